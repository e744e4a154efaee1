"""Host overcommit: one host, N VMs given more memory than the host has, and what each policy does.

The VMs share one :class:`labkit.model.host.Host` (RAM, swap, a second-chance clock over all guests'
pages, ``swapin_us`` of guest stall per page swapped in). Each VM has its own simulated clock; the
scenario advances them in lockstep, ``step_s`` at a time. Each step every guest's workload acts
(:mod:`labkit.scenarios.overcommit_workloads`), then time runs. Policies:

* ``none``: nothing returns memory; what guests freed stays backed until the host swaps it out.
* ``static``: every balloon is set once to ``static_target`` x ``vm_memory`` at t = 0.
* ``mom``: the MoM-like controller (:mod:`labkit.scenarios.mom`) over QMP, acting under host pressure.
* ``reporting``: free page reporting in every guest (``balloon={"free_page_reporting": True}``).
* ``reporting+mom``: both.
* ``hinting``: free page hinting enabled (``free_page_hint`` with an iothread) and no migration:
  hinting only runs between the dirty-bitmap syncs of a migration, so it must change nothing here.

Metrics (the summary; ``vmN.<metric>`` per VM too): host swap-outs and swap-ins (pages and bytes),
guest stall (swap-ins x ``swapin_us``), host zero-fill faults (x ``refault_us``), free page reporting's
requests, peak host RSS and peak host footprint (RSS + swap), memory returned to the host (balloon and
reporting discards), time under host pressure (host free < MoM's 20 %) and critical pressure (< 5 %),
guest OOM kills (see :mod:`labkit.scenarios.overcommit_metrics`). Counters start after every VM has
booted. The series hold host and per-VM values once per ``sample_s``.

>>> run = run_overcommit(OvercommitParams(n_vms=2, vm_memory="512M", host_ram="640M",
...                                       workload="idle", duration_s=20, seed=1))
>>> sorted(run.vm_names), run.summary["oom_kills"]
(['vm0', 'vm1'], 0.0)
>>> len(run.series["t_s"]), bool(run.summary["peak_host_rss"] <= 640 << 20)
(20, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import labkit
from labkit.devices.free_page_reporting import REFAULT_US
from labkit.model.host import Host
from labkit.model.traces import Trace, read_traces
from labkit.scenarios.base import Run
from labkit.scenarios.mom import Decision, MomController, MomPolicy, host_stats
from labkit.scenarios.overcommit_metrics import Counters, policy_table, reporting_overhead, summarize
from labkit.scenarios.overcommit_workloads import WORKLOADS, make_workload
from labkit.units import GiB, MiB, PAGE_SIZE, format_size, parse_size

POLICIES = ("none", "static", "mom", "reporting", "reporting+mom", "hinting")
# The one switch that turns free page reporting on (QEMU's virtio-balloon property).
REPORTING_OPTION = {"free_page_reporting": True}
HINTING_OPTION = {"free_page_hint": True, "iothread": "iothread0"}
SHIPPED_TRACES = Path(__file__).resolve().parents[2] / "data" / "traces" / "synthetic-4vm-6h"
VM_SERIES = ("rss", "swap", "balloon_actual", "working_set", "swap_ins", "swap_outs", "zero_fill",
             "returned")


def policy_balloon_options(policy: str, deflate_on_oom: bool = False) -> dict:
    """The virtio-balloon properties a policy needs (``balloon=`` of :func:`labkit.open`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {list(POLICIES)}")
    options: dict[str, Any] = {"deflate_on_oom": deflate_on_oom}
    if policy.startswith("reporting"):
        options |= REPORTING_OPTION
    if policy == "hinting":
        options |= HINTING_OPTION
    return options


@dataclass(frozen=True)
class OvercommitParams:
    """Parameters of one overcommit run. Sizes in bytes (strings like ``"8G"`` are parsed).

    ``host_ram`` defaults to 60 % of the VMs' total memory, ``host_swap`` to their total (so the host
    never runs out: labkit does not model the host's OOM killer). ``workload`` is one name of
    :data:`~labkit.scenarios.overcommit_workloads.WORKLOADS` for every VM, or one per VM. ``trace``
    (a GWA-T-12 file, directory or list of files; default: the project's shipped synthetic set)
    feeds ``workload="trace"``: VM i replays trace i mod the number of traces, ``trace_speed`` times
    faster than real time. ``static_target`` (a share of ``vm_memory``) is needed by, and only used
    by, policy ``static``.
    """

    n_vms: int = 4
    vm_memory: int | str = 2 * GiB
    host_ram: int | str | None = None
    host_swap: int | str | None = None
    policy: str = "none"
    static_target: float | None = None
    mom: MomPolicy = field(default_factory=MomPolicy)
    workload: str | tuple[str, ...] = "phases"
    trace: str | Path | tuple[str | Path, ...] | None = None
    trace_speed: float = 1.0
    max_share: float = 0.8
    duration_s: float = 600.0
    step_s: float = 1.0
    sample_s: float = 1.0
    access_period_s: float = 30.0
    chunk: int | str | None = None  # default: vm_memory / 128 (16 MiB for 2 GiB, 64 MiB for 8 GiB)
    swapin_us: float = 100.0  # a 4 KiB read from an SSD swap device
    refault_us: float = REFAULT_US  # a host zero-fill fault (free page reporting's assumption)
    deflate_on_oom: bool = False
    boot: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        def setv(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.n_vms, int) or isinstance(self.n_vms, bool) or not 1 <= self.n_vms <= 64:
            raise ValueError(f"n_vms must be an int from 1 to 64, got {self.n_vms!r}")
        memory = parse_size(self.vm_memory, name="vm_memory")
        if memory < 256 * MiB or memory % MiB:
            raise ValueError(f"vm_memory must be a whole number of MiB, at least 256 MiB, got "
                             f"{self.vm_memory!r}")
        setv("vm_memory", memory)
        total = memory * self.n_vms
        ram = parse_size(self.host_ram, name="host_ram") if self.host_ram is not None else int(
            0.6 * total) // MiB * MiB
        swap = parse_size(self.host_swap, name="host_swap") if self.host_swap is not None else total
        if ram <= 0 or swap < 0:
            raise ValueError(f"host_ram must be > 0 and host_swap >= 0, got {self.host_ram!r}, "
                             f"{self.host_swap!r}")
        if ram + swap < total:
            raise ValueError(f"host_ram + host_swap ({format_size(ram + swap)}) must cover the VMs' "
                             f"memory ({self.n_vms} x {format_size(memory)} = {format_size(total)}): "
                             "labkit does not model the host's OOM killer")
        setv("host_ram", ram)
        setv("host_swap", swap)
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {list(POLICIES)}")
        if self.policy == "static":
            if self.static_target is None:
                raise ValueError("policy 'static' needs static_target: the balloon target as a share "
                                 "of vm_memory, e.g. 0.7")
            if not 0.0 < self.static_target <= 1.0:
                raise ValueError(f"static_target is a share of vm_memory in (0, 1], got "
                                 f"{self.static_target!r}")
        if not isinstance(self.mom, MomPolicy):
            raise TypeError(f"mom must be a MomPolicy, got {type(self.mom).__name__}")
        names = (self.workload,) * self.n_vms if isinstance(self.workload, str) else tuple(self.workload)
        if len(names) != self.n_vms:
            raise ValueError(f"workload needs one name per VM ({self.n_vms}), got {len(names)}: "
                             f"{self.workload!r}")
        for name in names:
            if name not in WORKLOADS:
                raise ValueError(f"workload {name!r} is not one of {list(WORKLOADS)}")
        setv("workload", names if not isinstance(self.workload, str) else self.workload)
        for name in ("duration_s", "step_s", "sample_s", "access_period_s", "trace_speed"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if abs(self.duration_s / self.step_s - round(self.duration_s / self.step_s)) > 1e-9:
            raise ValueError(f"duration_s ({self.duration_s}) must be a whole number of steps of "
                             f"step_s ({self.step_s})")
        if abs(self.sample_s / self.step_s - round(self.sample_s / self.step_s)) > 1e-9:
            raise ValueError(f"sample_s ({self.sample_s}) must be a whole number of steps of "
                             f"step_s ({self.step_s})")
        if not 0.0 < self.max_share <= 0.95:
            raise ValueError(f"max_share is a share of vm_memory in (0, 0.95], got {self.max_share!r}")
        chunk = parse_size(self.chunk, name="chunk") if self.chunk is not None else max(
            MiB, memory // 128 // MiB * MiB)
        if chunk < MiB or chunk % PAGE_SIZE or chunk > memory // 4:
            raise ValueError(f"chunk must be a multiple of 4 KiB from 1 MiB to a quarter of vm_memory, "
                             f"got {self.chunk!r}")
        setv("chunk", chunk)
        for name in ("swapin_us", "refault_us"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 microseconds, got {getattr(self, name)!r}")
        if self.boot not in ("default", "minimal"):
            raise ValueError(f"boot {self.boot!r} is not one of ['default', 'minimal']")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def workloads(self) -> tuple[str, ...]:
        """One workload name per VM."""
        return (self.workload,) * self.n_vms if isinstance(self.workload, str) else self.workload

    def load_traces(self) -> list[Trace]:
        """The traces ``workload="trace"`` replays (parsed in full before any VM starts)."""
        source = self.trace if self.trace is not None else SHIPPED_TRACES
        if self.trace is None and not SHIPPED_TRACES.is_dir():
            raise FileNotFoundError(f"the shipped traces {str(SHIPPED_TRACES)!r} are missing; pass "
                                    "trace= a GWA-T-12 file or directory (see data/traces/README.md)")
        return read_traces(list(source) if isinstance(source, tuple) else source)


@dataclass
class OvercommitRun(Run):
    """A :class:`~labkit.scenarios.base.Run` plus the MoM controller's decisions and the VM names."""

    vm_names: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    controller: MomController | None = None

    def why(self, vm: str, last: int = 3) -> str:
        """Why did (or didn't) the MoM-like controller shrink ``vm``? (policies with MoM only)"""
        if self.controller is None:
            return f"{vm}: policy {getattr(self.params, 'policy', '?')!r} runs no MoM-like controller"
        return self.controller.why(vm, last)

    def vm_table(self, keys: Sequence[str] = ("swap_out_pages", "swap_in_pages", "stall_s",
                                              "peak_rss", "returned_bytes")) -> dict[str, np.ndarray]:
        """Per-VM summary metrics: one array per key, one entry per VM."""
        return {k: np.array([self.summary[f"{vm}.{k}"] for vm in self.vm_names]) for k in keys}


def run_overcommit(params: OvercommitParams | None = None, **overrides: Any) -> OvercommitRun:
    """Run one policy over one host and its VMs; keywords override fields of ``params``."""
    params = replace(params or OvercommitParams(), **overrides) if overrides else (
        params or OvercommitParams())
    names = params.workloads
    traces = params.load_traces() if "trace" in names else []
    host = Host(params.host_ram, params.host_swap, swapin_us=params.swapin_us)
    balloon = policy_balloon_options(params.policy, params.deflate_on_oom)
    vms = []
    try:
        for i in range(params.n_vms):
            vms.append(labkit.open(memory=params.vm_memory, seed=params.seed + i, host=host,
                                   vm_name=f"vm{i}", balloon=balloon, model={"boot": params.boot}))
        return _run(params, host, vms, traces)
    finally:
        for vm in vms:
            vm.close()


def _run(params: OvercommitParams, host: Host, vms: list, traces: list[Trace]) -> OvercommitRun:
    vm_names = [f"vm{i}" for i in range(params.n_vms)]
    rngs = np.random.default_rng(params.seed).spawn(params.n_vms)
    workloads = [make_workload(name, vm, rng, memory=params.vm_memory, duration_s=params.duration_s,
                               trace=traces[i % len(traces)] if traces else None,
                               trace_speed=params.trace_speed, max_share=params.max_share,
                               chunk=params.chunk, access_period_s=params.access_period_s,
                               step_s=params.step_s)
                 for i, (name, vm, rng) in enumerate(zip(params.workloads, vms, rngs, strict=True))]
    controller = None
    if params.policy.endswith("mom"):
        controller = MomController(dict(zip(vm_names, vms, strict=True)), host_stats(host), params.mom)
    if params.policy == "static":
        target = int(params.static_target * params.vm_memory) // PAGE_SIZE * PAGE_SIZE
        for vm in vms:
            vm.qmp("balloon", value=target)
    host_vms = list(host.vms)  # the host this scenario built: one entry per VM, in opening order
    counters = Counters(vms, host_vms)
    n_steps = int(round(params.duration_s / params.step_s))
    every = int(round(params.sample_s / params.step_s))
    n_samples = n_steps // every
    series = {k: np.zeros(n_samples) for k in ("t_s", "host_rss", "host_swap", "host_free",
                                                "host_free_percent", "pressure")}
    for name in vm_names:
        series |= {f"{name}.{k}": np.zeros(n_samples) for k in VM_SERIES}
    ram_pages = host.ram_pages
    threshold, critical = params.mom.pressure_threshold, params.mom.pressure_critical
    pressure_steps = critical_steps = 0
    peak_rss = peak_footprint = 0
    peak_vm_rss = np.zeros(params.n_vms, dtype=np.int64)
    step_ms = params.step_s * 1000.0
    for k in range(n_steps):
        now = k * params.step_s
        if controller is not None:
            controller.tick(now)
        for workload in workloads:
            workload.step(now)
        for vm in vms:
            vm.advance(step_ms)
        rss = np.array([h.rss_pages for h in host_vms], dtype=np.int64)
        used = int(rss.sum())
        free_share = (ram_pages - used) / ram_pages
        pressure_steps += free_share < threshold
        critical_steps += free_share <= critical
        peak_rss = max(peak_rss, used)
        swap_pages = host.swap_used_pages
        peak_footprint = max(peak_footprint, used + swap_pages)
        np.maximum(peak_vm_rss, rss, out=peak_vm_rss)
        if (k + 1) % every == 0:
            j = (k + 1) // every - 1
            series["t_s"][j] = (k + 1) * params.step_s
            series["host_rss"][j] = used * PAGE_SIZE
            series["host_swap"][j] = swap_pages * PAGE_SIZE
            series["host_free"][j] = (ram_pages - used) * PAGE_SIZE
            series["host_free_percent"][j] = 100.0 * free_share
            series["pressure"][j] = 2 if free_share <= critical else 1 if free_share < threshold else 0
            delta = counters.host_delta()
            for i, (name, vm, w) in enumerate(zip(vm_names, vms, workloads, strict=True)):
                h = host_vms[i]
                series[f"{name}.rss"][j] = h.rss_pages * PAGE_SIZE
                series[f"{name}.swap"][j] = h.swap_pages * PAGE_SIZE
                series[f"{name}.balloon_actual"][j] = vm.qmp("query-balloon")["actual"]
                series[f"{name}.working_set"][j] = w.working_set
                series[f"{name}.swap_outs"][j], series[f"{name}.swap_ins"][j] = delta[i, 0], delta[i, 1]
                series[f"{name}.zero_fill"][j] = delta[i, 2]
                series[f"{name}.returned"][j] = delta[i, 3] * PAGE_SIZE
    summary = summarize(vm_names, vms, workloads, counters.delta(), peak_vm_rss,
                        swapin_us=params.swapin_us, refault_us=params.refault_us)
    summary |= {"peak_host_rss": float(peak_rss * PAGE_SIZE),
                "peak_host_footprint": float(peak_footprint * PAGE_SIZE),
                "pressure_s": float(pressure_steps * params.step_s),
                "critical_s": float(critical_steps * params.step_s)}
    if controller is not None:
        summary["mom_evaluations"] = float(len(controller.decisions))
        summary["mom_balloon_changes"] = float(sum(d.acted for d in controller.decisions))
    events = []
    for name, vm in zip(vm_names, vms, strict=True):
        events += [{**e, "vm": name} for e in vm.events()]
    events.sort(key=lambda e: (e["timestamp"]["seconds"], e["timestamp"]["microseconds"]))
    return OvercommitRun(series=series, summary=summary, events=events, params=params,
                         vm_names=vm_names, decisions=list(controller.decisions) if controller else [],
                         controller=controller)


def compare_policies(params: OvercommitParams | None = None,
                     policies: Sequence[str] = ("none", "mom", "reporting", "reporting+mom"),
                     **overrides: Any) -> dict[str, OvercommitRun]:
    """The same host, VMs, workload and seed under each policy: ``{policy: run}``."""
    base = replace(params or OvercommitParams(), **overrides) if overrides else (
        params or OvercommitParams())
    for policy in policies:  # check them all before running any
        policy_balloon_options(policy)
        replace(base, policy=policy)
    return {policy: run_overcommit(replace(base, policy=policy)) for policy in policies}


__all__ = ["POLICIES", "OvercommitParams", "OvercommitRun", "compare_policies", "policy_table",
           "reporting_overhead", "run_overcommit"]
