"""Which mechanism for which job: the talk's four jobs, every applicable mechanism, measured by running.

The same seeded guests go through the existing scenarios, through their public parameters only:

* **migration** (:mod:`labkit.scenarios.migration`): plain, after a balloon inflation, with free page
  hinting, with free page reporting: total time, downtime, bytes sent.
* **overcommit** (:mod:`labkit.scenarios.overcommit`): two guests that work in bursts and idle in
  between on a host with 60 % of their memory; nothing, a static balloon (60 %), MoM driving the
  balloon, free page reporting, free page hinting: memory returned, host swap-out, guest stall.
* **page cache** (:mod:`labkit.scenarios.pmem`): N guests reading one shared image over virtio-blk
  (``cache=writeback`` and ``cache=none``) or virtio-pmem: copies of the image, host memory used.
* **resize** (:mod:`labkit.scenarios.resize`): the balloon (with and without deflate-on-oom) and
  virtio-mem onlined to ZONE_MOVABLE or ZONE_NORMAL: granularity, time, how much can come back.

:func:`claims` turns the talk's pros and cons into rows, each with the measurement that supports,
qualifies or contradicts it, and the verdict computed from that measurement (never typed in); the
cost numbers come from :mod:`labkit.scenarios.costs` with their labels (modelled, measured, published).

>>> result = run_matrix(MatrixParams(quick=True))
>>> sorted(result.jobs)
['migration', 'overcommit', 'page cache', 'resize']
>>> {c.key: c.verdict for c in result.claims}["pmem-one-copy"]
'supported'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from labkit.scenarios import costs
from labkit.scenarios.matrix_claims import VERDICTS, Claim, claims
from labkit.scenarios.migration import MigrationParams, migration_compare
from labkit.scenarios.overcommit import OvercommitParams, compare_policies
from labkit.scenarios.pmem import SharedImageParams, shared_image
from labkit.scenarios.resize import ResizeParams, resize_compare, resize_table
from labkit.scenarios.resize_numa import ResizeNumaParams, resize_numa
from labkit.units import GiB, MiB, PAGE_SIZE

JOBS = ("migration", "overcommit", "page cache", "resize")
MECHANISMS = ("nothing", "balloon", "hinting", "reporting", "virtio-mem", "virtio-pmem")


@dataclass(frozen=True)
class MatrixParams:
    """The guests every job starts from. ``quick`` shortens the cost model's runs (10 s instead of
    30 s of simulated workload, for tests and the browser sweep); the verdicts do not depend on it."""

    memory: int | str = 1 * GiB
    seed: int = 0
    n_guests: int = 3
    overcommit_s: float = 300.0
    quick: bool = False

    def __post_init__(self) -> None:
        from labkit.units import parse_size

        object.__setattr__(self, "memory", parse_size(self.memory, name="memory"))
        if self.memory < 512 * MiB or self.memory % (128 * MiB):
            raise ValueError(f"memory must be a multiple of 128 MiB, at least 512 MiB, got {self.memory!r}")
        if not isinstance(self.n_guests, int) or not 2 <= self.n_guests <= 8:
            raise ValueError(f"n_guests must be an int from 2 to 8, got {self.n_guests!r}")
        if not self.overcommit_s >= 60:
            raise ValueError(f"overcommit_s must be >= 60 s, got {self.overcommit_s!r}")


@dataclass(frozen=True)
class Cell:
    """One (job, mechanism) outcome: the headline number, how it reads, and the details behind it."""

    job: str
    mechanism: str
    variant: str
    value: float
    text: str
    better: str  # "lower" or "higher": how the headline compares across the row
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class MatrixResult:
    params: MatrixParams
    jobs: dict[str, list[Cell]]
    runs: dict[str, Any]
    costs: dict[str, Any]
    claims: list[Claim] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        return [c for job in JOBS for c in self.jobs[job]]

    def cell(self, job: str, variant: str) -> Cell:
        for c in self.jobs[job]:
            if c.variant == variant:
                return c
        raise KeyError(f"no cell {variant!r} in job {job!r}; it has {[c.variant for c in self.jobs[job]]}")


def _mib(v: float) -> str:
    return f"{v / MiB:.0f} MiB"


# --- the four jobs ------------------------------------------------------------------------------
MIGRATION_POLICIES = {"plain": "nothing", "balloon": "balloon", "hinting": "hinting",
                      "reporting": "reporting"}


def run_migration(p: MatrixParams) -> tuple[list[Cell], dict]:
    runs = migration_compare(MigrationParams(memory=p.memory, seed=p.seed, prepare_ms=4000.0,
                                             sample_ms=100.0, timeout_ms=60_000.0))
    cells = []
    for policy, run in runs.items():
        s = run.summary
        cells.append(Cell("migration", MIGRATION_POLICIES[policy], policy, s["total_time_ms"],
                          f"{s['total_time_ms']:.0f} ms", "lower",
                          {"downtime_ms": s["downtime_ms"], "transferred": s["transferred"],
                           "normal_pages": s["normal_pages"], "zero_pages": s["zero_pages"],
                           "hinted_max": s["hinted_max"]}))
    return cells, runs


OVERCOMMIT_POLICIES = {"none": "nothing", "static": "balloon", "mom": "balloon", "reporting": "reporting",
                       "hinting": "hinting"}


def run_overcommit(p: MatrixParams) -> tuple[list[Cell], dict]:
    runs = compare_policies(OvercommitParams(n_vms=2, vm_memory=p.memory, duration_s=p.overcommit_s,
                                             seed=p.seed, workload="burst-idle", static_target=0.6),
                            policies=tuple(OVERCOMMIT_POLICIES))
    cells = []
    for policy, run in runs.items():
        s = run.summary
        cells.append(Cell("overcommit", OVERCOMMIT_POLICIES[policy], policy, s["returned_bytes"],
                          f"{_mib(s['returned_bytes'])} back", "higher",
                          {k: s[k] for k in ("swap_out_bytes", "stall_s", "peak_host_rss", "pressure_s",
                                             "oom_kills")}))
    return cells, runs


PAGE_CACHE_TRANSPORTS = {"blk-writeback": "nothing", "blk-none": "nothing", "pmem": "virtio-pmem"}


def run_page_cache(p: MatrixParams) -> tuple[list[Cell], dict]:
    runs, cells = {}, []
    for transport, mechanism in PAGE_CACHE_TRANSPORTS.items():
        run = shared_image(SharedImageParams(n_vms=p.n_guests, transport=transport, vm_memory=p.memory,
                                             image_size=512 * MiB, boot_read=256 * MiB, seed=p.seed))
        runs[transport] = run
        s = run.summary
        copies = f"{s['copies']:.0f} cop{'y' if s['copies'] == 1 else 'ies'}"
        cells.append(Cell("page cache", mechanism, transport, s["copies"], copies,
                          "lower", {k: s[k] for k in ("host_used", "guest_copies", "host_copy", "memmap",
                                                      "second_read_ms")}))
    return cells, runs


RESIZE_VARIANTS = {"balloon": "balloon", "balloon_doo": "balloon", "virtio_mem_movable": "virtio-mem",
                   "virtio_mem_kernel": "virtio-mem"}


def run_resize(p: MatrixParams) -> tuple[list[Cell], dict]:
    params = ResizeParams(boot_memory=p.memory, device_size=p.memory, shrink=p.memory // 2,
                          app=p.memory // 4, slab=p.memory // 16, seed=p.seed, reboot=False)
    runs = dict(zip(RESIZE_VARIANTS, resize_compare(params), strict=True))
    rows = resize_table(list(runs.values()))
    cells = []
    for i, variant in enumerate(rows["variant"]):
        d = {k: float(rows[k][i]) for k in ("shrink_ms", "removed_bytes", "removable_max_bytes",
                                            "host_returned_bytes", "memtotal_drop_bytes", "grow_ms")}
        d["granularity"] = float(PAGE_SIZE if RESIZE_VARIANTS[variant] == "balloon" else 2 * MiB)
        cells.append(Cell("resize", RESIZE_VARIANTS[variant], str(variant), d["removable_max_bytes"],
                          f"{_mib(d['removable_max_bytes'])} max", "higher", d))
    # NUMA: which node a shrink takes memory from (the balloon can't aim; virtio-mem is per node)
    runs["numa"] = resize_numa(ResizeNumaParams(node_memory=p.memory // 2, shrink=p.memory // 4, seed=p.seed))
    return cells, runs


def run_costs(p: MatrixParams, migration_runs: dict) -> dict[str, Any]:
    duration = 10.0 if p.quick else 30.0
    out: dict[str, Any] = {"published": costs.published_reporting_overhead()}
    out["page_fault1"] = costs.reporting_overhead(costs.ReportingCostParams(
        workload="page_fault1", memory=2 * GiB, duration_s=duration, seed=p.seed))
    out["memhog"] = costs.reporting_overhead(costs.ReportingCostParams(
        workload="memhog", memory=2 * GiB, period_ms=3000.0, duration_s=duration, seed=p.seed))
    busy = migration_compare(MigrationParams(memory=p.memory, seed=p.seed, workload="kernel-build",
                                             prepare_ms=2000.0, sample_ms=100.0, timeout_ms=60_000.0,
                                             policies=("hinting",)))
    out["write_tracking"] = costs.write_tracking_cost(busy["hinting"])
    out["resize_model"] = costs.resize_speed("model")
    out["resize_live"] = (costs.recorded_resize_speed() if costs.RECORDED_RESIZE.exists() else None)
    return out


JOB_RUNNERS: dict[str, Callable[[MatrixParams], tuple[list[Cell], dict]]] = {
    "migration": run_migration, "overcommit": run_overcommit, "page cache": run_page_cache,
    "resize": run_resize}


def run_matrix(params: MatrixParams | None = None, **overrides: Any) -> MatrixResult:
    """Run every job, the cost model and the claims; see the module docstring."""
    p = params or MatrixParams()
    if overrides:
        p = replace(p, **overrides)
    jobs, runs = {}, {}
    for job, runner in JOB_RUNNERS.items():
        jobs[job], runs[job] = runner(p)
    result = MatrixResult(p, jobs, runs, run_costs(p, runs["migration"]))
    result.claims = claims(result)
    return result


def cell_ranks(cells: list[Cell]) -> np.ndarray:
    """0 (best) .. 1 (worst) within one job's row, by the row's own direction; ties share a rank."""
    values = np.array([c.value for c in cells], dtype=float)
    if values.size == 0:
        return values
    sign = -1.0 if cells[0].better == "higher" else 1.0
    keyed = sign * values
    lo, hi = np.nanmin(keyed), np.nanmax(keyed)
    return np.zeros_like(keyed) if hi == lo else (keyed - lo) / (hi - lo)


def format_matrix(result: MatrixResult) -> str:
    """The matrix and the claims as plain text (what ``labkit matrix`` prints)."""
    lines = ["Which mechanism for which job (model unless marked measured)", ""]
    for job in JOBS:
        lines.append(f"{job}:")
        for c in result.jobs[job]:
            lines.append(f"  {c.mechanism:<12} {c.variant:<20} {c.text}")
    lines += ["", "The talk's pros and cons, each with its measurement:"]
    width = max(len(c.claim) for c in result.claims)
    for c in result.claims:
        lines.append(f"  [{c.verdict:<12}] {c.claim.ljust(width)}  {c.evidence}  ({c.label})")
    return "\n".join(lines)


__all__ = ["JOBS", "MECHANISMS", "VERDICTS", "Cell", "Claim", "MatrixParams", "MatrixResult",
           "cell_ranks", "format_matrix", "run_matrix"]
