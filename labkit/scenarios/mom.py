"""A MoM-like auto-balloon controller: oVirt's Memory Overcommitment Manager policy, as a management app.

It sees exactly what MoM sees and acts the way MoM does, through QMP only: it turns on the balloon's
stats (``qom-set guest-stats-polling-interval``), reads them (``qom-get guest-stats``) and the
balloon's size (``query-balloon``), reads the host's free memory, and sets targets with ``balloon``.
The policy is MoM's ``balloon.rules`` (oVirt mom ``doc/balloon.rules``; vdsm ``mom-balloon.policy``):

* every ``interval_s`` (MoM's policy-engine-interval, 10 s) it computes
  ``host_free_percent = StatAvg(host mem_free) / host mem_available``; StatAvg is the mean of the last
  ``history`` samples (sample-history-length 10), sampled every ``monitor_interval_s`` (5 s);
* **host under pressure** (free < ``pressure_threshold`` 20 %): ``shrink_guest`` for every guest. The
  guest keeps ``min_guest_free_percent`` (20 %) free scaled by ``host_free_percent / pressure_threshold``
  (at 10 % host free a guest keeps 10 %); at or below ``pressure_critical`` (5 %) the share becomes
  ``host_free_percent - 5 %``, negative: MoM then squeezes guests into swapping.
  ``used = StatAvg(balloon_cur) - StatAvg(mem_unused)``; ``floor = max(guaranteed, used + share x
  balloon_cur)``; the new size is ``balloon_cur x (1 - 5 %)`` (``max_balloon_change_percent``) but not
  below the floor, and only if it does not grow the guest;
* **no pressure**: ``grow_guest``: a guest whose balloon is inflated grows by 5 % of its size, or at
  once to ``used + 20 % x balloon_max`` if that is more, up to ``balloon_max``; an uninflated guest is
  left alone. So the controller only ever *takes* memory under host pressure;
* a change of at most ``min_balloon_change_percent`` (0.25 %) of the current size is skipped.

``balloon_cur`` is the balloon's logical size (QMP ``query-balloon`` ``actual``, libvirt's
``currentMemory``); ``mem_unused`` is ``stat-free-memory`` (MemFree: page cache counts as *used*,
so MoM never takes a guest's cache); ``guaranteed`` is oVirt's per-VM guaranteed memory, a share of the
VM's memory here (a labkit default of 50 %; oVirt asks for it per VM). Every evaluation of every guest
leaves a :class:`Decision` saying what was computed and why the controller did or did not act.

>>> import labkit
>>> from labkit.model.host import Host
>>> host = Host(ram=4 << 30, swap=4 << 30)
>>> vm = labkit.open(memory="1G", seed=0, host=host)
>>> mom = MomController({"vm0": vm}, host_stats(host))
>>> for second in range(0, 31):
...     _ = mom.tick(second)
...     vm.advance(1000)
>>> mom.decisions[-1].reason_code
'not-ballooned'
>>> print(mom.why("vm0").splitlines()[0])
vm0: 3 evaluations, 0 balloon changes; latest at t=30 s: host not under pressure ...
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from labkit.backends.base import Backend
from labkit.model.host import Host
from labkit.units import PAGE_SIZE, format_size

QOM_PATH = "/machine/peripheral/{id}"  # -device virtio-balloon-pci,id=balloon0
STAT_UNSET_MIN = 1 << 63  # QEMU reports a stat the guest did not send as -1 (u64 max)

REASONS = {
    "no-stats": "no guest stats yet (guest-stats not refreshed since polling was enabled)",
    "not-ballooned": "host not under pressure and the balloon is not inflated: nothing to give back",
    "grow": "host not under pressure: deflating the balloon (grow_guest)",
    "shrink": "host under pressure: inflating the balloon (shrink_guest)",
    "guest-min-free": "host under pressure, but the guest is already at its minimum free memory",
    "guaranteed-min": "host under pressure, but the guest is at its guaranteed minimum",
    "change-too-small": "the change is within min_balloon_change_percent of the current size: skipped",
}


@dataclass(frozen=True)
class MomPolicy:
    """MoM's auto-balloon constants (defaults from oVirt MoM ``balloon.rules`` and its config)."""

    interval_s: float = 10.0  # policy-engine-interval
    monitor_interval_s: float = 5.0  # host- and guest-monitor-interval
    stats_polling_interval_s: int = 5  # guest-stats-polling-interval the manager sets on QEMU
    history: int = 10  # sample-history-length: StatAvg is the mean of this many samples
    pressure_threshold: float = 0.20
    pressure_critical: float = 0.05
    min_guest_free_percent: float = 0.20
    max_balloon_change_percent: float = 0.05
    min_balloon_change_percent: float = 0.0025
    guaranteed: float = 0.5  # guest.balloon_min as a share of the VM's memory (labkit's default)

    def __post_init__(self) -> None:
        for name in ("interval_s", "monitor_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MomPolicy {name} must be > 0 seconds, got {getattr(self, name)!r}")
        if not isinstance(self.stats_polling_interval_s, int) or self.stats_polling_interval_s < 1:
            raise ValueError(f"MomPolicy stats_polling_interval_s must be an int >= 1 (seconds), got "
                             f"{self.stats_polling_interval_s!r}")
        if not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"MomPolicy history must be an int >= 1, got {self.history!r}")
        for name in ("pressure_threshold", "pressure_critical", "min_guest_free_percent",
                     "max_balloon_change_percent", "min_balloon_change_percent", "guaranteed"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MomPolicy {name} is a fraction in [0, 1], got {value!r}")
        if self.pressure_critical > self.pressure_threshold:
            raise ValueError(f"MomPolicy pressure_critical ({self.pressure_critical}) must not exceed "
                             f"pressure_threshold ({self.pressure_threshold})")


@dataclass(frozen=True)
class Decision:
    """One evaluation of one guest: the inputs, what MoM's rules computed, and what happened.

    Sizes in bytes; ``target`` is the ``balloon`` value sent, or None when the controller did not act.
    """

    t_s: float
    vm: str
    host_free_percent: float
    pressure: str  # "none", "pressure" or "critical"
    rule: str  # "shrink_guest" or "grow_guest"
    balloon_cur: int
    balloon_max: int
    mem_unused: int
    guest_used: int
    floor: int  # the smallest size the rules allow this time (balloon_min in balloon.rules)
    proposed: int  # the size the rules computed (balloon_size)
    target: int | None
    reason_code: str

    @property
    def acted(self) -> bool:
        return self.target is not None

    @property
    def reason(self) -> str:
        """The reason in words, with the numbers behind it."""
        text = REASONS[self.reason_code]
        host = f"host free {self.host_free_percent:.1%}"
        if self.reason_code == "no-stats":
            return text
        if self.reason_code in ("shrink", "grow"):
            return (f"{text}: {format_size(self.balloon_cur)} -> {format_size(self.target or 0)} "
                    f"({host})")
        if self.reason_code == "guest-min-free":
            return (f"{text}: used {format_size(self.guest_used)} + free share = "
                    f"{format_size(self.floor)} >= current {format_size(self.balloon_cur)} ({host})")
        if self.reason_code == "guaranteed-min":
            return f"{text} of {format_size(self.floor)} ({host})"
        if self.reason_code == "change-too-small":
            held = "" if self.proposed not in (self.floor,) else (
                "; held up by the guest's floor " + format_size(self.floor))
            return (f"{text}: {format_size(self.balloon_cur)} -> {format_size(self.proposed)}{held} "
                    f"({host})")
        return f"{text} ({host})"


def host_stats(host: Host) -> Callable[[], dict[str, int]]:
    """MoM's host collector on a model host: ``mem_free`` and ``mem_available`` (MemTotal), bytes."""
    return lambda: {"mem_free": max(host.free_pages, 0) * PAGE_SIZE, "mem_available": host.ram}


class MomController:
    """Runs MoM's balloon policy over ``vms`` (name -> backend). Call :meth:`tick` every second.

    ``host_stats()`` returns the host's ``mem_free`` and ``mem_available`` in bytes (see
    :func:`host_stats`). ``balloon_max`` defaults to each VM's size when the controller starts.
    """

    def __init__(self, vms: Mapping[str, Backend], host_stats: Callable[[], dict[str, int]],
                 policy: MomPolicy | None = None, balloon_id: str = "balloon0"):
        if not vms:
            raise ValueError("MomController needs at least one VM")
        self.vms = dict(vms)
        self.host_stats = host_stats
        self.policy = policy or MomPolicy()
        self.path = QOM_PATH.format(id=balloon_id)
        self.decisions: list[Decision] = []
        self.host_free_percent: float | None = None
        self.balloon_max: dict[str, int] = {}
        self._host_free = deque(maxlen=self.policy.history)
        self._cur = {name: deque(maxlen=self.policy.history) for name in self.vms}
        self._unused = {name: deque(maxlen=self.policy.history) for name in self.vms}
        self._started = False
        self._next_monitor = 0.0
        self._next_policy = self.policy.interval_s

    def start(self) -> None:
        """Enable the balloon stats on every guest (as vdsm does) and learn each balloon_max."""
        for name, vm in self.vms.items():
            vm.qmp("qom-set", path=self.path, property="guest-stats-polling-interval",
                   value=self.policy.stats_polling_interval_s)
            self.balloon_max[name] = int(vm.qmp("query-balloon")["actual"])
        self._started = True

    def tick(self, now_s: float) -> list[Decision]:
        """Collect stats and evaluate the policy when their intervals are due; returns new decisions."""
        if not self._started:
            self.start()
        if now_s >= self._next_monitor:
            self._collect()
            self._next_monitor += self.policy.monitor_interval_s * max(
                1, int((now_s - self._next_monitor) // self.policy.monitor_interval_s) + 1)
        new = []
        if now_s >= self._next_policy:
            new = self.evaluate(now_s)
            self._next_policy += self.policy.interval_s * max(
                1, int((now_s - self._next_policy) // self.policy.interval_s) + 1)
        return new

    def _collect(self) -> None:
        stats = self.host_stats()
        self._host_free.append(stats["mem_free"] / stats["mem_available"])
        for name, vm in self.vms.items():
            guest = vm.qmp("qom-get", path=self.path, property="guest-stats")["stats"]
            unused = guest.get("stat-free-memory", -1)
            if unused < 0 or unused >= STAT_UNSET_MIN:
                continue
            self._cur[name].append(int(vm.qmp("query-balloon")["actual"]))
            self._unused[name].append(int(unused))

    def evaluate(self, now_s: float) -> list[Decision]:
        """One run of the policy over every guest (MoM's main script)."""
        p = self.policy
        if not self._host_free:
            self._collect()
        host_free = sum(self._host_free) / len(self._host_free)
        self.host_free_percent = host_free
        pressured = host_free < p.pressure_threshold
        state = "critical" if host_free <= p.pressure_critical else "pressure" if pressured else "none"
        out = []
        for name, vm in self.vms.items():
            if not self._cur[name]:
                out.append(Decision(now_s, name, host_free, state,
                                    "shrink_guest" if pressured else "grow_guest", 0,
                                    self.balloon_max[name], 0, 0, 0, 0, None, "no-stats"))
                continue
            cur = int(vm.qmp("query-balloon")["actual"])
            used = int(sum(self._cur[name]) / len(self._cur[name])
                       - sum(self._unused[name]) / len(self._unused[name]))
            rule = self._shrink if pressured else self._grow
            decision = rule(now_s, name, host_free, state, cur, used)
            if decision.target is not None:
                vm.qmp("balloon", value=decision.target)
            out.append(decision)
        self.decisions.extend(out)
        return out

    def _change_big_enough(self, cur: int, new: float) -> bool:
        return abs(new - cur) > self.policy.min_balloon_change_percent * cur

    def _shrink(self, now_s, name, host_free, state, cur, used) -> Decision:
        p = self.policy
        if host_free <= p.pressure_critical:
            free_share = -0.05 + host_free  # force the guest to swap
        else:
            free_share = p.min_guest_free_percent * (host_free / p.pressure_threshold)
        balloon_max = self.balloon_max[name]
        guaranteed = int(p.guaranteed * balloon_max)
        wanted = used + free_share * cur
        floor = max(guaranteed, wanted)
        proposed = max(cur * (1 - p.max_balloon_change_percent), floor)
        target, code = None, "shrink"
        if proposed > cur:
            code = "guaranteed-min" if guaranteed >= wanted else "guest-min-free"
        elif not self._change_big_enough(cur, proposed):
            code = "change-too-small"
        else:
            target = int(proposed) // PAGE_SIZE * PAGE_SIZE
        return Decision(now_s, name, host_free, state, "shrink_guest", cur, balloon_max,
                        cur - used, used, int(floor), int(proposed), target, code)

    def _grow(self, now_s, name, host_free, state, cur, used) -> Decision:
        p = self.policy
        balloon_max = self.balloon_max[name]
        floor = used + p.min_guest_free_percent * balloon_max
        if cur >= balloon_max:
            return Decision(now_s, name, host_free, state, "grow_guest", cur, balloon_max, cur - used,
                            used, int(floor), cur, None, "not-ballooned")
        proposed = min(cur * (1 + p.max_balloon_change_percent), balloon_max)
        proposed = max(proposed, floor)
        target, code = None, "grow"
        if not self._change_big_enough(cur, proposed):
            code = "change-too-small"
        else:
            target = min(int(proposed) // PAGE_SIZE * PAGE_SIZE, balloon_max)
        return Decision(now_s, name, host_free, state, "grow_guest", cur, balloon_max, cur - used,
                        used, int(floor), int(proposed), target, code)

    # --- answers for notebooks ------------------------------------------------------------------
    def reasons(self, vm: str | None = None) -> Counter:
        """How often each reason code came up (for one VM, or all)."""
        return Counter(d.reason_code for d in self.decisions if vm is None or d.vm == vm)

    def why(self, vm: str, last: int = 1) -> str:
        """Why did (or didn't) MoM shrink this guest? A summary and the ``last`` decisions in words."""
        if vm not in self.vms:
            raise ValueError(f"VM {vm!r} is not managed by this controller; it manages {sorted(self.vms)}")
        mine = [d for d in self.decisions if d.vm == vm]
        if not mine:
            return f"{vm}: not evaluated yet (the policy runs every {self.policy.interval_s:g} s)"
        acted = sum(d.acted for d in mine)
        counts = ", ".join(f"{code} x{n}" for code, n in self.reasons(vm).most_common())
        lines = [f"{vm}: {len(mine)} evaluations, {acted} balloon changes; latest at t={mine[-1].t_s:g} s: "
                 f"{mine[-1].reason}", f"  reasons: {counts}"]
        lines += [f"  t={d.t_s:g} s: {d.reason}" for d in mine[-last:]] if last > 1 else []
        return "\n".join(lines)
