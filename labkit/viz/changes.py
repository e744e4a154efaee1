"""What one step changed, in words and on the picture: page-state transitions between two snapshots,
a readout, and the outline rectangles drawn around changed cells.

A step of a VM (a balloon request, a reporting pass, a plug request...) moves pages from one state
to another. :func:`transitions` counts them with one ``bincount`` over the (old state, new state)
pairs of the pages that changed, read from two ``vm.snapshot()`` arrays (no backend internals);
:func:`describe` turns the counts into "256 pages free → balloon", and :func:`step_readout` adds
the clock and the host's RSS change: "request 17: 256 pages free → balloon, host RSS −1.0 MiB".
:func:`box_cover` turns a mask of changed cells into a few hundred rectangles at most, and
:func:`add_outline` draws them as stroked, unfilled quads (the colour inside stays visible).

>>> import numpy as np
>>> from labkit.model.pages import PageState
>>> old = np.zeros(1024, dtype=np.uint8)
>>> new = old.copy(); new[:256] = PageState.BALLOON
>>> transitions(old, new)
[('free', 'balloon', 256)]
>>> describe(transitions(old, new))
'256 pages free → balloon'
>>> step_readout("request 17", transitions(old, new), rss_delta=-(1 << 20))
'request 17: 256 pages free → balloon, host RSS −1.0 MiB'
"""

from __future__ import annotations

import numpy as np

from labkit.model.pages import N_STATES, PageState
from labkit.units import format_size

# PCP pages are free pages on a per-CPU list (docs/mechanisms.md §10.3): said so in words
STATE_NAMES = tuple("per-CPU free" if s == PageState.PCP else s.name.lower().replace("_", " ")
                    for s in PageState)


def transitions(old_state: np.ndarray, new_state: np.ndarray,
                names: tuple[str, ...] | list[str] = STATE_NAMES) -> list[tuple[str, str, int]]:
    """``(from, to, pages)`` for every pair of states some page moved between, most pages first.

    ``old_state`` and ``new_state`` are the uint8 ``state`` arrays of two snapshots of one guest (or
    any two arrays of codes into ``names``: the page map passes its display categories)."""
    old_state, new_state = np.asarray(old_state), np.asarray(new_state)
    if old_state.shape != new_state.shape:
        raise ValueError(f"two snapshots of different guests: {old_state.shape} vs {new_state.shape} pages")
    moved = np.flatnonzero(old_state != new_state)
    if len(moved) == 0:
        return []
    k = max(len(names), N_STATES)
    pairs = old_state[moved].astype(np.int64) * k + new_state[moved]
    counts = np.bincount(pairs, minlength=k * k)
    found = np.flatnonzero(counts)
    found = found[np.argsort(-counts[found], kind="stable")]
    return [(names[c // k], names[c % k], int(counts[c])) for c in found]


def describe(moves: list[tuple[str, str, int]], most: int = 3) -> str:
    """"256 pages free → balloon, 12 pages anon → free" (the ``most`` largest moves)."""
    if not moves:
        return "no page changed state"
    text = [f"{n} page{'s' if n != 1 else ''} {a} → {b}" for a, b, n in moves[:most]]
    if len(moves) > most:
        text.append(f"{sum(n for *_, n in moves[most:])} more pages in {len(moves) - most} other moves")
    return ", ".join(text)


def signed_size(delta: float) -> str:
    """"+1.0 MiB", "−256.0 KiB", "±0 B" (a real minus sign)."""
    delta = int(delta)
    if delta == 0:
        return "±0 B"
    text = format_size(abs(delta))
    if "." not in text.split()[0] and not text.endswith(" B"):
        number, unit = text.split()
        text = f"{float(number):.1f} {unit}"
    return ("+" if delta > 0 else "−") + text


def step_readout(what: str, moves: list[tuple[str, str, int]], rss_delta: float | None = None) -> str:
    """"request 17: 256 pages free → balloon, host RSS −1.0 MiB"."""
    text = f"{what}: {describe(moves)}"
    if rss_delta is not None:
        text += f", host RSS {signed_size(rss_delta)}"
    return text


MAX_BOXES = 256  # outline rectangles sent per frame at most (4 numbers each)


def _runs_to_boxes(mask: np.ndarray) -> np.ndarray:
    """Rectangles covering exactly the True cells of a 2-D mask: the runs of each row, merged
    with the same run of the rows below."""
    rows, cols = mask.shape
    padded = np.zeros((rows, cols + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    r, c0 = np.nonzero(edges == 1)  # row-major order: the i-th start and the i-th end pair up
    _, c1 = np.nonzero(edges == -1)
    if len(r) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    order = np.lexsort((r, c1, c0))  # by run, then row: a run repeated on the next rows is one box
    r, c0, c1 = r[order], c0[order], c1[order]
    new = np.ones(len(r), dtype=bool)
    new[1:] = (c0[1:] != c0[:-1]) | (c1[1:] != c1[:-1]) | (r[1:] != r[:-1] + 1)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(r)) - 1
    return np.stack([c0[first], c1[first], r[first], r[last] + 1], axis=1).astype(np.int64)


def box_cover(mask: np.ndarray, max_boxes: int = MAX_BOXES) -> np.ndarray:
    """``(n, 4)`` rectangles ``(col0, col1, row0, row1)`` (ends exclusive, in cells of ``mask``)
    that cover every True cell of the 2-D ``mask``: exact while at most ``max_boxes`` are needed,
    else on a mask coarsened 2x2 at a time (a True cell makes its coarse cell True), so scattered
    changes cost a few hundred rectangles, never one per cell.

    >>> m = np.zeros((4, 8), dtype=bool); m[1, 2:6] = m[2, 2:6] = True; m[3, 0] = True
    >>> box_cover(m).tolist()
    [[0, 1, 3, 4], [2, 6, 1, 3]]
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"box_cover needs a 2-D mask, got shape {mask.shape}")
    factor, coarse = 1, mask
    while True:
        boxes = _runs_to_boxes(coarse)
        if len(boxes) <= max_boxes or coarse.size == 1:
            break
        rows, cols = coarse.shape
        padded = np.zeros((rows + rows % 2, cols + cols % 2), dtype=bool)
        padded[:rows, :cols] = coarse
        coarse = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
        factor *= 2
    boxes = boxes * factor
    boxes[:, 1] = np.minimum(boxes[:, 1], mask.shape[1])
    boxes[:, 3] = np.minimum(boxes[:, 3], mask.shape[0])
    return boxes


def outline_data(boxes: np.ndarray, pad_x: float = 0.0, pad_y: float = 0.0) -> dict[str, list]:
    """The quad source of :func:`add_outline` for ``boxes`` ``(x0, x1, y0, y1)`` in data units,
    each grown by ``pad_x``/``pad_y`` so that the stroke runs around the cells, not over them."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return {"left": (boxes[:, 0] - pad_x).tolist(), "right": (boxes[:, 1] + pad_x).tolist(),
            "top": (boxes[:, 2] - pad_y).tolist(), "bottom": (boxes[:, 3] + pad_y).tolist()}


def add_outline(fig, source, line_width: float = 2.0):
    """Draw ``source`` (:func:`outline_data`) on ``fig`` as magenta rectangle outlines with no fill:
    a stroke of ``line_width`` screen pixels around what changed, whatever the zoom, that leaves
    the new colours of the changed cells visible."""
    from labkit.viz.palette import CHANGED_COLOR

    return fig.quad(left="left", right="right", top="top", bottom="bottom", source=source,
                    fill_alpha=0.0, line_color=CHANGED_COLOR, line_width=line_width, line_alpha=0.95)
