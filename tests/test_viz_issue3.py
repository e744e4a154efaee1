"""Views and widgets of issue 3 (hinting, reporting, migration, overcommit), built from real model
data and driven the way a notebook cell drives them: the numbers in their data sources must be the
model's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from bokeh.core.validation import check_integrity

import labkit
from labkit.backends.inspect import MigrationView as LiveMigrationView
from labkit.model.pages import PageFlag, PageState
from labkit.scenarios.migration import MigrationParams, migration_compare, migration_table, write_heavy
from labkit.scenarios.overcommit import OvercommitParams, compare_policies
from labkit.units import MiB
from labkit.viz import palette
from labkit.viz.migration import MigrationRecorder, MigrationView, comparison, from_run, hinting_status
from labkit.viz.migration_explorer import MigrationExplorer, PolicySwitch
from labkit.viz.overcommit import OvercommitView, policy_bars
from labkit.viz.pagemap import page_map
from labkit.viz.reporting import ReportingExplorer, staircase

HINT = {"free_page_hint": True, "iothread": "iothread0"}
REPORTING = {"free_page_reporting": True}


def integrity_ok(layout) -> None:
    """Bokeh's own validation finds no error in the document (duplicate factors, bad columns...)."""
    issues = check_integrity(layout.references())
    assert not issues.error, issues.error


def migrate_to_end(memory="1G", balloon=None, **parameters):
    vm = labkit.open(memory=memory, seed=0, balloon=balloon)
    rec = MigrationRecorder(vm)
    if parameters:
        vm.qmp("migrate-set-parameters", **parameters)
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    info = rec.run(every_ms=10)
    return vm, rec, info


@pytest.fixture(scope="module")
def hinted_migration():
    vm, rec, info = migrate_to_end(balloon=dict(HINT))
    yield vm, rec, info
    vm.close()


@pytest.fixture(scope="module")
def policy_runs():
    return migration_compare(MigrationParams(memory="1G", prepare_ms=2000, policies=(
        "plain", "hinting", "reporting")))


# --- the migration view from a recorder --------------------------------------------------------------
def test_rounds_add_up_to_what_query_migrate_says(hinted_migration):
    vm, rec, info = hinted_migration
    assert info["status"] == "completed"
    view = MigrationView(rec)
    rounds = view.round_source.data
    ram = info["ram"]
    assert len(rounds["round"]) == ram["dirty-sync-count"]  # one round after each bitmap sync
    assert rounds["round"][-1] == "stop-and-copy"
    assert sum(rounds["normal"]) == ram["normal"] and sum(rounds["zero"]) == ram["duplicate"]
    assert sum(rounds["mib"]) * MiB == pytest.approx(ram["transferred"])
    assert all(n >= 0 for n in rounds["normal"] + rounds["zero"])
    # the stop-and-copy is the downtime: it starts at the switchover and lasts `downtime`
    start, end = rounds["start"][-1], rounds["end"][-1]
    assert end == info["total-time"]
    assert end - start == pytest.approx(info["downtime"], abs=1)
    assert view.switch_source.data["x"] == [start]
    integrity_ok(view.layout)


def test_backlog_and_threshold_are_the_engines_numbers(hinted_migration):
    vm, rec, info = hinted_migration
    view = MigrationView(rec)
    src = view.source.data
    history = vm.migration.history
    windows = [h for h in history if h["kind"] == "window"]
    assert windows, "the migration measured bandwidth at least once"
    # the threshold line is bandwidth x downtime-limit as QEMU measures it, window by window
    for h in windows[::5]:  # the first sample after each window shows its threshold
        i = int(np.searchsorted(src["t"], h["t_ms"] - history[0]["t_ms"], side="right"))
        assert src["threshold"][i] * MiB == pytest.approx(h["threshold"])
    # the dashed reference is max-bandwidth x downtime-limit: 128 MiB/s x 300 ms by default
    params = vm.qmp("query-migrate-parameters")
    reference = params["max-bandwidth"] * params["downtime-limit"] / 1000
    assert reference == pytest.approx(38.4 * MiB)
    assert np.all(src["reference"] * MiB == pytest.approx(reference))
    # under the rate limit, the measured bandwidth is the limit: the two lines meet
    measured = src["threshold"][src["threshold"] > 0]
    assert np.median(measured) * MiB == pytest.approx(reference, rel=0.01)
    # the backlog starts at the whole guest (all-ones bitmap) and ends at zero
    assert src["remaining"][0] * MiB == 1 << 30 and src["remaining"][-1] == 0


