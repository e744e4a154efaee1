"""A deliberately per-page Python balloon inflate: the reference ``bench_foundation.py`` compares with.

This is what labkit would be without numpy: the same work as one balloon inflate of labkit's model,
done one page at a time in plain Python. It is not used by labkit; it exists so the benchmark's
"N x faster" has an honest denominator. Per page it does what the model does per page, vectorized:

* allocation choice: the buddy allocator's own per-page algorithm (``__rmqueue_smallest`` and
  ``expand()``): take the head of the smallest non-empty free list, split a larger block and queue its
  high halves on the lower lists, so pages come out in the same order as labkit's ``ZoneAllocator``;
* the zone's watermark check (``zone_watermark_ok`` against the low watermark) before each page;
* the state change (FREE -> BALLOON) in a ``bytearray`` (faster per page than a numpy array) and the
  zone's per-state counters;
* the host discard: if the page was backed, unback it and count the RSS drop
  (``ram_block_discard_range``); clear BACKED, SWAPPED and REFERENCED;
* the balloon's page list (append) and, every 256 pages (``VIRTIO_BALLOON_ARRAY_PFNS_MAX``), writing
  ``actual``, adjusting the managed page count and recording the ``BALLOON_CHANGE`` event.

It leaves out what the model also does and a per-page loop would pay for too (simulated time, QMP
event timestamps, stats), so the comparison flatters the naive loop, not labkit.

>>> import labkit
>>> with labkit.open(memory="256M", seed=0) as vm:
...     naive = NaiveBalloon.from_vm(vm)
...     done = naive.inflate(4096)
>>> done
4096
"""

from __future__ import annotations

from labkit.model.buddy import free_blocks
from labkit.model.pages import NR_PAGE_ORDERS, PageFlag, PageState

ARRAY_PFNS_MAX = 256  # VIRTIO_BALLOON_ARRAY_PFNS_MAX, drivers/virtio/virtio_balloon.c
FREE = int(PageState.FREE)
BALLOON = int(PageState.BALLOON)
BACKED = int(PageFlag.BACKED)
UNBACK_MASK = 0xFF & ~int(PageFlag.BACKED | PageFlag.SWAPPED | PageFlag.REFERENCED)


class NaiveBalloon:
    """One zone's free lists as Python lists of block starts, and a balloon inflated page by page."""

    def __init__(self, state: bytearray, flags: bytearray, free_lists: list[list[int]],
                 nr_free: int, low_watermark: int, rss_pages: int):
        self.state = state
        self.flags = flags
        # free_lists[k] holds the order-k block starts with the head of the list at the END,
        # so that list.pop() (O(1)) takes the head, as list_first_entry() does.
        self.free_lists = free_lists
        self.nr_free = nr_free
        self.low = low_watermark
        self.rss_pages = rss_pages
        self.balloon_pages: list[int] = []
        self.state_counts = [0] * 16
        self.state_counts[FREE] = nr_free
        self.actual = 0
        self.managed_adjust = 0
        self.discarded = 0
        self.events: list[tuple[str, int]] = []

    @classmethod
    def from_vm(cls, vm) -> NaiveBalloon:
        """Copy the biggest zone of a model guest (DMA32 below 4 GiB) into plain Python structures.

        Setup, not part of the timed loop: the free lists are taken in the model's own hand-out order
        (smallest order first, ascending address within an order)."""
        mem = vm.mem
        zi = max(range(len(mem.zones)), key=lambda i: mem.zones[i].end - mem.zones[i].start)
        blocks = free_blocks(mem, mem.zones[zi])
        free_lists = [list(reversed(blocks.starts[k].tolist())) for k in range(NR_PAGE_ORDERS)]
        return cls(bytearray(mem.state.tobytes()), bytearray(mem.flags.tobytes()), free_lists,
                   int(mem.counts[zi, PageState.FREE]), vm.kernel.watermarks[zi].low,
                   vm.kernel.host_vm.rss_pages)

    def _alloc_page(self) -> int:
        """``__rmqueue_smallest`` for order 0: smallest non-empty list, split with ``expand()``."""
        lists = self.free_lists
        for order in range(NR_PAGE_ORDERS):
            if lists[order]:
                break
        else:
            return -1
        start = lists[order].pop()
        while order > 0:  # expand(): keep the low half, queue the high half at the head
            order -= 1
            lists[order].append(start + (1 << order))
        return start

    def inflate(self, num_pages: int) -> int:
        """Inflate by ``num_pages``, one page at a time; returns the pages actually inflated."""
        state, flags, counts = self.state, self.flags, self.state_counts
        done = 0
        while done < num_pages:
            batch = 0
            while batch < ARRAY_PFNS_MAX and done + batch < num_pages:
                if self.nr_free <= self.low:  # zone_watermark_ok() failed
                    break
                pfn = self._alloc_page()
                if pfn < 0:
                    break
                self.nr_free -= 1
                counts[state[pfn]] -= 1
                state[pfn] = BALLOON
                counts[BALLOON] += 1
                f = flags[pfn]
                if f & BACKED:  # ram_block_discard_range on a backed page
                    self.rss_pages -= 1
                    self.discarded += 1
                flags[pfn] = f & UNBACK_MASK
                self.balloon_pages.append(pfn)
                batch += 1
            if batch == 0:
                break
            done += batch
            self.managed_adjust -= batch  # adjust_managed_page_count()
            self.actual = len(self.balloon_pages)  # update_balloon_size(): write actual
            self.events.append(("BALLOON_CHANGE", self.actual))
        return done
