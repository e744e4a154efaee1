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
from labkit.scenarios.migration import MigrationParams, migration_compare
from labkit.scenarios.overcommit import OvercommitParams, compare_policies
from labkit.scenarios.pmem import SharedImageParams, shared_image
from labkit.scenarios.resize import ResizeParams, resize_compare, resize_table
from labkit.units import GiB, MiB, PAGE_SIZE

JOBS = ("migration", "overcommit", "page cache", "resize")
MECHANISMS = ("nothing", "balloon", "hinting", "reporting", "virtio-mem", "virtio-pmem")
VERDICTS = ("supported", "qualified", "contradicted")


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


@dataclass(frozen=True)
class Claim:
    """One of the talk's pros/cons with the measurement behind it and the verdict it gets."""

    key: str
    mechanism: str
    job: str
    claim: str
    evidence: str
    verdict: str
    label: str  # where the evidence comes from: costs.MODELLED / MEASURED / PUBLISHED
    cause: str  # why the outcome is what it is, with the source section


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


# --- the claims ---------------------------------------------------------------------------------
def _pct(a: float, b: float) -> float:
    return 100.0 * (1.0 - a / b) if b else float("nan")


def _claims(r: MatrixResult) -> list[Claim]:
    m = {c.variant: c for c in r.jobs["migration"]}
    o = {c.variant: c for c in r.jobs["overcommit"]}
    pc = {c.variant: c for c in r.jobs["page cache"]}
    rs = {c.variant: c for c in r.jobs["resize"]}
    k = r.costs
    out: list[Claim] = []

    def add(key, mechanism, job, claim, evidence, verdict, label, cause):
        assert verdict in VERDICTS
        out.append(Claim(key, mechanism, job, claim, evidence, verdict, label, cause))

    idle = o["hinting"].details, o["none"].details
    same = o["hinting"].value == o["none"].value and idle[0]["peak_host_rss"] == idle[1]["peak_host_rss"]
    add("hinting-no-overhead", "hinting", "overcommit", "hinting: no overhead until requested",
        f"overcommit with hinting on: {_mib(o['hinting'].value)} returned, peak host RSS "
        f"{_mib(idle[0]['peak_host_rss'])} vs {_mib(idle[1]['peak_host_rss'])} with nothing",
        "supported" if same else "contradicted", costs.MODELLED,
        "QEMU starts a hinting round only from the precopy notifier after a bitmap sync (§2.3): "
        "without a migration the guest never hints")
    wt = k["write_tracking"]
    add("hinting-write-overhead", "hinting", "migration", "hinting adds overhead to writes",
        f"{wt['rewritten_pages']:.0f} pages re-dirtied while a kernel build migrates with hinting: "
        f"{1000 * wt['tracking_s']:.1f} ms of write-protect faults ({100 * wt['share']:.2f} % of a vCPU)",
        "supported" if wt["tracking_s"] > 0 else "qualified", costs.MODELLED,
        "a hint is only safe while QEMU tracks writes (dirty logging, §2.3): every first write after a "
        "sync faults; hinting outside a migration would need that tracking all the time")
    save = _pct(m["hinting"].value, m["plain"].value)
    add("hinting-migration", "hinting", "migration", "hinting: a good fit for migration",
        f"total {m['hinting'].text} vs {m['plain'].text} plain ({save:.0f} % faster)",
        "supported" if save >= 10 else ("qualified" if save > 0 else "contradicted"), costs.MODELLED,
        "hinted free pages leave the dirty bitmap and are never read or sent (§2.3); the published "
        "8 GB idle guest: 284 vs 1757 ms")
    add("hinting-overcommit", "hinting", "overcommit", "hinting: a poor fit for overcommit",
        f"{_mib(o['hinting'].value)} returned with hinting, {_mib(o['reporting'].value)} with reporting",
        "supported" if o["hinting"].value == 0 < o["reporting"].value else "contradicted", costs.MODELLED,
        "hints only clear migration bitmap bits; nothing is discarded (§2.3)")
    pf, mh = k["page_fault1"], k["memhog"]
    pub = k["published"]
    add("reporting-overhead", "reporting", "overcommit",
        "reporting: overhead incurred periodically, 1-2 % in memory-intensive workloads",
        f"memhog {100 * mh['overhead']:.2f} %, page_fault1 {100 * pf['overhead']:.3f} % (model); "
        f"Duyck v17 page_fault1: {100 * pub['page_fault1, 1 task']['overhead']:.2f} % (1 task), "
        f"{100 * pub['page_fault1, 16 tasks']['overhead']:.2f} % (16 tasks)",
        "supported" if 0 < mh["overhead"] <= 0.02 and pf["overhead"] < mh["overhead"] else "qualified",
        costs.MODELLED + " + " + costs.PUBLISHED,
        "a pass every 2 s reports free blocks >= 2 MiB (§3.2); a reported page the guest takes back is "
        "zero-filled by the host again (2 us each); page_fault1 re-uses its memory before the 2 s delay")
    add("reporting-overcommit", "reporting", "overcommit", "reporting: a good fit for overcommit",
        f"{_mib(o['reporting'].value)} returned vs {_mib(o['none'].value)} with nothing, without any "
        f"host-side policy", "supported" if o["reporting"].value > o["none"].value else "contradicted",
        costs.MODELLED, "freed memory goes back to the host on its own, 2 s after it is freed (§3)")
    rsave = _pct(m["reporting"].value, m["plain"].value)
    add("reporting-migration", "reporting", "migration", "reporting: a poor fit for migration",
        f"total {m['reporting'].text} vs {m['plain'].text} plain ({rsave:.0f} % faster)",
        "supported" if rsave < 10 else "contradicted", costs.MODELLED,
        "reported pages stay in the dirty bitmap: they are read and sent as zero pages (§6.4)")
    live = k["resize_live"]
    model = k["resize_model"]
    if live is not None:
        ratio, label = live["remove_ratio"], costs.MEASURED
        ev = (f"live QEMU, {_mib(live['size'])}: unplug {live['virtio_mem_unplug_ms']:.0f} ms vs inflate "
              f"{live['balloon_inflate_ms']:.0f} ms; plug {live['virtio_mem_plug_ms']:.0f} ms vs deflate "
              f"{live['balloon_deflate_ms']:.0f} ms (model: {model['virtio_mem_unplug_ms']:.0f} vs "
              f"{model['balloon_inflate_ms']:.0f} ms)")
    else:
        ratio, label = model["remove_ratio"], costs.MODELLED
        ev = (f"model, {_mib(model['size'])}: unplug {model['virtio_mem_unplug_ms']:.0f} ms vs inflate "
              f"{model['balloon_inflate_ms']:.0f} ms")
    add("virtio-mem-slower", "virtio-mem", "resize", "virtio-mem: slower than ballooning", ev,
        "supported" if ratio > 1.1 else ("qualified" if ratio > 0.5 else "contradicted"), label,
        "the balloon moves 256 pages per request (§1.2); virtio-mem moves whole 2 MiB blocks, but must "
        "migrate used pages out of each block first (alloc_contig_range, §5.5): empty memory is fast")
    bal, mov, ker = rs["balloon"], rs["virtio_mem_movable"], rs["virtio_mem_kernel"]
    add("virtio-mem-less", "virtio-mem", "resize", "virtio-mem: cannot unplug as much",
        f"at most {_mib(mov.value)} (ZONE_MOVABLE) / {_mib(ker.value)} (ZONE_NORMAL) vs "
        f"{_mib(bal.value)} with the balloon", "supported" if max(mov.value, ker.value) < bal.value
        else "contradicted", costs.MODELLED,
        "virtio-mem only unplugs its own device memory, and only subblocks without unmovable pages "
        "(§5.5); the balloon takes any free page, boot memory included (§1.2)")
    add("virtio-mem-movable", "virtio-mem", "resize", "virtio-mem unplug is reliable only in ZONE_MOVABLE",
        f"host got back {_mib(mov.details['host_returned_bytes'])} (online_movable) vs "
        f"{_mib(ker.details['host_returned_bytes'])} (online_kernel) of {_mib(r.params.memory // 2)} asked",
        "supported" if mov.details["host_returned_bytes"] > ker.details["host_returned_bytes"]
        else "qualified",
        costs.MODELLED, "slab in ZONE_NORMAL subblocks makes alloc_contig_range fail with -EBUSY (§5.5)")
    add("virtio-mem-granularity", "virtio-mem", "resize",
        "virtio-mem resizes in blocks, the balloon in pages",
        f"granularity {_mib(mov.details['granularity'])} vs {bal.details['granularity'] / 1024:.0f} KiB",
        "supported" if mov.details["granularity"] > bal.details["granularity"] else "contradicted",
        costs.MODELLED, "QEMU's default block size is the host THP size, 2 MiB on x86-64 (§5.2)")
    doo = rs["balloon_doo"]
    add("balloon-memtotal", "balloon", "resize", "the balloon shrinks MemTotal only without deflate-on-oom",
        f"MemTotal -{_mib(bal.details['memtotal_drop_bytes'])} without, "
        f"-{_mib(doo.details['memtotal_drop_bytes'])} with deflate-on-oom",
        "supported" if bal.details["memtotal_drop_bytes"] > 0 == doo.details["memtotal_drop_bytes"]
        else "contradicted", costs.MODELLED, "adjust_managed_page_count only without DEFLATE_ON_OOM (§1.3)")
    n = r.params.n_guests
    add("pmem-one-copy", "virtio-pmem", "page cache", "virtio-pmem: one cached copy of a shared image",
        f"{n} guests: {pc['pmem'].text} with virtio-pmem, {pc['blk-writeback'].text} with virtio-blk "
        f"cache=writeback, {pc['blk-none'].text} with cache=none",
        "supported" if pc["pmem"].value == 1 and pc["blk-writeback"].value == n + 1 else "contradicted",
        costs.MODELLED, "DAX maps the host's page cache into every guest; virtio-blk fills each guest's "
        "own page cache (§4.2)")
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
    result.claims = _claims(result)
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
