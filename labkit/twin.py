"""Twins: the model held against a real Linux guest under QEMU, scenario by scenario.

A twin scenario is a demo of :mod:`labkit.backends.qemu.demos` (a VM and a script that only uses the
Backend protocol) plus the checks that compare its real run with the model's run of the same script.
The real side is a live guest where QEMU and a guest kernel are available, else the recording under
``data/recorded/`` (``mode="auto"``); the model boots as the live busybox guest does
(``boot="minimal"``) and follows the real run's clock: before each ``sample()`` it catches up with
the time the real run had reached at the same sample (a real guest operation takes wall-clock time,
the model's takes none), so both sides are sampled at the same moments. Where the real run was made
under TCG (no KVM on the recording host) the model is set up for it (:func:`tcg_model`).

Every check names the quantity, its tolerance and the *cause* that justifies the tolerance (what the
model leaves out or cannot know); ``labkit twin [scenario]`` prints them, notebooks/10_model_vs_real
draws them, and tests/live holds them against a live guest.

>>> result = run_twin("balloon", mode="replay")
>>> result.holds, result.source
(True, 'replay')
>>> print(result.report().splitlines()[0])  # doctest: +ELLIPSIS
balloon: 1 GiB guest: balloon to 768 MiB and back (replay, ...): 5 of 5 checks hold
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labkit
from labkit.backends.qemu.demos import DEMOS, model_options, open_demo, run_demo
from labkit.units import MiB, PAGE_SIZE

# Measured on the live TCG guest (data/recorded/balloon.json: 256 MiB in ~720 ms of 256-page
# requests; `dd if=/dev/zero of=/dev/null bs=4M` in the guest: 512 MiB in 0.45 s)
TCG_BALLOON_REQUEST_MS = 2.8
TCG_ZERO_BYTES_PER_US = 1_200.0


def tcg_model(vm: Any) -> None:
    """Set the model up for a guest run under TCG: QEMU's own dirty bitmap (a hinted or sent page
    written again is sent again after the next sync: ``LinkModel.dirty_log``), and the guest's
    zeroing speed under TCG for the hinted blocks (``HintTiming.zero_bytes_per_us``)."""
    migration = getattr(vm, "migration", None)
    if migration is not None:
        migration.link.dirty_log = "tcg"
    hinting = getattr(vm, "hinting", None)
    if hinting is not None:
        hinting.timing.zero_bytes_per_us = TCG_ZERO_BYTES_PER_US


# --- checks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One comparison: ``measure(rows)`` on each side; ``mode`` ``"abs"`` holds
    ``|real - model| <= tolerance``, ``"factor"`` holds ``max(real/model, model/real) <= tolerance``
    (both positive), ``"atleast"`` holds ``real >= tolerance * model`` (the model's figure is a
    floor), ``"both"`` holds when both sides are true (``measure`` returns 0 or 1)."""

    name: str
    measure: Callable[[list[dict]], float]
    tolerance: float
    cause: str
    unit: str = "MiB"
    mode: str = "abs"

    def evaluate(self, real: list[dict], model: list[dict]) -> dict:
        a, b = float(self.measure(real)), float(self.measure(model))
        if self.mode == "factor":
            ratio = max(a / b, b / a) if a > 0 and b > 0 else float("inf")
            holds, diff = ratio <= self.tolerance, ratio
        elif self.mode == "atleast":  # the model gives a floor the real run stays above
            holds, diff = a >= self.tolerance * b, a / b if b else float("inf")
        elif self.mode == "both":
            holds, diff = bool(a) and bool(b), float(bool(a) == bool(b))
        elif a != a and b != b:  # nan on both: not there on either side (a zone the guest lacks)
            holds, diff = True, 0.0
        else:
            diff = a - b
            holds = abs(diff) <= self.tolerance
        return {"check": self.name, "real": a, "model": b, "diff": diff, "tolerance": self.tolerance,
                "unit": self.unit, "mode": self.mode, "holds": bool(holds), "cause": self.cause}


def _mib(key: str, i: int, j: int = 0) -> Callable[[list[dict]], float]:
    """The change of ``key`` from row ``j`` to row ``i``, in MiB."""
    return lambda rows: (rows[i][key] - rows[j][key]) / MiB


def _zone(zone: str, key: str) -> Callable[[list[dict]], float]:
    def measure(rows: list[dict]) -> float:
        for z in rows[0]["zoneinfo"]:
            if z["zone"] == zone:
                value = z[key] if key != "pcp_high" else z["pcp"][0]["high"]
                return float(value if key != "protection" else sum(value))
        return float("nan")
    return measure


