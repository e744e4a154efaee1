"""Vectorised queries on the high-order buddy blocks of the page model, for free page reporting.

The buddy free lists are derived from page states (:mod:`labkit.model.buddy`); reporting needs only the
orders from ``page_reporting_order`` up, and, on every free and allocation, the merged block around
the pages concerned. These helpers answer both without a Python loop over pages:

* :func:`reporting_free_lists`: the blocks of orders ``lo``..10 from one reduction over the state
  array (``PageState.FREE`` is 0: a run is free when its bytes, read as machine words, are zero);
* :func:`runs_all_free`, :func:`still_own_block`: is a block still a free buddy of its order;
* :func:`free_runs_of`: which runs around some freed pages are entirely free (did the free merge to
  the reporting order at all?);
* :func:`hit_runs`, :func:`window_rows`, :func:`merged_runs`: the aligned 4 MiB windows some pages
  touch (no buddy block crosses one), and the largest all-free (or all-reported) aligned runs in
  them that hold one of those pages: the merged buddy block of a free, the reported block an
  allocation split.

>>> mask = np.zeros(1024, dtype=bool); mask[512:] = True      # an order-9 free block
>>> hit = np.zeros(2, dtype=bool); hit[1] = True             # a page freed in it
>>> int(merged_runs(mask, hit, 9).sum())
512
"""

from __future__ import annotations

import numpy as np

from labkit.model.pages import MAX_PAGE_ORDER, NR_PAGE_ORDERS, GuestMemory, PageFlag, Zone

REPORTED = np.uint8(PageFlag.REPORTED)
WINDOW_ORDER = MAX_PAGE_ORDER  # aligned 4 MiB windows: no buddy block crosses one
WINDOW = 1 << WINDOW_ORDER
SMALL_RUN_SET = 64  # free_runs_of: up to this many runs, gather them; beyond, scatter a bool per run


def _words(arr: np.ndarray, order: int) -> tuple[np.ndarray, int]:
    """``arr`` (uint8, a multiple of 8 long) read as the widest words a 2^order run divides into."""
    itemsize = min(8, 1 << order)
    return arr.view(np.dtype(f"u{itemsize}")), itemsize


def reporting_free_lists(mem: GuestMemory, zone: Zone, lo: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The zone's buddy free blocks of orders ``lo``..MAX_PAGE_ORDER (``starts[k - lo]``, absolute,
    ascending) and whether each is reported: the blocks :func:`labkit.model.buddy.free_blocks`
    derives, from one reduction over the state array. PageState.FREE is 0, so a 2^lo run is free
    when its bytes read as machine words are all zero; the levels above are tiny.
    """
    size = zone.pages >> lo << lo  # a partial run at the zone's end holds no block of order >= lo
    words, itemsize = _words(mem.state[zone.start:zone.start + size], lo)
    full = ~words.reshape(-1, (1 << lo) // itemsize).any(axis=1)
    pad = -len(full) % (1 << (MAX_PAGE_ORDER - lo))
    if pad:
        full = np.concatenate([full, np.zeros(pad, dtype=bool)])
    levels = [full]
    for _ in range(lo, MAX_PAGE_ORDER):
        levels.append(levels[-1][0::2] & levels[-1][1::2])
    starts, reported = [], []
    for i, k in enumerate(range(lo, NR_PAGE_ORDERS)):
        own = levels[i] & ~np.repeat(levels[i + 1], 2) if k < MAX_PAGE_ORDER else levels[i]
        s = (np.flatnonzero(own) << k) + zone.start
        starts.append(s)
        reported.append((mem.flags[s] & REPORTED) != 0)
    return starts, reported


def runs_all_free(state: np.ndarray, starts: np.ndarray, order: int, zone: Zone) -> np.ndarray:
    """Per start: the aligned run [s, s + 2^order) lies inside ``zone`` and every page is free."""
    inside = (starts >= zone.start) & (starts + (1 << order) <= zone.end)
    out = np.zeros(len(starts), dtype=bool)
    s = starts[inside]
    if len(s):
        words, itemsize = _words(state, order)
        idx = (s // itemsize)[:, None] + np.arange((1 << order) // itemsize)
        out[inside] = ~words[idx].any(axis=1)
    return out


def still_own_block(state: np.ndarray, starts: np.ndarray, order: int, zone: Zone) -> np.ndarray:
    """Per start: still a free buddy block of exactly ``order``: all free, and its buddy is not
    (with perfect coalescing two free buddies are one block of the next order)."""
    ok = runs_all_free(state, starts, order, zone)
    if order < MAX_PAGE_ORDER and ok.any():
        ok &= ~runs_all_free(state, starts ^ (1 << order), order, zone)
    return ok


def expand_blocks(starts: np.ndarray, order: int) -> np.ndarray:
    """Every PFN of the blocks of ``order`` starting at ``starts``."""
    return (starts[:, None] + np.arange(1 << order, dtype=np.int64)).ravel()


def block_runs(starts: np.ndarray, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``npages`` pages at ``starts``, merged into contiguous runs: (run starts, ends).

    >>> block_runs(np.array([2048, 0, 1024, 8192]), 1024)
    (array([   0, 8192]), array([3072, 9216]))
    """
    s = np.sort(np.asarray(starts, dtype=np.int64))
    if len(s) == 0:
        return s, s
    breaks = np.flatnonzero(np.diff(s) != npages) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks - 1, [len(s) - 1]])
    return s[first], s[last] + npages


