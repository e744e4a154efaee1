"""virtio-mem exercise: plug and unplug requests, and what hot-plugged memory costs in memmap.

``virtio_mem_requests`` (§5.3, §5.4, §5.5, and §0 for the 128 MiB memory block): in
Sub Block Mode each 128 MiB Linux memory block has 64 subblocks of 2 MiB. Plugging prepares new
blocks one at a time, each plugged from subblock 0 with ``min(remaining, 64)`` subblocks in **one
PLUG request** before ``add_memory``. Adding a block allocates its memmap, 64 B of ``struct page``
per 4 KiB page = 2 MiB, for the whole block. Unplugging goes from the highest block down; inside an
online block the driver takes the whole block in one request when it is fully plugged and enough is
requested, else single subblocks from the top, one request each.

The guest onlines hot-plugged memory to ZONE_MOVABLE (``memhp_default_state=online_movable``), so
every unplug succeeds and the counts are exact.

>>> from labkit.exercises import make
>>> ex = make("virtio_mem_requests", "alice")
>>> ex.params["requested_mib"] % 2, ex.params["shrunk_mib"] < ex.params["requested_mib"]
(0, True)
"""

from __future__ import annotations

import math

import labkit
from labkit.devices.virtio_mem import Request
from labkit.exercises.core import Part, Spec, near
from labkit.model.hotplug import MEMMAP_PAGES_PER_BLOCK
from labkit.units import GiB, MiB, PAGE_SIZE

BLOCK_MIB = 128  # Linux memory block (guest < 64 GiB), §0
SUBBLOCK_MIB = 2  # pageblock size on x86-64, Linux >= 5.19 (§5.3)
MEMMAP_MIB_PER_BLOCK = MEMMAP_PAGES_PER_BLOCK * PAGE_SIZE // MiB


def unplug_requests(plugged_mib: int, remove_mib: int) -> int:
    """Requests to unplug ``remove_mib`` from ``plugged_mib`` (blocks filled from the bottom), by
    §5.5's rule: top block first; a fully plugged block in one request if at least a block is still
    to go, else one request per 2 MiB subblock.

    >>> unplug_requests(200, 6), unplug_requests(256, 150), unplug_requests(1000, 500)
    (3, 12, 61)
    """
    requests, left, top = 0, remove_mib, plugged_mib
    while left > 0:
        in_block = top - (math.ceil(top / BLOCK_MIB) - 1) * BLOCK_MIB  # plugged in the top block
        if in_block == BLOCK_MIB and left >= BLOCK_MIB:
            requests, take = requests + 1, BLOCK_MIB
        else:
            take = min(in_block, left)
            requests += take // SUBBLOCK_MIB
        left, top = left - take, top - take
    return requests


def _derive(rng) -> dict:
    device_gib = int(rng.choice([2, 4]))
    requested = int(rng.integers(65, 513)) * SUBBLOCK_MIB  # 130 MiB .. 1 GiB
    shrink = int(requested * rng.uniform(0.2, 0.8)) // SUBBLOCK_MIB * SUBBLOCK_MIB
    return {"memory_gib": int(rng.choice([1, 2])), "device_gib": device_gib,
            "requested_mib": requested, "shrunk_mib": requested - shrink,
            "vm_seed": int(rng.integers(0, 1000))}