def _migrate(key: str) -> Callable[[list[dict]], float]:
    def measure(rows: list[dict]) -> float:
        info = rows[-1]["migrate"]
        if key in ("total-time", "downtime", "setup-time"):
            return float(info[key])
        if key == "resent":  # pages sent more than once: every page once, the rest again
            ram = info["ram"]
            return float(ram["normal"] + ram["duplicate"] - ram["total"] // PAGE_SIZE)
        return float(info["ram"][key])
    return measure


ZONE_CAUSE = ("the same formulas (__setup_per_zone_wmarks, zone_highsize, "
              "setup_per_zone_lowmem_reserve) on the same managed pages, taken when "
              "init_per_zone_wmark_min and hugepage_init ran: nothing is left to differ")
MANAGED_CAUSE = ("memblock's reservations are measured for this kernel build (image, memmap, "
                 "hashes, percpu, swiotlb); early allocations differ by a page or two between builds")
PCP_CAUSE = ("MemFree does not count the per-CPU lists; where a list ends after a run of frees "
             "depends on free_factor, which the model decays once a jiffy where the real guest's "
             "background allocations halve it (docs/mechanisms.md §10.3): a few MiB either way")
RSS_CAUSE = ("host RSS counts every page the guest wrote (init_on_alloc zeroing included) less what "
             "QEMU discarded; the real QEMU also holds its own RAM blocks (firmware, ROMs, ACPI), "
             "and the busybox guest's page cache and slab are placed by a real allocator")
RETURN_CAUSE = ("a pass runs PAGE_REPORTING_DELAY (2 s) after the first free that makes a 2 MiB block; "
                "the real free takes 0.1-2 s of TCG time (the model's none, half-way through it), and "
                "a pass another free asked for earlier can come sooner: up to 2 s, plus a sample")
STEP_CAUSE = ("from the first return on, each pass reports what is free in whole 2 MiB blocks, a "
              "budget at a time, 2 s apart (PAGE_REPORTING_DELAY); each side's first return is the "
              "first sample after its pass, so its pass fell up to one sample interval (~0.6 s) "
              "earlier, and the next step can land one sample sooner or later on either side: "
              "real sample k is held against the model's samples k-1..k+1; what is left in whole "
              "blocks differs by a few blocks (measured 2-5 MiB)")
TCG_TIME_CAUSE = ("the model's time is what QEMU's 128 MiB/s max-bandwidth and its assumed per-page "
                  "costs allow on an idle host; under TCG the migration thread shares the host's 2 "
                  "cores with the vCPU and with whatever else runs (real runs of the same idle "
                  "migration: 829 ms on a quiet host, 1748 ms on a loaded one): the model is a floor")
NORMAL_CAUSE = ("normal pages are the pages holding data: the model's busybox boot profile is "
                "calibrated on MemFree and Slab, not on which free pages boot left dirty; a busy "
                "guest's rewritten pages are sent again as the syncs fall against its writes (real "
                "runs: 63-67k busy)")
ROM_CAUSE = ("ram_bytes_total sums every migratable RAM block: QEMU's firmware and ACPI blocks "
             "(pc.bios, pc.rom, /rom@etc/*: 328 KiB on this q35 machine) are not in the model")


def _zoneinfo_checks() -> tuple[Check, ...]:
    checks: list[Check] = []
    for zone in ("DMA", "DMA32", "Normal"):
        for key in ("min", "low", "high", "pcp_high"):
            checks.append(Check(f"{zone} {key}", _zone(zone, key), 0, ZONE_CAUSE, "pages"))
        checks.append(Check(f"{zone} protection (sum)", _zone(zone, "protection"), 0, ZONE_CAUSE, "pages"))
        checks.append(Check(f"{zone} present", _zone(zone, "present"), 0,
                            "the e820 map QEMU's q35 machine gives the guest", "pages"))
        checks.append(Check(f"{zone} managed", _zone(zone, "managed"), 4, MANAGED_CAUSE, "pages"))
    checks.append(Check("MemTotal", lambda rows: rows[0]["memtotal"] / MiB, 0.1, MANAGED_CAUSE))
    checks.append(Check("MemTotal (within 1 %)", lambda rows: rows[0]["memtotal"], 1.01, MANAGED_CAUSE,
                        "x", "factor"))
    checks.append(Check("MemFree at boot", lambda rows: rows[0]["memfree"] / MiB, 8,
                        "what the busybox boot allocated (slab, initramfs tmpfs, per-CPU lists) is "
                        "measured in sum (BootProfile.minimal); how it splits over the zones is not"))
    return tuple(checks)


def _balloon_checks(deflate_on_oom: bool = False) -> tuple[Check, ...]:
    memtotal = (Check("MemTotal change after inflate", _mib("memtotal", 1), 0,
                      "with deflate-on-oom balloon pages stay in MemTotal (no adjust_managed_page_count)")
                if deflate_on_oom else
                Check("MemTotal change after inflate", _mib("memtotal", 1), 0,
                      "adjust_managed_page_count once per balloon page (without deflate-on-oom)"))
    return (
        Check("actual after inflate", _mib("balloon_actual", 1), 0,
              "QEMU's actual: the pages the guest gave, counted by the same protocol", "MiB"),
        memtotal,
        Check("MemFree change after inflate + deflate", _mib("memfree", 2), 8, PCP_CAUSE),
        Check("host RSS change after inflate", _mib("host_rss", 1), 16, RSS_CAUSE),
        Check("host RSS change after inflate + deflate", _mib("host_rss", 2), 16, RSS_CAUSE),
    )


def _first_return(rows: list[dict]) -> int | None:
    """Index of the first sample after the allocation whose host RSS is 32 MiB below the peak."""
    peak = rows[1]["host_rss"]
    return next((i for i in range(2, len(rows)) if rows[i]["host_rss"] < peak - 32 * MiB), None)


def _return_after_free_s(rows: list[dict]) -> float:
    """Seconds from the sample before the free to the first sample showing the return."""
    i = _first_return(rows)
    return float("nan") if i is None else (rows[i]["t_ms"] - rows[1]["t_ms"]) / 1000


@dataclass(frozen=True)
class StaircaseCheck(Check):
    """Sample ``step`` of the reporting staircase, counted from each side's first return (the
    first sample 32 MiB below the peak): host RSS since the peak, real against model. The time of
    the first return is its own check (:func:`_reporting_checks`)."""

    step: int = 0

    def evaluate(self, real: list[dict], model: list[dict]) -> dict:
        def staircase(rows: list[dict]) -> list[float]:
            i = _first_return(rows)
            return [] if i is None else [(r["host_rss"] - rows[1]["host_rss"]) / MiB for r in rows[i:]]

        a_steps, b_steps = staircase(real), staircase(model)
        k = self.step
        a = a_steps[k] if k < len(a_steps) else float("nan")
        b = b_steps[k] if k < len(b_steps) else float("nan")
        # the model's samples one before and one after: a step may fall a sample apart
        window = b_steps[max(k - 1, 0):k + 2]
        if a != a or not window:
            # one run's watch ended earlier after its return: nothing to hold, unless a side
            # never returned at all
            holds = bool(a_steps) and bool(b_steps)
        else:
            holds = min(window) - self.tolerance <= a <= max(window) + self.tolerance
        return {"check": self.name, "real": a, "model": b, "diff": a - b, "tolerance": self.tolerance,
                "unit": self.unit, "mode": self.mode, "holds": bool(holds), "cause": self.cause}


def _reporting_checks(samples: int = 16) -> tuple[Check, ...]:
    checks = [
        Check("host RSS change with the allocation", _mib("host_rss", 1), 16, RSS_CAUSE),
        Check("MemFree change after the free", _mib("memfree", 2), 8,
              "the exit's order-1 pgd free empties the per-CPU list (free_high) on both; what "
              "the shell and memhold leave in slab differs by a few pages"),
        Check("host RSS change by the end", _mib("host_rss", -1), 16, RSS_CAUSE),
    ]
    checks.append(Check("first return after the free", _return_after_free_s, 2.5, RETURN_CAUSE, "s"))
    for k in range(samples):
        checks.append(StaircaseCheck(f"staircase, sample {k} from the first return", _first_return, 8,
                                     STEP_CAUSE, step=k))
    return tuple(checks)


def _oom_excess(rows: list[dict]) -> float:
    """MiB the OOM notifier deflated beyond what the allocation lacked (its size less
    MemAvailable: each side sizes the allocation from its own MemAvailable), less what ended on
    the per-CPU lists (deflated pages are freed there, and stay while the zone is below min)."""
    inflated, final = rows[1], rows[-1]
    lacked = (final["anon"] - inflated["anon"]) - inflated["memavailable"]
    excess = (final["balloon_actual"] - inflated["balloon_actual"]) - lacked
    return (excess - final.get("pcp_pages", 0) * PAGE_SIZE) / MiB


def _oom_checks() -> tuple[Check, ...]:
    return (
        Check("deflated by the OOM notifier", _mib("balloon_actual", -1, 1), 4,
              "the allocation is MemAvailable + 32 MiB rounded to a MiB on each side (a MiB apart), "
              "and deflated pages that end on the per-CPU list (0 to its high, 826 pages = 3.2 MiB "
              "here: real runs ended with 183 and 751) were deflated for nothing; the next check "
              "takes both out"),
        Check("deflated beyond the lack, less the per-CPU lists", _oom_excess, 3,
              "virtio_balloon_oom_notify deflates 256 pages (1 MiB) per out_of_memory call, onto the "
              "per-CPU list, where they stay while the zone is below min; the model needs ~2 MiB "
              "more of these calls than the real guest (measured: 4.1-4.3 MiB real, 6.4 MiB "
              "model); why is not found (UNEXPLAINED: the 1 MiB this should hold to)"),
        Check("OOM kills", lambda rows: rows[-1]["oom_kills"] - rows[0]["oom_kills"], 0,
              "deflate-on-oom: the notifier frees pages, so out_of_memory kills nobody", "kills"),
    )


def _virtio_mem_checks(online: str) -> tuple[Check, ...]:
    plugged = lambda rows: rows[-1]["virtio_mem_plugged"] / MiB  # noqa: E731
    checks = [
        Check("plugged", lambda rows: rows[1]["virtio_mem_plugged"] / MiB, 0,
              "virtio-mem plugs exactly the requested size in 2 MiB blocks"),
        Check("MemTotal change with the plug", _mib("memtotal", 1), 1,
              "online_pages: the plugged pages less their memmap (64 B a page, 2 MiB a block)"),
    ]
    if online == "kernel":
        checks.append(Check("left plugged after the unplug (factor)", plugged, 2.0,
                            "unmovable kernel allocations (page tables, slab, the memmap of later "
                            "blocks) land in ZONE_NORMAL blocks and pin them; which ones differs",
                            "x", "factor"))
    else:
        checks.append(Check("left plugged after the unplug", plugged, 0,
                            "ZONE_MOVABLE holds only movable pages: alloc_contig_range migrates them"))
    return tuple(checks)


def _migration_checks(hint: bool, busy: bool) -> tuple[Check, ...]:
    checks = [
        Check("completed", lambda rows: float(rows[-1]["migrate"]["status"] == "completed"), 1,
              "pre-copy converges on both (QEMU's default 128 MiB/s and 300 ms)", "", "both"),
        Check("total-time, at least the model's", _migrate("total-time"), 0.9, TCG_TIME_CAUSE, "x",
              "atleast"),
        Check("normal pages (factor)", _migrate("normal"), 1.3, NORMAL_CAUSE, "x", "factor"),
        Check("transferred (factor)", _migrate("transferred"), 1.3, NORMAL_CAUSE, "x", "factor"),
        Check("ram total", lambda rows: _migrate("total")(rows) / MiB, 1, ROM_CAUSE),
        Check("dirty-sync-count", _migrate("dirty-sync-count"), 2,
              "one sync more or less as the backlog crosses the threshold a window sooner or later",
              "syncs"),
    ]
    if hint and not busy:  # busy: the writer and the hint worker share the one TCG vCPU (not modelled)
        checks.append(Check("pages sent again (factor)", _migrate("resent"), 2.0,
                            "under TCG a hinted block the guest zeroed (init_on_alloc) is dirty "
                            "again at the next sync and goes out again; how many depends on how "
                            "fast the guest zeroes (1.2 GB/s, measured) against how fast the thread "
                            "scans", "x", "factor"))
    return tuple(checks)


@dataclass(frozen=True)
class Scenario:
    """A twin: the demo ``name`` with its checks and the row keys its view overlays."""

    name: str
    title: str
    checks: tuple[Check, ...]
    series: tuple[str, ...] = ()
    model: dict = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("zoneinfo_512m", "512 MiB guest: zones, watermarks, per-CPU lists (THP off below 512 MiB)",
             _zoneinfo_checks()),
    Scenario("zoneinfo_1g", "1 GiB guest: zones, watermarks, per-CPU lists (THP-raised min_free_kbytes)",
             _zoneinfo_checks()),
    Scenario("zoneinfo_4g", "4 GiB guest: ZONE_NORMAL above 4 GiB, swiotlb reserved",
             _zoneinfo_checks()),
    Scenario("balloon", "1 GiB guest: balloon to 768 MiB and back", _balloon_checks(),
             ("balloon_actual", "memfree", "host_rss")),
    Scenario("balloon_deflate_on_oom", "1 GiB guest with deflate-on-oom: balloon to 768 MiB and back",
             _balloon_checks(deflate_on_oom=True), ("balloon_actual", "memfree", "host_rss")),
    Scenario("balloon_4g", "4 GiB guest: balloon to 3840 MiB and back", _balloon_checks(),
             ("balloon_actual", "memfree", "host_rss")),
    Scenario("oom_deflate", "512 MiB guest, deflate-on-oom: allocate past MemAvailable", _oom_checks(),
             ("balloon_actual", "anon")),
    Scenario("reporting", "1 GiB guest: free 256 MiB, free page reporting gives it back",
             _reporting_checks(), ("host_rss", "memfree")),
    Scenario("reporting_512m", "512 MiB guest: free 300 MiB, what reporting returns in whole 2 MiB blocks",
             _reporting_checks(), ("host_rss", "memfree")),
    Scenario("virtio_mem_movable", "virtio-mem, online_movable: plug 512 MiB, use it, unplug",
             _virtio_mem_checks("movable"), ("virtio_mem_plugged", "memtotal", "host_rss")),
    Scenario("virtio_mem_kernel", "virtio-mem, online_kernel: plug 512 MiB, use it, unplug",
             _virtio_mem_checks("kernel"), ("virtio_mem_plugged", "memtotal", "host_rss")),
    Scenario("migration_idle", "1 GiB idle guest migrated to a second QEMU", _migration_checks(False, False),
             ("transferred", "remaining")),
    Scenario("migration_busy", "1 GiB guest rewriting 128 MiB at 32 MiB/s, migrated",
             _migration_checks(False, True), ("transferred", "remaining")),
    Scenario("migration_hint_idle", "1 GiB idle guest migrated with free page hinting",
             _migration_checks(True, False), ("transferred", "remaining")),
    Scenario("migration_hint_busy", "1 GiB busy guest migrated with free page hinting",
             _migration_checks(True, True), ("transferred", "remaining")),
)}
assert set(SCENARIOS) <= set(DEMOS)


