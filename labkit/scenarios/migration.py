"""Live migration under four policies: the same guest and workload, migrated plain, after a balloon
inflation, with free page hinting, and with free page reporting.

For each policy a fresh VM is opened with the same memory and seed (only the balloon's properties
differ), the workload starts, time runs for ``prepare_ms`` (the policy acts meanwhile: the balloon
takes all of MemAvailable but ``balloon_headroom``; reporting discards free memory on its 2 s
cadence), then ``migrate`` runs with the given ``max-bandwidth``, ``downtime-limit`` and
auto-converge, sampled every ``sample_ms`` until it completes or ``timeout_ms`` passes. What each
policy changes, with docs/mechanisms.md behind it:

* **plain**: every page is sent once in the first pass; never-touched pages are zero pages (a header
  on the wire, but the migration thread still reads each one: §6.4).
* **balloon**: inflated pages are discarded, so they read as zero; they stay in the bitmap (§1.6).
* **hinting**: the guest hands its free 4 MiB blocks to QEMU after every bitmap sync; their bits
  leave the bitmap and they cost nothing at all (§2.3). This is where the published result comes
  from: an idle 8 GB guest, unlimited bandwidth, 2 s downtime limit: 284 ms with hinting, 1757 ms
  without; a kernel build: 1402 vs 2528 ms (docs/results.md#wang-hinting).
* **reporting**: reported blocks are discarded and read as zero, like ballooned ones; reporting is
  made for overcommit, not migration (§3).

The ``write-heavy`` workload (Clark et al.'s MMuncher) writes a working set faster than the link:
pre-copy never gets the backlog under the threshold unless auto-converge slows the guest (§6.3).
Adding a policy is one entry in :data:`POLICIES`.

>>> from labkit.scenarios.migration import MigrationParams, migration_compare, migration_table
>>> runs = migration_compare(MigrationParams(memory="4G", bandwidth=0, downtime_limit_ms=2000,
...                                          prepare_ms=0, policies=("plain", "hinting")))
>>> rows = migration_table(runs)
>>> bool(rows["total_time_ms"][1] < rows["total_time_ms"][0] / 2)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import labkit
from labkit.backends.base import Backend
from labkit.scenarios.base import Run, table
from labkit.units import GiB, MiB, format_size, parse_size

MAX_THROTTLE = 128 << 20  # QEMU's default max-bandwidth (migration/options.c)
WORKLOADS = ("idle", "kernel-build", "write-heavy")
TERMINAL = ("completed", "failed", "cancelled")
TABLE_COLUMNS = (
    "completed", "total_time_ms", "downtime_ms", "setup_time_ms", "transferred", "normal_pages",
    "zero_pages", "dirty_sync_count", "throttle_max", "hinted_max", "balloon_size", "host_rss",
)


@dataclass(frozen=True)
class MigrationParams:
    """Parameters of the migration comparison. Sizes in bytes (strings like ``"8G"`` are parsed).

    ``bandwidth`` is QEMU's ``max-bandwidth`` in bytes/s (0: no rate limit, only the simulated
    link of ``link_bandwidth`` bytes/s); ``downtime_limit_ms`` is ``downtime-limit``.
    ``workload``: ``idle``, ``kernel-build`` (``jobs`` parallel jobs) or ``write-heavy`` (a writer
    over ``wss`` bytes at ``rate`` bytes/s).
    """

    memory: int | str = 8 * GiB
    seed: int = 0
    workload: str = "idle"
    wss: int | str = 256 * MiB
    rate: int | str = 256 * MiB
    jobs: int = 4
    bandwidth: int = MAX_THROTTLE
    downtime_limit_ms: int = 300
    auto_converge: bool = False
    link_bandwidth: float = 1.25e9
    prepare_ms: float = 10_000.0
    balloon_headroom: int | str = 512 * MiB
    timeout_ms: float = 120_000.0
    sample_ms: float = 50.0
    policies: tuple[str, ...] = ("plain", "balloon", "hinting", "reporting")
    uri: str = "tcp:127.0.0.1:4444"
    backend: str = "model"

    def checked(self) -> MigrationParams:
        """Validate; return a copy with sizes as ints. Errors name the value and what is accepted."""
        memory = parse_size(self.memory, name="memory")
        wss = parse_size(self.wss, name="wss")
        rate = parse_size(self.rate, name="rate")
        headroom = parse_size(self.balloon_headroom, name="balloon_headroom")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload {self.workload!r} is not one of {list(WORKLOADS)}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"policies {list(self.policies)!r}: each must be one of {list(POLICIES)}")
        if self.workload == "write-heavy" and not 0 < wss <= memory // 2:
            raise ValueError(f"wss must be positive and at most half of memory, got {self.wss!r}")
        if rate < 0 or headroom < 0:
            raise ValueError(f"rate and balloon_headroom must be >= 0, got {self.rate!r}, "
                             f"{self.balloon_headroom!r}")
        if not isinstance(self.bandwidth, int) or self.bandwidth < 0:
            raise ValueError(f"bandwidth must be an int >= 0 (bytes/s, 0 = unlimited), "
                             f"got {self.bandwidth!r}")
        if not isinstance(self.downtime_limit_ms, int) or not 0 <= self.downtime_limit_ms <= 2_000_000:
            raise ValueError(f"downtime_limit_ms must be an int from 0 to 2000000 (QEMU's range), "
                             f"got {self.downtime_limit_ms!r}")
        for name in ("prepare_ms", "timeout_ms", "sample_ms", "link_bandwidth"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or (name != "prepare_ms" and value == 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        return replace(self, memory=memory, wss=wss, rate=rate, balloon_headroom=headroom)


def hinting_anchor(workload: str = "idle", **overrides: Any) -> MigrationParams:
    """Wang's hinting setup (docs/results.md#wang-hinting): 8 GB, bandwidth unlimited, 2 s downtime limit."""
    base = dict(memory=8 * GiB, workload=workload, bandwidth=0, downtime_limit_ms=2000)
    return MigrationParams(**{**base, **overrides})


