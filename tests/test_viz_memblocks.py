"""labkit.viz.memblocks and memblocks_explorer: the memory-block grid, the retry backoff timeline and
the virtio-mem explorer, each held against the model state it draws (§5)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from bokeh.document import Document
from bokeh.document.events import ColumnDataChangedEvent, ColumnsPatchedEvent

import labkit
from labkit.model.pages import PageState
from labkit.viz import memblocks as mb
from labkit.viz.memblocks_explorer import driver_signature, explore_virtio_mem, step_driver

MiB, GiB = 1 << 20, 1 << 30
SUBBLOCK = 512  # pages in 2 MiB


def open_vm(state="online_movable", size="1G", memory="1G", **spec):
    return labkit.open(memory=memory, seed=0, memhp_default_state=state, balloon=False,
                       virtio_mem=[{"id": "vm0", "size": size, **spec}])


def resize(vm, value, ms=2000):
    vm.qmp("qom-set", path="vm0", property="requested-size", value=value)
    vm.advance(ms)


def pinned_vm():
    """§5.5: slab allocated after a big allocation was freed lands in hot-plugged ZONE_NORMAL."""
    vm = open_vm("online_kernel")
    resize(vm, GiB)
    big = vm.guest("alloc", size=vm.meminfo()["MemFree"] * 1024 - 192 * MiB)
    vm.guest("free", handle=big)
    vm.guest("alloc", size="64M", kind="slab")
    return vm


def reference_grid(vm) -> np.ndarray:
    """The grid computed subblock by subblock in plain Python (the model's own state, read slowly)."""
    drv = vm.virtio_mem.drivers[0]
    hp = vm.kernel.hotplug
    usable = drv.device.config.usable_region_size // (2 * MiB)
    out = np.zeros((drv.n_mb, 64), dtype=np.uint8)
    for m in range(drv.n_mb):
        block = drv.first_mb + m
        for s in range(64):
            unit = m * 64 + s
            if not drv.plugged[unit]:
                out[m, s] = mb.UNPLUGGED if unit < usable else mb.NOT_USABLE
                continue
            if block not in hp.memmap:
                out[m, s] = mb.NOT_ADDED
            elif block not in hp.online_blocks:
                out[m, s] = mb.OFFLINE
            else:
                a = drv.region.start + unit * SUBBLOCK
                kernel = bool(np.isin(vm.mem.state[a:a + SUBBLOCK],
                                      [PageState.KERNEL, PageState.RESERVED, PageState.HINTED]).any())
                out[m, s] = mb.BUSY if kernel else (
                    mb.MOVABLE if hp.online_blocks[block] == "Movable" else mb.NORMAL)
    return out


# --- the grid ---------------------------------------------------------------------------------------
def test_grid_matches_the_model_subblock_by_subblock_and_shows_why_unplug_fails():
    with pinned_vm() as vm:
        grid = mb.block_grid(vm)
        np.testing.assert_array_equal(grid.image, reference_grid(vm))
        assert grid.image.shape == (8, 64)  # 1 GiB region: 8 memory blocks of 64 subblocks
        busy = int((grid.image == mb.BUSY).sum())
        assert busy > 0 and (grid.image == mb.NORMAL).sum() > 0
        resize(vm, 0, ms=1000)  # §5.5: every plugged subblock left is a busy one
        left = vm.qmp("qom-get", path="vm0", property="size") // (2 * MiB)
        grid = mb.block_grid(vm)
        np.testing.assert_array_equal(grid.image, reference_grid(vm))
        assert left == (grid.image == mb.BUSY).sum() > 0
        assert set(np.unique(grid.image)) <= {mb.UNPLUGGED, mb.BUSY}


def test_usable_region_offline_blocks_and_blocks_not_added_yet():
    with open_vm("offline") as vm:
        vm.qmp("qom-set", path="vm0", property="requested-size", value=200 * MiB)
        assert step_driver(vm)  # §5.4: a new block is plugged before add_memory is called
        grid = mb.block_grid(vm)
        np.testing.assert_array_equal(grid.image, reference_grid(vm))
        assert (grid.image[0] == mb.NOT_ADDED).sum() == 64
        vm.advance(1000)
        grid = mb.block_grid(vm)
        np.testing.assert_array_equal(grid.image, reference_grid(vm))
        # §5.2: usable region = requested + 256 MiB = 456 MiB = 228 subblocks
        assert (grid.image.ravel() != mb.NOT_USABLE).sum() == 228
        assert (grid.image == mb.OFFLINE).sum() == 100  # 200 MiB plugged, added, offline


def test_big_block_mode_fills_each_row_with_one_cell():
    with open_vm(block_size="128M") as vm:
        resize(vm, 384 * MiB)
        grid = mb.block_grid(vm)
        assert grid.image.shape == (8, 1) and set(grid.units) == {1}  # one cell per big block
        assert list(grid.image[:, 0]) == [mb.MOVABLE] * 3 + [mb.UNPLUGGED] * 2 + [mb.NOT_USABLE] * 3
        assert grid.counts[mb.MOVABLE] == 3.0  # in memory blocks


def test_two_devices_stack_their_rows():
    with labkit.open(memory="1G", numa_nodes=2, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "512M", "node": 0},
                                 {"id": "vm1", "size": "256M", "node": 1}]) as vm:
        vm.qmp("qom-set", path="vm1", property="requested-size", value=128 * MiB)
        vm.advance(1000)
        grid = mb.block_grid(vm)
        assert grid.devices == ["vm0", "vm1"] and list(grid.device) == [0] * 4 + [1] * 2
        assert (grid.image[4] == mb.MOVABLE).all() and (grid.image[:4] != mb.MOVABLE).all()
        assert grid.block[4] == vm.virtio_mem.drivers[1].first_mb
        assert grid.addr[4] == vm.regions[1].memaddr
        assert mb.block_grid(vm, max_blocks=1).image.shape == (2, 64)