# --- running both sides ---------------------------------------------------------------------------
class _Clocked:
    """A backend whose ``sample()`` times are kept (the real run's clock)."""

    def __init__(self, vm: Any):
        self._vm = vm
        self.times: list[float] = []

    def sample(self) -> dict:
        row = self._vm.sample()
        self.times.append(float(row["t_ms"]))
        return row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)


class _Paced:
    """The model on the real run's clock: its i-th ``sample()`` first advances the model to the
    time the real run's i-th sample was taken (relative to each side's first sample), and a guest
    operation runs half-way between the samples around it (a real one takes that long: the model's
    is instant)."""

    def __init__(self, vm: Any, times: list[float]):
        self._vm = vm
        self._times = times
        self._n = 0
        self._t0 = 0.0

    def _catch_up(self, real_ms: float) -> None:
        behind = real_ms - self._times[0] + self._t0 - float(self._vm.env.now)
        if behind > 0:
            self._vm.advance(behind)

    def sample(self) -> dict:
        i, self._n = self._n, self._n + 1
        if i == 0:
            self._t0 = float(self._vm.env.now)
        elif i < len(self._times):
            self._catch_up(self._times[i])
        return self._vm.sample()

    def guest(self, op: str, **arguments: Any) -> Any:
        if 0 < self._n < len(self._times):
            self._catch_up((self._times[self._n - 1] + self._times[self._n]) / 2)
        return self._vm.guest(op, **arguments)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)


