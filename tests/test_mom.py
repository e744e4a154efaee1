"""The MoM-like controller's rules on a stand-in VM whose stats the test sets (no page model needed)."""

from __future__ import annotations

import pytest

from labkit.scenarios.mom import MomController, MomPolicy

MiB = 1 << 20
GiB = 1 << 30
UNSET = (1 << 64) - 1


class FakeVM:
    """Answers the QMP a management app uses; the balloon reaches its target at once."""

    def __init__(self, memory: int = GiB, free: int = 800 * MiB):
        self.memory = memory
        self.actual = memory
        self.free = free
        self.targets: list[int] = []
        self.polling = 0
        self.paths: set[str] = set()

    def qmp(self, command: str, **args):
        if command == "qom-set":
            self.paths.add(args["path"])
            assert args["property"] == "guest-stats-polling-interval"
            self.polling = args["value"]
            return {}
        if command == "qom-get":
            self.paths.add(args["path"])
            assert args["property"] == "guest-stats"
            return {"stats": {"stat-free-memory": self.free, "stat-total-memory": self.actual},
                    "last-update": 0}
        if command == "query-balloon":
            return {"actual": self.actual}
        if command == "balloon":
            self.targets.append(args["value"])
            self.free -= self.actual - args["value"]  # the balloon takes (or gives back) free memory
            self.actual = args["value"]
            return {}
        raise AssertionError(f"unexpected QMP command {command}")


class HostStub:
    def __init__(self, ram: int = 16 * GiB, free_share: float = 0.5):
        self.ram = ram
        self.free_share = free_share

    def __call__(self) -> dict[str, int]:
        return {"mem_free": int(self.ram * self.free_share), "mem_available": self.ram}


def run(controller: MomController, seconds: int, start: int = 0) -> None:
    for t in range(start, start + seconds):
        controller.tick(float(t))


def test_start_enables_stats_through_qom_and_evaluates_every_10_s():
    vm = FakeVM()
    mom = MomController({"a": vm}, HostStub())
    run(mom, 61)
    assert vm.polling == 5 and vm.paths == {"/machine/peripheral/balloon0"}
    assert [d.t_s for d in mom.decisions] == [10, 20, 30, 40, 50, 60]


def test_no_pressure_means_no_action():
    vm = FakeVM()
    mom = MomController({"a": vm}, HostStub(free_share=0.5))
    run(mom, 100)
    assert vm.targets == []
    assert {d.reason_code for d in mom.decisions} == {"not-ballooned"}
    assert all(d.pressure == "none" and not d.acted for d in mom.decisions)
    assert "host not under pressure" in mom.why("a")


def test_pressure_shrinks_by_at_most_5_percent_per_step_down_to_the_guaranteed_minimum():
    vm = FakeVM(free=900 * MiB)
    host = HostStub(free_share=0.10)
    mom = MomController({"a": vm}, host, MomPolicy(guaranteed=0.6))
    run(mom, 400)
    assert vm.targets, "the controller should shrink the guest under host pressure"
    before = GiB
    for target in vm.targets:
        assert target >= 0.95 * before - 4096, "more than max_balloon_change_percent in one step"
        assert target < before
        before = target
    assert min(vm.targets) >= 0.6 * GiB - 4096
    assert vm.actual <= 0.6 * GiB * 1.0025 + 4096  # it got there (within min_balloon_change_percent)
    codes = [d.reason_code for d in mom.decisions]
    assert codes[0] == "shrink" and codes[-1] in ("guaranteed-min", "change-too-small")
    assert codes.count("shrink") == len(vm.targets)


def test_a_busy_guest_keeps_its_free_share():
    # 1 GiB guest with 5 % free: used 973 MiB; at 10 % host free it keeps 10 % free: floor > size
    vm = FakeVM(free=51 * MiB)
    mom = MomController({"a": vm}, HostStub(free_share=0.10), MomPolicy(guaranteed=0.1))
    run(mom, 31)
    assert vm.targets == []
    assert {d.reason_code for d in mom.decisions} == {"guest-min-free"}
    d = mom.decisions[-1]
    assert d.floor > d.balloon_cur and "minimum free memory" in d.reason


def test_free_share_scales_with_host_free_and_goes_negative_when_critical():
    # guest used 512 MiB of 1 GiB
    for host_free, share in ((0.15, 0.20 * 0.15 / 0.20), (0.10, 0.10), (0.03, -0.05 + 0.03)):
        vm = FakeVM(free=512 * MiB)
        mom = MomController({"a": vm}, HostStub(free_share=host_free), MomPolicy(guaranteed=0.0))
        run(mom, 11)
        d = mom.decisions[-1]
        assert d.pressure == ("critical" if host_free <= 0.05 else "pressure")
        assert d.floor == pytest.approx(512 * MiB + share * GiB, abs=2)


def test_changes_below_a_quarter_percent_are_skipped():
    # the floor sits 0.1 % below the current size: the rules propose it, change_big_enough refuses
    used = int(GiB * (1 - 0.001)) - int(0.10 * GiB)
    vm = FakeVM(free=GiB - used)
    mom = MomController({"a": vm}, HostStub(free_share=0.10), MomPolicy(guaranteed=0.0))
    run(mom, 11)
    d = mom.decisions[-1]
    assert d.reason_code == "change-too-small" and not d.acted and vm.targets == []
    assert "held up by the guest's floor" in d.reason


def test_grow_gives_memory_back_when_pressure_ends():
    vm = FakeVM(free=900 * MiB)
    host = HostStub(free_share=0.10)
    mom = MomController({"a": vm}, host, MomPolicy(guaranteed=0.5))
    run(mom, 100)
    shrunk = vm.actual
    assert shrunk < GiB
    host.free_share = 0.5
    run(mom, 200, start=100)
    assert vm.actual == GiB
    grow = [d for d in mom.decisions if d.reason_code == "grow"]
    assert grow and all(d.target > d.balloon_cur for d in grow)
    assert mom.decisions[-1].reason_code == "not-ballooned"


def test_statavg_averages_the_history():
    vm = FakeVM(free=800 * MiB)
    mom = MomController({"a": vm}, HostStub(free_share=0.5), MomPolicy(history=2))
    run(mom, 6)  # samples at t=0 and t=5
    vm.free = 200 * MiB
    run(mom, 5, start=6)  # sample at t=10, then the evaluation: mean of 800 and 200 MiB
    d = mom.decisions[-1]
    assert d.mem_unused == pytest.approx(500 * MiB, abs=1)


def test_no_stats_no_action():
    vm = FakeVM(free=UNSET)
    mom = MomController({"a": vm}, HostStub(free_share=0.01))
    run(mom, 21)
    assert vm.targets == [] and {d.reason_code for d in mom.decisions} == {"no-stats"}


def test_why_and_bad_input():
    vm = FakeVM()
    mom = MomController({"a": vm}, HostStub())
    assert "not evaluated yet" in mom.why("a")
    with pytest.raises(ValueError, match="not managed"):
        mom.why("b")
    with pytest.raises(ValueError, match="at least one VM"):
        MomController({}, HostStub())
    for bad in ({"interval_s": 0}, {"pressure_threshold": 1.5}, {"history": 0},
                {"pressure_critical": 0.3}, {"stats_polling_interval_s": 0}):
        with pytest.raises(ValueError, match="MomPolicy"):
            MomPolicy(**bad)
