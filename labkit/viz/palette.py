"""Display categories for the page map: what a page *looks like*, derived from (state, flags).

The model keeps one state and one byte of flags per page; a picture needs one colour. Two views:

* **guest** (what the guest kernel sees): the page states, with free pages split into plain free and
  free *reported* to the host (``PageReported``, mm/page_reporting.c).
* **host** (what QEMU's RSS is made of): whether the host has RAM behind a page, and whether the guest
  is using it. A free (or ballooned, or hinted) page the host still backs is the "RSS stays at its
  maximum" waste; a page the host discarded or never faulted in reads as zero and costs nothing.

Each view is a fixed ordered list of :class:`Category` (name, colour, importance). Colours come from
the Okabe-Ito and Paul Tol palettes, chosen to stay distinct under the common colour-vision
deficiencies; greys only for "nothing here" (free, not backed, offline, absent), told apart by
lightness. ``importance`` weighs the page counts when many pages share one pixel (:func:`downsample`:
the category with the most ``pages x importance`` wins), so a single balloon page in a sea of free
pages stays visible. Small cells (2 or 4 pages) use a lookup table indexed by the packed categories
of the cell; larger ones count each category present with packed bits and popcount.

>>> import numpy as np
>>> from labkit.model.pages import PageFlag, PageState
>>> state = np.array([PageState.FREE, PageState.FREE, PageState.BALLOON], dtype=np.uint8)
>>> flags = np.array([0, PageFlag.REPORTED, 0], dtype=np.uint8)
>>> [GUEST_CATEGORIES[i].name for i in classify(state, flags)]
['free', 'free (reported)', 'balloon']
>>> [HOST_CATEGORIES[i].name for i in classify(state, flags, view="host")]
['not backed (reads as zero)', 'not backed (reads as zero)', 'balloon (discarded)']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.model.pages import PageFlag, PageState

VIEWS = ("guest", "host")


@dataclass(frozen=True)
class Category:
    """One colour on the page map: ``name`` for the legend, ``color`` (hex), ``importance``
    (weight of one page of this category when a pixel covers many pages)."""

    name: str
    color: str
    importance: float


# --- guest view: one category per page state, free split by PageReported ----------------------
G_FREE, G_REPORTED, G_RESERVED, G_KERNEL, G_ANON, G_SHMEM, G_FILE_CLEAN, G_FILE_DIRTY, \
    G_BALLOON, G_HINTED, G_OFFLINE, G_ABSENT, G_PCP = range(13)

GUEST_CATEGORIES: tuple[Category, ...] = (
    Category("free", "#E6E6E6", 1),
    Category("free (reported)", "#88CCEE", 64),
    Category("reserved", "#332288", 4),
    Category("kernel", "#882255", 4),
    Category("anon", "#CC6677", 2),
    Category("shmem", "#AA4499", 4),
    Category("file clean", "#44AA99", 2),
    Category("file dirty", "#117733", 8),
    Category("balloon", "#E69F00", 1024),
    Category("hinted", "#F0E442", 1024),
    Category("offline", "#8C8C8C", 256),
    Category("absent", "#1A1A1A", 0.5),
    Category("free (per-CPU list)", "#BBBBBB", 2),
)

# --- host view: what QEMU's resident set is made of -------------------------------------------
H_IN_USE, H_IDLE, H_NOT_BACKED, H_SWAPPED, H_BALLOON, H_ABSENT, H_BALLOON_BACKED = range(7)

HOST_CATEGORIES: tuple[Category, ...] = (
    Category("backed, in use by the guest", "#009E73", 1),
    Category("backed, guest-free (idle waste)", "#CC3311", 4),
    Category("not backed (reads as zero)", "#E6E6E6", 1),
    Category("swapped to host swap", "#EE3377", 256),
    Category("balloon (discarded)", "#E69F00", 1024),
    Category("absent / offline", "#1A1A1A", 0.5),
    Category("balloon, still backed (discard off)", "#7A5195", 1024),
)

# The colour names the notebooks' text uses, one per colour (no two "oranges").
COLOR_NAMES = {
    "#E6E6E6": "light grey", "#88CCEE": "light blue", "#332288": "indigo", "#882255": "wine",
    "#CC6677": "rose", "#AA4499": "purple", "#44AA99": "teal", "#117733": "dark green",
    "#E69F00": "orange", "#F0E442": "yellow", "#8C8C8C": "grey", "#1A1A1A": "black",
    "#009E73": "green", "#CC3311": "red", "#EE3377": "magenta", "#7A5195": "violet",
    "#BBBBBB": "silver",
}
# the outline drawn around cells that changed since the previous frame (not a state's colour)
CHANGED_COLOR = "#FF00FF"

CATEGORIES = {"guest": GUEST_CATEGORIES, "host": HOST_CATEGORIES}

# One lookup per view, indexed by ``state | (flag bits << 6)`` (states < 64): a single gather a page.
assert len(PageState) <= 64
_GUEST_LUT = np.zeros(256, dtype=np.uint8)  # key: state | REPORTED << 6
_HOST_LUT = np.zeros(256, dtype=np.uint8)  # key: state | BACKED << 6 | SWAPPED << 7
_GUEST_OF_STATE = {
    PageState.FREE: G_FREE, PageState.RESERVED: G_RESERVED, PageState.KERNEL: G_KERNEL,
    PageState.ANON: G_ANON, PageState.SHMEM: G_SHMEM, PageState.FILE_CLEAN: G_FILE_CLEAN,
    PageState.FILE_DIRTY: G_FILE_DIRTY, PageState.BALLOON: G_BALLOON,
    PageState.HINTED: G_HINTED, PageState.OFFLINE: G_OFFLINE, PageState.ABSENT: G_ABSENT,
    PageState.PCP: G_PCP,
}
_GUEST_FREE = (PageState.FREE, PageState.BALLOON, PageState.HINTED, PageState.OFFLINE,
               PageState.ABSENT, PageState.PCP)  # pages the guest is not using
for _state in PageState:
    _GUEST_LUT[int(_state)] = _GUEST_OF_STATE[_state]
    _GUEST_LUT[int(_state) | 64] = G_REPORTED if _state == PageState.FREE else (
        _GUEST_OF_STATE[_state])
    _unbacked = {PageState.BALLOON: H_BALLOON, PageState.OFFLINE: H_ABSENT,
                 PageState.ABSENT: H_ABSENT}.get(_state, H_NOT_BACKED)
    _HOST_LUT[int(_state)] = _unbacked
    _HOST_LUT[int(_state) | 64] = H_BALLOON_BACKED if _state == PageState.BALLOON else (
        H_IDLE if _state in _GUEST_FREE else H_IN_USE)
    _HOST_LUT[int(_state) | 128] = _HOST_LUT[int(_state) | 192] = H_SWAPPED
del _state, _unbacked


def categories(view: str = "guest") -> tuple[Category, ...]:
    """The ordered categories of ``view`` ("guest" or "host")."""
    _check_view(view)
    return CATEGORIES[view]


def colors(view: str = "guest") -> list[str]:
    return [c.color for c in categories(view)]


def names(view: str = "guest") -> list[str]:
    return [c.name for c in categories(view)]


def importance(view: str = "guest") -> np.ndarray:
    return np.array([c.importance for c in categories(view)], dtype=np.float64)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {list(VIEWS)}")


def classify(state: np.ndarray, flags: np.ndarray, view: str = "guest") -> np.ndarray:
    """Category index (uint8, into :func:`categories` of ``view``) of every page.

    Guest view: the page state, with free pages that carry ``PageFlag.REPORTED`` shown apart.
    Host view, in order of precedence: swapped to host swap; backed and in use (reserved, kernel,
    anon, shmem, file); a balloon page the host still backs (discard disabled, as under VFIO: its
    own colour, so the legend does not call it discarded); backed but guest-free (free or hinted
    pages the host still holds, and offline/absent ranges that are still backed); not backed:
    balloon, offline/absent, or anything else (never touched or discarded, reads as zero).

    >>> import numpy as np
    >>> classify(np.array([3, 0], dtype=np.uint8), np.array([2, 2], dtype=np.uint8), "host")
    array([0, 1], dtype=uint8)
    """
    _check_view(view)
    state = np.asarray(state)
    flags = np.asarray(flags)
    if state.shape != flags.shape:
        raise ValueError(f"state and flags must have the same shape, got {state.shape} and "
                         f"{flags.shape}")
    if state.dtype != np.uint8 or flags.dtype != np.uint8:
        raise TypeError(f"state and flags must be uint8 arrays, got {state.dtype} and {flags.dtype}")
    if view == "guest":
        key = (flags & np.uint8(PageFlag.REPORTED)) << np.uint8(6)
        lut = _GUEST_LUT
    else:
        key = (flags & np.uint8(PageFlag.BACKED)) << np.uint8(5)
        key |= (flags & np.uint8(PageFlag.SWAPPED)) << np.uint8(5)
        lut = _HOST_LUT
    key |= state & np.uint8(63)
    return lut[key]


def downsample(cats: np.ndarray, cell: int, weights: np.ndarray) -> np.ndarray:
    """Reduce each run of ``cell`` categories along the last axis to the category with the most
    ``count x weight`` (ties go to the lower index). ``cats`` is uint8 with values < 16.

    >>> downsample(np.array([[0, 0, 0, 8]], dtype=np.uint8), 4, np.array([1.0] * 8 + [1024.0]))
    array([[8]], dtype=uint8)
    """
    if cell & (cell - 1) or cell < 1:
        raise ValueError(f"cell must be a power of two >= 1, got {cell}")
    if cats.shape[-1] % cell:
        raise ValueError(f"the last axis ({cats.shape[-1]}) must be a multiple of cell {cell}")
    if cell == 1:
        return np.array(cats, dtype=np.uint8, copy=True)
    out_shape = cats.shape[:-1] + (cats.shape[-1] // cell,)
    if cell in (2, 4):
        return _lookup(cell, tuple(weights))[_pack(cats, cell)].reshape(out_shape)
    runs = np.ascontiguousarray(cats).reshape(-1, cell)
    word = {8: np.uint8, 16: np.uint16, 32: np.uint32}.get(cell, np.uint64)
    best_score = np.zeros(len(runs), dtype=np.float32)
    best = np.zeros(len(runs), dtype=np.uint8)
    present = np.flatnonzero(np.bincount(runs.ravel(), minlength=len(weights)))
    for category in present:  # a loop over categories, not pages
        is_category = runs == category
        if hasattr(np, "bitwise_count"):  # numpy >= 2: pack 8 pages a byte, count set bits
            packed = np.packbits(is_category.ravel()).view(word).reshape(len(runs), -1)
            counts = np.bitwise_count(packed).sum(axis=1, dtype=np.uint32)
        else:
            counts = is_category.sum(axis=1, dtype=np.uint32)
        score = counts.astype(np.float32) * np.float32(weights[category])
        better = score > best_score
        best_score[better] = score[better]
        best[better] = category
    return best.reshape(out_shape)


def _pack(cats: np.ndarray, cell: int) -> np.ndarray:
    runs = np.ascontiguousarray(cats).reshape(-1, cell).astype(np.uint16)
    code = runs[:, 0] << 4 | runs[:, 1]
    if cell == 4:
        code = code << 8 | runs[:, 2] << 4 | runs[:, 3]
    return code


_LOOKUPS: dict[tuple, np.ndarray] = {}


def _lookup(cell: int, weights: tuple) -> np.ndarray:
    """The winner of every possible run of ``cell`` 4-bit categories (256 or 65536 entries)."""
    key = (cell, weights)
    if key not in _LOOKUPS:
        code = np.arange(16 ** cell, dtype=np.int64)
        digits = np.stack([(code >> (4 * (cell - 1 - i))) & 15 for i in range(cell)], axis=1)
        w = np.zeros(16)
        w[:len(weights)] = weights
        onehot = digits[:, :, None] == np.arange(16)[None, None, :]
        scores = onehot.sum(axis=1) * w[None, :]
        _LOOKUPS[key] = scores.argmax(axis=1).astype(np.uint8)
    return _LOOKUPS[key]
