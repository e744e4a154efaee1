"""The protocol views and scenarios read through: ``inspect(mechanism)`` snapshots and
``advance_until(event)``, on the model and on a replayed recording."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import labkit
from labkit.backends.inspect import SNAPSHOTS, as_dict, from_dict
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.units import MiB


def test_snapshots_are_frozen_copies_that_do_not_follow_the_vm():
    with labkit.open(memory="1G", seed=0) as vm:
        before = vm.inspect("balloon")
        vm.qmp("balloon", value=768 * MiB)
        vm.advance(2000)
        after = vm.inspect("balloon")
        with pytest.raises(dataclasses.FrozenInstanceError):
            after.actual = 0
    assert before.actual == 1024 * MiB and after.actual == after.target == 768 * MiB
    assert after.driver_pages == 256 * MiB // 4096 and after.requests == 256 * MiB // 4096 // 256


def test_advance_until_stops_at_the_event_and_only_there():
    # drivers/virtio/virtio_balloon.c: each request moves at most VIRTIO_BALLOON_ARRAY_PFNS_MAX pages
    with labkit.open(memory="1G", seed=0) as vm:
        vm.qmp("balloon", value=768 * MiB)
        first = vm.advance_until("balloon-request")
        assert first["count"] == 1 and vm.inspect("balloon").actual_pages == VIRTIO_BALLOON_ARRAY_PFNS_MAX
        event = vm.advance_until("BALLOON_CHANGE", max_ms=5000)
        assert event["event"] == "BALLOON_CHANGE" and event in vm.events()
        t = vm.now_ms
        assert vm.advance_until("MIGRATION", max_ms=250) is None and vm.now_ms == t + 250  # time ran out
        vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        done = vm.advance_until("MIGRATION", max_ms=60_000, status="completed")
        assert done["data"] == {"status": "completed"} and vm.qmp("query-migrate")["status"] == "completed"


@pytest.mark.parametrize(("event", "max_ms", "error"), [
    ("balloon-request", float("nan"), "max_ms must be a finite number"),
    ("balloon-request", -1, "max_ms must be a finite number"),
    ("balloon_change", 10, "takes a QMP event name"),
    ("reporting-report", 10, "nothing that makes 'reporting-report'"),
])
def test_advance_until_refuses_bad_input_without_moving_time(event, max_ms, error):
    with labkit.open(memory="256M", seed=0) as vm:
        with pytest.raises(ValueError, match=error):
            vm.advance_until(event, max_ms)
        assert vm.now_ms == 0.0


def test_every_mechanism_has_a_snapshot_on_the_model():
    with labkit.open(memory="1G", seed=0, memhp_default_state="online_movable",
                     balloon={"free_page_reporting": True, "free_page_hint": True, "iothread": "io0"},
                     virtio_mem=[{"id": "vm0", "size": "1G", "requested_size": "256M"}]) as vm:
        vm.advance(3000)
        views = {name: vm.inspect(name) for name in SNAPSHOTS}
        with pytest.raises(ValueError, match="inspect\\(\\) takes one of"):
            vm.inspect("gpu")
    assert {name: type(v) for name, v in views.items()} == SNAPSHOTS
    dev = views["virtio-mem"].devices[0]
    assert dev.size == 256 * MiB and int(dev.plugged_units.sum()) * dev.unit_bytes == dev.size
    assert views["reporting"].negotiated and views["reporting"].passes >= 1
    assert views["hinting"].qemu_status == "STOP" and views["migration"].status == "none"
    assert sum(z["end"] - z["start"] for z in views["memory"].zones) == views["memory"].n_pages


def test_virtio_mem_snapshot_marks_the_subblocks_an_unplug_cannot_take():
    # mm/memory_hotplug.c: alloc_contig_range fails (-EBUSY) on a range holding an unmovable page
    with labkit.open(memory="1G", seed=0, balloon=False, memhp_default_state="online_kernel",
                     virtio_mem=[{"id": "vm0", "size": "1G", "requested_size": "1G"}]) as vm:
        vm.advance(2000)
        vm.guest("alloc", size="64M", kind="slab")
        view = vm.inspect("virtio-mem").devices[0]
        unmovable_units = int(view.unmovable_units.sum())
        state = vm.mem.state[view.region_start_pfn:view.region_start_pfn + view.blocks * 32768]
        per_unit = state.reshape(len(view.plugged_units), -1)
        from labkit.model.hotplug import UNMOVABLE_STATES

        expected = np.isin(per_unit, list(UNMOVABLE_STATES)).any(axis=1)
    assert unmovable_units > 0
    np.testing.assert_array_equal(view.unmovable_units, expected)


def test_the_migration_snapshot_has_one_row_per_sync_with_the_hinting_round():
    # hw/virtio/virtio-balloon.c: every AFTER_BITMAP_SYNC with the VM running starts a round,
    # VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1 first; the last-stage sync starts none
    with labkit.open(memory="1G", seed=0, balloon={"free_page_hint": True, "iothread": "io0"}) as vm:
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 2000})
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        vm.advance_until("bitmap-sync")
        vm.advance(10_000)
        view = vm.inspect("migration")
    assert view.status == "completed" and len(view.syncs) == view.dirty_sync_count
    ids = [s["cmd_id"] for s in view.syncs]
    assert ids[:-1] == [0x80000001 + i for i in range(len(ids) - 1)] and ids[-1] == -1
    assert view.syncs[-1]["last_stage"] and all(not s["last_stage"] for s in view.syncs[:-1])


def test_snapshots_round_trip_through_a_recording(tmp_path):
    from labkit.backends.qemu.record import Recorder, ReplayBackend

    path = tmp_path / "run.json"
    with Recorder(labkit.open(memory="1G", seed=0, memhp_default_state="online_movable",
                              virtio_mem=[{"id": "vm0", "size": "1G"}])) as vm:
        vm.qmp("qom-set", path="vm0", property="requested-size", value=128 * MiB)
        event = vm.advance_until("MEMORY_DEVICE_SIZE_CHANGE", max_ms=5000)
        live = vm.inspect("virtio-mem")
        vm.save(path)
    replay = ReplayBackend(path)
    replay.qmp("qom-set", path="vm0", property="requested-size", value=128 * MiB)
    assert replay.advance_until("MEMORY_DEVICE_SIZE_CHANGE", max_ms=5000) == event
    again = replay.inspect("virtio-mem")
    assert type(again) is type(live) and as_dict(again) == as_dict(live)
    np.testing.assert_array_equal(again.devices[0].plugged_units, live.devices[0].plugged_units)
    assert from_dict("virtio-mem", as_dict(live)).devices[0].size == 128 * MiB
