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
from labkit.units import MiB, format_size
from labkit.viz import palette
from labkit.viz.changes import (
    STATE_NAMES,
    box_cover,
    describe,
    outline_data,
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


def test_box_cover_is_exact_when_few_and_coarse_but_complete_when_many():
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 200), dtype=bool)
    mask[3, 17] = True                      # one cell
    mask[10:20, 40:90] = True               # a block: one box, not 10 row runs
    mask[30, 150:200] = mask[31, 0:20] = True  # a run wrapping to the next row: two boxes
    boxes = box_cover(mask)
    covered = np.zeros_like(mask)
    for c0, c1, r0, r1 in boxes:
        covered[r0:r1, c0:c1] = True
    assert np.array_equal(covered, mask) and len(boxes) == 4
    scattered = rng.random((300, 400)) < 0.05  # ~6000 isolated cells
    boxes = box_cover(scattered, max_boxes=200)
    assert len(boxes) <= 200
    covered = np.zeros_like(scattered)
    for c0, c1, r0, r1 in boxes:
        covered[r0:r1, c0:c1] = True
    assert covered[scattered].all()  # coarser, but every changed cell is inside a box
    assert box_cover(np.zeros((5, 5), bool)).shape == (0, 4)
    with pytest.raises(ValueError, match="2-D mask"):
        box_cover(np.zeros(5, bool))
    data = outline_data(np.array([[0, 4, 1, 2]]), pad_x=0.5, pad_y=0.25)
    assert data == {"left": [-0.5], "right": [4.5], "top": [0.75], "bottom": [2.25]}


