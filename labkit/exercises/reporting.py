"""Free page reporting exercise: how much host RSS comes back, and when.

``reporting_rss`` (§3.2, §3.3, §7): a free that merges into a block of order >= 9
moves reporting from IDLE to REQUESTED and schedules a pass ``PAGE_REPORTING_DELAY`` = 2 s later.
A pass walks each free list of order 9 and 10 and makes ``budget + 1`` report calls of
``PAGE_REPORTING_CAPACITY`` = 32 blocks, with ``budget = DIV_ROUND_UP(nr_free, 32 * 16)``: about
1/16 of the list. A pass that runs out of budget leaves the state REQUESTED, so the next one follows
2 s after it ends. QEMU discards each reported block: host RSS falls by the pages that were backed.

The student is given /proc/buddyinfo after the free (the zones reporting walks: each with its
own lists and budgets, ``page_reporting_process_zone``) and predicts the staircase at one instant.
The expected answer is what the model measures; the tolerance on the RSS covers what a textbook
estimate cannot see (blocks that mixed the job's pages with never-touched ones, the order-9 list).

>>> from labkit.exercises import make
>>> ex = make("reporting_rss", "alice")
>>> ex.params["seconds"] % 2
1
"""

from __future__ import annotations

import math

import labkit
from labkit.exercises.core import Part, Spec, near
from labkit.model.buddy import free_blocks
from labkit.model.page_reporting import (
    PAGE_REPORTING_BUDGET_DIVISOR,
    PAGE_REPORTING_CAPACITY,
    PAGE_REPORTING_DELAY_MS,
)
from labkit.units import GiB, MiB

SETTLE_MS = 60_000  # boot's own free memory is reported in the first ~30 s (§3.3)
ORDER10_MIB = 4


def per_pass_mib(nr_free_order10: int) -> int:
    """What one pass reports from the order-10 list: (budget + 1) calls x 32 blocks x 4 MiB (§3.3).

    >>> per_pass_mib(431), per_pass_mib(1936)
    (256, 640)
    """
    budget = math.ceil(nr_free_order10 / (PAGE_REPORTING_CAPACITY * PAGE_REPORTING_BUDGET_DIVISOR))
    return (budget + 1) * PAGE_REPORTING_CAPACITY * ORDER10_MIB


def step_mib(facts: dict) -> int:
    """One pass over every zone reporting walks: each zone's order-10 list gets its own budget."""
    return sum(per_pass_mib(n) for n in facts["order10_zones"])


def estimate_mib(facts: dict, passes: int) -> int:
    """The textbook staircase after ``passes`` passes: each zone returns its budget's worth per
    pass, until its unreported (the job's) order-10 blocks run out."""
    return sum(min(job * ORDER10_MIB, passes * per_pass_mib(n))
               for n, job in zip(facts["order10_zones"], facts["job10_zones"], strict=True))


