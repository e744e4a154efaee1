"""Per-CPU page lists (``struct per_cpu_pages``, mm/page_alloc.c, Linux 6.1), one per zone and CPU.

Order-0 pages are freed to the freeing CPU's list of the page's zone and allocated from it; the
buddy allocator only sees them in batches. Pages on a list are free but not in ``NR_FREE_PAGES``
(MemFree), not on the buddy free lists (not merged, not reported), until they go back:

* **free** (``free_unref_page_commit``): the page goes to the head of the list; when the count
  reaches ``high`` (``nr_pcp_high``: ``min(4 * batch, high)`` while kswapd reclaims the zone),
  ``free_pcppages_bulk`` gives ``nr_pcp_free`` pages from the *tail* (the oldest) to the buddy
  allocator: ``batch << free_factor`` clamped to [batch, high - batch], and ``free_factor`` grows
  by one each time that is still below ``high - batch``: a long run of frees without allocations
  frees in ever larger chunks.
* **allocation** (``rmqueue_pcplist``): ``free_factor`` halves, the page comes from the head; an
  empty list is refilled with ``batch`` pages from the buddy allocator (``rmqueue_bulk``), in the
  order the buddy allocator hands them out. The zone's watermark is checked before every page, so
  once a refill took the zone to its watermark the rest of that batch stays on the list.
* **drain** (``drain_all_pages``): everything back to the buddy allocator: when direct reclaim did
  not help an allocation, before ``alloc_contig_range`` (virtio-mem unplug), when memory goes
  offline; and a "free_high" free: an order 1-3 page freed while ``free_factor`` > 0 empties the
  list (a process's order-1 pgd at exit, :meth:`labkit.model.kmem.KernelMemory.exit_mm`). Nothing
  else drains an idle list (``vmstat`` drains only other nodes' lists).

The list is an array ordered tail (oldest) to head (newest). Model choices: one array per zone and
CPU for the lists of both migratetypes (Linux keeps one list per migratetype and order, all counted in
``count``): an allocation takes the newest pages of its pageblock type, a bulk free the oldest pages
whatever their type (Linux round-robins over the lists); every guest activity runs on
CPU 0 (the other CPUs' lists stay empty, but split ``high`` as in Linux); and ``free_factor``
halves once per scheduler tick (``TICK_MS``, HZ=250 on Debian) of simulated time between two
list operations: the guest's own background allocations (timers, workers) reset it. Measured on the
live guest: after a balloon deflate of 256 MiB in 256-page requests the list ends within 2 MiB of
``high``, where a run without allocations would have emptied it to ~32 MiB below.

>>> pcp = PerCpuPages(high=8, batch=2)
>>> pcp.free(np.arange(10), now_ms=0.0).tolist()   # reaches 8: frees 2, then 4, from the tail
[0, 1, 2, 3, 4, 5]
>>> pcp.count, pcp.free_factor
(4, 2)
"""

from __future__ import annotations

import numpy as np

TICK_MS = 4.0  # CONFIG_HZ=250 (Debian): one jiffy
_EMPTY = np.zeros(0, dtype=np.int64)


class PerCpuPages:
    """One ``struct per_cpu_pages``: the list, ``high``, ``batch`` and ``free_factor``."""

    def __init__(self, high: int = 0, batch: int = 1):
        self.high = high
        self.batch = batch
        self.free_factor = 0
        self.pages = _EMPTY  # tail (oldest) ... head (newest)
        self._last_ms = 0.0
        self.bulk_frees = 0  # free_pcppages_bulk calls

    @property
    def count(self) -> int:
        return len(self.pages)

    def _decay(self, now_ms: float) -> None:
        ticks = int(now_ms // TICK_MS) - int(self._last_ms // TICK_MS)  # jiffies that went by
        if ticks > 0:
            self.free_factor >>= min(ticks, 16)
        self._last_ms = max(self._last_ms, now_ms)

    def touch_clock(self, now_ms: float) -> None:
        """Bring ``free_factor`` up to ``now_ms`` (its per-tick decay) without a list operation."""
        self._decay(now_ms)

    def nr_pcp_free(self, high: int) -> int:
        """``nr_pcp_free`` (order 0): how many pages the next bulk free takes; moves free_factor."""
        batch = self.batch
        if high < batch:
            return 1
        max_nr_free = high - batch
        n = batch << self.free_factor
        if n < max_nr_free:
            self.free_factor += 1
        return min(max(n, batch), max_nr_free)

    def free(self, pfns: np.ndarray, now_ms: float, reclaim_active: bool = False) -> np.ndarray:
        """``free_unref_page_commit`` for each page of ``pfns`` in order; returns the pages the
        bulk frees gave to the buddy allocator, oldest first."""
        self._decay(now_ms)
        k = len(pfns)
        high = min(self.batch << 2, self.high) if reclaim_active else self.high
        if high <= 0:  # pcp disabled: every page goes straight back
            return np.asarray(pfns, dtype=np.int64)
        count, left, flushed = self.count, k, 0
        while left > 0:
            adds = max(high - count, 1)
            if adds > left:
                count += left
                break
            left -= adds
            count += adds
            before = self.free_factor
            nr = min(self.nr_pcp_free(high), count)
            count -= nr
            flushed += nr
            if self.free_factor == before and nr == high - self.batch and count == self.batch:
                cycles = left // nr  # steady state: each cycle adds nr pages and frees nr
                left -= cycles * nr
                flushed += cycles * nr
                self.bulk_frees += cycles
            self.bulk_frees += 1
        joined = np.concatenate([self.pages, np.asarray(pfns, dtype=np.int64)]) if k else self.pages
        self.pages = joined[flushed:]
        return joined[:flushed]

    def take(self, n: int, now_ms: float, select=None) -> np.ndarray:
        """Up to ``n`` pages from the head (newest first), only those ``select(pages)`` marks when
        given (the allocation's migratetype); the allocation halves free_factor."""
        self._decay(now_ms)
        if n <= 0:
            return _EMPTY
        self.free_factor >>= min(n, 16)
        if self.count == 0:
            return _EMPTY
        if select is None:
            k = min(n, self.count)
            out = self.pages[self.count - k:][::-1].copy()
            self.pages = self.pages[:self.count - k]
            return out
        mine = np.flatnonzero(select(self.pages))
        if len(mine) == 0:
            return _EMPTY
        idx = mine[len(mine) - min(n, len(mine)):]
        out = self.pages[idx[::-1]]
        keep = np.ones(self.count, dtype=bool)
        keep[idx] = False
        self.pages = self.pages[keep]
        return out

    def refill(self, leftover: np.ndarray) -> None:
        """``rmqueue_bulk`` put a batch on the (empty) list and the allocation used its first
        pages: ``leftover`` are the rest, in hand-out order (next one first)."""
        if len(leftover):
            self.pages = np.concatenate([leftover[::-1], self.pages])

    def drain(self) -> np.ndarray:
        """``drain_pages_zone``: every page back; returns them oldest first."""
        out, self.pages = self.pages, _EMPTY
        return out