def test_one_balloon_request_is_outlined_said_and_zoomable():
    with labkit.open(memory="4G", seed=0) as vm:
        pm = page_map(vm.snapshot(), width=400, height=320, legend="below")
        assert len(pm.outline_source.data["left"]) == 0
        vm.qmp("balloon", value=4096 * MiB - MiB)
        assert vm.step()
        pm.update(vm.snapshot())
        # a 1 MiB balloon: one fill_balloon batch of 256 pages, free -> balloon, nothing else
        # (off the CPU's per-CPU list, where order-0 allocations go first: rmqueue_pcplist; the
        # page map shows those free pages in their own grey)
        assert [(b, n) for _, b, n in pm.last_moves] == [("balloon", 256)]
        assert pm.last_moves[0][0] in ("free", "free (per-CPU list)")
        assert pm.changed_pages == 256
        col0, col1, row0, row1 = pm.changed_region()
        assert (col1 - col0) * (row1 - row0) >= 256
        boxes = pm.outline_boxes
        assert 1 <= len(boxes) <= 4
        # an OUTLINE: the rectangles surround the changed pages (a stroke just outside them, no
        # fill), and the cells inside show what the pages became: the balloon
        changed = np.flatnonzero(pm.grid._state == PageState.BALLOON)
        rows, cols = np.divmod(changed, pm.row_pages)
        for r, c in zip(rows, cols, strict=True):
            assert ((boxes[:, 0] < c) & (c < boxes[:, 1]) & (boxes[:, 2] < r) & (r < boxes[:, 3])).any()
        inside = pm.image[rows, cols // pm.cell]
        assert (inside == palette.G_BALLOON).all()
        glyph = next(r.glyph for r in pm.figure.renderers if r.data_source is pm.outline_source)
        assert glyph.fill_alpha == 0 and glyph.line_color == palette.CHANGED_COLOR
        assert pm.zoom_to_change()
        x0, x1 = pm.figure.x_range.start, pm.figure.x_range.end
        y1, y0 = pm.figure.y_range.start, pm.figure.y_range.end  # rows grow downwards
        assert x0 <= col0 and col1 <= x1 and y0 <= row0 and row1 <= y1
        assert y1 - y0 < pm.rows / 4  # zoomed in on the rows the request touched
        # zoomed: the outline follows, its stroke still 1.5 screen pixels outside the cells
        assert len(pm.outline_boxes) == len(boxes) and (np.diff(pm.outline_boxes[:, 2:]) < 1.2).all()
        pm.update(vm.snapshot())  # the same snapshot again: nothing changed since, no outline
        assert pm.changed_pages == 0 and pm.last_moves == [] and len(pm.outline_boxes) == 0


def test_explorer_step_readout_and_step_to_change():
    """The readout of a Step is true: the acknowledged request moved actual by at most 256 pages
    (VIRTIO_BALLOON_ARRAY_PFNS_MAX, §1.2), and the pages the driver already took for the next
    request (fill_balloon runs again at once while the target is unmet) are said apart, so that
    "acknowledged + already sent" is exactly what the page map shows moving."""
    ex = explore(memory="1G", seed=0)
    try:
        ex.step()
        assert "nothing to do" in ex.change_html.value  # at its target: says so
        ex.slider.value = ex.slider.max - 4  # 4 MiB: four requests of 256 pages
        rss = ex.vm.sample()["host_rss"]
        events = ex.live.sent_events
        assert ex.step() and ex.requests == 1
        assert ex.live.sent_messages > 0 and ex.live.sent_events > events
        text = ex.change_html.value
        moved = ex.page_map.last_moves
        assert [(b, n) for _, b, n in moved] == [("balloon", 512)] and moved[0][0].startswith("free")
        assert text.startswith("<b>request 1: 256 pages into the balloon, acknowledged (actual −1.0 MiB); "
                               f"256 more already sent · map: 512 pages {moved[0][0]} → balloon · host RSS −")
        assert 0 < rss - ex.vm.sample()["host_rss"] <= 512 * 4096
        assert ex.vm.sample()["balloon_size"] == 512 * 4096  # what the readout calls "already sent"
        n = ex.step_to_change()
        assert n == 1 and ex.requests == 2  # one request already changes the 1 GiB overview
        assert ex.last_readout.startswith("request 2: 256 pages into the balloon, acknowledged")
        assert ex.zoom_to_change()
        while ex.step():
            pass
        assert ex.vm.qmp("query-balloon")["actual"] == (1024 - 4) * MiB
        # the last request: acknowledged, nothing more sent, nothing new on the map
        assert ex.last_readout.startswith("request 4: 256 pages into the balloon, acknowledged (actual "
                                          "−1.0 MiB) · map: no page changed state")
        assert len(ex.page_map.outline_source.data["left"]) == 0  # no change, no outline
        ex.tick()
        assert ex.last_readout.startswith("100 ms: no request acknowledged · map: no page changed")
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
        # what counts as changed is what the picture shows: pages whose category in this view moved
        shown = palette.classify(state, flags, view) != palette.classify(new_state, new_flags, view)
        assert pm.changed_pages == int(shown.sum()) and set(pm.grid.changed) == set(np.flatnonzero(shown))
        assert sum(n for *_, n in pm.last_moves) == pm.changed_pages


# --- Play runs in the kernel ---------------------------------------------------------------------
def test_play_ticks_on_the_kernels_event_loop_and_stops(monkeypatch):
    """Play is a toggle: while it is on, the event loop the explorer runs in (the kernel's, in a
    notebook) calls tick() every play_interval_ms, with no message from the browser per frame; it
    stops when pressed again, after MAX_PLAY_TICKS, and at the first error (shown in the widget)."""
    import asyncio
    import concurrent.futures

    from labkit.viz import controls

    ex = explore(memory="1G", seed=0, tick_ms=10.0, play_interval_ms=10)

    async def play_for(seconds: float) -> None:
        ex.play.value = True
        await asyncio.sleep(seconds)
        ex.play.value = False

    def body() -> None:
        asyncio.run(play_for(0.3))
        ticks = ex.play_ticks
        assert ticks >= 3 and ex.vm.sample()["t_ms"] == pytest.approx(10.0 * ticks)
        assert ex.play.description == "Play"
        asyncio.run(asyncio.sleep(0.05))  # paused: nothing ticks any more
        assert ex.vm.sample()["t_ms"] == pytest.approx(10.0 * ticks)
        monkeypatch.setattr(controls, "MAX_PLAY_TICKS", 2)
        asyncio.run(play_for(0.2))
        assert ex.play_ticks == 2 and not ex.playing  # stopped by itself
        ex.play.value = True  # outside an event loop (a script): nothing ticks by itself
        assert ex.play_ticks == 0 and ex._play_timer is None
        ex.play.value = False

    # on a thread of its own, without a running event loop: in the whole suite the browser tests'
    # Playwright keeps one running on the main thread
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(body).result(timeout=60)
    finally:
        ex.vm.close()

    async def play_closed() -> None:
        ex.play.value = True
        await asyncio.sleep(0.1)

    # the VM is closed: the first tick fails, Play stops, the error shows (on its own thread too)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, play_closed()).result(timeout=60)
    assert not ex.playing and isinstance(ex.error, RuntimeError) and "closed" in ex.status_html.value


# --- what each stepper says is what happened -------------------------------------------------------
def test_migration_readout_says_the_hinting_round_and_what_was_sent():
    """02's explorer: the first tick of a hinting migration. The guest hands QEMU free blocks of
    order 10 (4 MiB, 1024 pages; §2.2) and QEMU clears their bits from the dirty bitmap; the
    readout's numbers are the page map's and query-migrate's."""
    from labkit.viz.migration_explorer import MigrationExplorer

    hint = {"free_page_hint": True, "iothread": "iothread0"}
    ex = MigrationExplorer(factory=lambda: labkit.open(memory="1G", seed=0, balloon=hint),
                           migrate="tcp:127.0.0.1:4444", tick_ms=1, sample_ms=1)
    try:
        facts = [ex._facts]
        ex.tick = (lambda tick: lambda: (facts.append(ex._facts), tick())[1])(ex.tick)
        n = ex.step_to_change()  # 1 ms ticks until the map changes: the round's hinted blocks
        before, after, text = facts[-1], ex._facts, ex.last_readout
        assert 1 <= n <= 10
        held = ex.status["held_blocks"]
        assert held > 0 and f"the guest holds {held} blocks of 4 MiB" in text
        assert ex.page_map.last_moves == [("free", "hinted", held * 1024)]
        assert f"map: {held * 1024} pages free → hinted" in text
        assert "QEMU REQUESTED → START" in text  # QEMU saw its command ID come back (§2.1)
        assert after["hinted"] == before["hinted"] and "cleared" not in text  # not read yet
        while ex._facts["hinted"] == 0:  # QEMU's I/O thread reads the hints: bits leave the bitmap
            ex.step()
        before, after, text = facts[-1], ex._facts, ex.last_readout
        cleared = after["hinted"] - before["hinted"]
        assert 0 < cleared <= held * 1024 and f"QEMU cleared {cleared} pages from the bitmap" in text
        sent = after["normal"] - before["normal"], after["zero"] - before["zero"]
        assert f"({sent[0]} normal pages, {sent[1]} zero pages)" in text
        assert f"sent {format_size(after['transferred'] - before['transferred'])}" in text
        assert ex.step_to_change() >= 1  # later ticks send pages, then DONE frees the blocks
        while ex.vm.qmp("query-migrate")["status"] != "completed":
            ex.step()
        assert "hinting" in ex.last_readout or "stop-and-copy" in ex.last_readout
    finally:
        ex.vm.close()


def test_reporting_readout_matches_the_counters_and_the_map():
    """03's explorer: a pass reports free blocks of order >= 9 (2 MiB) in batches of at most 32
    (PAGE_REPORTING_CAPACITY, §3.3); the pages it reported turn "free (reported)" on the map, and
    the readout's MiB are sample()'s reported_bytes."""
    from labkit.viz.reporting import ReportingExplorer

    vm = labkit.open(memory="1G", seed=0, balloon={"free_page_reporting": True})
    vm.advance(30_000)
    ex = ReportingExplorer(vm, job_mib=256)
    try:
        ex.run_job(256)
        assert ex.last_readout.startswith("a 256 MiB job ran and exited")
        before = ex.facts()
        assert ex.step_to_change() == 2
        after = ex.facts()
        reported = after["reported_bytes"] - before["reported_bytes"]
        reports = after["reports"] - before["reports"]
        assert reported > 0 and reported <= reports * 32 * 4 * MiB
        moves = dict(((a, b), n) for a, b, n in ex.page_map.last_moves)
        assert moves[("free", "free (reported)")] * 4096 == reported
        assert f"{reports} reports; free and reported {signed_size(reported)}" in ex.last_readout
        assert len(ex.page_map.outline_boxes) >= 1
    finally:
        vm.close()


def test_virtio_mem_readout_and_outline_of_one_unplugged_subblock():
    """05's explorer: below a whole block, the driver unplugs one 2 MiB subblock per request
    (§5.5): one UNPLUG request, one grid cell plugged -> unplugged, outlined."""
    from labkit.viz.memblocks import MOVABLE, UNPLUGGED
    from labkit.viz.memblocks_explorer import explore_virtio_mem

    ex = explore_virtio_mem(memory="1G", seed=0, balloon=False, memhp_default_state="online_movable",
                            virtio_mem=[{"id": "vm0", "size": "1G"}])
    try:
        ex.slider.value = 128
        ex.tick()
        ex.slider.value = 126
        assert ex.step()
        text = ex.last_readout
        assert text.startswith("step (+") and "1 UNPLUG request" in text
        assert "plugged 128 MiB → 126 MiB" in text
        assert ex.grid.last_moves == [("plugged, online ZONE_MOVABLE", "unplugged", 1)]
        (x0, x1, y0, y1), = ex.grid.outline_boxes
        assert x0 < 63 < x1 and y0 < 0.5 < y1  # the top subblock of block 0 (from the top, §5.5)
        assert ex.grid.image[0, 63] == UNPLUGGED and ex.grid.image[0, 62] == MOVABLE
        assert ex.step_to_change() == 1 and "no driver event" in ex.last_readout  # done: no event
    finally:
        ex.vm.close()


def test_writeback_stepper_outlines_and_says_what_the_flusher_and_the_crash_did(tmp_path):
    """04's stepper: host page cache pages dirty for dirty_expire_centisecs (30 s) are written by
    the flusher that wakes every dirty_writeback_centisecs (5 s; mm/page-writeback.c), so 32 MiB
    written at t = 0 turn clean at the 35 s step; a crash then loses what is still dirty."""
    from labkit.model.host import Host
    from labkit.units import GiB, PAGE_SIZE
    from labkit.viz.pagecache import WritebackStepper

    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    spec = [{"id": "vpmem0", "path": str(image), "size": "1G"}]
    with labkit.open(memory="1G", seed=0, host=Host(8 * GiB), model={"boot": "minimal"},
                     virtio_pmem=spec) as vm:
        vm.guest("pmem_write", device="vpmem0", offset=0, size="32M")
        stepper = WritebackStepper(vm, vm.virtio_pmem.devices[0].file, pages=64 * MiB // PAGE_SIZE)
        stepper.widget()
        assert stepper.step_to_change() == 7 and vm.now_ms == 35_000
        assert stepper.last_moves == [("dirty (not on disk)", "clean (cached)", 256)]
        assert "in the host page cache 32 → 0 MiB" in stepper.last_readout
        assert "256 cells (32 MiB) dirty (not on disk) → clean (cached)" in stepper.last_readout
        (x0, x1, _, _), = [tuple(b) for b in np.array(
            [stepper.outline_source.data[k] for k in ("left", "right", "top", "bottom")]).T]
        assert 0 < x0 < 2 and 254 < x1 < 256  # just inside the first 256 cells (128 KiB each)
        vm.guest("pmem_write", device="vpmem0", offset=32 * MiB, size="16M")
        stepper.refresh("a 16 MiB write")
        assert stepper.last_readout.startswith("a 16 MiB write: ") and "16 MiB" in stepper.last_readout
        stepper.crash()
        assert stepper.last_readout.startswith("host crash at t = 35 s: 16 MiB that was dirty")
        assert ("dirty (not on disk)", "lost in crash", 128) in stepper.last_moves


def test_the_page_map_draws_the_zone_boundaries():
    """Issue 11: the page map draws where each zone starts (q35: DMA is the first 16 MiB, DMA32 the
    rest below the 2 GiB PCI hole here, Normal above 4 GiB; docs/mechanisms.md §10.1), and the
    ZONE_MOVABLE of a virtio-mem device's region where the region starts (§5.5)."""
    with labkit.open(memory="6G", seed=0, balloon=False) as vm:
        pm = page_map(vm.snapshot())
        assert pm.row_pages == 4096
        assert pm.zone_label_source.data["text"] == ["DMA", "DMA32", "Normal"]
        # 16 MiB = 4096 pages: row 1; 2 GiB = 524288 pages: row 128 (the boundaries fall between rows)
        assert pm.zone_source.data["y0"] == [1.0, 128.0] == pm.zone_source.data["y1"]
    with labkit.open(memory="1G", seed=0, balloon=False, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "v0", "size": "512M", "requested_size": "256M"}]) as vm:
        vm.advance(3000)
        pm = page_map(vm.snapshot())
        labels = pm.zone_label_source.data
        assert labels["text"][-1] == "Movable"
        start = vm.regions[0].start
        assert (labels["y"][-1], labels["x"][-1]) == divmod(start, pm.row_pages)


