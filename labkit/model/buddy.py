"""The buddy allocator's free lists, derived from page states rather than stored.

With perfect coalescing, the free blocks of order k are the aligned 2^k runs of free pages that are not
inside a free aligned run of order k+1 (up to ``MAX_PAGE_ORDER`` 10). :func:`free_blocks` computes them
for a zone by reshape-and-reduce: one pass halves the mask per order, so the cost is about two passes over
the zone's state array, with no Python loop over pages.

Allocation order, as mm/page_alloc.c hands out pages:

* Smallest fitting block first: an order-0 request takes the head of the order-0 list and splits a
  larger block only when every smaller list is empty; ``expand()`` hands out the low half and queues the
  high halves, so a split block is consumed in ascending address order.
* Boot and onlining free memory with ``FPI_TO_TAIL`` (``__free_pages_core``, Linux >= 5.10), so a fresh
  free list is in ascending address order.
* Pages freed later go to the **head** of their list; order-0 frees first land on the per-CPU lists,
  which are LIFO. labkit keeps those in a small hot stack (:class:`ZoneAllocator`) served first, and
  puts larger recent frees at the head of their order's list at the next rebuild.
* Reported pages were put back with ``FPI_TO_TAIL`` (``__putback_isolated_page``): they sit at the tail
  of their list, behind every unreported block of the same order.

Simplification (documented): between rebuilds, the relative order of recently freed blocks is kept
only for the last batch of frees; older recency is forgotten, as if the lists had been shuffled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.model.pages import MAX_PAGE_ORDER, NR_PAGE_ORDERS, GuestMemory, PageFlag, PageState, Zone

FREE = np.uint8(PageState.FREE)
REPORTED = np.uint8(PageFlag.REPORTED)
# Order-0 frees below this size go to the hot stack (the per-CPU page lists, mm/page_alloc.c
# free_unref_page). Linux sizes pcp->high from the zone; a few hundred pages is typical for a VM.
PCP_HIGH = 512


@dataclass
class FreeBlocks:
    """Free blocks of one zone: ``starts[k]`` are the absolute PFNs of the order-k blocks, ascending,
    and ``reported[k]`` whether each carries PageReported."""

    starts: list[np.ndarray]
    reported: list[np.ndarray]

    def nr_free(self) -> np.ndarray:
        """Blocks per order, as /proc/buddyinfo prints them."""
        return np.array([len(s) for s in self.starts], dtype=np.int64)

    def free_pages(self) -> int:
        return int(sum(len(s) << k for k, s in enumerate(self.starts)))


def _padded_free_mask(mem: GuestMemory, zone: Zone) -> np.ndarray:
    size = zone.pages
    block = 1 << MAX_PAGE_ORDER
    padded = -(-size // block) * block
    mask = np.zeros(padded, dtype=bool)
    np.equal(mem.state[zone.start:zone.end], FREE, out=mask[:size])
    return mask


def free_blocks(mem: GuestMemory, zone: Zone, max_order: int = MAX_PAGE_ORDER) -> FreeBlocks:
    """Derive the zone's buddy free lists (orders 0..max_order) by reshape-and-reduce.

    ``full[k]`` marks the aligned 2^k runs that are entirely free; viewing a bool array as uint16
    pairs, ``0x0101`` is a pair whose parent run is entirely free, so one comparison per order builds
    the next level, and a run is its own free block when its parent is not entirely free.
    """
    full = [_padded_free_mask(mem, zone)]
    for _ in range(max_order):
        full.append(full[-1].view(np.uint16) == 0x0101)
    starts, reported = [], []
    for k in range(max_order + 1):
        own = full[k]
        if k < max_order:
            own = own.copy()
            own.view(np.uint16)[full[k + 1]] = 0  # a run inside a free parent is not its own block
        s = (np.flatnonzero(own) << k) + zone.start
        starts.append(s)
        reported.append((mem.flags[s] & REPORTED) != 0)
    return FreeBlocks(starts, reported)


def buddyinfo(mem: GuestMemory) -> str:
    """The guest's ``/proc/buddyinfo``: free blocks per order for each node and zone."""
    lines = []
    for zone in mem.zones:
        counts = free_blocks(mem, zone).nr_free()
        cells = "".join(f"{int(c):7d}" for c in counts)
        lines.append(f"Node {zone.node}, zone {zone.name:>8s}{cells}")
    return "\n".join(lines)


