"""Balloon exercises: counting inflate requests, and reading ``virsh dommemstat`` right.

* ``balloon_requests`` (§1.2, §1.7): QMP ``balloon`` takes a *logical* size and QEMU
  turns it into ``num_pages = (vm_ram_size - value) >> 12``; the driver moves at most
  ``VIRTIO_BALLOON_ARRAY_PFNS_MAX`` = 256 PFNs per run of its work item and writes ``actual`` after
  each, re-queueing itself while the target is unmet; ``query-balloon`` reports ``actual`` as a logical
  size too.
* ``dommemstat`` (§1.3, §1.5, §1.7): libvirt's ``actual`` is query-balloon's logical size,
  ``available`` is ``stat-total-memory`` (MemTotal, which shrinks with the balloon unless
  deflate-on-oom), ``unused`` is MemFree and ``usable`` is MemAvailable. The usual complaint:
  exporters and dashboards mix them up.

>>> from labkit.exercises import make
>>> ex = make("balloon_requests", "alice")
>>> _ = ex.check(ex.solve())
✓ balloon_requests (alice, seed 0): right.
"""

from __future__ import annotations

import labkit
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.exercises.core import Part, Spec, near
from labkit.units import GiB, MiB, PAGE_SIZE

BALLOON_PATH = "/machine/peripheral/balloon0"


# --- balloon_requests -------------------------------------------------------------------------------
def _requests_derive(rng) -> dict:
    memory_gib = int(rng.choice([1, 2, 4]))
    whole_mib = int(rng.integers(9, 161))
    extra_pages = int(rng.integers(1, VIRTIO_BALLOON_ARRAY_PFNS_MAX))  # a last, partial request
    pages = whole_mib * VIRTIO_BALLOON_ARRAY_PFNS_MAX + extra_pages
    return {"memory_gib": memory_gib, "value": memory_gib * GiB - pages * PAGE_SIZE,
            "after": int(rng.integers(2, 6)), "vm_seed": int(rng.integers(0, 1000))}


def _requests_run(p: dict) -> tuple[dict, dict]:
    """Inflate on the model: ``vm.step()`` runs until the driver's next request is done."""
    with labkit.open(memory=p["memory_gib"] * GiB, seed=p["vm_seed"]) as vm:
        vm.qmp("balloon", value=p["value"])
        for _ in range(p["after"]):
            vm.step()
        actual_after = vm.qmp("query-balloon")["actual"]
        while vm.step():
            pass
        return {"value_mib": p["value"] / MiB}, {"requests": vm.balloon.requests,
                                                 "actual_after": actual_after}


def _requests_hint(part, given, expected, p, facts) -> str | None:
    ram = p["memory_gib"] * GiB
    pages = (ram - p["value"]) // PAGE_SIZE
    if part == "requests":
        if given == pages:
            return ("a request is not one page: the driver puts up to VIRTIO_BALLOON_ARRAY_PFNS_MAX = "
                    "256 PFNs (1 MiB) in each (§1.2).")
        if given == pages // VIRTIO_BALLOON_ARRAY_PFNS_MAX:
            return ("count the last, partial request too: the work item re-queues itself while "
                    "diff != 0, and the pages left over after the full 256-page requests need one more "
                    "(§1.2).")
        return ("first the balloon size: num_pages = (vm_ram_size - value) >> 12 (§1.7); then each run "
                "of the driver's work item moves at most 256 of them (§1.2).")
    after = p["after"] * VIRTIO_BALLOON_ARRAY_PFNS_MAX * PAGE_SIZE
    if given == after:
        return ("that is the balloon's size; query-balloon's actual is the logical size the guest is "
                "left with: vm_ram_size minus the balloon (§1.7).")
    if given == p["value"]:
        return (f"that is where the balloon ends; after {p['after']} requests the driver has moved only "
                f"{p['after']} x 256 pages (§1.2).")
    if near(given * MiB, expected["actual_after"], 0, 0) or near(given * 1024, expected["actual_after"],
                                                                   0, 0):
        return "answer in bytes, as QMP does."
    return ("actual = vm_ram_size - 4096 x (pages in the balloon) (§1.7), and the balloon grows by 256 "
            "pages per request (§1.2).")


