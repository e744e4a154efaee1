"""The guest kernel's memory management, as far as the five mechanisms see it.

Zone watermarks follow mm/page_alloc.c (``init_per_zone_wmark_min``, ``__setup_per_zone_wmarks``):
``min_free_kbytes = sqrt(lowmem_kbytes * 16)`` clamped to [128, 262144]; each zone's share of it is its
``min``; ``low = min + max(min / 4, managed * watermark_scale_factor / 10000)`` and ``high = min + 2 x``
that step (``watermark_scale_factor`` 10). ZONE_MOVABLE gets ``clamp(managed / 1024, 32, 128)`` as min.

Allocation follows the page allocator's shape: the fast path takes pages while a zone stays above its
low watermark; then kswapd is woken and reclaims page cache toward the high watermark; the slow path may
go down to the min watermark; then direct reclaim; then, unless ``__GFP_NORETRY`` (balloon pages), the
OOM path: the OOM notifier chain (virtio-balloon's deflate-on-oom), and if it freed nothing, the OOM
killer. The guest has no swap, so anonymous and shmem pages are never reclaimed: only page cache is.

Simplifications (stated here, not hidden): reclaim is instantaneous and takes the oldest file pages
first (one LRU, no active/inactive split); the OOM killer picks the largest killable anonymous
"process"; slab is not reclaimable; lowmem_reserve is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from labkit.errors import GuestError
from labkit.model.buddy import ZoneAllocator
from labkit.model.host import Host, HostVM, ascending_run
from labkit.model.pages import GuestMemory, PageFlag, PageState

SWAP_CLUSTER_MAX = 32  # include/linux/swap.h: reclaim batch
WATERMARK_SCALE_FACTOR = 10  # mm/page_alloc.c default (0.1 % of the zone)
MIN_FREE_KBYTES_MAX = 262144  # mm/page_alloc.c init_per_zone_wmark_min upper clamp
MIN_FREE_KBYTES_MIN = 128

FILE_STATES = (PageState.FILE_CLEAN, PageState.FILE_DIRTY)
FREE = int(PageState.FREE)  # plain ints index numpy arrays faster than IntEnum members
FILE_CLEAN = int(PageState.FILE_CLEAN)
FILE_DIRTY = int(PageState.FILE_DIRTY)


@dataclass
class Watermarks:
    min: int
    low: int
    high: int


@dataclass
class Handle:
    """A guest allocation a workload made: a process's anonymous memory, a tmpfs file or a file."""

    id: int
    kind: str  # "anon", "shmem", "file", or the kernel's own "kernel"
    size: int  # bytes asked for
    pages: np.ndarray  # PFNs currently holding it (file handles lose pages to reclaim)
    name: str = ""
    killable: bool = True
    alive: bool = True
    created_ms: float = 0.0
    _run: tuple | None = field(default=None, repr=False, compare=False)

    def run_start(self) -> int | None:
        """The first PFN if ``pages`` is one ascending run, else None; remembered for this very
        ``pages`` array (a process writes the same memory again and again)."""
        pages = self.pages
        if self._run is None or self._run[0] is not pages:
            self._run = (pages, int(pages[0]) if len(pages) and ascending_run(pages) else None)
        return self._run[1]


@dataclass
class VmStat:
    """The /proc/vmstat counters the balloon's stats and the notebooks read."""

    pgfault: int = 0
    pgmajfault: int = 0
    pswpin: int = 0
    pswpout: int = 0
    oom_kill: int = 0
    allocstall: int = 0
    pgscan_kswapd: int = 0
    pgscan_direct: int = 0
    pgsteal_kswapd: int = 0
    pgsteal_direct: int = 0
    pgwriteback: int = 0
    oom_events: int = 0
    extra: dict = field(default_factory=dict)


