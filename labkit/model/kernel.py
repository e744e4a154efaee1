"""The guest kernel's memory management, as far as the five mechanisms see it.

It boots as the live backend's kernel does (Debian's 6.1 cloud kernel on q35; the knobs and their
defaults are :mod:`labkit.model.bootparams`): zones DMA / DMA32 / Normal (:mod:`labkit.model.layout`),
watermarks, ``lowmem_reserve`` and per-CPU list sizes as mm/page_alloc.c computes them
(:mod:`labkit.model.watermarks`, THP's ``set_recommended_min_free_kbytes`` included), per-CPU page
lists in front of the buddy allocator (:mod:`labkit.model.pcp`), and ``init_on_alloc`` zeroing.

Allocation follows ``__alloc_pages``: an allocation may use the zones up to its ``highest_zoneidx``
(ZONE_MOVABLE for user and balloon pages, ZONE_NORMAL for the kernel's own), highest zone first, on
the preferred node first (``zonelist``); a zone is used while its free pages stay above the
watermark plus its ``lowmem_reserve`` for that class (``zone_watermark_fast``). The fast path
checks the low watermark; then kswapd is woken and reclaims toward the high watermark; the slow
path may go down to the min watermark; then direct reclaim (:mod:`labkit.model.reclaim`), and if
that made progress but did not help, ``drain_all_pages`` and one more try; then, unless
``__GFP_NORETRY`` (balloon pages), the OOM path: the OOM notifier chain (virtio-balloon's
deflate-on-oom), and if it freed nothing, the OOM killer. With ``init_on_alloc=1`` every allocated
page is zeroed: written, so the host backs it (docs/mechanisms.md §10.4).

Simplifications (stated here, not hidden): reclaim is instantaneous (see its module); the OOM killer
picks the largest killable anonymous "process"; no migratetypes, compaction or watermark boosting;
every guest activity runs on CPU 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from labkit.errors import GuestError
from labkit.model import procfs
from labkit.model import watermarks as wm
from labkit.model.allocator import ZoneAllocator
from labkit.model.bootparams import DEFAULTS, BootParams
from labkit.model.handles import Handle
from labkit.model.host import Host, HostVM
from labkit.model.kmem import KernelMemory
from labkit.model.pages import PAGEBLOCK_ORDER, GuestMemory, PageFlag, PageState
from labkit.model.pcp import PerCpuPages
from labkit.model.reclaim import SWAP_CLUSTER_MAX, Shrinker, reclaim
from labkit.model.watermarks import Watermarks
from labkit.model.zone_setup import ZoneSetup
from labkit.units import PAGE_SIZE

WATERMARK_SCALE_FACTOR = 10  # mm/page_alloc.c default (0.1 % of the zone)
FILE_STATES = (PageState.FILE_CLEAN, PageState.FILE_DIRTY)
FREE = int(PageState.FREE)  # plain ints index numpy arrays faster than IntEnum members
PCP = int(PageState.PCP)
ZONE_NORMAL, ZONE_MOVABLE = wm.ZONE_NORMAL, wm.ZONE_MOVABLE


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
    drain_all_pages: int = 0
    extra: dict = field(default_factory=dict)


class Kernel(ZoneSetup, KernelMemory):
    """A guest kernel over a :class:`GuestMemory`, backed by a :class:`Host`, booted with
    ``params`` (:class:`~labkit.model.bootparams.BootParams`).

    Devices hook in the way drivers do: ``oom_notifiers`` (``register_oom_notifier``),
    ``free_hooks`` (``page_reporting_notify_free``), ``alloc_hooks``, ``shrinkers``
    (``register_shrinker``) and ``adjust_managed_page_count``. ``phys_pfn`` maps a page index to
    its physical frame (for ``/proc/zoneinfo``).
    """

    def __init__(self, mem: GuestMemory, host: Host, name: str = "vm0",
                 clock: Callable[[], float] = lambda: 0.0, params: BootParams = DEFAULTS,
                 phys_pfn: Callable[[int], int] = lambda pfn: pfn):
        self.mem = mem
        self.host = host
        self.host_vm: HostVM = host.attach(mem, name)
        self.clock = clock
        self.params = params
        self.phys_pfn = phys_pfn
        self.allocators = [ZoneAllocator(mem, z) for z in mem.zones]
        self.pcp = [[PerCpuPages() for _ in range(params.nr_cpus)] for _ in mem.zones]
        self.managed_adjust = 0  # adjust_managed_page_count() total (balloon without deflate-on-oom)
        self.vmstat = VmStat()
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1
        self.oom_notifiers: list[Callable[[], int]] = []
        self.free_hooks: list[Callable[[np.ndarray], None]] = []
        # alloc_hooks: called with the PFNs just allocated, before PageReported is cleared on them
        self.alloc_hooks: list[Callable[[np.ndarray], None]] = []
        self.shrinkers: list[Shrinker] = []
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
        self.reclaim_active = False  # ZONE_RECLAIM_ACTIVE on the zones being reclaimed
        self.slab_reclaimable = 0  # pages of KERNEL that count as SReclaimable
        self.page_table_pages = 0
        self._dcache: Handle | None = None
        self.slab_per_op_pages = 0  # what each workload step leaves in the dcache (boot sets it)
        self._zonelists: dict = {}
        self._zonelists_of: list | None = None
        self._zonelists_len = 0
        self.min_free_kbytes = 0
        self.user_min_free_kbytes = -1
        self.khugepaged = False  # THP enabled and khugepaged started (hugepage_init)
        n = len(mem.zones)
        self.watermarks = [Watermarks(0, 0, 0) for _ in range(n)]
        self.lowmem_reserve = np.zeros((n, wm.MAX_NR_ZONES), dtype=np.int64)
        self.totalreserve_pages = 0
        self.init_per_zone_wmark_min()

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

    def pcp_pages(self, zone_index: int | None = None) -> int:
        """Pages on per-CPU lists (of one zone, or all)."""
        zones = range(len(self.mem.zones)) if zone_index is None else (zone_index,)
        return sum(p.count for zi in zones for p in self.pcp[zi])

    # --- zonelists ----------------------------------------------------------------------------
    def zonelist(self, movable: bool, node: int | None) -> tuple[int, ...]:
        """Zones an allocation may use, in the order it tries them: up to ZONE_MOVABLE for movable
        (user, balloon) pages, up to ZONE_NORMAL for the kernel's own, highest zone first, the
        preferred node first (``build_zonelists``, node order)."""
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
        highest = ZONE_MOVABLE if movable else ZONE_NORMAL
        out = []
        for n in [preferred] + [n for n in nodes if n != preferred]:
            mine = [(z.idx, i) for i, z in enumerate(self.mem.zones) if z.node == n and z.idx <= highest]
            out += [i for _, i in sorted(mine, reverse=True)]
        return out

    @staticmethod
    def classzone(movable: bool) -> int:
        """``gfp_zone()``: the highest zone index an allocation may use."""
        return ZONE_MOVABLE if movable else ZONE_NORMAL

    def watermark_threshold(self, zone_index: int, mark: str, classzone: int) -> int:
        """``zone_watermark_ok`` (order 0) passes while free pages stay above this."""
        return getattr(self.watermarks[zone_index], mark) + int(self.lowmem_reserve[zone_index, classzone])

    # --- allocation ---------------------------------------------------------------------------
    def _take(self, zones: tuple[int, ...], n: int, mark: str, state: PageState,
              parts: list[np.ndarray], classzone: int) -> int:
        """Take up to ``n`` pages from zones above watermark ``mark``, marking them at once;
        appends them to ``parts`` and returns how many."""
        got = 0
        counts = self.mem.counts
        now = self.clock()
        for zi in zones:
            if got >= n:
                break
            headroom = int(counts[zi, FREE]) - self.watermark_threshold(zi, mark, classzone)
            if headroom <= 0:
                continue
            got += self._rmqueue(zi, n - got, headroom, state, parts, now, classzone != ZONE_MOVABLE)
        return got

    def _rmqueue(self, zi: int, want: int, headroom: int, state: PageState,
                 parts: list[np.ndarray], now: float, unmovable: bool) -> int:
        """``rmqueue_pcplist`` ``want`` times: the CPU's list first (newest first), refilled by
        ``batch`` pages from the buddy allocator when empty; each page needs the zone above its
        watermark (``headroom`` pages above it now), so the last refill may strand pages there."""
        pcp = self.pcp[zi][0]
        mem = self.mem
        pb = mem.pageblock_unmovable
        cached = pcp.take(want, now, lambda pages: pb[pages >> PAGEBLOCK_ORDER] == unmovable)
        if len(cached):
            mem.move_known(cached, PageState.PCP, state, zi)
            parts.append(cached)
        need = want - len(cached)
        if need <= 0:
            return len(cached)
        batch = max(1, pcp.batch)
        max_refills = -(-headroom // batch)
        refills = -(-need // batch)
        if refills <= max_refills:
            usable = need
        else:
            refills, usable = max_refills, (max_refills - 1) * batch + 1
        pages = self.allocators[zi].take(refills * batch, unmovable)
        # rmqueue_bulk: the whole batch leaves the free lists (del_page_from_free_list clears
        # PageReported), the pages the allocation does not use now included
        for hook in self.alloc_hooks:  # free page reporting: a split reported block loses the flag
            hook(pages)
        mem.clear_flag(pages, PageFlag.REPORTED)
        use = min(usable, len(pages))
        mem.move_known(pages[:use], PageState.FREE, state, zi)  # the buddy hands out FREE pages
        leftover = pages[use:]
        if len(leftover):
            mem.move_known(leftover, PageState.FREE, PageState.PCP, zi)
            pcp.refill(leftover)
        if use:
            parts.append(pages[:use])
        return len(cached) + use

    def alloc_pages(self, n: int, state: PageState, *, movable: bool = True, node: int | None = None,
                    noretry: bool = False) -> np.ndarray:
        """Allocate ``n`` order-0 pages into ``state``; returns their PFNs.

        With ``noretry`` (``__GFP_NORETRY``) the allocation gives up after one direct reclaim
        and may return fewer pages; otherwise it goes through the OOM path until it succeeds.
        With ``init_on_alloc`` the pages are zeroed: the host backs them.
        """
        if self.panicked:
            raise GuestError(f"the guest kernel panicked: {self.panicked}")
        zones = self.zonelist(movable, node)
        cz = self.classzone(movable)
        parts: list[np.ndarray] = []
        need = n - self._take(zones, n, "low", state, parts, cz)
        if need > 0:
            self._kswapd(zones, cz)
            need -= self._take(zones, need, "min", state, parts, cz)
        if need > 0:
            self.vmstat.allocstall += 1
            progress = self._reclaim(zones, need, direct=True)
            if progress:
                need -= self._take(zones, need, "min", state, parts, cz)
                if need > 0:  # __alloc_pages_direct_reclaim: drain the pcp lists, retry once
                    self.drain_all_pages()
                    need -= self._take(zones, need, "min", state, parts, cz)
        while need > 0 and not noretry:
            try:
                self._out_of_memory(zones)
            except GuestError:  # the kernel panicked: the pages taken so far are nobody's
                for pfns in parts:
                    self.free_pages(pfns, was=state)
                raise
            need -= self._take(zones, need, "min", state, parts, cz)
        pfns = (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
                else np.zeros(0, dtype=np.int64))
        if self.params.init_on_alloc:  # post_alloc_hook -> kernel_init_pages: zeroed
            self.touch(pfns, zeroed=True)
        return pfns

    def free_pages(self, pfns: np.ndarray, was: PageState | None = None, *,
                   to_buddy: bool = False) -> None:
        """Free order-0 pages (``free_unref_page``): to the CPU's per-CPU list of their zone,
        which gives the oldest back to the buddy allocator in bulk when it is full. ``to_buddy``:
        straight to the buddy allocator (``__free_pages_core`` of onlined memory, order-10 hint
        blocks). ``was``: the state every page is in, when the caller knows it."""
        if len(pfns) == 0:
            return
        if self.isolated:
            pfns = self._free_isolated(pfns)
            if len(pfns) == 0:
                return
        zone = 0 if len(self.mem.zones) == 1 else self.mem._single_zone(pfns)
        if zone is not None:  # the common case: one call, no per-page zone lookup
            groups = [(zone, pfns)]
        else:
            zone_ids = self.mem.zone_index_of(pfns)
            groups = [(int(zi), pfns[zone_ids == zi])  # not np.unique: no sort/hash
                      for zi in np.flatnonzero(np.bincount(zone_ids + 1)) - 1]
        now = self.clock()
        for zi, part in groups:
            if zi < 0:
                raise ValueError(f"freeing pages in no zone: {part[:8].tolist()}")
            target = PageState.FREE if to_buddy else PageState.PCP
            if was is not None:
                self.mem.move_known(part, was, target, zi)
            else:
                self.mem.set_state(part, target)
            flushed = part if to_buddy else self.pcp[zi][0].free(part, now, self.reclaim_active)
            if not to_buddy and len(flushed):
                self.mem.move_known(flushed, PageState.PCP, PageState.FREE, zi)
            self._to_buddy(zi, flushed)

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

    def _to_buddy(self, zi: int, pfns: np.ndarray) -> None:
        """Pages (already FREE) reached the buddy free lists: merges and reporting notifications."""
        if len(pfns):
            self.allocators[zi].freed(pfns)
            for hook in self.free_hooks:
                hook(pfns)

    def drain_all_pages(self, zone_index: int | None = None) -> int:
        """``drain_all_pages``: every per-CPU list (of one zone) back to the buddy allocator."""
        drained = 0
        zones = range(len(self.mem.zones)) if zone_index is None else (zone_index,)
        for zi in zones:
            for pcp in self.pcp[zi]:
                pages = pcp.drain()
                if len(pages):
                    self.mem.move_known(pages, PageState.PCP, PageState.FREE, zi)
                    self._to_buddy(zi, pages)
                    drained += len(pages)
        self.vmstat.drain_all_pages += 1
        return drained

    def new_handle(self, kind: str, pfns: np.ndarray, size: int, *, name: str = "",
                   killable: bool = True) -> Handle:
        """A new owner of ``pfns`` (a process's memory, a file, a kernel cache) with the next id."""
        h = Handle(self._next_handle, kind, size or len(pfns) * PAGE_SIZE, pfns, name=name,
                   killable=killable, created_ms=self.clock())
        self.handles[h.id] = h
        self._next_handle += 1
        return h

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

    def touch(self, pfns: np.ndarray, run_start: int | None = None, zeroed: bool = False) -> None:
        """The guest wrote these pages: the host backs them (and dirty-logs them in a migration).
        ``run_start``: the caller knows ``pfns`` is one ascending run from there; ``zeroed``: it
        only zeroed them (the content still reads as zero)."""
        self.host.touch(self.host_vm, pfns, run_start, zeroed)

    # --- reclaim and OOM ----------------------------------------------------------------------
    def _kswapd(self, zones: tuple[int, ...], classzone: int) -> None:
        """kswapd: reclaim page cache until the zones are back above their high watermark."""
        short = sum(max(0, self.watermark_threshold(z, "high", classzone) - self.zone_free(z))
                    for z in zones)
        if short > 0:
            self._reclaim(zones, short, direct=False)

    def _reclaim(self, zones: tuple[int, ...], n: int, *, direct: bool) -> int:
        """Reclaim at least ``n`` pages (:func:`labkit.model.reclaim.reclaim`); returns the LRU
        pages reclaimed (``did_some_progress``)."""
        lru, shrunk = reclaim(self, zones, n)
        freed_total = lru + shrunk
        if direct:
            self.vmstat.pgscan_direct += freed_total
            self.vmstat.pgsteal_direct += freed_total
        else:
            self.vmstat.pgscan_kswapd += freed_total
            self.vmstat.pgsteal_kswapd += freed_total
        return freed_total

    def _out_of_memory(self, zones: tuple[int, ...]) -> None:
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
        self.release_overhead(victim)
        self.exit_mm()


    # --- /proc ----------------------------------------------------------------------------------
    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo fields in kB (:func:`labkit.model.procfs.meminfo`)."""
        return procfs.meminfo(self)

    def zoneinfo(self) -> list[dict]:
        """/proc/zoneinfo's fields per populated zone (:func:`labkit.model.procfs.zoneinfo`)."""
        return procfs.zoneinfo(self)


assert SWAP_CLUSTER_MAX and WATERMARK_SCALE_FACTOR