def _derive(rng) -> dict:
    memory_gib = int(rng.choice([2, 3, 4, 6, 8]))
    job_mib = int(memory_gib * 1024 * rng.uniform(0.45, 0.75)) // 64 * 64
    # passes the job needs, from the free memory a guest of this size has (about 90 % of RAM)
    passes = math.ceil(job_mib / per_pass_mib(int(memory_gib * 1024 * 0.9) // ORDER10_MIB))
    k = int(rng.integers(1, max(2, passes - 1)))  # a moment mid-staircase, between two passes
    return {"memory_gib": memory_gib, "job_mib": job_mib, "seconds": 2 * k + 1,
            "vm_seed": int(rng.integers(0, 1000))}


def _run(p: dict) -> tuple[dict, dict]:
    """Boot with reporting, let boot's free memory be reported, run the job, free it, wait."""
    with labkit.open(memory=p["memory_gib"] * GiB, seed=p["vm_seed"],
                     balloon={"free_page_reporting": True}) as vm:
        vm.advance(SETTLE_MS)
        job = vm.guest("alloc", size=p["job_mib"] * MiB, kind="anon")
        rss = vm.sample()["host_rss"]
        vm.guest("free", handle=job)
        # the zones a pass walks: free above the low watermark + 64 MiB (ZONE_DMA never is)
        walked = {(z["node"], z["zone"]) for z in vm.zoneinfo()
                  if z["free"] > z["low"] + (PAGE_REPORTING_CAPACITY << 9)}
        lines = [line for line in vm.buddyinfo().splitlines()
                 if (int(line.split()[1].rstrip(",")), line.split()[3]) in walked]
        counts = [[int(x) for x in line.split()[4:]] for line in lines]
        job10 = [int((~free_blocks(vm.mem, z).reported[10]).sum()) for z in vm.mem.zones
                 if (z.node, z.name) in walked]
        passes_before = vm.reporting.passes
        vm.advance(p["seconds"] * 1000)
        facts = {"buddyinfo": "\n    ".join(lines), "order9": sum(c[9] for c in counts),
                 "order10": sum(c[10] for c in counts), "order10_zones": [c[10] for c in counts],
                 "job10_zones": job10, "job10": ", ".join(map(str, job10)), "rss_mib": rss / MiB}
        return facts, {"passes": vm.reporting.passes - passes_before,
                       "returned_mib": (rss - vm.sample()["host_rss"]) / MiB}


def _hint(part, given, expected, p, facts) -> str | None:
    t = p["seconds"]
    step = step_mib(facts)
    if part == "passes":
        if given in (math.ceil(t / 2) + (t % 2 == 0), t // 2 + 1):
            return ("the first pass does not start at once: the free only schedules it, "
                    "PAGE_REPORTING_DELAY = 2 s later (§3.2).")
        if given <= 1:
            return ("one pass reports only about 1/16 of each list; a pass that runs out of budget leaves "
                    "the state REQUESTED, so another follows 2 s later (§3.2, §3.3).")
        return "passes start 2 s after the free, then every 2 s while work is left (§3.2)."
    if near(given, p["job_mib"], 0.05, 16):
        return ("reporting is paced: a pass makes budget + 1 report calls of 32 blocks per free list, "
                "budget = ceil(nr_free / (32 x 16)), about 1/16 of the list (§3.3).")
    passes = expected["passes"]
    budget = step // (PAGE_REPORTING_CAPACITY * ORDER10_MIB) - len(facts["order10_zones"])
    if budget and near(given, passes * budget * PAGE_REPORTING_CAPACITY * ORDER10_MIB, 0.1, 16):
        return "a list gets budget + 1 report calls per pass, not budget (§3.3)."
    if near(given, expected["returned_mib"] - step, 0.1, 16) or near(
            given, expected["returned_mib"] + step, 0.1, 16):
        return "about one pass off: count the passes again (the first runs 2 s after the free, §3.2)."
    if near(given, expected["returned_mib"] / 2, 0.1, 16):
        return "the order-10 list holds 4 MiB blocks (1024 pages), not 2 MiB ones."
    return ("per pass: (ceil(nr_free / 512) + 1) x 32 blocks of 4 MiB from each zone's order-10 list "
            "(§3.3), one pass every 2 s from 2 s after the free (§3.2), at most what the job left.")


def _explain(p: dict, facts: dict, expected: dict) -> str:
    step = step_mib(facts)
    zones = []
    for n10 in facts["order10_zones"]:
        budget = math.ceil(n10 / (PAGE_REPORTING_CAPACITY * PAGE_REPORTING_BUDGET_DIVISOR))
        zones.append(f"{n10} blocks: budget ceil({n10} / 512) = {budget}, {budget + 1} calls x 32 x "
                     f"4 MiB = {per_pass_mib(n10)} MiB")
    passes = (p["seconds"] * 1000) // PAGE_REPORTING_DELAY_MS
    estimate = min(p["job_mib"], estimate_mib(facts, passes))
    return (f"The free schedules a pass 2 s later (§3.2); passes then run every 2 s, so by "
            f"{p['seconds']} s {passes} have run (model: {expected['passes']}).\n"
            f"Order-10 lists, one per zone: {'; '.join(zones)}: {step} MiB a pass (§3.3).\n"
            f"Estimate: each zone gives {passes} passes' worth, at most its unreported blocks "
            f"({facts['job10']}): {estimate} MiB; the model measured "
            f"{expected['returned_mib']:.0f} MiB (blocks that mixed the job's pages with never-touched "
            f"ones return less than 4 MiB).")


REPORTING_RSS = Spec(
    name="reporting_rss",
    title="Free page reporting: the host RSS staircase",
    sections=("§3.2", "§3.3", "§7"),
    parts=(Part("passes", "int", "how many reporting passes have run since the free"),
           Part("returned_mib", "float", "how much host RSS has fallen since the free",
                unit="MiB", rel=0.10, abs=16.0)),
    derive=_derive,
    run=_run,
    prompt=("A guest with `-m {memory_gib}G` has free page reporting on "
            "(`-device virtio-balloon-pci,free-page-reporting=on`). It has been idle long enough for "
            "everything free at boot to be reported. A job writes {job_mib} MiB (host RSS is then "
            "{rss_mib:.0f} MiB) and exits. Right after the free, /proc/buddyinfo says, for the zones "
            "reporting walks:\n\n"
            "    {buddyinfo}\n\n"
            "(orders 0 to 10; order 9 = 2 MiB blocks, order 10 = 4 MiB blocks, all but the job's "
            "already reported; each zone has its own lists). Of the order-10 blocks, the job's (not "
            "yet reported) are, zone by zone: {job10}. Nothing else happens.\n\n"
            "1. How many reporting passes have run {seconds} s after the free?\n"
            "2. By then, how much has host RSS fallen?"),
    hint=_hint,
    explain=_explain,
)