def write_heavy(**overrides: Any) -> MigrationParams:
    """Clark et al.'s MMuncher, scaled: a 256 MiB working set rewritten at 256 MiB/s, QEMU's
    default 128 MiB/s and 300 ms: pre-copy does not converge without auto-converge."""
    base = dict(memory=2 * GiB, workload="write-heavy", wss=256 * MiB, rate=256 * MiB,
                prepare_ms=1000.0, timeout_ms=30_000.0, policies=("plain",))
    return MigrationParams(**{**base, **overrides})


# --- policies -----------------------------------------------------------------------------------
def _inflate_balloon(vm: Backend, p: MigrationParams) -> None:
    """Inflate until the guest keeps only the headroom available: the balloon takes MemAvailable
    less the headroom, so the logical size (QMP ``balloon``) is memory - MemAvailable + headroom."""
    available = vm.meminfo()["MemAvailable"] * 1024
    target = min(p.memory, (p.memory - available + p.balloon_headroom) // MiB * MiB)
    vm.qmp("balloon", value=max(target, 64 * MiB))


@dataclass(frozen=True)
class Policy:
    """A way to prepare the guest for migration: balloon properties and an action at prepare."""

    balloon: dict = field(default_factory=dict)
    prepare: Callable[[Backend, MigrationParams], None] | None = None


POLICIES: dict[str, Policy] = {
    "plain": Policy(),
    "balloon": Policy(prepare=_inflate_balloon),
    "hinting": Policy(balloon={"free_page_hint": True, "iothread": "iothread0"}),
    "reporting": Policy(balloon={"free_page_reporting": True}),
}


@dataclass
class MigrationRun(Run):
    """A :class:`Run` plus the migration's own history: one row per 100 ms window and per bitmap
    sync (``kind``: "window", "sync", "end"), for the backlog-vs-threshold view."""

    history: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["history"] = {k: v.tolist() for k, v in self.history.items()}
        return out


# --- the scenario -------------------------------------------------------------------------------
def _start_workload(vm: Backend, p: MigrationParams) -> None:
    if p.workload == "kernel-build":
        vm.guest("kernel_build", jobs=p.jobs)
    elif p.workload == "write-heavy":
        handle = vm.guest("alloc", size=p.wss, kind="anon")
        vm.guest("writer", handle=handle, rate=p.rate)


def run_policy(p: MigrationParams, policy: str) -> MigrationRun:
    """Migrate one fresh VM under ``policy``; returns its Run (series sampled from ``migrate`` on)."""
    p = p.checked()
    pol = POLICIES[policy]
    model = {"migration_link_bandwidth": float(p.link_bandwidth)} if p.backend == "model" else None
    with labkit.open(backend=p.backend, memory=p.memory, seed=p.seed, balloon=dict(pol.balloon),
                     model=model) as vm:
        _start_workload(vm, p)
        if pol.prepare is not None:
            pol.prepare(vm, p)
        vm.advance(p.prepare_ms)
        before = vm.sample()
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": p.bandwidth,
                                            "downtime-limit": p.downtime_limit_ms})
        vm.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": p.auto_converge},
            {"capability": "events", "state": True}])
        t0 = vm.sample()["t_ms"]
        vm.qmp("migrate", uri=p.uri)
        rows = [dict(vm.sample(), since_migrate_ms=0.0)]
        info = vm.qmp("query-migrate")
        while info["status"] not in TERMINAL and rows[-1]["since_migrate_ms"] < p.timeout_ms:
            vm.advance(p.sample_ms)
            row = dict(vm.sample())
            row["since_migrate_ms"] = row["t_ms"] - t0
            rows.append(row)
            info = vm.qmp("query-migrate")
        run = MigrationRun.from_rows(rows, summary=_summary(info, rows, before), events=vm.events(),
                                     params=p)
        history = vm.inspect("migration").history
        keys = ("t_ms", "transferred", "remaining", "threshold", "dirty_sync_count", "throttle")
        run.history = {k: np.array([float(h[k]) for h in history]) for k in keys}
        run.history["is_sync"] = np.array([h["kind"] == "sync" for h in history], dtype=bool)
        return run