def test_hinting_rounds_and_held_blocks_come_from_the_device(hinted_migration):
    vm, rec, info = hinted_migration
    hints = MigrationView(rec).hint_source.data
    device = vm.hinting.device
    assert len(hints["x0"]) == device.rounds >= 1
    assert hints["label"] == [f"round {0x80000001 + i:#x}" for i in range(device.rounds)]
    data = rec.data()
    assert np.nanmax(data.samples["hinted"]) > 0  # the guest held blocks during the migration
    assert data.samples["hinted"][-1] == 0  # and gave them all back at DONE
    assert hinting_status(vm)["qemu_status"] == "DONE"


def test_a_recorder_without_the_notifier_finds_syncs_in_the_samples():
    """A live QEMU reports no bitmap syncs of its own: they show as dirty-sync-count steps."""
    vm = labkit.open(memory="512M", seed=0)

    class QmpOnly:  # what a live backend offers the recorder
        qmp, sample, advance = vm.qmp, vm.sample, vm.advance

        def inspect(self, mechanism):  # as the live backend's: no bitmap, no sync rows
            info = vm.qmp("query-migrate")
            return LiveMigrationView(info.get("status", "none"), "running",
                                     info.get("ram", {}).get("dirty-sync-count", 0))

    rec = MigrationRecorder(QmpOnly())
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    info = rec.run(every_ms=5)
    data = rec.data()
    assert len(data.syncs["t_ms"]) >= 1
    assert data.syncs["count"][-1] == info["ram"]["dirty-sync-count"]
    rounds = data.rounds()
    assert sum(rounds["normal"]) + data.syncs["normal"][0] == info["ram"]["normal"]
    vm.close()


def test_the_recorder_reads_the_syncs_through_inspect_and_joins_no_chain():
    vm = labkit.open(memory="256M", seed=0)
    chain = list(vm.migration.precopy_notifiers)
    rec = MigrationRecorder(vm)
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    info = rec.run(every_ms=10)
    assert vm.migration.precopy_notifiers == chain  # nothing hooked into the model
    view = vm.inspect("migration")
    assert [s["t_abs"] for s in rec.syncs] == [r["t_ms"] for r in view.syncs]
    assert [s["remaining_before"] for s in rec.syncs] == [r["remaining_before"] for r in view.syncs]
    assert rec.syncs[-1]["count"] == info["ram"]["dirty-sync-count"] and rec.syncs[-1]["last_stage"]
    late = MigrationRecorder(vm)  # made after the migration: its syncs are not this recorder's
    late.poll()
    assert late.syncs == []
    rec.close()  # nothing to release
    vm.close()


# --- the migration view from scenario runs -----------------------------------------------------------
def test_view_of_a_scenario_run(policy_runs):
    run = policy_runs["hinting"]
    view = MigrationView(run)
    data = from_run(run)
    rounds = view.round_source.data
    assert len(rounds["round"]) == run.summary["dirty_sync_count"]
    assert rounds["round"][-1] == "stop-and-copy"
    assert sum(rounds["mib"]) * MiB == pytest.approx(run.summary["transferred"])
    assert rounds["end"][-1] == run.summary["total_time_ms"]
    assert data.end["downtime_ms"] == run.summary["downtime_ms"]
    history = run.history
    assert np.array_equal(view.source.data["threshold"] * MiB, history["threshold"])
    p = run.params
    assert view.source.data["reference"][0] * MiB == p.bandwidth * p.downtime_limit_ms / 1000
    assert len(view.hint_source.data["x0"]) == run.summary["dirty_sync_count"] - 1
    if data.has_pages:  # the history carries normal/zero per sync
        assert sum(rounds["normal"]) == run.summary["normal_pages"]
    integrity_ok(view.layout)


