"""labkit.viz: display categories, the page map (downsampling, zoom, updates), time series and the
explorer widget, driven headless the way a notebook cell would drive them."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.document.events import ColumnDataChangedEvent, ColumnsPatchedEvent, ColumnsStreamedEvent
from bokeh.events import RangesUpdate
from bokeh.models import CustomJSHover, CustomJSTickFormatter

import labkit
import labkit.viz as viz
from labkit.model.pages import PageFlag, PageState
from labkit.units import MiB, format_size
from labkit.viz import palette
from labkit.viz.pagemap import grid_width
from labkit.viz.palette import downsample

S, F = PageState, PageFlag
REPORTED, BACKED, SWAPPED = int(F.REPORTED), int(F.BACKED), int(F.SWAPPED)


def snapshot(n: int, fill: PageState = S.FREE, flags: int = 0) -> dict:
    return {"t_ms": 0.0, "state": np.full(n, int(fill), dtype=np.uint8),
            "flags": np.full(n, flags, dtype=np.uint8), "zones": [("Normal", 0, 0, n)]}


def reference_downsample(cats: np.ndarray, cell: int, weights: np.ndarray) -> np.ndarray:
    """Straightforward weighted mode with bincount, to hold the fast paths against."""
    runs = cats.reshape(-1, cell).astype(np.int64)
    k = len(weights)
    keys = runs + (np.arange(len(runs)) * k)[:, None]
    counts = np.bincount(keys.ravel(), minlength=len(runs) * k).reshape(len(runs), k)
    return (counts * weights).argmax(axis=1).astype(np.uint8).reshape(
        cats.shape[:-1] + (cats.shape[-1] // cell,))


# --- palette ------------------------------------------------------------------------------------
GUEST_CASES = [  # (state, flags, expected guest category name)
    (S.FREE, 0, "free"), (S.FREE, REPORTED, "free (reported)"), (S.FREE, BACKED, "free"),
    (S.RESERVED, BACKED, "reserved"), (S.KERNEL, BACKED, "kernel"), (S.ANON, BACKED, "anon"),
    (S.ANON, REPORTED, "anon"),  # a stray REPORTED bit on a used page does not make it free
    (S.SHMEM, 0, "shmem"), (S.FILE_CLEAN, BACKED, "file clean"),
    (S.FILE_DIRTY, BACKED, "file dirty"), (S.BALLOON, 0, "balloon"), (S.HINTED, 0, "hinted"),
    (S.OFFLINE, 0, "offline"), (S.ABSENT, 0, "absent"),
    (S.PCP, BACKED, "free (per-CPU list)"),  # free, but on a per-CPU list: not in MemFree
]
HOST_CASES = [  # (state, flags, expected host category name)
    (S.ANON, BACKED, "backed, in use by the guest"),
    (S.KERNEL, BACKED, "backed, in use by the guest"),
    (S.FILE_DIRTY, BACKED | REPORTED, "backed, in use by the guest"),
    (S.FREE, BACKED, "backed, guest-free (idle waste)"),
    # discard disabled (VFIO): QEMU acks the inflate but keeps the RAM (virtio-balloon.c,
    # balloon_inflate_page() returns early when ram_block_discard_is_disabled()); its own colour,
    # so the legend never calls these pages discarded
    (S.BALLOON, BACKED, "balloon, still backed (discard off)"),
    (S.HINTED, BACKED, "backed, guest-free (idle waste)"),
    (S.PCP, BACKED, "backed, guest-free (idle waste)"),
    (S.FREE, 0, "not backed (reads as zero)"),
    (S.FREE, REPORTED, "not backed (reads as zero)"),
    (S.ANON, 0, "not backed (reads as zero)"),
    (S.ANON, SWAPPED, "swapped to host swap"),
    (S.FILE_CLEAN, SWAPPED | REPORTED, "swapped to host swap"),
    (S.BALLOON, 0, "balloon (discarded)"),
    (S.OFFLINE, 0, "absent / offline"), (S.ABSENT, 0, "absent / offline"),
]


@pytest.mark.parametrize("view, cases", [("guest", GUEST_CASES), ("host", HOST_CASES)])
def test_classify_every_category_on_hand_built_pages(view, cases):
    state = np.array([int(s) for s, _, _ in cases], dtype=np.uint8)
    flags = np.array([f for _, f, _ in cases], dtype=np.uint8)
    got = palette.classify(state, flags, view)
    assert got.dtype == np.uint8 and got.shape == state.shape
    assert [palette.names(view)[i] for i in got] == [name for _, _, name in cases]
    assert set(got.tolist()) == set(range(len(palette.categories(view)))), "a category untested"


def test_every_category_has_its_own_colour_and_colour_name():
    """One palette: no two categories of a view share a colour, the balloon is the same colour in
    both views, and every colour has one name for the notebooks' text (no two "oranges")."""
    for view in palette.VIEWS:
        colours = palette.colors(view)
        assert len(set(colours)) == len(colours), f"{view}: two categories share a colour"
        assert all(c in palette.COLOR_NAMES for c in colours), f"{view}: a colour has no name"
    names = list(palette.COLOR_NAMES.values())
    assert len(set(names)) == len(names)
    assert palette.GUEST_CATEGORIES[palette.G_BALLOON].color == palette.HOST_CATEGORIES[
        palette.H_BALLOON].color
    idle = palette.HOST_CATEGORIES[palette.H_IDLE].color
    assert palette.COLOR_NAMES[idle] == "red" and palette.CHANGED_COLOR not in palette.COLOR_NAMES