def _summary(info: dict, rows: list[dict], before: dict) -> dict[str, float]:
    ram = info.get("ram", {})
    col = lambda key: [r[key] for r in rows if key in r]  # noqa: E731
    completed = info["status"] == "completed"
    return {
        "completed": float(completed),
        "total_time_ms": float(info.get("total-time", np.nan)) if completed else np.nan,
        "downtime_ms": float(info.get("downtime", np.nan)) if completed else np.nan,
        "setup_time_ms": float(info.get("setup-time", np.nan)),
        "elapsed_ms": float(rows[-1]["t_ms"] - rows[0]["t_ms"]),
        "transferred": float(ram.get("transferred", np.nan)),
        "normal_pages": float(ram.get("normal", np.nan)),
        "zero_pages": float(ram.get("duplicate", np.nan)),
        "precopy_bytes": float(ram.get("precopy-bytes", np.nan)),
        "downtime_bytes": float(ram.get("downtime-bytes", np.nan)),
        "dirty_sync_count": float(ram.get("dirty-sync-count", np.nan)),
        "throttle_max": float(max(col("migration_throttle"), default=0.0)),
        "hinted_max": float(max(col("hinted"), default=0.0)),
        "balloon_size": float(before["balloon_size"]),
        "host_rss": float(before["host_rss"]),
    }


def migration_compare(params: MigrationParams) -> dict[str, MigrationRun]:
    """Run every policy of ``params.policies`` on the same guest and workload."""
    params = params.checked()
    return {policy: run_policy(params, policy) for policy in params.policies}


def migration_table(runs: dict[str, Run]) -> dict[str, np.ndarray]:
    """One row per policy (in ``runs`` order), the columns of :data:`TABLE_COLUMNS` plus ``policy``."""
    rows = table(list(runs.values()), TABLE_COLUMNS)
    rows["policy"] = np.array(list(runs))
    return rows


def format_table(rows: dict[str, np.ndarray]) -> str:
    """A plain-text table of :func:`migration_table` for notebooks, the CLI and the benchmark."""
    lines = [f"{'policy':>10} {'total ms':>9} {'downtime':>8} {'sent':>10} {'normal':>9} "
             f"{'zero':>9} {'syncs':>5} {'throttle':>8}"]
    for i, name in enumerate(rows["policy"]):
        total = rows["total_time_ms"][i]
        lines.append(
            f"{name:>10} {'never' if np.isnan(total) else f'{total:.0f}':>9} "
            f"{rows['downtime_ms'][i]:>8.0f} {format_size(int(rows['transferred'][i])):>10} "
            f"{rows['normal_pages'][i]:>9.0f} {rows['zero_pages'][i]:>9.0f} "
            f"{rows['dirty_sync_count'][i]:>5.0f} {rows['throttle_max'][i]:>7.0f}%")
    return "\n".join(lines)