def _requests_explain(p: dict, facts: dict, expected: dict) -> str:
    ram = p["memory_gib"] * GiB
    pages = (ram - p["value"]) // PAGE_SIZE
    full, rest = divmod(pages, VIRTIO_BALLOON_ARRAY_PFNS_MAX)
    return (f"num_pages = ({ram} - {p['value']}) >> 12 = {pages} balloon pages (§1.7).\n"
            f"{pages} = {full} x 256 + {rest}: {full} full requests and 1 partial one = "
            f"{full + (rest > 0)} requests (§1.2). Model: {expected['requests']}.\n"
            f"After {p['after']} requests the balloon holds {p['after']} x 256 pages, so query-balloon "
            f"says actual = {ram} - {p['after']} x 256 x 4096 = "
            f"{ram - p['after'] * VIRTIO_BALLOON_ARRAY_PFNS_MAX * PAGE_SIZE} (model: "
            f"{expected['actual_after']}).")


BALLOON_REQUESTS = Spec(
    name="balloon_requests",
    title="Inflating the balloon, request by request",
    sections=("§1.2", "§1.7"),
    parts=(Part("requests", "int", "how many inflate requests the driver sends until it reaches the target"),
           Part("actual_after", "int", "what query-balloon returns as actual once the driver has "
                "finished the request given above", unit="bytes")),
    derive=_requests_derive,
    run=_requests_run,
    prompt=("A guest runs with `-m {memory_gib}G` and a virtio-balloon device; the balloon is empty. "
            "The host runs\n\n    vm.qmp(\"balloon\", value={value})    # {value_mib:.4f} MiB\n\n"
            "The guest's driver inflates toward the target: each run of its work item sends one "
            "request on the inflate queue, waits for QEMU's ack, then writes `actual`.\n\n"
            "1. How many inflate requests does it send in all?\n"
            "2. What does `vm.qmp(\"query-balloon\")[\"actual\"]` return right after request number "
            "{after}?"),
    hint=_requests_hint,
    explain=_requests_explain,
)


# --- dommemstat -------------------------------------------------------------------------------------
def _stat_derive(rng) -> dict:
    memory_gib = int(rng.choice([2, 3, 4]))
    ram_mib = memory_gib * 1024
    round16 = lambda x: int(x) // 16 * 16  # noqa: E731
    return {"memory_gib": memory_gib, "deflate_on_oom": bool(rng.integers(2)),
            "app_mib": round16(ram_mib * rng.uniform(0.10, 0.25)),
            "files_mib": round16(ram_mib * rng.uniform(0.05, 0.15)),
            "balloon_mib": round16(ram_mib * rng.uniform(0.15, 0.35)),
            "vm_seed": int(rng.integers(0, 1000))}


def _stat_run(p: dict) -> tuple[dict, dict]:
    """Boot, run an application and read files, inflate, poll the stats once."""
    ram = p["memory_gib"] * GiB
    with labkit.open(memory=ram, seed=p["vm_seed"], balloon={"deflate_on_oom": p["deflate_on_oom"]}) as vm:
        vm.guest("alloc", size=p["app_mib"] * MiB, kind="anon")
        vm.guest("alloc", size=p["files_mib"] * MiB, kind="file")
        info = vm.meminfo()
        facts = {key: info[key] / 1024 for key in ("MemTotal", "MemFree", "MemAvailable", "Cached")}
        # free pages on the per-CPU lists (/proc/zoneinfo's pcp count): not in MemFree
        facts["PerCpu"] = sum(c["count"] for z in vm.zoneinfo() for c in z["pcp"]) * PAGE_SIZE / MiB
        facts["target"] = ram - p["balloon_mib"] * MiB
        facts["deflate_on_oom_onoff"] = "on" if p["deflate_on_oom"] else "off"
        vm.qmp("balloon", value=facts["target"])
        vm.advance(3000)
        vm.qmp("qom-set", path=BALLOON_PATH, property="guest-stats-polling-interval", value=2)
        vm.advance(100)
        stats = vm.qmp("qom-get", path=BALLOON_PATH, property="guest-stats")["stats"]
        return facts, {"actual": vm.qmp("query-balloon")["actual"] / MiB,
                       "available": stats["stat-total-memory"] / MiB,
                       "usable": stats["stat-available-memory"] / MiB}