def test_a_migration_that_never_converges():
    run = migration_compare(write_heavy(memory="1G", timeout_ms=3000))["plain"]
    assert run.summary["completed"] == 0
    view = MigrationView(run)
    assert "stop-and-copy" not in view.round_source.data["round"]
    assert view.switch_source.data["x"] == []
    bars = comparison({"write-heavy": run})
    assert np.isnan(bars.source.data["total_time_ms"][0])
    assert bars.source.data["note"] == ["did not converge"]


def test_comparison_bars_hold_the_table(policy_runs):
    bars = comparison(policy_runs)
    table = migration_table(policy_runs)
    src = bars.source.data
    assert src["policy"] == list(table["policy"])
    assert np.array_equal(src["total_time_ms"], table["total_time_ms"])
    assert np.array_equal(src["downtime_ms"], table["downtime_ms"])
    assert np.allclose(np.array(src["sent_mib"]) * MiB, table["transferred"])
    integrity_ok(bars.layout)


def test_policy_switch_redraws_the_chosen_run(policy_runs):
    switch = PolicySwitch(policy_runs, value="plain")
    plain = list(switch.view.source.data["remaining"])
    switch.buttons.value = "hinting"  # what a click does
    hinting = policy_runs["hinting"].history["remaining"]
    assert np.array_equal(switch.view.source.data["remaining"] * MiB, hinting)
    assert list(switch.view.source.data["remaining"]) != plain
    assert "hinting" in switch.view.backlog_figure.title.text


# --- the migration explorer ----------------------------------------------------------------------------
def test_explorer_steps_a_hinting_round_and_the_page_map_shows_the_blocks():
    vm = labkit.open(memory="1G", seed=0, balloon=dict(HINT))
    ex = MigrationExplorer(vm, tick_ms=1.0)
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    for _ in range(4):
        ex.tick()
    hinted = int(np.count_nonzero(vm.mem.state == PageState.HINTED))
    assert hinted > 0 and ex.status["held_blocks"] * 1024 == hinted
    assert ex.status["qemu_cmd_id"] == "0x80000001"
    assert ex.page_map.counts[palette.G_HINTED] == hinted
    assert "0x80000001" in ex.status_html.value
    ticks_before = len(ex.view.source.data["t"])
    ex.speed.value = 20.0
    ex.step_button.click()
    assert len(ex.view.source.data["t"]) > ticks_before
    while not ex.recorder.finished:
        ex.tick()
    assert ex.status["qemu_status"] == "DONE" and ex.page_map.counts[palette.G_HINTED] == 0
    assert ex.view.round_source.data["round"][-1] == "stop-and-copy"
    with pytest.raises(ValueError, match="tick_ms must be a number of milliseconds > 0, got 0"):
        MigrationExplorer(vm, tick_ms=0)
    vm.close()


# --- page map colours --------------------------------------------------------------------------------
def test_reported_and_hinted_pages_have_their_own_colours():
    cats = palette.GUEST_CATEGORIES
    colours = {c.name: c.color for c in cats}
    assert len({colours["free"], colours["free (reported)"], colours["hinted"]}) == 3
    with labkit.open(memory="1G", seed=0, balloon=dict(REPORTING)) as vm:
        vm.advance(30_000)
        reported = int(np.count_nonzero((vm.mem.flags & PageFlag.REPORTED) != 0))
        assert reported > 0
        assert page_map(vm.snapshot()).counts[palette.G_REPORTED] == reported


# --- overcommit ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overcommit_runs():
    params = OvercommitParams(n_vms=2, vm_memory="512M", host_ram="768M", workload=("burst-idle", "ramp"),
                              duration_s=60, seed=0)
    return compare_policies(params, ("none", "mom", "reporting"))


