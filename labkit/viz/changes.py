"""What one step changed, in words: page-state transitions between two snapshots, and a readout.

A step of a VM (a balloon request, a reporting pass, a plug request...) moves pages from one state
to another. :func:`transitions` counts them with one ``bincount`` over the (old state, new state)
pairs of the pages that changed, read from two ``vm.snapshot()`` arrays (no backend internals);
:func:`describe` turns the counts into "256 pages free → balloon", and :func:`step_readout` adds
the clock and the host's RSS change: "request 17: 256 pages free → balloon, host RSS −1.0 MiB".

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

HALO_PX = 2  # width of the outline around changed cells, in cells (= screen pixels at overview)
# PCP pages are free pages on a per-CPU list (docs/mechanisms.md §10.3): said so in words
STATE_NAMES = tuple("per-CPU free" if s == PageState.PCP else s.name.lower().replace("_", " ")
                    for s in PageState)


def transitions(old_state: np.ndarray, new_state: np.ndarray) -> list[tuple[str, str, int]]:
    """``(from, to, pages)`` for every pair of states some page moved between, most pages first.

    ``old_state`` and ``new_state`` are the uint8 ``state`` arrays of two snapshots of one guest."""
    old_state, new_state = np.asarray(old_state), np.asarray(new_state)
    if old_state.shape != new_state.shape:
        raise ValueError(f"two snapshots of different guests: {old_state.shape} vs {new_state.shape} pages")
    moved = np.flatnonzero(old_state != new_state)
    if len(moved) == 0:
        return []
    pairs = old_state[moved].astype(np.int64) * N_STATES + new_state[moved]
    counts = np.bincount(pairs, minlength=N_STATES * N_STATES)
    found = np.flatnonzero(counts)
    found = found[np.argsort(-counts[found], kind="stable")]
    return [(STATE_NAMES[k // N_STATES], STATE_NAMES[k % N_STATES], int(counts[k])) for k in found]


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


def any_reduce(mask: np.ndarray, cell: int) -> np.ndarray:
    """Each run of ``cell`` along the last axis -> True if any is True (a changed pixel)."""
    if cell == 1:
        return mask.copy()
    return mask.reshape(mask.shape[:-1] + (mask.shape[-1] // cell, cell)).any(axis=-1)


def outline(mask: np.ndarray, width: int = HALO_PX) -> np.ndarray:
    """uint8 image: 1 on the ring of ``width`` cells around the True cells of ``mask``, else 0."""
    grown = mask.copy()
    for axis in (0, 1):  # separable square dilation: shifted ORs along each axis
        step = grown.copy()
        for d in range(1, width + 1):
            if axis == 0:
                step[d:] |= grown[:-d]
                step[:-d] |= grown[d:]
            else:
                step[:, d:] |= grown[:, :-d]
                step[:, :-d] |= grown[:, d:]
        grown = step
    return (grown & ~mask).astype(np.uint8)