def _expand(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenate the ranges [starts[i], starts[i] + sizes[i]) without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(starts, sizes) + (np.arange(total, dtype=np.int64) - offsets)


class ZoneAllocator:
    """Hands out a zone's free pages in the order Linux's buddy allocator would.

    ``take(n)`` serves the hot stack first (LIFO), then walks a plan: the derived free blocks
    ordered smallest order first; within an order, recently freed blocks (head) then the rest by
    ascending address, then reported blocks (tail). The plan is rebuilt only after frees that bypass
    the hot stack, so a long run of small allocations costs O(n) each, not a pass over the zone.
    """

    def __init__(self, mem: GuestMemory, zone: Zone):
        self.mem = mem
        self.zone = zone
        self._hot = np.zeros(0, dtype=np.int64)
        self._recent: list[np.ndarray] = []
        self._plan_starts: np.ndarray | None = None  # block starts, in hand-out order
        self._plan_ends = np.zeros(0, dtype=np.int64)  # cumulative pages up to each block's end
        self._cursor = 0  # pages of the plan handed out so far
        self.rebuilds = 0

    # --- frees --------------------------------------------------------------------------------
    def freed(self, pfns: np.ndarray) -> None:
        """Note that ``pfns`` (already FREE in the state array) went back to the free lists."""
        if len(pfns) == 0:
            return
        if len(pfns) <= PCP_HIGH and len(self._hot) + len(pfns) <= 4 * PCP_HIGH:
            self._hot = np.concatenate([self._hot, pfns])
        else:
            self._recent.append(np.asarray(pfns, dtype=np.int64))
            self.invalidate()

    def invalidate(self) -> None:
        """Free pages changed outside ``take``: rebuild the plan before the next allocation."""
        self._plan_starts = None
        if len(self._hot):
            self._recent.append(self._hot)
            self._hot = np.zeros(0, dtype=np.int64)

    # --- allocation ---------------------------------------------------------------------------
    def take(self, n: int) -> np.ndarray:
        """Take up to ``n`` free pages (fewer only if the zone has fewer free pages)."""
        state = self.mem.state
        out = []
        got = 0
        if len(self._hot):
            hot = self._hot[::-1]
            hot = hot[state[hot] == FREE]
            use = hot[:n]
            out.append(use)
            got += len(use)
            self._hot = hot[len(use):][::-1]
        attempts = 0
        while got < n and attempts < 3:
            if self._plan_starts is None:
                self._rebuild()
            total = int(self._plan_ends[-1]) if len(self._plan_ends) else 0
            stop = min(total, self._cursor + (n - got))
            chunk = self._plan_slice(self._cursor, stop)
            self._cursor = stop
            chunk = chunk[state[chunk] == FREE]
            if out:  # pages this call already took are still FREE in the state array
                chunk = chunk[~np.isin(chunk, np.concatenate(out))]
            out.append(chunk)
            got += len(chunk)
            if self._cursor >= total:
                self._plan_starts = None
                attempts += 1
        # no duplicates: hot pages were freed after the plan was built, behind its cursor
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _rebuild(self) -> None:
        """Order the zone's free blocks the way the free lists would hand them out."""
        self.rebuilds += 1
        if len(self._hot):  # the hot pages become the most recent frees of the new plan
            self._recent.append(self._hot)
            self._hot = np.zeros(0, dtype=np.int64)
        blocks = free_blocks(self.mem, self.zone)
        recency = None
        if self._recent:
            recency = np.zeros(self.zone.pages + 1, dtype=np.int32)
            for seq, batch in enumerate(self._recent, start=1):
                batch = batch[(batch >= self.zone.start) & (batch < self.zone.end)]
                recency[batch - self.zone.start] = seq
            self._recent = []
        ordered_starts, ordered_sizes = [], []
        for k in range(NR_PAGE_ORDERS):
            s, rep = blocks.starts[k], blocks.reported[k]
            if len(s) == 0:
                continue
            groups = []
            unrep = s[~rep]
            if recency is not None and len(unrep):
                bounds = np.empty(2 * len(unrep), dtype=np.int64)
                bounds[0::2] = unrep - self.zone.start
                bounds[1::2] = unrep - self.zone.start + (1 << k)
                rec = np.maximum.reduceat(recency, bounds)[0::2] if (1 << k) > 1 else recency[
                    unrep - self.zone.start]
                is_recent = rec > 0
                recent = unrep[is_recent]
                groups.append(recent[np.argsort(-rec[is_recent], kind="stable")])
                groups.append(unrep[~is_recent])
            else:
                groups.append(unrep)
            groups.append(s[rep])
            for g in groups:
                ordered_starts.append(g)
                ordered_sizes.append(np.full(len(g), 1 << k, dtype=np.int64))
        if ordered_starts:
            self._plan_starts = np.concatenate(ordered_starts)
            self._plan_ends = np.cumsum(np.concatenate(ordered_sizes))
        else:
            self._plan_starts = np.zeros(0, dtype=np.int64)
            self._plan_ends = np.zeros(0, dtype=np.int64)
        self._cursor = 0

    def _plan_slice(self, a: int, b: int) -> np.ndarray:
        """Pages at plan positions [a, b), expanding only the blocks they fall in."""
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self._plan_ends, a, side="right"))
        if b <= self._plan_ends[first]:  # within one block: the common case
            end = int(self._plan_ends[first])
            size = end - (int(self._plan_ends[first - 1]) if first else 0)
            offset = a - (end - size)
            return np.arange(b - a, dtype=np.int64) + (int(self._plan_starts[first]) + offset)
        last = int(np.searchsorted(self._plan_ends, b, side="left"))
        ends = self._plan_ends[first:last + 1]
        starts = self._plan_starts[first:last + 1]
        base = int(self._plan_ends[first - 1]) if first else 0
        sizes = np.diff(ends, prepend=base)
        return _expand(starts, sizes)[a - base:b - base]