def test_the_page_map_labels_guest_physical_addresses():
    """The page index leaves q35's PCI hole out (RAM above 2 GiB of a 4 GiB guest is at 4 GiB;
    docs/mechanisms.md §10.1) and a virtio-mem region sits at its memaddr: the snapshot says where
    each run of indexes lies, and the page map's axis and hover get those runs (the mapping itself
    is checked in a browser: tests/browser/test_display_state.py)."""
    with labkit.open(memory="4G", seed=0, balloon=False,
                     virtio_mem=[{"id": "v0", "size": "1G"}]) as vm:
        snap = vm.snapshot()
        assert snap["phys"] == [(0, 524288, 0), (524288, 1048576, 1 << 20),
                                (vm.regions[0].start, vm.regions[0].end, vm.regions[0].memaddr >> 12)]
        pm = page_map(snap)
        flat = [x for run in snap["phys"] for x in run]
        assert pm.figure.yaxis[0].formatter.args["P"] == flat == pm._addr_hover.args["P"]
        assert pm.figure.yaxis[0].axis_label == "guest physical address (holes left out)"
    with labkit.open(memory="1G", seed=0, balloon=False) as vm:
        pm = page_map(vm.snapshot())
        assert pm.figure.yaxis[0].axis_label == "guest physical address"  # one run: no hole
        pm.update(dict(vm.snapshot(), phys=[(0, 131072, 0), (131072, 262144, 1 << 20)]))
        assert pm.figure.yaxis[0].formatter.args["P"] == [0, 131072, 0, 131072, 262144, 1 << 20]
        assert pm.figure.yaxis[0].axis_label.endswith("(holes left out)")