def test_policy_bars_hold_the_summaries(overcommit_runs):
    bars = policy_bars(overcommit_runs)
    src = bars.source.data
    assert src["policy"] == ["none", "mom", "reporting"]
    for i, run in enumerate(overcommit_runs.values()):
        assert src["swap_out_bytes"][i] * MiB == run.summary["swap_out_bytes"]
        assert src["stall_s"][i] == run.summary["stall_s"]
        assert src["returned_bytes"][i] * MiB == run.summary["returned_bytes"]
    integrity_ok(bars.layout)


def test_overcommit_view_switches_policy_vm_and_time(overcommit_runs):
    view = OvercommitView(overcommit_runs, policy="none")
    assert "runs no MoM-like controller" in view.why_html.value
    view.policy_buttons.value = "mom"
    mom = overcommit_runs["mom"]
    assert np.array_equal(view.host_source.data["host_rss"] * MiB, mom.series["host_rss"])
    view.vm_buttons.value = "vm1"
    assert np.array_equal(view.vm_source.data["balloon_actual"] * MiB, mom.series["vm1.balloon_actual"])
    mine = [d for d in mom.decisions if d.vm == "vm1"]
    assert view.decision_source.data["t"] == [d.t_s for d in mine]
    assert view.decision_source.data["reason"] == [d.reason_code for d in mine]
    view.time_slider.value = 45.0
    decision = view.decision_at(45.0)
    assert decision is mine[[d.t_s for d in mine].index(40.0)]
    assert decision.reason_code in view.why_html.value
    assert all(c.location == 45.0 for c in view.cursors)
    with pytest.raises(ValueError, match="policy 'static' is not one of"):
        OvercommitView(overcommit_runs, policy="static")


def test_staircase_and_reporting_explorer_follow_the_vm():
    vm = labkit.open(memory="2G", seed=0, balloon=dict(REPORTING))
    vm.advance(40_000)
    ex = ReportingExplorer(vm, tick_ms=2000, sample_ms=500, job_mib=1024)
    rss_before = vm.sample()["host_rss"]
    ex.run_job(1024)
    assert vm.sample()["host_rss"] >= rss_before + 900 * MiB  # the job's pages stay backed
    passes = vm.reporting.passes
    for _ in range(3):
        ex.tick()
    assert vm.reporting.passes > passes
    src = ex.staircase.source.data
    assert len(src["t"]) == 1 + 1 + 3 * 4  # first row, after the job, 4 samples per 2 s tick
    assert src["host_rss"][-1] * MiB == vm.sample()["host_rss"] < rss_before + 900 * MiB
    reported = int(np.count_nonzero((vm.mem.flags & PageFlag.REPORTED) != 0))
    assert ex.page_map.counts[palette.G_REPORTED] == reported > 0
    # every pass since the explorer's first row (earlier ones would stretch the axis over an empty
    # stretch before the data: the "opens empty" staircase of issue 9)
    starts = [p.start_ms for p in vm.reporting.core.history if p.start_ms >= ex.staircase.t0]
    assert starts and ex.staircase.pass_source.data["x"] == pytest.approx(
        [(s - ex.staircase.t0) / 1000 for s in starts])
    assert ex.status["passes"] == vm.reporting.passes
    integrity_ok(ex.staircase.layout)
    with labkit.open(memory="512M", seed=0) as plain:
        with pytest.raises(ValueError, match="no free page reporting"):
            ReportingExplorer(plain)
    vm.close()


# --- bad input ---------------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly():
    with pytest.raises(TypeError, match="a MigrationRecorder, a MigrationRun or MigrationData, got int"):
        MigrationView(42)
    with labkit.open(memory="256M", seed=0) as vm:
        with pytest.raises(ValueError, match="has no free page hinting"):
            hinting_status(vm)
        rec = MigrationRecorder(vm)
        with pytest.raises(ValueError, match="every_ms must be > 0, got 0"):
            rec.advance(10, every_ms=0)
        rec.close()
    with pytest.raises(ValueError, match="at least one run"):
        comparison({})
    with pytest.raises(ValueError, match="at least one vm.sample"):
        staircase([])