def test_classify_keeps_shape_and_rejects_bad_input():
    state = np.full((4, 8), int(S.ANON), dtype=np.uint8)
    assert palette.classify(state, np.zeros_like(state)).shape == (4, 8)
    with pytest.raises(ValueError, match="view 'hypervisor' is not one of"):
        palette.classify(state, np.zeros_like(state), view="hypervisor")
    with pytest.raises(ValueError, match="same shape"):
        palette.classify(state, np.zeros(3, dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        palette.classify(state.astype(np.int64), np.zeros_like(state))


@pytest.mark.parametrize("view", palette.VIEWS)
def test_palettes_have_distinct_colours_and_names(view):
    cats = palette.categories(view)
    assert len({c.color.lower() for c in cats}) == len(cats)
    assert len({c.name for c in cats}) == len(cats)
    assert len(cats) <= 16  # the packed lookup tables assume 4-bit categories
    assert palette.importance(view)[0] < palette.importance(view)[
        palette.G_BALLOON if view == "guest" else palette.H_BALLOON]


# --- downsampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [2, 4, 8, 64, 256, 1024])
def test_downsample_matches_a_weighted_bincount_reference(cell):
    rng = np.random.default_rng(cell)
    weights = palette.importance("guest")
    probs = np.array([60, 5, 2, 3, 10, 2, 8, 3, 4, 1, 1, 1, 2], dtype=float)
    cats = rng.choice(len(weights), size=(8, cell * 64), p=probs / probs.sum()).astype(np.uint8)
    np.testing.assert_array_equal(downsample(cats, cell, weights),
                                  reference_downsample(cats, cell, weights))


def test_downsample_weighs_counts_rather_than_taking_the_max():
    weights = palette.importance("guest")
    a, f = palette.G_ANON, palette.G_FREE
    cats = np.array([[f, f, f, a, f, a, a, a]], dtype=np.uint8)
    # three free pages outweigh one anon page (1 x 3 > 2 x 1); a plain max would pick anon
    assert downsample(cats, 4, weights).tolist() == [[f, a]]
    with pytest.raises(ValueError, match="power of two"):
        downsample(cats, 3, weights)


@pytest.mark.parametrize("n_pages, max_cells", [(4 << 20, 1024), (1 << 20, 64)])
def test_one_balloon_page_in_a_free_region_stays_visible(n_pages, max_cells):
    snap = snapshot(n_pages)
    pfn = 777_777 % n_pages
    snap["state"][pfn] = int(S.BALLOON)
    pm = viz.page_map(snap, max_cells=max_cells)
    assert pm.cell > 1 and max(pm.image.shape) <= max_cells
    row, col = divmod(pfn, pm.row_pages)
    hits = np.argwhere(pm.image == palette.G_BALLOON)
    assert hits.tolist() == [[row, col // pm.cell]]
    assert (pm.image == palette.G_FREE).sum() == pm.image.size - 1


def test_grid_rows_align_with_buddy_blocks_and_stay_under_max_cells():
    for n in (1 << 14, 1 << 18, 3 << 19, 1 << 22, 1 << 26):
        width = grid_width(n)
        assert width & (width - 1) == 0 and width >= 512
        assert -(-n // width) <= 1024


# --- the page map figure ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_snapshot():
    """16 GiB guest with a partly inflated balloon."""
    with labkit.open(memory="16G", seed=3) as vm:
        vm.qmp("balloon", value=12 << 30)
        vm.advance(300)
        return vm.snapshot()


def test_page_map_figure_uses_uint8_image_and_linear_mapper(big_snapshot):
    pm = viz.page_map(big_snapshot)
    k = len(palette.GUEST_CATEGORIES)
    # 4 Mi pages on a 512 x 512 pixel plot: 512 rows of 8192 pages, 16 pages a cell
    assert (pm.max_cols, pm.max_rows, pm.row_pages, pm.rows) == (512, 512, 8192, 512)
    assert pm.image.dtype == np.uint8 and pm.image.shape == (512, 512) and pm.cell == 16
    assert (pm.figure.frame_width, pm.figure.frame_height) == (512, 512)
    assert (pm.color_mapper.low, pm.color_mapper.high) == (-0.5, k - 0.5)
    assert list(pm.color_mapper.palette) == palette.colors("guest")
    assert sum(pm.legend_source.data["pages"]) == len(big_snapshot["state"])
    balloon = np.count_nonzero(big_snapshot["state"] == int(S.BALLOON))
    assert pm.counts[palette.G_BALLOON] == balloon > 0
    share = 100 * balloon / len(big_snapshot["state"])
    assert pm.legend_source.data["label"][palette.G_BALLOON] == (
        f"balloon: {format_size(balloon * 4096)} ({share:.1f}%)")


def test_zoom_reslices_the_window_at_full_resolution(big_snapshot):
    pm = viz.page_map(big_snapshot)
    overview = pm.image.copy()
    pm.zoom(1000, 1200, 200.2, 207.9)
    assert pm.cell == 1
    col0, col1, row0, row1 = pm.window
    assert col0 <= 1000 and col1 >= 1200 and row0 <= 200 and row1 >= 208
    full = palette.classify(big_snapshot["state"], big_snapshot["flags"]).reshape(
        pm.rows, pm.row_pages)
    np.testing.assert_array_equal(pm.image, full[row0:row1, col0:col1])
    data = pm.source.data
    assert (data["x"][0], data["y"][0], data["dw"][0], data["dh"][0]) == (
        col0, row0, col1 - col0, row1 - row0)
    assert pm.image.shape[1] <= pm.max_cols and pm.image.shape[0] <= pm.max_rows
    pm.zoom(0, 1500, 0, 300)  # a wider window: coarser, still within max_cols columns
    assert 1 < pm.cell < 16 and pm.image.shape[1] <= pm.max_cols
    pm.zoom(0, pm.row_pages, pm.rows, 0)  # back out (the y range is flipped): the overview
    assert pm.cell == 16 and pm.window == (0, pm.row_pages, 0, pm.rows)
    np.testing.assert_array_equal(pm.image, overview)


def test_ranges_update_event_drives_the_zoom(big_snapshot):
    pm = viz.page_map(big_snapshot)
    pm.figure._trigger_event(RangesUpdate(pm.figure, x0=0, x1=256, y0=40, y1=10))
    assert pm.cell == 1 and pm.window[2] <= 10 and pm.window[3] >= 40


def test_update_changes_source_data_without_new_figures():
    with labkit.open(memory="1G", seed=0) as vm:
        pm = viz.page_map(vm.snapshot())
        doc = Document()
        doc.add_root(pm.figure)
        ids = {m.id for m in doc.models}
        events = []
        doc.on_change(lambda event: events.append(event))
        figure, source = pm.figure, pm.source

        pm.update(vm.snapshot())  # nothing changed: nothing is sent
        assert not any(isinstance(e, ColumnDataChangedEvent | ColumnsPatchedEvent)
                       for e in events)

        vm.qmp("balloon", value=1023 << 20)  # 1 MiB balloon: a small rectangle changes
        vm.advance(10)
        pm.update(vm.snapshot())
        patches = [e for e in events if isinstance(e, ColumnsPatchedEvent)]
        assert patches, "a 1 MiB change is sent as a patch of its rectangle"
        expected = palette.classify(vm.snapshot()["state"], vm.snapshot()["flags"]).reshape(
            pm.rows, pm.row_pages)
        np.testing.assert_array_equal(pm.image, expected)

        vm.qmp("balloon", value=256 << 20)  # a big change: the whole image is replaced
        vm.advance(1000)
        pm.update(vm.snapshot())
        assert any(isinstance(e, ColumnDataChangedEvent) and e.model is pm.source
                   for e in events)
        assert (pm.image == palette.G_BALLOON).sum() == pm.counts[palette.G_BALLOON] > 0
        assert pm.figure is figure and pm.source is source
        assert {m.id for m in doc.models} == ids, "update() must not create Bokeh models"


def test_update_with_another_guest_size_and_view_switch():
    pm = viz.page_map(snapshot(1 << 18))
    pm.zoom(0, 64, 0, 8)
    pm.update(snapshot(1 << 20, S.ANON, BACKED))
    assert (pm.rows, pm.row_pages, pm.window) == (512, 2048, (0, 2048, 0, 512))
    assert (pm.figure.y_range.start, pm.figure.x_range.end) == (512, 2048)
    assert set(np.unique(pm.image).tolist()) == {palette.G_ANON}
    pm.set_view("host")
    assert set(np.unique(pm.image).tolist()) == {palette.H_IN_USE}
    assert list(pm.color_mapper.palette) == palette.colors("host")
    assert pm.color_mapper.high == len(palette.HOST_CATEGORIES) - 0.5
    assert pm.legend_source.data["name"] == palette.names("host")
    with pytest.raises(ValueError, match="snapshot needs 'state' and 'flags'"):
        pm.update({"state": np.zeros(4, dtype=np.uint8)})


def test_page_map_of_16_gib_renders_quickly_enough(big_snapshot, capsys):
    """Not a timed test: prints how long a 4 Mi-page map takes, for the record."""
    import time
    start = time.perf_counter()
    pm = viz.page_map(big_snapshot)
    built = time.perf_counter() - start
    changed = dict(big_snapshot, state=big_snapshot["state"].copy())
    changed["state"][: 1 << 20] = int(S.BALLOON)  # 4 GiB more balloon
    start = time.perf_counter()
    pm.update(changed)
    updated = time.perf_counter() - start
    start = time.perf_counter()
    pm.zoom(0, 300, 100, 110)
    zoomed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n16 GiB page map: build {built:.3f} s, update {updated:.3f} s, "
              f"zoom {zoomed:.4f} s")
    assert pm.counts[palette.G_BALLOON] >= 1 << 20
    assert pm.image.size <= 1024 * 1024


# --- JavaScript of the hover and the axes (run by node, as BokehJS would) -----------------------
NODE = shutil.which("node")


def run_js(functions: list[tuple[list[str], str, list]]) -> list:
    script = "const out = [];\n" + "".join(
        f"out.push(new Function(...{json.dumps(names)}, {json.dumps(code)})"
        f"(...{json.dumps(args)}));\n" for names, code, args in functions
    ) + "console.log(JSON.stringify(out));"
    return json.loads(subprocess.run([NODE, "-e", script], capture_output=True, text=True,
                                     check=True, timeout=30).stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_hover_and_tick_javascript_compute_pfn_address_and_sizes():
    pm = viz.page_map(snapshot(1 << 22))  # 8192 pages a row, 16 pages a cell
    hover = next(t for t in pm.figure.tools if type(t).__name__ == "HoverTool")
    data = {"source": {"data": {"row_pages": [pm.row_pages], "cell": [pm.cell]}}}
    special = {"x": 40.5, "y": 3.2}
    formatters = hover.formatters
    assert all(isinstance(f, CustomJSHover) for f in formatters.values())
    pfn, addr, cat = formatters["$x"], formatters["$y"], formatters["@image"]
    legend = {"legend": {"data": {"name": palette.names("guest")}}}
    y_axis = pm.figure.yaxis[0].formatter
    x_axis = pm.figure.xaxis[0].formatter
    assert isinstance(y_axis, CustomJSTickFormatter)
    assert addr.args["P"] == y_axis.args["P"] == []  # a snapshot without "phys": index = frame
    hover_args, tick_args = ["source", "P", "value", "format", "special_vars"], ["tick", "index", "ticks",
                                                                                "source", "P"]
    out = run_js([
        (["source", "value", "format", "special_vars"], pfn.code, [data["source"], 0, "", special]),
        (hover_args, addr.code, [data["source"], [], 0, "", special]),
        (["legend", "value", "format", "special_vars"], cat.code, [legend["legend"], 8, "", {}]),
        (tick_args, y_axis.code, [256, 0, [], data["source"], []]),
        (tick_args, x_axis.code, [512, 0, [], data["source"], []]),
    ])
    assert (pm.row_pages, pm.cell) == (8192, 16)
    first = 3 * 8192 + 32
    assert out == [f"{first}-{first + 15} (16 pages)", hex(first * 4096), "balloon", "8 GiB",
                   "+2 MiB"]
    # q35 with 2 GiB below the PCI hole: index 524288 on is at 4 GiB (docs/mechanisms.md §10.1)
    runs = [0, 524288, 0, 524288, 1 << 22, 1 << 20]
    low, high = {"x": 40.5, "y": 3.2}, {"x": 40.5, "y": 100.2}
    out = run_js([
        (hover_args, addr.code, [data["source"], runs, 0, "", low]),
        (hover_args, addr.code, [data["source"], runs, 0, "", high]),
        (tick_args, y_axis.code, [256, 0, [], data["source"], runs]),
    ])
    assert out == [hex(first * 4096), hex((100 * 8192 + 32 + 524288) * 4096), "10 GiB"]


# --- time series --------------------------------------------------------------------------------
def test_timeseries_streams_rows_in_the_chosen_unit():
    with labkit.open(memory="4G", seed=0) as vm:
        ts = viz.TimeSeries(vm)
        source, figures = ts.source, (ts.guest_figure, ts.host_figure)
        assert ts.unit == "GiB" and len(ts) == 1
        doc = Document()
        doc.add_root(ts.layout)
        events = []
        doc.on_change(lambda event: events.append(event))
        vm.qmp("balloon", value=3 << 30)
        vm.advance(500)
        ts.append(vm.sample())
        assert any(isinstance(e, ColumnsStreamedEvent) for e in events)
        assert ts.source is source and (ts.guest_figure, ts.host_figure) == figures
        assert ts.source.data["balloon_target"][-1] == 3.0
        assert ts.source.data["t"][-1] == 0.5
        assert ts.source.data["host_rss"][-1] == vm.sample()["host_rss"] / (1 << 30)
        ts.extend([vm.sample(), vm.sample()])
        assert len(ts) == 4


def test_timeseries_accepts_rows_and_columns_and_checks_unit():
    rows = [{"t_ms": 0.0, "memtotal": 512 * MiB, "host_rss": 100 * MiB},
            {"t_ms": 1000.0, "memtotal": 500 * MiB, "host_rss": 90 * MiB}]
    ts = viz.TimeSeries(rows)
    assert ts.unit == "MiB" and ts.source.data["memtotal"] == [512.0, 500.0]
    assert np.isnan(ts.source.data["balloon_actual"]).all()  # missing columns are gaps
    columns = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    assert viz.TimeSeries(columns, unit="GiB").source.data["t"] == [0.0, 1.0]
    ts.reset(rows[:1])
    assert len(ts) == 1

    class Run:  # what labkit.scenarios return: one array per key; some use seconds ("t_s")
        series = {"t_s": np.array([0.0, 2.0]), "host_rss": np.array([1.0, 2.0]) * MiB}
    assert viz.TimeSeries(Run(), unit="MiB").source.data["t"] == [0.0, 2.0]
    with pytest.raises(ValueError, match="unit 'KB' is not one of"):
        viz.TimeSeries(rows, unit="KB")
    with pytest.raises(TypeError, match="TimeSeries takes a backend"):
        viz.TimeSeries(42)


# --- the explorer -------------------------------------------------------------------------------
@pytest.fixture
def explorer():
    ex = viz.explore(memory="2G", seed=1)
    yield ex
    ex.vm.close()


def test_explorer_is_a_widget_with_bokeh_models(explorer):
    import ipywidgets
    from jupyter_bokeh.widgets import BokehModel
    assert isinstance(explorer, ipywidgets.VBox)
    models = [w for w in explorer.plots.children if isinstance(w, BokehModel)]
    # one widget for both plots: a step's changes go to the browser as one message set
    assert models == [explorer.live]
    assert explorer.live._model.children == [explorer.page_map.figure, explorer.timeseries.layout]
    assert explorer.slider.max == 2048 and explorer.slider.value == 2048
    used = explorer.vm.sample()
    assert explorer.slider.min == -(-(used["memtotal"] - used["memavailable"]) // MiB)
    assert "OOM kills: 0" in explorer.status_html.value


def test_slider_sets_the_balloon_target_and_plots_get_new_data(explorer):
    vm = explorer.vm
    sent = []
    explorer.live.send = lambda content, buffers=None: sent.append(content)
    image_before = explorer.page_map.image.copy()
    explorer.slider.value = 1536
    assert vm.sample()["balloon_target"] == 1536 * MiB
    assert explorer.timeseries.source.data["balloon_target"][-1] == 1.5  # GiB
    assert len(explorer.timeseries) == 2 and sent, "the time series streamed over the comm"
    for _ in range(3):  # 512 requests of 256 pages, 0.5 ms each: 256 ms of simulated time
        explorer.tick()
    assert vm.qmp("query-balloon")["actual"] == 1536 * MiB
    assert (explorer.page_map.image == palette.G_BALLOON).sum() > 0
    assert not np.array_equal(explorer.page_map.image, image_before)
    assert "actual <b>1.5 GiB</b>" in explorer.status_html.value


def test_step_moves_balloon_actual_by_at_most_256_pages(explorer):
    vm = explorer.vm
    assert explorer.step() is False  # nothing to do at full size: no time passes, no new row
    assert vm.sample()["t_ms"] == 0 and "balloon idle" in explorer.status_html.value
    explorer.slider.value = 2000
    actual = [vm.qmp("query-balloon")["actual"]]
    t0 = vm.sample()["t_ms"]
    for _ in range(5):
        assert explorer.step() is True
        actual.append(vm.qmp("query-balloon")["actual"])
    moved = -np.diff(actual) // 4096
    assert ((moved > 0) & (moved <= 256)).all(), moved
    assert vm.sample()["t_ms"] > t0
    assert len(explorer.timeseries) == 1 + 1 + 5


def test_play_ticks_and_speed(explorer):
    vm = explorer.vm
    explorer.speed.value = 10.0
    explorer.tick()  # what Play does, once every play_interval_ms (the kernel's own timer)
    assert vm.sample()["t_ms"] == 10.0
    explorer.tick()
    assert vm.sample()["t_ms"] == 20.0
    explorer.view_buttons.value = "host"
    assert explorer.page_map.view == "host"


def test_reset_restores_the_initial_state(explorer):
    initial = explorer.vm.sample()
    initial_counts = explorer.page_map.counts.copy()
    first_vm = explorer.vm
    h = first_vm.guest("alloc", size="256M", kind="anon")
    first_vm.guest("touch", handle=h)
    explorer.slider.value = 1024
    explorer.tick()
    assert explorer.vm.sample() != initial
    explorer.reset_button.click()
    assert explorer.vm is not first_vm and first_vm.closed  # the explorer opened the first one
    assert explorer.vm.sample() == initial
    assert explorer.slider.value == 2048 and len(explorer.timeseries) == 1
    np.testing.assert_array_equal(explorer.page_map.counts, initial_counts)
    assert explorer.vm.qmp("query-balloon")["actual"] == 2 << 30


def test_reset_reopens_a_given_vm_with_its_arguments_and_leaves_it_open():
    vm = labkit.open(memory="1G", seed=5, balloon={"deflate_on_oom": True},
                     host={"ram": "3G", "discard": False}, model={"boot": "minimal"})
    initial = vm.sample()
    ex = viz.explore(vm, tick_ms=50)
    assert ex.tick_ms == 50.0
    ex.slider.value = 900
    ex.tick()
    ex.reset()
    assert not vm.closed and ex.vm is not vm
    assert ex.vm.sample() == initial
    assert ex.vm.qmp("qom-get", path="balloon0", property="deflate-on-oom") is True
    assert ex.vm.host.ram == 3 << 30 and not ex.vm.host.discard_enabled
    ex.vm.close()
    vm.close()


def test_explore_argument_errors():
    with pytest.raises(TypeError, match="needs a VM"):
        viz.explore()
    with labkit.open(memory="1G") as vm:
        with pytest.raises(TypeError, match="not both"):
            viz.explore(vm, memory="1G")
        with pytest.raises(ValueError, match="tick_ms must be"):
            viz.explore(vm, tick_ms=0)


def test_setup_notebook_honours_bokeh_resources(monkeypatch):
    import bokeh.io
    seen = {}
    monkeypatch.setattr(bokeh.io, "output_notebook",
                        lambda resources=None, **kw: seen.update(mode=resources.mode, **kw))
    monkeypatch.setenv("BOKEH_RESOURCES", "inline")
    viz.setup_notebook()
    assert seen == {"mode": "inline", "hide_banner": True}


def test_small_pans_inside_the_sent_window_send_nothing(big_snapshot):
    pm = viz.page_map(big_snapshot)
    pm.zoom(1000, 1400, 200, 210)
    data = pm.source.data
    pm.zoom(1100, 1500, 202, 212)  # within the margin that was sent
    assert pm.source.data is data
    pm.zoom(3000, 3400, 600, 610)  # elsewhere: re-sliced
    assert pm.source.data is not data and pm.window[0] <= 3000 < 3400 <= pm.window[1]


class ProtocolOnlyVM:
    """A backend with only the Backend protocol (no step(), no snapshot()), like a live guest."""

    def __init__(self, **options):
        self._vm = labkit.open(**options)
        self.memory = self._vm.memory
        for name in ("qmp", "guest", "meminfo", "advance", "advance_until", "sample", "events", "inspect",
                     "close"):
            setattr(self, name, getattr(self._vm, name))


def test_explorer_on_a_backend_without_step_or_snapshot():
    ex = viz.explore(factory=lambda: ProtocolOnlyVM(memory="1G", seed=2), tick_ms=10)
    assert ex.page_map is None and len(ex.plots.children) == 1
    ex.slider.value = 1000
    assert ex.step() is True  # no step(): one tick of advance()
    assert ex.vm.sample()["t_ms"] == 10.0
    ex.view_buttons.value = "host"  # no page map: nothing to switch, no error
    ex.reset()
    assert ex.vm.sample()["t_ms"] == 0.0
    ex.vm.close()


def test_repr_of_views_in_a_notebook_is_short():
    pm = viz.page_map(snapshot(1 << 16))
    bundle = pm._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("<PageMap guest view")


def test_errors_in_widget_callbacks_show_in_the_status_line(explorer):
    def broken(command, **arguments):
        raise labkit.QMPError("GenericError", "Parameter 'target' expects a size")
    explorer.vm.qmp = broken  # what a failing backend call looks like from a slider drag
    explorer.play.value = True
    assert explorer.play.description == "Pause"
    explorer.slider.value = 1000
    assert isinstance(explorer.error, labkit.QMPError)
    assert "QMPError" in explorer.status_html.value and "expects a size" in explorer.status_html.value
    assert explorer.playing is False and explorer.play.description == "Play"
