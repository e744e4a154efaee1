"""virtio-mem benchmark: plug and then unplug 64 GiB in 2 MiB blocks on a device with a 1 TiB region,
against one numpy pass over that region's state array. A script, not a test: it prints ratios and
asserts nothing.

    .venv/bin/python benchmarks/bench_virtio_mem.py              # ~20 s on 2 cores, 3 cycles
    .venv/bin/python benchmarks/bench_virtio_mem.py --profile    # plus the top functions of each

What is timed (wall and CPU seconds of this process): ``qom-set requested-size`` then
``vm.advance`` in 1 s steps until ``qom-get size`` reaches the target, on
``labkit.open(memory="4G", virtio_mem=[{"id": "vm0", "size": "1T"}],
memhp_default_state="online_movable", host={"ram": "2T"})`` (creation is timed apart). Plugging 64
GiB is 512 memory blocks: per block one PLUG request of 64 subblocks, ``add_memory`` (2 MiB of memmap
from ZONE_NORMAL), onlining to ZONE_MOVABLE (32768 pages to the buddy allocator). Unplugging is, per
block, ``alloc_contig_range`` (isolate the free pages; nothing to migrate here), one UNPLUG request
of the whole block, the host discard, ``offline_and_remove_memory``. Targets: at most 1 s wall each.
The reference is ``np.count_nonzero(state[region] == ABSENT)``: one pass over 256 Mi pages.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

import labkit
from labkit.model.pages import PageState
from labkit.units import GiB, format_size

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_foundation import line, machine_info, median_time  # noqa: E402

TARGET_S = 1.0
SIZE = 64 * GiB
OPEN = {"memory": "4G", "virtio_mem": [{"id": "vm0", "size": "1T"}],
        "memhp_default_state": "online_movable", "host": {"ram": "2T"}}


def resize(vm, value: int, profile: bool) -> tuple[float, float, float]:
    """Set requested-size and advance until size matches; returns (cpu s, wall s, simulated ms)."""
    prof = cProfile.Profile() if profile else None
    t0_sim = vm.now_ms
    c, t = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    vm.qmp("qom-set", path="vm0", property="requested-size", value=value)
    while vm.qmp("qom-get", path="vm0", property="size") != value:
        vm.advance(1000)
    vm.advance(10)  # the last block's add_memory / removal follows its request
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print("\n".join("    " + row for row in out.getvalue().splitlines()[6:24] if row.strip()))
    return cpu, wall, vm.now_ms - t0_sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print the top functions of each")
    parser.add_argument("--repeat", type=int, default=3, help="plug/unplug cycles (the fastest counts)")
    args = parser.parse_args()
    machine_info()
    t = time.perf_counter()
    vm = labkit.open(**OPEN)
    print(f"open (4 GiB boot + 1 TiB region, {vm.mem.n_pages:,} pages): "
          f"{time.perf_counter() - t:.2f} s wall")
    region = vm.regions[0]
    state = vm.mem.state[region.start:region.end]
    ref_cpu, ref_wall = median_time(lambda: np.count_nonzero(state == PageState.ABSENT), 5)
    print(f"reference: one numpy pass over the region's {len(state):,} page states: "
          f"{ref_cpu * 1000:.0f} ms CPU, {ref_wall * 1000:.0f} ms wall")
    drv = vm.virtio_mem.drivers[0]
    results: dict[str, list[tuple[float, float, float, int]]] = {"plug": [], "unplug": []}
    for _ in range(args.repeat):  # plug/unplug cycles on the same VM; the fastest one is reported
        for name, value in (("plug", SIZE), ("unplug", 0)):
            requests = sum(drv.device.requests.values())
            cpu, wall, sim = resize(vm, value, args.profile)
            results[name].append((cpu, wall, sim, sum(drv.device.requests.values()) - requests))
    blocks = SIZE // (128 << 20)
    for name, runs in results.items():
        cpu, wall, sim, requests = min(runs)
        walls = ", ".join(f"{w:.2f}" for _, w, _, _ in runs)
        line(f"{name} {format_size(SIZE)} ({blocks} blocks of 64 x 2 MiB)", f"{wall:.2f} s wall",
             f"<= {TARGET_S:.0f} s", wall / TARGET_S, wall <= TARGET_S,
             f"{cpu:.2f} s CPU = {cpu / ref_cpu:.1f}x the numpy pass, {cpu / blocks * 1000:.2f} ms "
             f"CPU a block; {requests} requests, {sim:.0f} simulated ms; walls of all runs: {walls}")
    print(f"MemTotal at the end: {format_size(vm.meminfo()['MemTotal'] * 1024)}; "
          f"plugged {format_size(vm.qmp('qom-get', path='vm0', property='size'))}")
    vm.close()


if __name__ == "__main__":
    main()