def hit_runs(pfns: np.ndarray, n_pages: int, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """The aligned 4 MiB windows ``pfns`` touch, and which 2^lo runs of those windows (laid end to
    end) hold one of them: one bool scatter over the guest's runs, no sort, no per-PFN index."""
    n_windows = -(-n_pages >> WINDOW_ORDER)
    per = 1 << (WINDOW_ORDER - lo)  # runs per window
    runs = np.zeros(n_windows * per, dtype=bool)
    runs[pfns >> lo] = True
    # a window's runs read as one machine word (any(axis=1) over rows this short is slow)
    touched = (runs.view(f"u{per}") != 0 if per <= 8 else
               runs.view(np.uint64).reshape(n_windows, per >> 3).any(axis=1))
    windows = np.flatnonzero(touched)
    return windows, runs.reshape(n_windows, per)[windows].ravel()


def free_runs_of(state: np.ndarray, pfns: np.ndarray, lo: int) -> np.ndarray:
    """Ids (``pfn >> lo``) of the aligned 2^lo runs that hold some of ``pfns`` and are entirely free
    (a run past the array's end is not), each at least once: the runs where a free of ``pfns``
    merged into a block of order >= ``lo``. Reads only those runs, as machine words."""
    ids = pfns >> lo
    if len(ids) > 1:  # neighbours share a run: drop repeats next to each other (no sort)
        keep = np.empty(len(ids), dtype=bool)
        keep[0] = True
        np.not_equal(ids[1:], ids[:-1], out=keep[1:])
        ids = ids[keep]
    whole = len(state) >> lo
    if len(ids) > SMALL_RUN_SET:  # many runs: one bool scatter over the guest's runs
        seen = np.zeros(whole + 1, dtype=bool)
        seen[np.minimum(ids, whole)] = True
        ids = np.flatnonzero(seen[:whole])
    elif len(state) != whole << lo and len(ids) and ids.max() >= whole:  # a partial run at the end
        ids = ids[ids < whole]
    words, itemsize = _words(state[:whole << lo], lo)
    rows = words.reshape(whole, (1 << lo) // itemsize)[ids]
    return ids[~rows.any(axis=1)]


def window_rows(arr: np.ndarray, windows: np.ndarray, fill: int) -> np.ndarray:
    """Copies of ``arr`` over ``windows`` (in any order), one row each, ``fill`` past the array's end."""
    whole = len(arr) >> WINDOW_ORDER
    rows = arr[:whole << WINDOW_ORDER].reshape(whole, WINDOW)
    if len(arr) == whole << WINDOW_ORDER or len(windows) == 0 or windows.max() < whole:
        return rows[windows]
    out = np.full((len(windows), WINDOW), fill, dtype=arr.dtype)
    inside = windows < whole
    out[inside] = rows[windows[inside]]
    tail = arr[whole << WINDOW_ORDER:]
    out[~inside, :len(tail)] = tail
    return out


def window_pfns(windows: np.ndarray, flat: np.ndarray) -> np.ndarray:
    return (windows[flat >> WINDOW_ORDER] << WINDOW_ORDER) | (flat & (WINDOW - 1))


def merged_runs(mask: np.ndarray, hit: np.ndarray, lo: int) -> np.ndarray:
    """Pages (flat, whole windows) of the largest all-True aligned runs of order ``lo``..10 that
    contain a hit (``hit``: one bool per 2^lo run): with ``mask`` = free pages and the runs of freed
    pages, the merged buddy blocks of order >= ``lo`` the free produced; with ``mask`` =
    PageReported and the runs of allocated pages, the reported blocks they came from."""
    full = [mask.reshape(-1, 1 << lo).all(axis=1)]
    hit_levels = [hit]
    for _ in range(lo, MAX_PAGE_ORDER):  # pairs by strided halves: all()/any() on rows of 2 is slow
        full.append(full[-1][0::2] & full[-1][1::2])
        hit_levels.append(hit_levels[-1][0::2] | hit_levels[-1][1::2])
    cover = full[-1] & hit_levels[-1]
    for i in range(len(full) - 2, -1, -1):
        cover = np.repeat(cover, 2) | (full[i] & hit_levels[i])
    return np.repeat(cover, 1 << lo)
