"""Live migration exercise: will pre-copy converge without auto-converge?

``migration_converges`` (§6.1, §6.2, §6.3, §7): after each 100 ms window QEMU sets
``threshold_size = bandwidth x downtime-limit``; it syncs the dirty bitmap, and may stop the VM,
only when the pending backlog is at most that threshold. A guest that dirties its writable working
set faster than ``max-bandwidth`` keeps the backlog above the threshold forever, unless the whole
working set fits under it; auto-converge (off by default) would throttle the vCPUs.

The variants are drawn where the textbook rule has a clear answer: the guest dirties at most 3/4 of
the bandwidth (converges), or at least 1.5 times it with a working set of at least 4 thresholds
(never converges) or at most 0.6 of one (converges). Between those, convergence depends on how random
writes overlap, which the model shows but a student cannot be asked to predict.

>>> from labkit.exercises import make
>>> ex = make("migration_converges", "alice")
>>> sorted(ex.params)
['bandwidth_mib', 'downtime_ms', 'rate_mib', 'vm_seed', 'wss_mib']
"""

from __future__ import annotations

import numpy as np

from labkit.exercises.core import Part, Spec, near
from labkit.scenarios.migration import run_policy, write_heavy
from labkit.units import MiB

MEMORY = "1G"
TIMEOUT_MS = 20_000.0  # simulated; a converging variant completes in a few seconds
MAX_WSS_MIB = 480  # write_heavy: at most half of memory


def _derive(rng) -> dict:
    bandwidth = int(rng.choice([32, 64, 128]))
    downtime = int(rng.choice([200, 300, 500]))
    threshold = bandwidth * downtime / 1000
    case = rng.choice(["slow", "fast-big", "fast-small"], p=[0.35, 0.4, 0.25])
    if case == "slow":
        rate, wss = bandwidth * rng.choice([0.5, 0.75]), threshold * rng.uniform(2, 6)
    elif case == "fast-big":
        rate, wss = bandwidth * rng.choice([1.5, 2, 3]), threshold * rng.uniform(4, 8)
    else:
        rate, wss = bandwidth * rng.choice([1.5, 2, 3]), threshold * rng.uniform(0.25, 0.6)
    wss = int(min(wss, MAX_WSS_MIB)) // 2 * 2
    return {"bandwidth_mib": bandwidth, "downtime_ms": downtime, "rate_mib": int(rate),
            "wss_mib": max(wss, 4), "vm_seed": int(rng.integers(0, 1000))}


def _run(p: dict) -> tuple[dict, dict]:
    """Migrate a 1 GiB guest running a random writer (Clark et al.'s MMuncher) on the model."""
    run = run_policy(write_heavy(memory=MEMORY, seed=p["vm_seed"], wss=p["wss_mib"] * MiB,
                                 rate=p["rate_mib"] * MiB, bandwidth=p["bandwidth_mib"] * MiB,
                                 downtime_limit_ms=p["downtime_ms"], timeout_ms=TIMEOUT_MS), "plain")
    thresholds = run.history["threshold"]
    threshold = float(np.median(thresholds[thresholds > 0])) if (thresholds > 0).any() else 0.0
    return ({"timeout_s": TIMEOUT_MS / 1000},
            {"threshold_mib": threshold / MiB, "converges": bool(run.summary["completed"])})


def _hint(part, given, expected, p, facts) -> str | None:
    b, dl, r, w = p["bandwidth_mib"], p["downtime_ms"], p["rate_mib"], p["wss_mib"]
    if part == "threshold_mib":
        if near(given, b * dl, 0.05, 0) or near(given, b * dl / 1e6, 0.05, 0):
            return "mind the units: MiB/s x ms; the downtime limit is in milliseconds."
        return "threshold_size = bandwidth x downtime-limit (§6.2)."
    thr = expected["threshold_mib"]
    if not expected["converges"]:
        return (f"the guest dirties {r} MiB/s, faster than the {b} MiB/s link, and its working set "
                f"({w} MiB) does not fit under the threshold ({thr:.0f} MiB): the backlog never falls to "
                f"bandwidth x downtime-limit, so QEMU never syncs and stops the VM (§6.2). Auto-converge "
                f"would throttle the vCPUs until it does (§6.3).")
    if r < b:
        return (f"the link ({b} MiB/s) is faster than the guest dirties ({r} MiB/s): each pass has fewer "
                f"pages to resend than the one before, until the backlog is under the threshold (§6.2).")
    return (f"the whole writable working set ({w} MiB) fits under bandwidth x downtime-limit "
            f"({thr:.0f} MiB): once the first pass is done the backlog is at most {w} MiB, so the next "
            f"sync finds it below the threshold and QEMU stops the VM (§6.2).")


def _explain(p: dict, facts: dict, expected: dict) -> str:
    b, dl, r, w = p["bandwidth_mib"], p["downtime_ms"], p["rate_mib"], p["wss_mib"]
    thr = b * dl / 1000
    if r < b:
        why = f"the guest dirties {r} MiB/s < {b} MiB/s sent: the backlog shrinks every pass"
    elif w <= thr:
        why = f"the working set, {w} MiB, fits under the threshold"
    else:
        why = f"{r} MiB/s dirtied > {b} MiB/s sent and {w} MiB > {thr:g} MiB: the backlog stays above"
    return (f"threshold = {b} MiB/s x {dl} ms = {thr:g} MiB (§6.2; model measured "
            f"{expected['threshold_mib']:.1f}).\n"
            f"Converges: {why} (model: {'completed' if expected['converges'] else 'still running'} "
            f"after {facts['timeout_s']:g} s).")


MIGRATION_CONVERGES = Spec(
    name="migration_converges",
    title="Pre-copy migration: will it converge?",
    sections=("§6.1", "§6.2", "§6.3", "§7"),
    parts=(Part("threshold_mib", "float", "the backlog QEMU must see at a sync to stop the VM",
                unit="MiB", rel=0.05),
           Part("converges", "bool", f"whether the migration completes within {TIMEOUT_MS / 1000:g} s")),
    derive=_derive,
    run=_run,
    prompt=("A 1 GiB guest runs a program that writes random pages of a {wss_mib} MiB working set at "
            "{rate_mib} MiB/s. It is migrated with QEMU pre-copy: `max-bandwidth` {bandwidth_mib} MiB/s, "
            "`downtime-limit` {downtime_ms} ms, auto-converge off (the default), no hinting.\n\n"
            "1. Below what backlog (in MiB) does QEMU sync the bitmap and stop the VM?\n"
            "2. Does the migration complete (within {timeout_s:g} s)?"),
    hint=_hint,
    explain=_explain,
)
