"""Visible steps (issue 9, item 2): the page map outlines what a step changed, the readout says it in
words and numbers, the explorer zooms to it and can step to the next visible change.

The facts: one balloon request moves at most VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256 pages from the
guest's free lists into the balloon (drivers/virtio/virtio_balloon.c, fill_balloon(); §1.2), and
QEMU discards the backed ones (hw/virtio/virtio-balloon.c, balloon_inflate_page(); §1.6), so host
RSS falls by at most 1 MiB per request.
"""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.model.pages import PageState
from labkit.units import MiB
from labkit.viz import palette
from labkit.viz.changes import (
    STATE_NAMES,
    any_reduce,
    describe,
    outline,
    signed_size,
    step_readout,
    transitions,
)
from labkit.viz.explorer import explore
from labkit.viz.pagemap import page_map


def test_transitions_are_a_bincount_of_state_pairs():
    rng = np.random.default_rng(0)
    old = rng.integers(0, len(PageState), 50_000).astype(np.uint8)
    new = old.copy()
    moved = rng.choice(len(old), 3000, replace=False)
    new[moved] = rng.integers(0, len(PageState), len(moved))
    got = transitions(old, new)
    expected = {}
    for a, b in zip(old, new, strict=True):  # a plain loop over pages, as an oracle only
        if a != b:
            key = (STATE_NAMES[a], STATE_NAMES[b])
            expected[key] = expected.get(key, 0) + 1
    assert {(a, b): n for a, b, n in got} == expected
    assert [n for *_, n in got] == sorted((n for *_, n in got), reverse=True)
    assert transitions(old, old) == [] and describe([]) == "no page changed state"
    with pytest.raises(ValueError, match="different guests"):
        transitions(old, new[:10])


def test_signed_sizes_and_the_readout():
    assert signed_size(-(1 << 20)) == "−1.0 MiB" and signed_size(3 << 19) == "+1.5 MiB"
    assert signed_size(0) == "±0 B"
    moves = [("free", "balloon", 256), ("anon", "free", 3), ("free", "kernel", 1), ("a", "b", 1)]
    assert step_readout("request 17", moves[:1], -(1 << 20)) == (
        "request 17: 256 pages free → balloon, host RSS −1.0 MiB")
    assert describe(moves).endswith("1 more pages in 1 other moves")


def test_outline_rings_changed_cells_and_any_reduce_keeps_one_page():
    mask = np.zeros((8, 1024), dtype=bool)
    mask[3, 517] = True  # one page among 1024 per cell
    reduced = any_reduce(mask, 64)
    assert reduced.shape == (8, 16) and reduced[3, 8] and reduced.sum() == 1
    ring = outline(reduced, width=1)
    assert ring[3, 8] == 0 and ring[2:5, 7:10].sum() == 8 and ring.sum() == 8


def test_one_balloon_request_is_outlined_said_and_zoomable():
    with labkit.open(memory="4G", seed=0) as vm:
        pm = page_map(vm.snapshot(), width=400, height=320, legend="below")
        assert pm.halo.sum() == 0
        vm.qmp("balloon", value=4096 * MiB - MiB)
        assert vm.step()
        pm.update(vm.snapshot())
        # 256 pages -> balloon (fill_balloon's batch): off the CPU's per-CPU list first, then the
        # free lists (rmqueue_pcplist, whose refill may leave a few more pages on the list)
        into_balloon = [(a, n) for a, b, n in pm.last_moves if b == "balloon"]
        assert {a for a, _ in into_balloon} <= {"free", "per-CPU free"}
        assert sum(n for _, n in into_balloon) == 256
        assert all(b == "balloon" or (a, b) == ("free", "per-CPU free") for a, b, _ in pm.last_moves)
        changed = pm.changed_pages
        col0, col1, row0, row1 = pm.changed_region()
        assert (col1 - col0) * (row1 - row0) >= 256
        halo = pm.halo
        assert halo.any() and halo.shape == pm.image.shape
        # the outline sits around the cells that changed: those cells now show the balloon
        rows, cols = np.nonzero(halo)
        near = pm.image[max(0, rows.min() - 1):rows.max() + 2, max(0, cols.min() - 1):cols.max() + 2]
        assert (near == palette.G_BALLOON).any()
        assert pm.zoom_to_change()
        x0, x1 = pm.figure.x_range.start, pm.figure.x_range.end
        y1, y0 = pm.figure.y_range.start, pm.figure.y_range.end  # rows grow downwards
        assert x0 <= col0 and col1 <= x1 and y0 <= row0 and row1 <= y1
        assert y1 - y0 < pm.rows / 4  # zoomed in on the rows the request touched
        pm.update(vm.snapshot())  # the same snapshot again: nothing changed, no outline change
        assert pm.changed_pages == changed


def test_explorer_step_readout_and_step_to_change():
    ex = explore(memory="1G", seed=0)
    try:
        ex.step()
        assert "nothing to do" in ex.change_html.value  # at its target: says so
        ex.slider.value = ex.slider.max - 4  # 4 MiB: four requests of 256 pages
        rss = ex.vm.sample()["host_rss"]
        assert ex.step() and ex.requests == 1
        text = ex.change_html.value
        # when request 1 is acked the driver has already taken the next batch of 256 pages off
        # the free lists (fill_balloon runs again at once while the target is unmet)
        # (off the per-CPU list first, then the free lists: rmqueue_pcplist)
        moved = ex.page_map.last_moves
        ballooned = sum(n for _, b, n in moved if b == "balloon")
        assert moved[0][1] == "balloon" and moved[0][0] in ("free", "per-CPU free")
        assert ballooned in (256, 512)
        assert text.startswith(f"<b>request 1: {moved[0][2]} pages {moved[0][0]} → balloon")
        assert 0 < rss - ex.vm.sample()["host_rss"] <= ballooned * 4096
        n = ex.step_to_change()
        assert n == 1 and ex.requests == 2  # one request already changes the 1 GiB overview
        assert ex.zoom_to_change()
        ex.tick()
        assert "ms: " in ex.change_html.value
        while ex.step():
            pass
        assert ex.vm.qmp("query-balloon")["actual"] == (1024 - 4) * MiB
        assert ex.step_to_change() == 1  # nothing to do: one (empty) step, then stop
    finally:
        ex.vm.close()


@pytest.mark.parametrize("n_changed", [1, 300, 40_000])
def test_incremental_update_draws_what_a_fresh_map_draws(n_changed):
    """update() reclassifies only the changed pages (and their overview cells) when they are few:
    the picture, the counts and the legend must be those of a map built from scratch."""
    rng = np.random.default_rng(n_changed)
    n = 1 << 18
    state = rng.integers(0, len(PageState), n).astype(np.uint8)
    flags = rng.integers(0, 8, n).astype(np.uint8)
    for view in ("guest", "host"):
        pm = page_map({"state": state, "flags": flags}, view=view, width=200, height=150)
        new_state, new_flags = state.copy(), flags.copy()
        where = rng.choice(n, n_changed, replace=False)
        new_state[where] = rng.integers(0, len(PageState), n_changed)
        new_flags[where] ^= 2
        pm.update({"state": new_state, "flags": new_flags})
        fresh = page_map({"state": new_state, "flags": new_flags}, view=view, width=200, height=150)
        assert np.array_equal(pm.image, fresh.image)
        assert np.array_equal(pm.counts, fresh.counts)
        assert pm.legend_source.data["label"] == fresh.legend_source.data["label"]
        assert pm.changed_pages == n_changed