def _run(p: dict) -> tuple[dict, dict]:
    """Plug ``requested_mib``, count; shrink to ``shrunk_mib``, count (model time: a few seconds)."""
    with labkit.open(memory=p["memory_gib"] * GiB, seed=p["vm_seed"], balloon=False,
                     memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": p["device_gib"] * GiB}]) as vm:
        dev = vm.virtio_mem.devices[0]
        vm.qmp("qom-set", path="vm0", property="requested-size", value=p["requested_mib"] * MiB)
        vm.advance(5000)
        plugged = vm.qmp("qom-get", path="vm0", property="size")
        memmap = sum(len(pfns) for pfns in vm.kernel.hotplug.memmap.values()) * PAGE_SIZE
        plug_requests = dev.requests[Request.PLUG]
        vm.qmp("qom-set", path="vm0", property="requested-size", value=p["shrunk_mib"] * MiB)
        vm.advance(5000)
        facts = {"plugged_mib": plugged // MiB,
                 "shrunk_plugged_mib": vm.qmp("qom-get", path="vm0", property="size") // MiB}
        return facts, {"plug_requests": plug_requests, "memmap_mib": memmap / MiB,
                       "unplug_requests": dev.requests[Request.UNPLUG]}


def _hint(part, given, expected, p, facts) -> str | None:
    r = p["requested_mib"]
    if part == "plug_requests":
        if given == r // SUBBLOCK_MIB:
            return ("plugging a new memory block is one PLUG request for all its subblocks: count = "
                    "min(remaining, 64), from subblock 0 (§5.4).")
        if given == 1:
            return "one request covers at most one memory block's 64 subblocks (128 MiB) (§5.4)."
        return "the driver prepares one 128 MiB memory block at a time, one PLUG request each (§5.4)."
    if part == "memmap_mib":
        if near(given, r / 64, 0.001, 0.01):
            return ("the memmap is allocated when a whole 128 MiB memory block is added (add_memory), "
                    "for all of it, however little of it is plugged (§5.4).")
        if near(given, expected["memmap_mib"] * 1024, 0.001, 0.01):
            return "answer in MiB, not KiB."
        return "64 B of struct page per 4 KiB page, for every added 128 MiB memory block: 2 MiB each."
    removed = r - p["shrunk_mib"]
    if given == removed // SUBBLOCK_MIB:
        return ("a fully plugged online block is unplugged with one request when at least a whole block "
                "is still to go (§5.5).")
    if given == math.ceil(removed / BLOCK_MIB):
        return ("inside a partially plugged block, and for what is left below a whole block, the driver "
                "unplugs one 2 MiB subblock per request, from the top (§5.5).")
    return ("start from the highest memory block: a partial one goes subblock by subblock, a full one in "
            "one request if at least 128 MiB is still to go (§5.5).")


def _explain(p: dict, facts: dict, expected: dict) -> str:
    r, s = p["requested_mib"], p["shrunk_mib"]
    blocks = math.ceil(r / BLOCK_MIB)
    return (f"{r} MiB fills {r // BLOCK_MIB} whole 128 MiB block(s)"
            f"{f' and {r % BLOCK_MIB} MiB of one more' if r % BLOCK_MIB else ''}: one PLUG request per "
            f"new block, {blocks} in all (§5.4; model {expected['plug_requests']}).\n"
            f"Each added block costs its whole memmap, 2 MiB: {blocks} x 2 = {blocks * 2} MiB "
            f"(model {expected['memmap_mib']:g}).\n"
            f"Unplugging {r - s} MiB from the top: partial blocks and remainders subblock by subblock, "
            f"full blocks in one request: {unplug_requests(r, r - s)} requests (§5.5; model "
            f"{expected['unplug_requests']}).")


VIRTIO_MEM_REQUESTS = Spec(
    name="virtio_mem_requests",
    title="virtio-mem: plug, memmap, unplug",
    sections=("§0", "§5.3", "§5.4", "§5.5"),
    parts=(Part("plug_requests", "int", "PLUG requests the driver sends to reach the requested size"),
           Part("memmap_mib", "float", "guest memory the memmap of the added memory takes", unit="MiB",
                abs=0.01),
           Part("unplug_requests", "int", "UNPLUG requests the driver sends to shrink")),
    derive=_derive,
    run=_run,
    prompt=("A guest with `-m {memory_gib}G` (Linux 6.x, x86-64, `memhp_default_state=online_movable`) has "
            "a virtio-mem device with a {device_gib} GiB region, nothing plugged, QEMU's default 2 MiB "
            "block size. The host runs\n\n"
            "    vm.qmp(\"qom-set\", path=\"vm0\", property=\"requested-size\",\n"
            "           value={requested_mib} * MiB)\n\n"
            "and, once the guest has plugged it all, sets `requested-size` to {shrunk_mib} MiB.\n\n"
            "1. How many PLUG requests does the guest's driver send?\n"
            "2. How much guest memory does the memmap (`struct page` array) of the added memory take, "
            "after plugging?\n"
            "3. How many UNPLUG requests does the driver send to shrink?"),
    hint=_hint,
    explain=_explain,
)