def _stat_hint(part, given, expected, p, facts) -> str | None:
    balloon = p["balloon_mib"]
    if part == "actual":
        if near(given, balloon):
            return "actual is not the balloon's size: it is the logical size, RAM minus the balloon (§1.7)."
        return "actual is what query-balloon returns: vm_ram_size - balloon, in bytes (§1.7)."
    if part == "available":
        if near(given, p["memory_gib"] * 1024) or near(given, p["memory_gib"] * 1024 - balloon):
            return ("available is the guest's MemTotal (stat-total-memory), which is smaller than -m: the "
                    "kernel reserves memory at boot (§1.5).")
        if not p["deflate_on_oom"] and near(given, facts["MemTotal"]):
            return ("without deflate-on-oom every balloon page leaves MemTotal "
                    "(adjust_managed_page_count(page, -1), §1.3).")
        if p["deflate_on_oom"] and near(given, facts["MemTotal"] - balloon):
            return "with deflate-on-oom MemTotal does not shrink: balloon pages look like used memory (§1.3)."
        return "libvirt's available is stat-total-memory, MemTotal, not free memory (§1.5)."
    if near(given, facts["MemAvailable"]):
        return ("balloon pages are allocated guest memory: MemAvailable falls by the balloon, with or "
                "without deflate-on-oom (§1.3).")
    if near(given, facts["MemAvailable"] - balloon):
        return ("the balloon's first pages come off the per-CPU lists, which were never in MemFree or "
                "MemAvailable: only the rest lowers them (mm/page_alloc.c rmqueue_pcplist).")
    if near(given, facts["MemFree"] - balloon):
        return ("usable is MemAvailable (stat-available-memory), which also counts page cache the guest "
                "could reclaim, not MemFree (§1.5).")
    return "libvirt's usable is stat-available-memory, the guest's MemAvailable (§1.5)."


def _stat_explain(p: dict, facts: dict, expected: dict) -> str:
    b = p["balloon_mib"]
    shrink = (f"MemTotal shrinks by the balloon, {facts['MemTotal']:.1f} - {b}" if not p["deflate_on_oom"]
              else "with deflate-on-oom MemTotal stays")
    return (f"actual = logical size = {p['memory_gib'] * 1024} - {b} = {p['memory_gib'] * 1024 - b} MiB "
            f"(§1.7); model {expected['actual']:.1f}.\n"
            f"available = MemTotal: {shrink} (§1.3): {expected['available']:.1f} MiB.\n"
            f"usable = MemAvailable: the balloon took {b} MiB of free memory, the first "
            f"{facts['PerCpu']:.1f} MiB off the per-CPU lists (never in MemAvailable): "
            f"{facts['MemAvailable']:.1f} - ({b} - {facts['PerCpu']:.1f}) = "
            f"{facts['MemAvailable'] - b + facts['PerCpu']:.1f} MiB (§1.5); model {expected['usable']:.1f}.")


DOMMEMSTAT = Spec(
    name="dommemstat",
    title="actual, available, usable: what virsh dommemstat shows",
    sections=("§1.3", "§1.5", "§1.7"),
    parts=(Part("actual", "float", "dommemstat's actual", unit="MiB", abs=1.0),
           Part("available", "float", "dommemstat's available", unit="MiB", abs=1.0),
           Part("usable", "float", "dommemstat's usable", unit="MiB", abs=2.0)),
    derive=_stat_derive,
    run=_stat_run,
    prompt=("A guest with `-m {memory_gib}G` and a balloon device with "
            "`deflate-on-oom={deflate_on_oom_onoff}` runs an application ({app_mib} MiB of anonymous "
            "memory) and has read {files_mib} MiB of files. Its /proc/meminfo says, in MiB:\n\n"
            "    MemTotal {MemTotal:.2f}   MemFree {MemFree:.2f}   MemAvailable {MemAvailable:.2f}   "
            "Cached {Cached:.2f}\n\n"
            "and /proc/zoneinfo counts {PerCpu:.2f} MiB of free pages on the per-CPU lists (not in "
            "MemFree).\n\n"
            "The host runs `virsh setmem` (QMP `balloon`, value={target}) and the balloon reaches its "
            "target without reclaiming anything. Stats polling is then switched on. What does "
            "`virsh dommemstat` show for actual, available and usable, in MiB? (libvirt's names map to "
            "QEMU's query-balloon and guest-stats: notebook 01_balloon, section 5.)"),
    hint=_stat_hint,
    explain=_stat_explain,
)
