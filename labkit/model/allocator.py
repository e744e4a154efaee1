"""Handing out a zone's free pages in the order Linux's buddy allocator would, pageblock types included.

The free lists themselves are derived (:func:`labkit.model.buddy.free_blocks`); this module decides
which free pages an allocation gets, as ``__rmqueue`` does (mm/page_alloc.c, Linux 6.1):

* **Pageblock migratetypes.** Every 2 MiB pageblock is MOVABLE or UNMOVABLE
  (``GuestMemory.pageblock_unmovable``); all start MOVABLE (``memmap_init_range``). An allocation
  takes free blocks from pageblocks of its own type, smallest block first (``__rmqueue_smallest``).
* **Fallback and stealing** (``__rmqueue_fallback``): when its own type has nothing left, an
  unmovable allocation takes the *largest* free block of a movable pageblock and, from order
  ``pageblock_order / 2`` up (``can_steal_fallback``), claims the pageblock for UNMOVABLE
  (``steal_suitable_fallback``; a block of ``pageblock_order`` or more claims all its pageblocks). So
  the kernel's slab and page tables gather in a few pageblocks instead of scattering over
  memory, and what user space frees merges back into whole blocks. A movable allocation falls back
  to unmovable pageblocks' free blocks only when no movable one is left, and claims back whole free
  pageblocks it takes.
* **Order within a type**: smallest order first; within an order, recently freed blocks (the head
  of the list: ``freed`` pages, the most recent first), then the rest by ascending address, then
  reported blocks (put back to the tail, ``__putback_isolated_page``). ``expand()`` hands out the
  low half of a split block first, so a split block is consumed in ascending order.

A *plan* per type orders the type's free blocks and is sliced by consecutive requests: a long run of
small allocations costs what it takes, not a pass over the zone; it is rebuilt after frees.

Simplifications (documented): no RECLAIMABLE / HIGHATOMIC / CMA types; ``steal_suitable_fallback``'s
"half the pageblock free or of the same type" test is approximated by the stolen block's order; the
recency of frees older than the last rebuild is forgotten.

>>> import numpy as np
>>> from labkit.model.pages import GuestMemory, PageState, Zone
>>> mem = GuestMemory(4096, [Zone("Normal", 0, 0, 4096)])
>>> a = ZoneAllocator(mem, mem.zones[0])
>>> kernel_pages = a.take(8, unmovable=True)   # steals the largest block's pageblock
>>> mem.set_state(kernel_pages, PageState.KERNEL)
>>> int(kernel_pages[0]), mem.pageblock_unmovable.tolist()
(0, [True, True, False, False, False, False, False, False])
>>> int(a.take(1)[0])                          # movable pages stay out of it
1024
"""

from __future__ import annotations

import numpy as np

from labkit.model.buddy import PLAN_WINDOW, FreeBlocks, _expand, free_blocks
from labkit.model.pages import MAX_PAGE_ORDER, NR_PAGE_ORDERS, PAGEBLOCK_ORDER, GuestMemory, PageState, Zone

FREE = np.uint8(PageState.FREE)
MOVABLE, UNMOVABLE = 0, 1
STEAL_MIN_ORDER = PAGEBLOCK_ORDER // 2  # can_steal_fallback: order >= pageblock_order / 2


class _Plan:
    """One type's free blocks in hand-out order, and how far requests have used them."""

    def __init__(self, starts: np.ndarray, sizes: np.ndarray):
        self.starts = starts
        self.ends = np.cumsum(sizes) if len(sizes) else np.zeros(0, dtype=np.int64)
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self.cursor = 0
        self._window = np.zeros(0, dtype=np.int64)
        self._window_at = 0

    def pages(self, a: int, b: int) -> np.ndarray:
        """Pages at plan positions [a, b) (a view), from the expanded window of the plan."""
        w = a - self._window_at
        if w < 0 or b - self._window_at > len(self._window):
            self._window = self._slice(a, min(self.total, max(b, a + PLAN_WINDOW)))
            self._window_at = a
            w = 0
        return self._window[w:w + (b - a)]

    def _slice(self, a: int, b: int) -> np.ndarray:
        """Pages at plan positions [a, b), expanding only the blocks they fall in."""
        if b <= a:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self.ends, a, side="right"))
        if b <= self.ends[first]:  # within one block: the common case
            end = int(self.ends[first])
            size = end - (int(self.ends[first - 1]) if first else 0)
            offset = a - (end - size)
            return np.arange(b - a, dtype=np.int64) + (int(self.starts[first]) + offset)
        last = int(np.searchsorted(self.ends, b, side="left"))
        ends = self.ends[first:last + 1]
        starts = self.starts[first:last + 1]
        base = int(self.ends[first - 1]) if first else 0
        sizes = np.diff(ends, prepend=base)
        return _expand(starts, sizes)[a - base:b - base]