def test_grid_update_patches_the_changed_rows_only():
    with open_vm() as vm:
        resize(vm, 512 * MiB)
        g = mb.MemoryBlockGrid(vm)
        doc = Document()
        doc.add_root(g.figure)
        ids = {m.id for m in doc.models}
        events = []
        doc.on_change(events.append)
        g.update(vm)
        assert not any(isinstance(e, ColumnsPatchedEvent | ColumnDataChangedEvent) for e in events)
        resize(vm, 506 * MiB)  # three subblocks of the top block
        g.update(vm)
        patches = [e for e in events if isinstance(e, ColumnsPatchedEvent)]
        assert patches and (g.image == mb.MOVABLE).sum() == 253
        np.testing.assert_array_equal(g.image, reference_grid(vm))
        assert "506 MiB plugged" in g.figure.title.text
        assert {m.id for m in doc.models} == ids, "update() must not create Bokeh models"
        assert repr(g) == "<MemoryBlockGrid 8 blocks x 64 cells>"


def test_grid_errors_name_what_is_wrong():
    with labkit.open(memory="512M") as vm, pytest.raises(ValueError, match="no virtio-mem device"):
        mb.block_grid(vm)
    with open_vm() as vm, pytest.raises(ValueError, match="max_blocks must be an int >= 1, got 0"):
        mb.block_grid(vm, max_blocks=0)


def test_grid_is_numpy_fast_on_a_big_region():
    import time
    with labkit.open(memory="1G", memhp_default_state="online_kernel",
                     virtio_mem=[{"id": "vm0", "size": "16G"}], host={"ram": "32G"}) as vm:
        resize(vm, 8 * GiB, ms=5000)
        start = time.process_time()
        grid = mb.block_grid(vm)
        assert time.process_time() - start < 0.5  # 2 Mi pages of online ZONE_NORMAL scanned
        assert grid.image.shape == (128, 64)
        assert (grid.image == mb.NORMAL).sum() + (grid.image == mb.BUSY).sum() == 64 * 64


# --- the backoff ------------------------------------------------------------------------------------
def test_retry_schedule_replays_the_drivers_timer_rules():
    # §5.6: 50 s doubling to 300 s; success resets to 50 s; -ENOSPC arms nothing; a failure while
    # the timer runs does not re-arm it
    busy = -errno.EBUSY
    history = [(0, "unplug", busy)] + [(t * 1000, "unplug", busy) for t in (50, 150, 350, 650, 950)]
    assert [f["retry_ms"] for f in mb.retry_schedule(history)] == [
        50_000, 100_000, 200_000, 300_000, 300_000, 300_000]
    fails = mb.retry_schedule([(0, "plug", -errno.ETXTBSY), (10_000, "unplug", busy),
                               (50_000, "unplug", 0), (60_000, "plug", -errno.ENOSPC),
                               (100_000, "unplug", -errno.ENOMEM)])
    assert [(f["error"], f["retry_ms"]) for f in fails] == [
        ("ETXTBSY", 50_000), ("EBUSY", None), ("ENOSPC", None), ("ENOMEM", 50_000)]
    assert fails[0]["retry_at_ms"] == 50_000.0


