"""A guest's physical memory as two numpy bytes a page.

``state`` says who owns each 4 KiB page (exactly one state per page); ``flags`` carries what the
host and the free-page mechanisms know about it. A 1 TiB guest is 2 x 256 Mi bytes = 512 MiB.

Layout: the page index is the guest page frame number (PFN) in a compacted physical address space
(no PCI hole below 4 GiB; :mod:`labkit.model.layout` maps it to real frames). Boot zones are
contiguous PFN ranges (ZONE_DMA, ZONE_DMA32, ZONE_NORMAL as on an x86-64 q35 guest, per NUMA node),
aligned to ``MAX_PAGE_ORDER`` blocks, so buddies never merge across a zone; hot-plugged memory joins a
zone one Linux memory block at a time (``block_pages``: 128 MiB, or what ``probe_memory_block_size``
picks for guests of 64 GiB and more).

>>> mem = GuestMemory(1 << 18, zones=[Zone("Normal", 0, 0, 1 << 18)])
>>> int(mem.count(PageState.FREE)) == 1 << 18
True
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from labkit.units import MiB, PAGE_SIZE

MAX_PAGE_ORDER = 10  # include/linux/mmzone.h: largest buddy block, 4 MiB
NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1
PAGEBLOCK_ORDER = 9  # x86-64 pageblock_order = HPAGE_PMD_ORDER (2 MiB)
MEMORY_BLOCK_SIZE = 128 * MiB  # MIN_MEMORY_BLOCK_SIZE, arch/x86/mm/init_64.c (boot RAM < 64 GiB)
PAGES_PER_MEMORY_BLOCK = MEMORY_BLOCK_SIZE // PAGE_SIZE
STRUCT_PAGE_SIZE = 64  # bytes of memmap per 4 KiB page (include/linux/mm_types.h, x86-64)


class PageState(enum.IntEnum):
    """Who owns a page. One per page; the counts add up to the guest size."""

    FREE = 0  # on the buddy allocator's free lists
    RESERVED = 1  # memblock-reserved at boot (kernel image, memmap): never in MemTotal
    KERNEL = 2  # unmovable kernel allocations: slab, page tables, stacks
    ANON = 3  # anonymous process memory
    SHMEM = 4  # tmpfs / shared memory (counted in Cached and Shmem)
    FILE_CLEAN = 5  # page cache, clean
    FILE_DIRTY = 6  # page cache, dirty (needs writeback before reclaim)
    BALLOON = 7  # inflated into the virtio-balloon
    HINTED = 8  # held by the balloon driver as a free page hint (free_page_list)
    OFFLINE = 9  # PageOffline: virtio-mem unplugged or fake-offlined
    ABSENT = 10  # no memory here (not plugged, not added, or a hole in the e820 map)
    PCP = 11  # free, on a per-CPU page list: not in MemFree (NR_FREE_PAGES), not on the buddy lists


N_STATES = len(PageState)


class PageFlag(enum.IntFlag):
    """What else is known about a page, one bit each."""

    REPORTED = 1 << 0  # PageReported: free and reported to the host (mm/page_reporting.c)
    BACKED = 1 << 1  # the host has RAM behind this page (counts in QEMU's RSS)
    SWAPPED = 1 << 2  # the host swapped this page out (content lives in host swap)
    DIRTY_LOG = 1 << 3  # set in the migration dirty bitmap
    REFERENCED = 1 << 4  # host accessed bit, for the host's second-chance (clock) reclaim
    MOVABLE_PIN = 1 << 5  # a transiently pinned movable page (e.g. long-term GUP)
    ZEROED = 1 << 6  # backed, but all the guest wrote is zeros (init_on_alloc): reads as zero


# numpy looks up ``__array_ufunc__`` on the type of each operand of ``array == PageState.X``; on an
# Enum class a missing attribute goes through Python 3.11's EnumType.__getattr__, which made every
# such comparison cost ~10 us. ndarray's own ``__array_ufunc__`` is what numpy treats as "no
# override", so declaring it changes no result and makes the lookup a plain attribute read.
PageState.__array_ufunc__ = np.ndarray.__array_ufunc__
PageFlag.__array_ufunc__ = np.ndarray.__array_ufunc__


ZONE_INDEX = {"DMA": 0, "DMA32": 1, "Normal": 2, "Movable": 3}  # enum zone_type, x86-64


@dataclass(frozen=True)
class Zone:
    """A zone: a name ("DMA", "DMA32", "Normal" or "Movable"), its NUMA node and the PFN range
    [start, end) it spans at boot (hot-plugged blocks join it by ``GuestMemory.block_zone``)."""

    name: str
    node: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.name not in ZONE_INDEX:
            raise ValueError(f"zone name {self.name!r} is not one of {list(ZONE_INDEX)}")

    @property
    def pages(self) -> int:
        return self.end - self.start

    @property
    def movable(self) -> bool:
        return self.name == "Movable"

    @property
    def idx(self) -> int:
        """``zone_idx()``: ZONE_DMA 0, ZONE_DMA32 1, ZONE_NORMAL 2, ZONE_MOVABLE 3."""
        return ZONE_INDEX[self.name]


class GuestMemory:
    """State and flags of every page, the zone layout, and per-zone state counts kept up to date.

    All changes go through :meth:`set_state` (and the flag helpers), which keep ``counts`` exact
    without ever rescanning the arrays; :meth:`recount` rescans, for tests of that invariant.

    ``zones`` tile boot memory [0, boot end); ``hotplug_zones`` (ZONE_MOVABLE, and a ZONE_NORMAL
    for a node that has none at boot) own no pages until a hot-plugged memory block of
    ``block_pages`` pages joins them (:meth:`assign_block`).
    """

    def __init__(self, n_pages: int, zones: list[Zone], initial: PageState = PageState.FREE,
                 hotplug_zones: list[Zone] | None = None, block_pages: int = PAGES_PER_MEMORY_BLOCK):
        if n_pages <= 0:
            raise ValueError(f"a guest needs at least one page, got {n_pages}")
        if block_pages < PAGES_PER_MEMORY_BLOCK or block_pages & (block_pages - 1):
            raise ValueError(f"a memory block is a power of two of at least {MEMORY_BLOCK_SIZE >> 20} "
                             f"MiB, got {block_pages} pages")
        covered = sorted((z.start, z.end) for z in zones)
        boot_end = covered[-1][1]
        if covered[0][0] != 0 or boot_end > n_pages or any(
            a[1] != b[0] for a, b in zip(covered, covered[1:], strict=False)
        ) or any(a >= b for a, b in covered):
            raise ValueError(f"zones must tile [0, {n_pages}) without gaps, got {covered}")
        if boot_end < n_pages and not hotplug_zones:
            raise ValueError(f"zones must tile [0, {n_pages}) without gaps, got {covered}")
        self.n_pages = n_pages
        self.boot_pages = boot_end
        self.block_pages = block_pages
        self.zones = sorted(zones, key=lambda z: z.start) + list(hotplug_zones or [])
        self.n_boot_zones = len(zones)
        # np.zeros is calloc: pages never written stay unallocated (1 TiB guest: ~240 MiB less RSS)
        self.state = (np.zeros(n_pages, dtype=np.uint8) if initial == PageState.FREE
                      else np.full(n_pages, int(initial), dtype=np.uint8))
        self.flags = np.zeros(n_pages, dtype=np.uint8)
        self._zone_starts = np.array([z.start for z in self.zones[:len(zones)]], dtype=np.int64)
        self.counts = np.zeros((len(self.zones), N_STATES), dtype=np.int64)
        self.unzoned = np.zeros(N_STATES, dtype=np.int64)  # pages in no zone (not added)
        # Zone membership of hot-pluggable memory blocks: a hot-plugged block joins ZONE_NORMAL or
        # ZONE_MOVABLE when it is onlined (mm/memory_hotplug.c); -1: in no zone.
        self.block_zone: np.ndarray | None = None
        for i, z in enumerate(self.zones[:len(zones)]):
            self.counts[i, int(initial)] = z.pages
        if boot_end < n_pages:
            self.state[boot_end:] = int(PageState.ABSENT)
            self.unzoned[int(PageState.ABSENT)] = n_pages - boot_end
            self.block_zone = np.full(self.memory_blocks, -1, dtype=np.int16)
            self._first_hot_block = -(-boot_end // block_pages)
        # pageblock migratetype, one per 2 MiB: all MOVABLE at boot (memmap_init_range); the
        # allocator claims pageblocks for UNMOVABLE (labkit.model.allocator)
        self.pageblock_unmovable = np.zeros(-(-n_pages >> PAGEBLOCK_ORDER), dtype=bool)
        self.backed_pages = 0
        self.swapped_pages = 0

    # --- layout -------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[int]:
        return sorted({z.node for z in self.zones})

    def node_range(self, node: int) -> tuple[int, int]:
        zs = [z for z in self.zones if z.node == node and z.end > z.start]
        if not zs:
            raise ValueError(f"NUMA node {node} does not exist; nodes are {self.nodes}")
        return min(z.start for z in zs), max(z.end for z in zs)

    def zone_index_of(self, pfns: np.ndarray) -> np.ndarray:
        """Zone index of each PFN; -1 for pages in no zone (hot-pluggable space not yet added)."""
        pfns = np.asarray(pfns)
        by_span = np.searchsorted(self._zone_starts, pfns, side="right") - 1
        if self.block_zone is None:
            return by_span
        hot = pfns >= self.boot_pages
        if not hot.any():
            return by_span
        by_span[hot] = self.block_zone[pfns[hot] // self.block_pages]
        return by_span

    def zone_runs(self, zone_index: int) -> list[tuple[int, int]]:
        """The PFN ranges [start, end) that belong to a zone, ascending."""
        zone = self.zones[zone_index]
        runs = [(zone.start, zone.end)] if zone_index < self.n_boot_zones else []
        if self.block_zone is None:
            return runs
        member = np.concatenate([[False], self.block_zone == zone_index, [False]])
        edges = np.flatnonzero(np.diff(member.astype(np.int8)))
        for a, b in zip(edges[0::2], edges[1::2], strict=True):
            runs.append((int(a) * self.block_pages, min(int(b) * self.block_pages, self.n_pages)))
        return runs

    def assign_block(self, block: int, zone_index: int) -> None:
        """Move hot-plugged memory block ``block`` into zone ``zone_index`` (-1: no zone)."""
        if self.block_zone is None:
            raise ValueError("this guest has no hot-pluggable memory")
        if block < self._first_hot_block:
            raise ValueError(f"memory block {block} is boot memory; its zone is fixed")
        a = block * self.block_pages
        b = min(a + self.block_pages, self.n_pages)
        hist = np.bincount(self.state[a:b], minlength=N_STATES)
        old = int(self.block_zone[block])
        (self.unzoned if old < 0 else self.counts[old]).__isub__(hist)
        (self.unzoned if zone_index < 0 else self.counts[zone_index]).__iadd__(hist)
        self.block_zone[block] = zone_index

    def zone_span(self, zone_index: int) -> tuple[int, int]:
        """[zone_start_pfn, zone_end_pfn) in the page index: what the zone spans, holes included
        (an empty zone spans nothing: (0, 0))."""
        runs = [r for r in self.zone_runs(zone_index) if r[1] > r[0]]
        if not runs:
            return 0, 0
        return runs[0][0], runs[-1][1]

    @property
    def memory_blocks(self) -> int:
        return -(-self.n_pages // self.block_pages)

    # --- counts -------------------------------------------------------------------------------
    def count(self, state: PageState, zone: int | None = None) -> int:
        if zone is None:
            return int(self.counts[:, int(state)].sum() + self.unzoned[int(state)])
        return int(self.counts[zone, int(state)])

    def totals(self) -> np.ndarray:
        """Pages per state over the whole guest (length N_STATES)."""
        return self.counts.sum(axis=0) + self.unzoned

    def recount(self) -> np.ndarray:
        """Counts per zone and state, recomputed from the arrays (for invariant checks)."""
        out = np.zeros_like(self.counts)
        for i in range(len(self.zones)):
            for a, b in self.zone_runs(i):
                out[i] += np.bincount(self.state[a:b], minlength=N_STATES)
        return out

    def recount_unzoned(self) -> np.ndarray:
        """Counts of the pages in no zone, recomputed (for invariant checks)."""
        if self.block_zone is None:
            return np.zeros(N_STATES, dtype=np.int64)
        out = np.zeros(N_STATES, dtype=np.int64)
        for block in np.flatnonzero(self.block_zone < 0):
            if block < self._first_hot_block:
                continue
            a = int(block) * self.block_pages
            out += np.bincount(self.state[a:min(a + self.block_pages, self.n_pages)],
                               minlength=N_STATES)
        return out

    # --- changes ------------------------------------------------------------------------------
    def set_state(self, pfns: np.ndarray, new: PageState) -> None:
        """Move ``pfns`` (unique page numbers) to state ``new``, keeping the counts exact."""
        if len(pfns) == 0:
            return
        old = self.state[pfns]
        zone = self._single_zone(pfns)
        if zone is not None:
            self.counts[zone] -= np.bincount(old, minlength=N_STATES)
            self.counts[zone, int(new)] += len(pfns)
        else:
            rows = self.zone_index_of(pfns) + 1  # row 0: pages in no zone
            k, n = N_STATES, len(self.zones) + 1
            flat = np.bincount(rows * k + old, minlength=n * k).reshape(n, k)
            per_row = np.bincount(rows, minlength=n)
            self.unzoned -= flat[0]
            self.unzoned[int(new)] += per_row[0]
            self.counts -= flat[1:]
            self.counts[:, int(new)] += per_row[1:]
        self.state[pfns] = int(new)

    def move_known(self, pfns: np.ndarray, old: PageState, new: PageState, zone: int) -> None:
        """:meth:`set_state` for pages the caller knows are all in state ``old`` and in zone
        ``zone`` (the allocator's pages are FREE and in its zone): no gather, no histogram."""
        n = len(pfns)
        if n:
            row = self.counts[zone]
            row[int(old)] -= n
            row[int(new)] += n
            self.state[pfns] = int(new)

    def _single_zone(self, pfns: np.ndarray) -> int | None:
        """The zone holding all of ``pfns``, or None if they span zones."""
        if len(self.zones) == 1 and self.block_zone is None:
            return 0
        lo_pfn, hi_pfn = int(pfns.min()), int(pfns.max())
        lo, hi = self.zone_index_of(np.array([lo_pfn, hi_pfn]))
        if lo != hi or lo < 0:
            return None
        if hi_pfn >= self.boot_pages and self.block_zone is not None:
            if lo_pfn < self.boot_pages:
                return None
            # a foreign block may sit between the two ends
            first, last = lo_pfn // self.block_pages, hi_pfn // self.block_pages
            if last > first and (self.block_zone[first:last + 1] != lo).any():
                return None
        return int(lo)

    def set_range_state(self, start: int, end: int, new: PageState) -> None:
        """Move pages [start, end) to ``new``: like :meth:`set_state`, by slices (no index array)."""
        if end <= start:
            return
        boot = min(end, self.boot_pages)
        pieces = [(i, max(start, z.start), min(boot, z.end))
                  for i, z in enumerate(self.zones[:self.n_boot_zones])] if start < boot else []
        if end > self.boot_pages and self.block_zone is not None:
            # zone membership per memory block: one piece per block (a loop over blocks)
            a0 = max(start, self.boot_pages)
            edges = list(range(a0 - a0 % self.block_pages + self.block_pages, end, self.block_pages))
            bounds = [a0, *edges, end]
            pieces += [(int(self.block_zone[a // self.block_pages]), a, b)
                       for a, b in zip(bounds, bounds[1:], strict=False)]
        for i, a, b in pieces:
            if a < b:
                row = self.unzoned if i < 0 else self.counts[i]
                row -= np.bincount(self.state[a:b], minlength=N_STATES)
                row[int(new)] += b - a
        self.state[start:end] = int(new)

    def set_flag(self, pfns: np.ndarray, flag: PageFlag) -> None:
        self.flags[pfns] |= np.uint8(int(flag))

    def clear_flag(self, pfns: np.ndarray, flag: PageFlag) -> None:
        # int() first: IntFlag's own ~ and & go through the enum machinery (~5 us a call)
        self.flags[pfns] &= np.uint8(~int(flag) & 0xFF)

    def has_flag(self, pfns: np.ndarray | slice, flag: PageFlag) -> np.ndarray:
        return (self.flags[pfns] & np.uint8(flag)) != 0

    def pages_in(self, state: PageState, start: int = 0, end: int | None = None) -> np.ndarray:
        """PFNs in ``state`` within [start, end), ascending."""
        end = self.n_pages if end is None else end
        return np.flatnonzero(self.state[start:end] == int(state)) + start

    def bytes_per_state(self) -> dict[str, int]:
        return {s.name.lower(): int(n) * PAGE_SIZE for s, n in zip(PageState, self.totals(), strict=True)}