class ZoneAllocator:
    """Hands out a zone's free pages in the order Linux's buddy allocator would."""

    def __init__(self, mem: GuestMemory, zone: Zone):
        self.mem = mem
        self.zone = zone
        self._recent: list[np.ndarray] = []
        self._plans: list[_Plan | None] = [None, None]  # per migratetype
        self._blocks: FreeBlocks | None = None  # free lists of the current epoch (until a free)
        self._recency_of = None
        self.rebuilds = 0
        self.steals = 0  # pageblocks claimed for UNMOVABLE
        self._marked = False  # the scratch array holds marks of the running take

    # --- frees --------------------------------------------------------------------------------
    def freed(self, pfns: np.ndarray) -> None:
        """Note that ``pfns`` (already FREE in the state array) went back to the free lists."""
        if len(pfns) == 0:
            return
        self._recent.append(np.asarray(pfns, dtype=np.int64))
        self.invalidate()

    def invalidate(self) -> None:
        """Free pages changed outside ``take``: rebuild the plans before the next allocation."""
        self._plans = [None, None]
        self._blocks = None

    # --- allocation ---------------------------------------------------------------------------
    def take(self, n: int, unmovable: bool = False) -> np.ndarray:
        """Take up to ``n`` free pages for a movable (or unmovable) allocation: fewer only if the
        zone has fewer free pages."""
        mt = UNMOVABLE if unmovable else MOVABLE
        out: list[np.ndarray] = []
        try:
            out += self._take_type(n, mt, [])
            got = sum(len(o) for o in out)
            for _ in range(64):  # each steal claims >= one pageblock; far more than enough rounds
                if got >= n:
                    break
                if not self._fallback(mt):
                    break
                more = self._take_type(n - got, mt, out)
                got += sum(len(o) for o in more)
                out += more
            if got < n:  # nothing left of either type but scraps: take them (no claim)
                out += self._take_type(n - got, 1 - mt, out)
        finally:
            if self._marked:  # the pages this call took are no longer marked (see _take_type)
                for part in out:
                    self._scratch()[part] = False
                self._marked = False
        if not out:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(out) if len(out) != 1 else out[0]

    def _scratch(self) -> np.ndarray:
        """One bool per guest page, shared by the guest's allocators (one take runs at a time): the
        pages the running take already has, which are still FREE in the state array."""
        scratch = getattr(self.mem, "_take_scratch", None)
        if scratch is None or len(scratch) != self.mem.n_pages:
            scratch = self.mem._take_scratch = np.zeros(self.mem.n_pages, dtype=bool)
        return scratch

    def _take_type(self, n: int, mt: int, already: list[np.ndarray]) -> list[np.ndarray]:
        state = self.mem.state
        out: list[np.ndarray] = []
        got = attempts = 0
        while got < n and attempts < 2:
            plan = self._plans[mt]
            if plan is None:
                plan = self._plans[mt] = self._rebuild(mt)
            stop = min(plan.total, plan.cursor + (n - got))
            chunk = plan.pages(plan.cursor, stop)
            plan.cursor = stop
            taken = state[chunk]
            # FREE is 0: pages allocated since the plan was built are the non-zero states
            chunk = chunk[taken == FREE] if np.count_nonzero(taken) else chunk.copy()
            # pages this call already took are still FREE in the state array: they are marked in
            # a scratch array (a lookup per page, where a search in their sorted list cost a sort
            # of everything taken so far each round: seconds for a large unmovable boot allocation)
            mark = self._scratch()
            if got or already:
                chunk = chunk[~mark[chunk]]
            mark[chunk] = True
            self._marked = True
            out.append(chunk)
            got += len(chunk)
            if plan.cursor >= plan.total:
                self._plans[mt] = None
                attempts += 1
        return out

    def _fallback(self, mt: int) -> bool:
        """``__rmqueue_fallback``: claim the other type's largest free block for ``mt`` (its
        pageblocks change type when the block is large enough); False if there is none."""
        blocks = self._free_blocks()
        pb = self.mem.pageblock_unmovable
        want_other = mt == MOVABLE  # the other type's blocks: UNMOVABLE ones for a movable request
        for k in range(MAX_PAGE_ORDER, -1, -1):
            starts = blocks.starts[k]
            if len(starts) == 0:
                continue
            other = starts[pb[starts >> PAGEBLOCK_ORDER] == want_other]
            other = other[self.mem.state[other] == FREE]
            if len(other) == 0:
                continue
            if k < STEAL_MIN_ORDER or (mt == MOVABLE and k < PAGEBLOCK_ORDER):
                return False  # only scraps: taken without a claim by take()
            start = int(other[0])
            first = start >> PAGEBLOCK_ORDER
            last = max(first + 1, (start + (1 << k)) >> PAGEBLOCK_ORDER)
            pb[first:last] = mt == UNMOVABLE
            self.steals += last - first if mt == UNMOVABLE else 0
            self.invalidate()
            return True
        return False

    def _free_blocks(self) -> FreeBlocks:
        if self._blocks is None:
            self._blocks = free_blocks(self.mem, self.zone)
        return self._blocks

    def _rebuild(self, mt: int) -> _Plan:
        """Order the type's free blocks the way its free lists would hand them out."""
        self.rebuilds += 1
        blocks = self._free_blocks()
        if self._recent:  # the frees since the last rebuild: one recency for both types' plans
            self._recency_of = _recency(self._recent)
            self._recent = []
        recency = self._recency_of
        pb = self.mem.pageblock_unmovable
        ordered_starts, ordered_sizes = [], []
        for k in range(NR_PAGE_ORDERS):
            s, rep = blocks.starts[k], blocks.reported[k]
            if len(s) == 0:
                continue
            mine = pb[s >> PAGEBLOCK_ORDER] == (mt == UNMOVABLE)
            s, rep = s[mine], rep[mine]
            if len(s) == 0:
                continue
            groups = []
            unrep = s[~rep] if rep.any() else s
            if recency is not None and len(unrep):
                rec = recency(unrep, 1 << k)
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
            return _Plan(np.concatenate(ordered_starts), np.concatenate(ordered_sizes))
        return _Plan(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


def _recency(recent: list[np.ndarray]):
    """How recently each block was freed: a function of (block starts, block size) giving, per
    block, the sequence number of the last page freed inside it (0: none; frees are numbered
    page by page across ``recent``, oldest first).

    Sorted (page, batch) keys and a segmented max, so the cost follows the recent frees, not the
    zone's size (a 1 TiB zone would need a GiB for a per-page array)."""
    pfns = np.concatenate(recent)
    if len(pfns) == 0:
        return None
    # one sequence number per freed page: the free lists are LIFO page by page, so within a
    # batch (a process exiting) the pages freed last are handed out first
    batch = np.arange(1, len(pfns) + 1, dtype=np.int64)
    bits = int(batch[-1]).bit_length()
    keys = np.sort((pfns << bits) | batch)
    pages = keys >> bits
    latest = np.append(keys & ((1 << bits) - 1), 0)  # one past the end for reduceat

    def recency(starts: np.ndarray, size: int) -> np.ndarray:
        first = np.searchsorted(pages, starts, side="left")
        end = np.searchsorted(pages, starts + size, side="left")
        bounds = np.empty(2 * len(starts), dtype=np.int64)
        bounds[0::2] = first
        bounds[1::2] = end
        rec = np.maximum.reduceat(latest, bounds)[0::2]
        rec[end == first] = 0
        return rec

    return recency