def test_timeline_shows_the_real_drivers_backoff():
    with pinned_vm() as vm:
        tl = mb.ResizeTimeline(vm)
        vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
        for _ in range(70):
            vm.advance(10_000)
            tl.append(vm.sample())
        tl.update_history(vm)
        t = np.array(tl.failures.data["t"])
        assert list(np.round(np.diff(t))) == [50, 100, 200, 300]
        assert tl.failures.data["label"][:2] == ["EBUSY, retry in 50 s", "EBUSY, retry in 100 s"]
        assert np.allclose(tl.retries.data["t"][:4], t[1:5])
        plugged = vm.qmp("qom-get", path="vm0", property="size") / MiB
        assert np.allclose(tl.failures.data["y"][1:], plugged)
        assert len(tl) == 71 and tl.source.data["virtio_mem_requested"][-1] == 0
        tl.reset([vm.sample()])
        assert len(tl) == 1 and tl.failures.data["t"] == []


# --- the explorer -----------------------------------------------------------------------------------
@pytest.fixture
def explorer():
    ex = explore_virtio_mem(memory="1G", seed=0, memhp_default_state="online_movable",
                            balloon=False, virtio_mem=[{"id": "vm0", "size": "1G"}])
    yield ex
    ex.vm.close()


def test_explorer_widgets_and_plots(explorer):
    import ipywidgets
    from jupyter_bokeh.widgets import BokehModel
    assert isinstance(explorer, ipywidgets.VBox)
    models = [w for w in explorer.plots.children if isinstance(w, BokehModel)]
    assert models == [explorer.live]  # one widget: a step's changes go as one message set
    assert explorer.live._model.children == [explorer.grid.figure, explorer.timeline.layout]
    assert (explorer.slider.min, explorer.slider.max, explorer.slider.step) == (0, 1024, 2)
    assert "plugged <b>0 B</b>" in explorer.status_html.value


def test_step_unplugs_one_subblock_at_a_time(explorer):
    vm = explorer.vm
    explorer.slider.value = 128  # one memory block
    explorer.tick()
    assert vm.qmp("qom-get", path="vm0", property="size") == 128 * MiB
    explorer.slider.value = 122  # §5.5: fewer than a block: single subblocks, from the top
    sizes = []
    while explorer.step() and len(sizes) < 20:
        sizes.append(vm.qmp("qom-get", path="vm0", property="size") // MiB)
    assert sorted(set(sizes), reverse=True)[:3] == [126, 124, 122]
    row = explorer.grid.image[0]
    assert (row[:61] == mb.MOVABLE).all() and (row[61:] == mb.UNPLUGGED).all()
    assert explorer.step() is False and "(no driver event)" in explorer.status_html.value


def test_step_jumps_to_the_next_retry_and_play_advances_time(explorer):
    vm = explorer.vm
    vm.virtio_mem.devices[0]._busy = lambda: True  # a migration runs: BUSY (§5.2)
    explorer.slider.value = 64
    explorer.step()
    while vm.virtio_mem.drivers[0].last_rc == 0:
        assert explorer.step()
    assert "-ETXTBSY" in explorer.status_html.value and "next retry at 50 s" in explorer.status_html.value
    signature = driver_signature(vm)
    assert explorer.step() and vm.now_ms >= 50_000  # straight to the timer
    assert driver_signature(vm) != signature
    explorer.speed.value = 10_000.0
    t = vm.now_ms
    explorer.tick()
    assert vm.now_ms == t + 10_000


def test_reset_and_errors(explorer):
    first = explorer.vm
    explorer.slider.value = 256
    explorer.tick()
    explorer.slider.value = 3  # not a multiple of the block size: QEMU's error, in the status line
    assert explorer.error is not None and "multiples of" in explorer.status_html.value
    explorer.reset_button.click()
    assert explorer.vm is not first and first.closed
    assert explorer.slider.value == 0 and len(explorer.timeline) == 1
    assert (explorer.grid.image != mb.MOVABLE).all()
    with pytest.raises(ValueError, match="device must be an index from 0 to 0, got 1"):
        explore_virtio_mem(explorer.vm, device=1)
    with pytest.raises(TypeError, match="needs a VM"):
        explore_virtio_mem()