@dataclass
class TwinResult:
    """Both runs of a scenario and its checks."""

    scenario: Scenario
    source: str
    facts: dict
    real: list[dict]
    model: list[dict]
    results: list[dict]

    @property
    def holds(self) -> bool:
        return all(r["holds"] for r in self.results)

    def failures(self) -> list[dict]:
        return [r for r in self.results if not r["holds"]]

    def report(self) -> str:
        """The checks as a terminal table, each with its cause."""
        kernel = self.facts.get("kernel", "?")
        accel = self.facts.get("accel", "?")
        held = sum(r["holds"] for r in self.results)
        lines = [f"{self.scenario.name}: {self.scenario.title} ({self.source}, {kernel}, {accel}): "
                 f"{held} of {len(self.results)} checks hold",
                 f"  {'check':<44} {'real':>10} {'model':>10} {'diff':>9} {'tolerance':>11}"]
        for r in self.results:
            tol = (f"x{r['tolerance']:g}" if r["mode"] == "factor" else
                   f">= x{r['tolerance']:g}" if r["mode"] == "atleast" else
                   "both" if r["mode"] == "both" else f"±{r['tolerance']:g} {r['unit']}".rstrip())
            diff = f"x{r['diff']:.2f}" if r["mode"] in ("factor", "atleast") else f"{r['diff']:+.1f}"
            mark = "ok " if r["holds"] else "NO "
            lines.append(f"{mark}{r['check']:<44} {r['real']:>10.1f} {r['model']:>10.1f} {diff:>9} {tol:>11}")
        causes = []
        for r in self.results:
            if r["cause"] not in causes:
                causes.append(r["cause"])
        lines.append("  causes:")
        lines += [f"  [{i + 1}] {c}" for i, c in enumerate(causes)]
        return "\n".join(lines)


