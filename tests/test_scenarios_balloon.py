"""The "inflate by how much?" scenario, checked against the balloon facts of docs/mechanisms.md §1."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import labkit
from labkit.model.pages import PageFlag, PageState
from labkit.scenarios import Run, SizingParams, balloon_sizing, guest_demand, run_target, sizing_table
from labkit.scenarios.balloon_sizing import (
    format_table,
    idle_backed_bytes,
    open_vm,
    out_of_puff_retries,
    working_set,
)
from labkit.units import GiB, MiB, PAGE_SIZE

OOM_NR_PAGES = 256  # VIRTIO_BALLOON_OOM_NR_PAGES, docs/mechanisms.md §1.4
PARAMS = SizingParams(memory=2 * GiB, seed=3, targets=(1.0, 0.85, 0.7, 0.55, 0.4, 0.3))


@pytest.fixture(scope="module")
def runs_plain() -> list[Run]:
    return balloon_sizing(PARAMS)


@pytest.fixture(scope="module")
def runs_doo() -> list[Run]:
    return balloon_sizing(PARAMS, deflate_on_oom=True)


def by_share(runs: list[Run], share: float) -> Run:
    return next(r for r in runs if r.summary["target_share"] == share)


# --- §1.2: the driver chases the target, 256 PFNs a request; "Out of puff!" when it cannot -----------
def test_too_aggressive_target_runs_out_of_puff_and_actual_stalls_above_it(runs_plain):
    run = by_share(runs_plain, 0.3)
    s = run.summary
    assert s["out_of_puff"] > 0
    assert not s["reached"]
    assert s["actual"] > s["target"]
    # it stalls where the guest cannot give more: at the demand (unreclaimable + min watermark)
    assert abs(s["actual"] - s["demand"]) <= 16 * MiB
    # a failed allocation costs a 200 ms sleep, so retries are at most one per 200 ms of settling
    assert s["out_of_puff"] <= PARAMS.settle_ms / 200 + 1
    # and the whole page cache went first (kswapd and direct reclaim for __GFP_NORETRY pages)
    assert s["cache_after"] < 0.05 * s["cache_before"]


def test_actual_moves_at_most_256_pages_per_request_and_reaches_a_reachable_target():
    with labkit.open(memory="1G", seed=1) as vm:
        target = guest_demand(vm) + 64 * MiB
        vm.qmp("balloon", value=target)
        actuals = [vm.qmp("query-balloon")["actual"]]
        while vm.step():
            actuals.append(vm.qmp("query-balloon")["actual"])
        steps = -np.diff(np.array(actuals)) // PAGE_SIZE
        assert steps.max() <= 256 and steps.min() >= 0
        assert actuals[-1] == target
        assert out_of_puff_retries(vm) == 0


def test_balloon_change_events_are_delivered_at_most_once_a_second():
    # QEMU's monitor throttles BALLOON_CHANGE to 1/s (docs/mechanisms.md §1.7): the first change goes out
    # at once, later ones are held and only the newest is sent when the second is over. A held event
    # keeps the timestamp it was created with, so delivery times, not timestamps, are 1 s apart.
    with labkit.open(memory="1G", seed=0, model={"balloon_request_ms": 5.0}) as vm:
        vm.qmp("balloon", value=guest_demand(vm) + 16 * MiB)
        delivered_at, seen = [], 0
        for _ in range(120):  # 6 s in 50 ms steps
            vm.advance(50)
            n = len(vm.events())
            if n > seen:
                assert n == seen + 1
                delivered_at.append(vm.sample()["t_ms"])
                seen = n
        assert vm.balloon.requests > 100 and 2 <= len(delivered_at) <= 7
        assert np.diff(delivered_at).min() >= 1000 - 50
        # the last one carries the logical size the guest settled at
        assert vm.events()[-1]["data"]["actual"] == vm.qmp("query-balloon")["actual"]


# --- §1.3: MemTotal with and without deflate-on-oom ---------------------------------------------
def test_memtotal_shrinks_by_the_balloon_without_deflate_on_oom(runs_plain):
    full = by_share(runs_plain, 1.0).summary["memtotal"]
    for run in runs_plain:
        s = run.summary
        assert s["memtotal"] == full - s["balloon_size"]


def test_memtotal_unchanged_by_inflation_with_deflate_on_oom(runs_doo):
    full = by_share(runs_doo, 1.0).summary["memtotal"]
    for run in runs_doo:
        assert run.summary["memtotal"] == full
        assert run.summary["balloon_size"] > 0 or run.summary["target_share"] == 1.0


# --- §1.4: OOM deflate, 256 pages per OOM event, no re-inflate until the next balloon command ---
def test_oom_deflates_256_pages_per_event_and_does_not_reinflate_by_itself():
    with labkit.open(memory="1G", seed=2, balloon={"deflate_on_oom": True}) as vm:
        target = guest_demand(vm) + 32 * MiB
        vm.qmp("balloon", value=target)
        vm.advance(2000)
        assert vm.qmp("query-balloon")["actual"] == target
        assert vm.balloon.idle
        memtotal = vm.meminfo()["MemTotal"]
        size_before = vm.sample()["balloon_size"]

        h = vm.guest("alloc", size="96M", kind="anon")  # 64 MiB past what the guest has left
        events = vm.kernel.vmstat.oom_events
        deflated = size_before - vm.sample()["balloon_size"]
        assert events > 0
        assert deflated == events * OOM_NR_PAGES * PAGE_SIZE
        assert vm.balloon.oom_deflated_pages == events * OOM_NR_PAGES
        assert vm.sample()["oom_kills"] == 0  # the notifier freed memory, so nobody was killed
        assert vm.meminfo()["MemTotal"] == memtotal

        vm.guest("free", handle=h)  # memory is free again, yet the balloon stays deflated
        deflated_actual = vm.qmp("query-balloon")["actual"]
        assert deflated_actual == target + deflated
        vm.advance(5000)
        assert vm.qmp("query-balloon")["actual"] == deflated_actual

        vm.qmp("balloon", value=target)  # the same target again: a config change re-inflates
        vm.advance(2000)
        assert vm.qmp("query-balloon")["actual"] == target


def test_without_deflate_on_oom_an_allocation_past_the_limit_kills_a_process():
    with labkit.open(memory="1G", seed=2, balloon={"deflate_on_oom": False}) as vm:
        target = guest_demand(vm) + 32 * MiB
        vm.qmp("balloon", value=target)
        vm.advance(2000)
        size = vm.sample()["balloon_size"]
        vm.guest("alloc", size="96M", kind="anon")
        assert vm.sample()["oom_kills"] >= 1
        assert vm.sample()["balloon_size"] == size  # the balloon gave nothing back
        assert any("Out of memory: Killed process" in line for line in vm.dmesg())


def test_growth_after_deep_inflation_oom_kills_without_and_deflates_with(runs_plain, runs_doo):
    deep_plain, deep_doo = by_share(runs_plain, 0.3).summary, by_share(runs_doo, 0.3).summary
    assert deep_plain["oom_kills"] >= 1 and deep_plain["oom_deflated"] == 0
    assert deep_doo["oom_kills"] == 0
    assert deep_doo["oom_deflated"] == deep_doo["oom_deflate_events"] * OOM_NR_PAGES * PAGE_SIZE
    assert deep_doo["oom_deflated"] >= deep_doo["growth"] - 4 * MiB
    assert deep_doo["app_alive"] and deep_doo["growth_alive"]


# --- §1.6: the host frees only what was backed; never-touched pages cost nothing either way -----
def test_host_rss_drops_by_exactly_the_backed_pages_the_balloon_took():
    vm, _ = open_vm(SizingParams(memory="1G", seed=5))
    with vm:
        before = vm.snapshot()
        rss_before = vm.sample()["host_rss"]
        vm.qmp("balloon", value=int(0.8 * GiB))
        vm.advance(2000)
        after = vm.snapshot()
        balloon = after["state"] == PageState.BALLOON
        backed_before = (before["flags"][balloon] & PageFlag.BACKED) != 0
        returned = rss_before - vm.sample()["host_rss"]
        assert returned == int(backed_before.sum()) * PAGE_SIZE
        assert returned < int(balloon.sum()) * PAGE_SIZE  # some balloon pages were never touched
        assert not ((after["flags"][balloon] & PageFlag.BACKED) != 0).any()


def test_discard_disabled_inflation_frees_nothing_on_the_host():
    run = run_target(SizingParams(memory="1G", seed=0, discard=False), 0.6)
    assert run.summary["balloon_size"] > 0
    # nothing is discarded; with init_on_alloc=1 (Debian) the guest even zeroes the balloon pages
    # it never touched before, so host RSS may grow (mm/page_alloc.c post_alloc_hook)
    assert run.summary["host_returned"] <= 0


def test_too_little_inflation_leaves_guest_free_memory_backed_and_idle(runs_plain):
    ws = working_set(PARAMS)
    none = by_share(runs_plain, 1.0).summary
    assert none["idle_backed"] >= 0.9 * ws.transient  # the finished job's pages stay on the host
    deeper = [by_share(runs_plain, t).summary["idle_backed"] for t in PARAMS.targets]
    assert deeper[-1] < 0.1 * none["idle_backed"]


def test_idle_backed_counts_backed_pages_on_the_per_cpu_lists_as_idle():
    # A freed page that stays on a per-CPU list is free (mm/page_alloc.c free_unref_page_commit()),
    # only not in NR_FREE_PAGES (docs/mechanisms.md §10.3): a backed one is idle waste like a backed
    # buddy page, and the balloon takes it first (rmqueue_pcplist()): the host view paints it red too.
    vm, _ = open_vm(SizingParams(memory="1G", seed=5))
    with vm:
        job = vm.guest("alloc", size="64M", kind="anon")
        vm.guest("free", handle=job)
        snap = vm.snapshot()
        backed = (snap["flags"] & PageFlag.BACKED) != 0
        on_pcp = int(np.count_nonzero((snap["state"] == PageState.PCP) & backed))
        on_buddy = int(np.count_nonzero((snap["state"] == PageState.FREE) & backed))
        assert on_pcp > 0  # the job's last freed pages sit on the per-CPU lists
        assert idle_backed_bytes(vm) == (on_pcp + on_buddy) * PAGE_SIZE


def test_table_shape_and_trends(runs_plain):
    rows = sizing_table(runs_plain)
    assert all(len(v) == len(PARAMS.targets) for v in rows.values())
    # deeper targets return more host memory and reclaim more cache, and leave less available
    assert (np.diff(rows["host_returned"]) >= 0).all()
    assert (np.diff(rows["cache_reclaimed"]) >= 0).all()
    assert (np.diff(rows["memavailable"]) <= 0).all()
    text = format_table(rows)
    assert text.count("\n") == len(PARAMS.targets) + 1 and "out_of_puff" in text


def test_seeded_runs_repeat_and_seeds_differ():
    p = SizingParams(memory="1G", seed=11, targets=(0.6, 0.35))
    a, b = sizing_table(balloon_sizing(p)), sizing_table(balloon_sizing(p))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert working_set(p) != working_set(SizingParams(memory="1G", seed=12))


# --- any backend: the helpers only need the public calls -------------------------------------
class PublicOnly:
    """A backend that offers only the protocol (no snapshot, no driver internals): its balloon view
    is a live guest's, where the driver's counters can't be seen (None)."""

    def __init__(self, vm):
        self._vm = vm

    def inspect(self, mechanism):
        view = self._vm.inspect(mechanism)
        return dataclasses.replace(view, out_of_puff=None) if mechanism == "balloon" else view

    def __getattr__(self, name):
        if name in ("qmp", "guest", "meminfo", "advance", "sample", "events", "step", "close",
                    "dmesg", "zoneinfo"):
            return getattr(self._vm, name)
        raise AttributeError(name)


