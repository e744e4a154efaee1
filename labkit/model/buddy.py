"""The buddy allocator's free lists, derived from page states rather than stored.

With perfect coalescing, the free blocks of order k are the aligned 2^k runs of free pages that are not
inside a free aligned run of order k+1 (up to ``MAX_PAGE_ORDER`` 10). :func:`free_blocks` computes them
for a zone by reshape-and-reduce, with no Python loop over pages: max-order blocks entirely free or in use
are settled in one pass, the others halve their mask once per order; the cost is a few passes over the
state array plus the output (``benchmarks/README.md`` has the numbers).

Allocation order, as mm/page_alloc.c hands out pages (:class:`labkit.model.allocator.ZoneAllocator`):

* Smallest fitting block first: an order-0 request takes the head of the order-0 list and splits a
  larger block only when every smaller list is empty; ``expand()`` hands out the low half and queues the
  high halves, so a split block is consumed in ascending address order.
* Boot and onlining free memory with ``FPI_TO_TAIL`` (``__free_pages_core``, Linux >= 5.10), so a fresh
  free list is in ascending address order.
* Pages freed later go to the **head** of their list (order-0 frees first land on the per-CPU lists,
  :mod:`labkit.model.pcp`, which give them to the buddy allocator in batches): recent frees go to
  the head of their order's list at the next rebuild.
* Reported pages were put back with ``FPI_TO_TAIL`` (``__putback_isolated_page``): they sit at the tail
  of their list, behind every unreported block of the same order.

Simplification (documented): between rebuilds, the relative order of recently freed blocks is kept
only for the last batch of frees; older recency is forgotten, as if the lists had been shuffled once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.model.pages import MAX_PAGE_ORDER, GuestMemory, PageFlag, PageState, Zone

FREE = np.uint8(PageState.FREE)
REPORTED = np.uint8(PageFlag.REPORTED)
PAIR_FREE = np.uint16(0x0101)  # two bools viewed as one uint16: both pages (or runs) free
BYTES_ALL_ONE = 0x0101010101010101  # eight bools viewed as one uint64: all eight pages free
CHUNK_PAGES = 1 << 22  # free_blocks works on 16 GiB of a zone at a time (masks of 4 MiB: in cache)
REPORTED_CHECK_RATIO = 64  # above one block per 64 pages, one pass over the flags beats a gather
PLAN_WINDOW = 1 << 14  # plan pages expanded at once for take(): 64 MiB, 64 balloon requests


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


class _Workspace:
    """Scratch arrays for :func:`free_blocks`, kept between calls: a fresh multi-MiB temporary costs
    a page fault per 4 KiB, more than the arithmetic done in it. At most ~4 bytes a page of one
    ``CHUNK_PAGES`` stretch (16 MiB). Never returned: results are always fresh arrays."""

    def __init__(self, pages: int):
        self.mask = np.empty(pages, dtype=bool)  # the stretch's free mask
        self.gathered = np.empty(pages // 2, dtype=bool)  # its mixed max-order blocks, side by side
        self.levels = np.empty(pages, dtype=bool)  # full[1], full[2], ... one after the other
        self.pairs = np.empty(pages // 2, dtype=np.uint16)  # own blocks of one order, as pairs


_workspace = _Workspace(0)


def _get_workspace(pages: int) -> _Workspace:
    global _workspace
    if len(_workspace.mask) < pages:
        _workspace = _Workspace(pages)
    return _workspace


def _flatnonzero(own: np.ndarray, hits: int) -> np.ndarray:
    """``np.flatnonzero`` of a bool array known to hold ``hits`` True values; when they are sparse,
    find the non-zero 8-byte words first and look only inside those."""
    if hits * 8 >= len(own) or len(own) % 8:
        return np.flatnonzero(own)
    words = own.view(np.uint64)
    at = np.flatnonzero(words != 0)
    inside = np.flatnonzero(words[at].view(bool))
    return (at[inside >> 3] << 3) | (inside & 7)


def _levels(mask: np.ndarray, max_order: int, ws: _Workspace) -> list[np.ndarray]:
    """Free blocks in a bool mask of whole 2^max_order blocks: per order k, the page offsets of the
    order-k blocks, ascending.

    ``full[k]`` marks the aligned 2^k runs that are entirely free; viewing a bool array as uint16
    pairs, ``0x0101`` is a pair whose parent run is entirely free, so one comparison per order builds
    the next level. A free run is its own block when its parent is not entirely free: XOR-ing the
    pairs with ``0x0101`` where the parent is full clears exactly the runs inside a free parent.
    Counting the runs of each order gives the number of blocks of each order before finding them.
    """
    full = [mask]
    runs = [int(np.count_nonzero(mask))]  # free runs of each order
    used = 0
    while len(full) <= max_order and runs[-1] > 1:
        pairs = full[-1].view(np.uint16)
        parent = ws.levels[used:used + len(pairs)]
        used += len(pairs)
        full.append(np.equal(pairs, PAIR_FREE, out=parent))
        runs.append(int(np.count_nonzero(parent)))
    out = []
    for k in range(max_order + 1):
        blocks = runs[k] - 2 * runs[k + 1] if k + 1 < len(full) else (
            runs[k] if k < len(full) else 0)
        if blocks == 0:  # also when every free run of this order has a free buddy
            out.append(np.zeros(0, dtype=np.int64))
            continue
        if k + 1 == len(full):
            own = full[k]
        else:
            inside_free_parent = ws.pairs[:len(full[k + 1])]
            inside_free_parent[...] = full[k + 1]
            inside_free_parent *= PAIR_FREE
            own = np.bitwise_xor(full[k].view(np.uint16), inside_free_parent,
                                 out=inside_free_parent).view(bool)
        idx = _flatnonzero(own, blocks)
        if k:
            idx <<= k
        out.append(idx)
    return out


def _own_blocks(state: np.ndarray, max_order: int, ws: _Workspace) -> list[np.ndarray]:
    """Free blocks of one stretch of a zone: per order k, page offsets from the stretch's start.

    Most max-order blocks are entirely free or entirely in use. Summing each block's bytes as
    uint64 words (8 pages a word; a byte lane sums to at most 128, so no carry) tells which: a sum
    of 0 is a block in use, ``(block / 8) * 0x0101010101010101`` a free one. Only the mixed blocks
    are gathered, side by side (blocks never merge across a max-order boundary), and go through the
    per-order levels; when most blocks are mixed, the whole stretch does.
    """
    size = len(state)
    block = 1 << max_order
    padded = -(-size >> max_order) << max_order
    mask = ws.mask[:padded]
    np.equal(state, FREE, out=mask[:size])
    mask[size:] = False
    if not 8 <= block <= 8 * 255:
        return _levels(mask, max_order, ws)
    sums = mask.view(np.uint64).reshape(-1, block >> 3).sum(axis=1, dtype=np.uint64)
    all_free = sums == np.uint64((block >> 3) * BYTES_ALL_ONE)
    mixed = sums != 0
    mixed &= ~all_free
    mixed_ids = np.flatnonzero(mixed)
    if 2 * len(mixed_ids) > len(mixed):
        return _levels(mask, max_order, ws)
    gathered = ws.gathered[:len(mixed_ids) * block].reshape(-1, block)
    np.take(mask.reshape(-1, block), mixed_ids, axis=0, out=gathered)
    out = _levels(gathered.reshape(-1), max_order, ws)
    for k in range(max_order):
        offsets = out[k]  # in the gathered mixed blocks: back to the stretch
        if len(offsets):
            in_block = offsets & (block - 1)
            offsets >>= max_order
            out[k] = (mixed_ids[offsets] << max_order) | in_block
    out[max_order] = np.flatnonzero(all_free) << max_order
    return out


def free_blocks(mem: GuestMemory, zone: Zone, max_order: int = MAX_PAGE_ORDER) -> FreeBlocks:
    """Derive the zone's buddy free lists (orders 0..max_order) by reshape-and-reduce.

    The zone is processed in stretches of ``CHUNK_PAGES`` (aligned to 2^max_order from the zone's
    start, so no block straddles two): the masks stay in cache, and a 1 TiB guest needs no temporary
    arrays of its own size. Reported flags are read only where there can be any: when a stretch has
    many blocks, one check of its flags saves gathering them block by block.

    >>> from labkit.model.pages import GuestMemory, Zone
    >>> mem = GuestMemory(4096, [Zone("Normal", 0, 0, 4096)])
    >>> mem.set_state(np.array([5]), PageState.KERNEL)
    >>> free_blocks(mem, mem.zones[0]).nr_free().tolist()  # 0-3, 4, 6-7, 8-15, ... 512-1023, 3 x 1024
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3]
    """
    block = 1 << max_order
    chunk = max(block, CHUNK_PAGES >> max_order << max_order)
    # a zone is its PFN runs: one span at boot; hot-plugged memory blocks join it when onlined
    runs = mem.zone_runs(mem.zones.index(zone))
    stretches = [(a, min(a + chunk, end)) for start, end in runs for a in range(start, end, chunk)]
    longest = max((b - a for a, b in stretches), default=block)
    ws = _get_workspace(min(chunk, -(-longest // block) * block))
    parts: list[list[np.ndarray]] = [[] for _ in range(max_order + 1)]
    rep_parts: list[list[np.ndarray]] = [[] for _ in range(max_order + 1)]
    for a, b in stretches:
        own = _own_blocks(mem.state[a:b], max_order, ws)
        flags = mem.flags[a:b]
        none_reported = False
        if sum(len(i) for i in own) * REPORTED_CHECK_RATIO > b - a:
            # one pass over the stretch's flags, into the (now free) levels scratch
            none_reported = not np.bitwise_and(
                flags, REPORTED, out=ws.levels[:b - a].view(np.uint8)).any()
        for k, idx in enumerate(own):
            if len(idx) == 0:
                continue
            rep_parts[k].append(np.zeros(len(idx), dtype=bool) if none_reported
                                else (flags[idx] & REPORTED) != 0)
            if a:
                idx += a
            parts[k].append(idx)
    return FreeBlocks([_join(p, np.int64) for p in parts], [_join(p, bool) for p in rep_parts])


def _join(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


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


def _is_in(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``np.isin(values, pool)`` by binary search in the sorted pool: no hash table or sort of
    ``values`` (a 1 GiB allocation is 262144 values against a few hundred hot pages)."""
    if len(pool) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    pool = np.sort(pool)
    at = np.searchsorted(pool, values)
    at[at == len(pool)] = 0
    return pool[at] == values