def _facts(vm: Any) -> dict:
    facts = getattr(vm, "facts", None)
    if isinstance(facts, dict):
        return dict(facts)
    from labkit.backends.qemu.record import describe

    return describe(vm)


def run_model(name: str, times: list[float] | None = None, facts: dict | None = None) -> list[dict]:
    """The model's run of scenario ``name``, paced by the real run's sample ``times`` if given,
    for the real run's ``facts`` (its accelerator, the initramfs it booted with)."""
    facts = facts or {}
    accel = facts.get("accel") or "tcg"
    options = model_options(name)
    knobs = dict(options.get("model", {}), **SCENARIOS[name].model)
    if accel == "tcg":
        knobs["balloon_request_ms"] = TCG_BALLOON_REQUEST_MS
    if facts.get("initrd_bytes"):
        knobs["initrd_bytes"] = int(facts["initrd_bytes"])
    options["model"] = knobs
    with labkit.open(backend="model", **options) as vm:
        if accel == "tcg":
            tcg_model(vm)
        return run_demo(name, _Paced(vm, times) if times else vm)


def run_twin(name: str, mode: str = "auto", record: str | Path | None = None) -> TwinResult:
    """Run scenario ``name`` on the real side (``mode``: ``"live"``, ``"replay"`` or ``"auto"``)
    and on the model, and evaluate its checks. ``record``: also save the live run there."""
    if name not in SCENARIOS:
        raise ValueError(f"twin scenario {name!r} is not one of {sorted(SCENARIOS)}")
    vm, source = open_demo(name, mode)
    if record is not None and source == "live":
        from labkit.backends.qemu.record import Recorder

        vm = Recorder(vm, note=f"labkit twin {name!r}")
    clocked = _Clocked(vm)
    with vm:
        real = run_demo(name, clocked)
        facts = _facts(vm)
        if record is not None and source == "live":
            vm.save(record)
    model = run_model(name, clocked.times, facts)
    scenario = SCENARIOS[name]
    results = [check.evaluate(real, model) for check in scenario.checks]
    return TwinResult(scenario, source.split(" ")[0], facts, real, model, results)


# --- labkit twin ----------------------------------------------------------------------------------
def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="*", help=f"twin scenarios (default: all): {', '.join(SCENARIOS)}")
    parser.add_argument("--mode", choices=("auto", "live", "replay"), default="auto",
                        help="live QEMU, the recordings under data/recorded/, or live where possible")


def run_twin_command(args: argparse.Namespace) -> int:
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"twin scenario {unknown[0]!r} is not one of {sorted(SCENARIOS)}")
    failed = 0
    for name in names:
        result = run_twin(name, args.mode)
        print(result.report(), end="\n\n")
        sys.stdout.flush()
        failed += not result.holds
    print(f"{len(names) - failed} of {len(names)} twin scenarios hold")
    return 1 if failed else 0


# the command labkit.cli adds to its table (this module imports nothing from the CLI)
CLI_COMMANDS = (
    ("twin", "hold the model against a real guest (live QEMU or its recordings): checks with their "
             "tolerances and causes", run_twin_command, _arguments),
)