def test_helpers_work_on_a_backend_without_snapshots():
    vm, _ = open_vm(SizingParams(memory="1G", seed=4))
    with vm:
        public = PublicOnly(vm)
        exact = idle_backed_bytes(vm)
        estimate = idle_backed_bytes(public)
        assert exact > 0 and abs(estimate - exact) <= 0.15 * exact + 64 * MiB
        assert guest_demand(public) == guest_demand(vm)
        vm.qmp("balloon", value=128 * MiB)
        vm.advance(1000)
        assert out_of_puff_retries(public) == out_of_puff_retries(vm) > 0


# --- Run and parameters ------------------------------------------------------------------------
def test_run_from_rows_fills_missing_keys_and_serialises(tmp_path):
    run = Run.from_rows([{"t_ms": 0.0, "a": 1.0}, {"t_ms": 1.0, "b": 2.0}], summary={"x": 1},
                        params=PARAMS)
    assert len(run) == 2 and np.isnan(run.series["a"][1]) and np.isnan(run.series["b"][0])
    path = tmp_path / "run.json"
    run.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["summary"] == {"x": 1.0} and data["params"]["seed"] == 3
    with pytest.raises(KeyError, match="'c'"):
        run.last("c")


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": (1.2,)}, "targets are fractions"),
    ({"targets": ()}, "targets are fractions"),
    ({"memory": "100M"}, "at least 256 MiB"),
    ({"anon_share": (0.5, 0.7)}, "at or under 0.8"),
    ({"growth": -0.1}, "growth"),
    ({"sample_ms": 0}, "sample_ms"),
])
def test_bad_parameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SizingParams(**kwargs)


def test_run_target_rejects_a_bad_target():
    with pytest.raises(ValueError, match="got 0"):
        run_target(PARAMS, 0)
