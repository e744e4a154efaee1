"""Page reclaim in the guest kernel: the priority loop of mm/vmscan.c, on page cache and shrinkers.

``do_try_to_free_pages`` (direct reclaim) and kswapd's ``balance_pgdat`` walk ``sc->priority`` from
``DEF_PRIORITY`` (12) down to 0. At each priority ``shrink_node`` scans ``lru_pages >> priority``
pages of the file LRU (oldest first: clean pages are freed, dirty ones are written back and freed
too) and calls ``shrink_slab``: every shrinker is asked to scan ``(freeable >> priority) * 4 /
seeks`` objects in batches of ``SHRINK_BATCH`` (``do_shrink_slab``), on *every* pass, so a shrinker
gives back in proportion to what it holds while the page cache is still being reclaimed (the free
page hint shrinker is one: docs/mechanisms.md §10.6). The loop stops once
the target is reclaimed. While it runs, the zones count as ``ZONE_RECLAIM_ACTIVE``: the per-CPU
lists hold at most ``4 * batch`` pages, so what reclaim frees reaches the buddy allocator.

Simplifications: one LRU of file pages, ordered by creation (no active/inactive split, no refault
detection); reclaim takes no simulated time; no deferred scan counts (``nr_deferred``). The guest
has no swap: anonymous and shmem pages are never reclaimed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from labkit.model.pages import PageState

DEF_PRIORITY = 12  # mm/vmscan.c
SHRINK_BATCH = 128  # mm/vmscan.c: do_shrink_slab's default batch_size
DEFAULT_SEEKS = 2  # include/linux/shrinker.h
SWAP_CLUSTER_MAX = 32  # include/linux/swap.h
FILE_CLEAN = int(PageState.FILE_CLEAN)
FILE_DIRTY = int(PageState.FILE_DIRTY)


@dataclass
class Shrinker:
    """A ``struct shrinker``: ``count()`` objects freeable, ``scan(nr)`` frees and returns pages."""

    count: Callable[[], int]
    scan: Callable[[int], int]
    seeks: int = DEFAULT_SEEKS
    name: str = ""
    scanned: int = 0  # objects asked for, cumulative
    freed: int = 0  # pages it gave back, cumulative


def do_shrink_slab(shrinker: Shrinker, priority: int) -> int:
    """``do_shrink_slab`` for one shrinker at ``priority``: pages freed."""
    freeable = shrinker.count()
    if freeable <= 0:
        return 0
    total_scan = min((freeable >> priority) * 4 // max(shrinker.seeks, 1), 2 * freeable)
    freed = 0
    while total_scan >= SHRINK_BATCH or total_scan >= freeable:
        nr = min(SHRINK_BATCH, total_scan)
        if nr <= 0:
            break
        got = shrinker.scan(nr)
        freed += got
        shrinker.scanned += nr
        total_scan -= nr
        if got == 0 and shrinker.count() == 0:
            break
    shrinker.freed += freed
    return freed


def shrink_file_lru(kernel, zones: tuple[int, ...], budget: int) -> tuple[int, int]:
    """Reclaim up to ``budget`` of the oldest file pages in ``zones``, clean before dirty (dirty
    ones are written back first). Returns (pages freed, dirty pages written)."""
    freed = written = 0
    files = [h for h in kernel.handles.values() if h.kind == "file" and h.alive and len(h.pages)]
    zone_list = list(zones)
    for clean_only in (True, False):
        for h in files:
            if freed >= budget:
                break
            pages = h.pages
            if len(pages) == 0:
                continue
            st = kernel.mem.state[pages]
            reclaimable = (st == FILE_CLEAN) if clean_only else (st == FILE_CLEAN) | (st == FILE_DIRTY)
            if len(kernel.mem.zones) > 1:
                reclaimable &= np.isin(kernel.mem.zone_index_of(pages), zone_list)
            idx = np.flatnonzero(reclaimable)[: budget - freed]
            if len(idx) == 0:
                continue
            victims = pages[idx]
            if not clean_only:
                written += int(np.count_nonzero(st[idx] == FILE_DIRTY))
            h.pages = np.delete(pages, idx)
            kernel.free_pages(victims)
            kernel.trim_overhead(h)
            freed += len(victims)
    return freed, written


def file_lru_pages(kernel, zones: tuple[int, ...]) -> int:
    counts = kernel.mem.counts
    return int(sum(counts[z, FILE_CLEAN] + counts[z, FILE_DIRTY] for z in zones))


def reclaim(kernel, zones: tuple[int, ...], n: int) -> tuple[int, int]:
    """The priority loop: reclaim at least ``n`` pages (rounded up to SWAP_CLUSTER_MAX) if it can.
    Returns (LRU pages reclaimed: ``nr_reclaimed``, pages the shrinkers gave back)."""
    target = -(-n // SWAP_CLUSTER_MAX) * SWAP_CLUSTER_MAX
    lru_freed = shrunk = 0
    kernel.reclaim_active = True
    try:
        for priority in range(DEF_PRIORITY, -1, -1):
            scan = file_lru_pages(kernel, zones) >> priority
            if scan and lru_freed < target:
                got, written = shrink_file_lru(kernel, zones, min(scan, target - lru_freed))
                lru_freed += got
                kernel.vmstat.pgwriteback += written
            for shrinker in kernel.shrinkers:
                shrunk += do_shrink_slab(shrinker, priority)
            if lru_freed + shrunk >= target:
                break
    finally:
        kernel.reclaim_active = False
    return lru_freed, shrunk