def compute_watermarks(mem: GuestMemory, managed: np.ndarray) -> list[Watermarks]:
    """Per-zone min/low/high watermarks in pages, as ``__setup_per_zone_wmarks`` computes them."""
    lowmem = int(sum(m for m, z in zip(managed, mem.zones, strict=True) if not z.movable))
    lowmem_kbytes = lowmem * 4
    min_free_kbytes = int(math.isqrt(lowmem_kbytes * 16))
    min_free_kbytes = min(max(min_free_kbytes, MIN_FREE_KBYTES_MIN), MIN_FREE_KBYTES_MAX)
    pages_min = min_free_kbytes // 4
    marks = []
    for m, z in zip(managed, mem.zones, strict=True):
        m = int(m)
        if z.movable:
            zmin = min(max(m // 1024, SWAP_CLUSTER_MAX), 128)
        else:
            zmin = pages_min * m // max(lowmem, 1)
        step = max(zmin // 4, m * WATERMARK_SCALE_FACTOR // 10000)
        marks.append(Watermarks(zmin, zmin + step, zmin + 2 * step))
    return marks


class Kernel:
    """A guest kernel over a :class:`GuestMemory`, backed by a :class:`Host`.

    Devices hook in the way drivers do: ``oom_notifiers`` (``register_oom_notifier``),
    ``free_hooks`` (``page_reporting_notify_free``), ``alloc_hooks`` and ``adjust_managed_page_count``.
    """

    def __init__(self, mem: GuestMemory, host: Host, name: str = "vm0",
                 clock: Callable[[], float] = lambda: 0.0):
        self.mem = mem
        self.host = host
        self.host_vm: HostVM = host.attach(mem, name)
        self.clock = clock
        self.allocators = [ZoneAllocator(mem, z) for z in mem.zones]
        self.managed_adjust = 0  # adjust_managed_page_count() total (balloon without deflate-on-oom)
        self.vmstat = VmStat()
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1
        self.oom_notifiers: list[Callable[[], int]] = []
        self.free_hooks: list[Callable[[np.ndarray], None]] = []
        # alloc_hooks: called with the PFNs just allocated, before PageReported is cleared on them
        self.alloc_hooks: list[Callable[[np.ndarray], None]] = []
        # shrinkers: called by reclaim with the pages still wanted; return pages freed
        self.shrinkers: list[Callable[[int], int]] = []
        # remap hooks: page owners outside the handles (the balloon list) follow migration
        self.remap_hooks: list[Callable[[np.ndarray, np.ndarray], None]] = []
        # unmovable holders: each returns PFNs its owner holds off the LRU and off the movable
        # lists, so migration cannot isolate them (balloon pages between balloon_page_list_dequeue
        # and release, an Out-of-puff fill's local list): alloc_contig_range fails -EBUSY on them
        self.unmovable_holders: list[Callable[[], np.ndarray]] = []
        # PFN ranges [start, end) isolated by start_isolate_page_range (MIGRATE_ISOLATE pageblocks):
        # a page freed into one stays isolated (PageOffline here), off the free lists
        self.isolated: list[tuple[int, int]] = []
        self.hotplug = None  # MemoryHotplug, when the guest has hot-pluggable memory
        self.dmesg: list[tuple[float, str]] = []
        self.panicked: str | None = None
        self._zonelists: dict = {}
        self._zonelists_of: list | None = None
        self._zonelists_len = 0
        self.watermarks = compute_watermarks(mem, self.zone_managed())

    # --- accounting ---------------------------------------------------------------------------
    def zone_managed(self) -> np.ndarray:
        c = self.mem.counts
        return c.sum(axis=1) - c[:, PageState.RESERVED] - c[:, PageState.OFFLINE] - c[
            :, PageState.ABSENT]

    def totalram_pages(self) -> int:
        """MemTotal in pages: managed pages, less what drivers took out of the count."""
        return int(self.zone_managed().sum()) + self.managed_adjust

    def adjust_managed_page_count(self, delta: int) -> None:
        self.managed_adjust += delta

    def log(self, message: str) -> None:
        self.dmesg.append((self.clock(), message))

    def zone_free(self, zone_index: int) -> int:
        return int(self.mem.counts[zone_index, FREE])

    def zonelist(self, movable: bool, node: int | None) -> tuple[int, ...]:
        """Zones to try, in order: the preferred node first; MOVABLE before NORMAL for movable."""
        if self._zonelists_of is not self.mem.zones or self._zonelists_len != len(self.mem.zones):
            # built once per zone layout (every allocation asks: hashing the zones each time costs)
            self._zonelists = {}
            self._zonelists_of, self._zonelists_len = self.mem.zones, len(self.mem.zones)
        key = (movable, node)
        cached = self._zonelists.get(key)
        if cached is None:
            cached = self._zonelists[key] = tuple(self._build_zonelist(movable, node))
        return cached

    def _build_zonelist(self, movable: bool, node: int | None) -> list[int]:
        nodes = self.mem.nodes
        preferred = nodes[0] if node is None else node
        order = [preferred] + [n for n in nodes if n != preferred]
        out = []
        for n in order:
            for i, z in enumerate(self.mem.zones):
                if z.node == n and z.movable and movable:
                    out.append(i)
            for i, z in enumerate(self.mem.zones):
                if z.node == n and not z.movable:
                    out.append(i)
        return out

    # --- allocation ---------------------------------------------------------------------------
    def _take(self, zones: tuple[int, ...], n: int, mark: str, state: PageState,
              parts: list[np.ndarray]) -> int:
        """Take up to ``n`` pages from zones above watermark ``mark``, marking them at once;
        appends them to ``parts`` and returns how many."""
        got = 0
        counts = self.mem.counts
        for zi in zones:
            if got >= n:
                break
            headroom = int(counts[zi, FREE]) - getattr(self.watermarks[zi], mark)
            if headroom <= 0:
                continue
            pfns = self.allocators[zi].take(min(n - got, headroom))
            self.mem.move_known(pfns, PageState.FREE, state, zi)  # the allocator hands out FREE pages
            parts.append(pfns)
            got += len(pfns)
        return got

    def alloc_pages(self, n: int, state: PageState, *, movable: bool = True, node: int | None = None,
                    noretry: bool = False) -> np.ndarray:
        """Allocate ``n`` order-0 pages into ``state``; returns their PFNs.

        With ``noretry`` (``__GFP_NORETRY``) the allocation gives up after one direct reclaim
        and may return fewer pages; otherwise it goes through the OOM path until it succeeds.
        """
        if self.panicked:
            raise GuestError(f"the guest kernel panicked: {self.panicked}")
        zones = self.zonelist(movable, node)
        parts: list[np.ndarray] = []
        need = n - self._take(zones, n, "low", state, parts)
        if need > 0:
            self._kswapd(zones)
            need -= self._take(zones, need, "min", state, parts)
        if need > 0:
            self.vmstat.allocstall += 1
            self._reclaim(zones, need, direct=True)
            need -= self._take(zones, need, "min", state, parts)
        while need > 0 and not noretry:
            try:
                self._out_of_memory(zones)
            except GuestError:  # the kernel panicked: the pages taken so far are nobody's
                for pfns in parts:
                    self.free_pages(pfns, was=state)
                raise
            need -= self._take(zones, need, "min", state, parts)
        pfns = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
                else np.zeros(0, dtype=np.int64))
        for hook in self.alloc_hooks:  # free page reporting: a split reported block loses the flag
            hook(pfns)
        # PageReported is cleared when a page leaves the free list (del_page_from_free_list)
        self.mem.clear_flag(pfns, PageFlag.REPORTED)
        return pfns

    def free_pages(self, pfns: np.ndarray, was: PageState | None = None) -> None:
        """Return pages to the buddy allocator (``__free_pages``). ``was``: the state every page is
        in, when the caller knows it (the balloon's pages are BALLOON): spares reading them."""
        if len(pfns) == 0:
            return
        if self.isolated:
            pfns = self._free_isolated(pfns)
            if len(pfns) == 0:
                return
        zone = 0 if len(self.mem.zones) == 1 else self.mem._single_zone(pfns)
        if was is not None and zone is not None:
            self.mem.move_known(pfns, was, PageState.FREE, zone)
        else:
            self.mem.set_state(pfns, PageState.FREE)
        if zone is not None:  # the common case: one call, no per-page zone lookup
            self.allocators[zone].freed(pfns)
        else:
            zone_ids = self.mem.zone_index_of(pfns)
            for zi in np.flatnonzero(np.bincount(zone_ids + 1)) - 1:  # not np.unique: no sort/hash
                self.allocators[int(zi)].freed(pfns[zone_ids == zi])
        for hook in self.free_hooks:
            hook(pfns)

    def _free_isolated(self, pfns: np.ndarray) -> np.ndarray:
        """Pages freed into an isolated range go to the MIGRATE_ISOLATE free list, which nothing
        allocates from (mm/page_alloc.c ``__free_one_page`` with the pageblock's isolate type): they
        stay PageOffline until the range is claimed or un-isolated. Returns the other pages."""
        inside = np.zeros(len(pfns), dtype=bool)
        for a, b in self.isolated:  # a loop over ranges (one at a time in practice), not pages
            inside |= (pfns >= a) & (pfns < b)
        if inside.any():
            self.mem.set_state(pfns[inside], PageState.OFFLINE)
            return pfns[~inside]
        return pfns

    def held_unmovable(self, start: int, end: int) -> bool:
        """Does an owner hold a page of [start, end) where migration cannot isolate it?"""
        for holder in self.unmovable_holders:
            held = holder()
            if len(held) and np.count_nonzero((held >= start) & (held < end)):
                return True
        return False

    def recompute_watermarks(self) -> None:
        """setup_per_zone_wmarks after memory was onlined or offlined."""
        self.watermarks = compute_watermarks(self.mem, self.zone_managed())

    def remap_pages(self, old: np.ndarray, new: np.ndarray) -> None:
        """Page migration moved ``old[i]`` to ``new[i]``: owners follow (handles, remap_hooks)."""
        order = np.argsort(old)
        old_sorted, new_sorted = old[order], new[order]
        for h in self.handles.values():
            if len(h.pages) == 0:
                continue
            at = np.searchsorted(old_sorted, h.pages)
            at[at == len(old_sorted)] = 0
            hit = old_sorted[at] == h.pages
            if hit.any():
                h.pages = h.pages.copy()
                h.pages[hit] = new_sorted[at[hit]]
        for hook in self.remap_hooks:
            hook(old_sorted, new_sorted)

    def touch(self, pfns: np.ndarray, run_start: int | None = None) -> None:
        """The guest wrote these pages: the host backs them (and dirty-logs them in a migration).
        ``run_start``: the caller knows ``pfns`` is one ascending run from there."""
        self.host.touch(self.host_vm, pfns, run_start)

    # --- reclaim and OOM ----------------------------------------------------------------------
    def _kswapd(self, zones: list[int]) -> None:
        """kswapd: reclaim page cache until the zones are back above their high watermark."""
        short = sum(max(0, self.watermarks[z].high - self.zone_free(z)) for z in zones)
        if short > 0:
            self._reclaim(zones, short, direct=False)

    def _reclaim(self, zones: list[int], n: int, *, direct: bool) -> int:
        """Reclaim at least ``n`` pages (in SWAP_CLUSTER_MAX batches) of page cache, oldest first."""
        target = -(-n // SWAP_CLUSTER_MAX) * SWAP_CLUSTER_MAX
        freed_total = 0
        zone_list = list(zones)
        # oldest first: ``handles`` is in creation order already (a dict keeps insertion order, and
        # new_handle stamps created_ms from a clock that only moves forward), so no sort is needed
        files = [h for h in self.handles.values() if h.kind == "file" and h.alive and len(h.pages)]
        for clean_only in (True, False):
            for h in files:
                if freed_total >= target:
                    break
                pages = h.pages
                if len(pages) == 0:
                    continue
                st = self.mem.state[pages]
                reclaimable = (st == FILE_CLEAN) if clean_only else (st == FILE_CLEAN) | (st == FILE_DIRTY)
                if len(self.mem.zones) > 1:
                    reclaimable &= np.isin(self.mem.zone_index_of(pages), zone_list)
                idx = np.flatnonzero(reclaimable)[: target - freed_total]
                if len(idx) == 0:
                    continue
                victims = pages[idx]
                if not clean_only:
                    self.vmstat.pgwriteback += int(np.count_nonzero(st[idx] == FILE_DIRTY))
                h.pages = np.delete(pages, idx)
                self.free_pages(victims)
                freed_total += len(victims)
        for shrinker in self.shrinkers:  # e.g. virtio-balloon's free page hint shrinker
            if freed_total >= n:
                break
            freed_total += shrinker(n - freed_total)
        if direct:
            self.vmstat.pgscan_direct += freed_total
            self.vmstat.pgsteal_direct += freed_total
        else:
            self.vmstat.pgscan_kswapd += freed_total
            self.vmstat.pgsteal_kswapd += freed_total
        return freed_total

    def _out_of_memory(self, zones: list[int]) -> None:
        """``out_of_memory()``: the notifier chain first; if it freed anything, no kill."""
        self.vmstat.oom_events += 1
        freed = sum(notifier() for notifier in self.oom_notifiers)
        if freed > 0:
            return
        victims = [h for h in self.handles.values() if h.alive and h.killable and h.kind == "anon"
                   and len(h.pages)]
        if not victims:
            self.panicked = "System is deadlocked on memory"
            self.log("Kernel panic - not syncing: System is deadlocked on memory")
            raise GuestError("Out of memory and no killable processes: the guest kernel panicked")
        victim = max(victims, key=lambda h: len(h.pages))
        self.vmstat.oom_kill += 1
        self.log(f"Out of memory: Killed process {victim.id} ({victim.name or victim.kind}) "
                 f"anon-rss:{len(victim.pages) * 4}kB")
        pages = victim.pages
        victim.pages = np.zeros(0, dtype=np.int64)
        victim.alive = False
        self.free_pages(pages)

    # --- /proc/meminfo ------------------------------------------------------------------------
    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo fields in kB, computed as fs/proc/meminfo.c and si_mem_available() do."""
        t = self.mem.totals()
        kb = 4
        free = int(t[PageState.FREE])
        file_pages = int(t[PageState.FILE_CLEAN] + t[PageState.FILE_DIRTY])
        wmark_low = sum(w.low for w in self.watermarks)
        totalreserve = sum(w.high for w in self.watermarks)
        pagecache = file_pages - min(file_pages // 2, wmark_low)
        available = max(0, free - totalreserve + pagecache)
        kernel = int(t[PageState.KERNEL])
        cached = file_pages + int(t[PageState.SHMEM])
        return {
            "MemTotal": self.totalram_pages() * kb,
            "MemFree": free * kb,
            "MemAvailable": available * kb,
            "Buffers": 0,
            "Cached": cached * kb,
            "SwapCached": 0,
            "Active(file)": file_pages // 2 * kb,
            "Inactive(file)": (file_pages - file_pages // 2) * kb,
            "SwapTotal": 0,
            "SwapFree": 0,
            "Dirty": int(t[PageState.FILE_DIRTY]) * kb,
            "Writeback": 0,
            "AnonPages": int(t[PageState.ANON]) * kb,
            "Shmem": int(t[PageState.SHMEM]) * kb,
            "Slab": kernel * kb,
            "SReclaimable": 0,
            "SUnreclaim": kernel * kb,
        }
