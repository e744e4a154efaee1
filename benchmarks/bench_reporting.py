"""Free page reporting benchmark: one reporting pass over a 64 GiB guest, as a ratio to one numpy pass
over its state array (target <= 20x). A script, not a test: it prints, it asserts nothing.

    .venv/bin/python benchmarks/bench_reporting.py            # about half a minute on 2 cores
    .venv/bin/python benchmarks/bench_reporting.py --quick    # one repetition

Sections:
1. the first pass after registration of a freshly booted 64 GiB guest (mostly free, never reported):
   the zone gate, the free lists of orders 9 and 10, and budget + 1 = 33 report calls of 32 blocks at
   order 10 (~1/16 of the guest), each with QEMU's discard and the drain;
2. the same pass when the free memory is backed on the host (a 60 GiB memhog freed first), so each
   report really discards 128 MiB;
3. for information: the wall time of every pass until the guest is fully reported (~17 passes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import labkit
from labkit.model.page_reporting import PAGE_REPORTING_DELAY_MS
from labkit.model.pages import PageState

TARGET = 20.0


def numpy_pass(vm) -> float:
    """One numpy pass over the state array: count the free pages."""
    state = vm.mem.state
    times = []
    for _ in range(7):
        t = time.perf_counter()
        np.count_nonzero(state == PageState.FREE)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_pass(vm, start_ms: float) -> tuple[float, object]:
    """Wall time of the reporting pass due at ``start_ms`` (nothing else runs in that window)."""
    vm.advance(start_ms - vm.now_ms)
    passes = vm.reporting.passes
    t = time.perf_counter()
    vm.advance(500)  # the pass: 33 requests of 0.5 ms each, then nothing until the next
    wall = time.perf_counter() - t
    assert vm.reporting.passes == passes + 1
    return wall, vm.reporting.core.history[-1]


def open_guest(backed: bool):
    vm = labkit.open(backend="model", memory="64G", seed=0, balloon={"free_page_reporting": True},
                     host={"ram": "128G"})
    if backed:
        vm.guest("free", handle=vm.guest("alloc", size="60G"))
    return vm


def report_line(name: str, walls: list[float], base: float, stats) -> None:
    wall = statistics.median(walls)
    ratio = wall / base
    verdict = "ok" if ratio <= TARGET else "MISSED"
    blocks = sum(len(s) for s, _ in stats.drained)
    print(f"{name}: pass {wall * 1000:.1f} ms vs numpy pass {base * 1000:.1f} ms -> ratio "
          f"{ratio:.1f}x (target <= {TARGET:.0f}x) [{verdict}]  ({stats.report_calls} report calls, "
          f"{blocks} blocks, {stats.reported_pages * 4096 / (1 << 30):.2f} GiB reported)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition")
    repeat = 1 if parser.parse_args().quick else 3

    for backed, name in ((False, "64 GiB guest, never-touched free memory, first pass"),
                         (True, "64 GiB guest, 60 GiB freed (backed), first pass")):
        walls, base = [], []
        for _ in range(repeat):
            vm = open_guest(backed)
            base.append(numpy_pass(vm))
            start = PAGE_REPORTING_DELAY_MS if not backed else vm.now_ms + PAGE_REPORTING_DELAY_MS
            wall, stats = one_pass(vm, start)
            walls.append(wall)
            vm.close()
        report_line(name, walls, statistics.median(base), stats)

    vm = open_guest(False)
    walls, start = [], float(PAGE_REPORTING_DELAY_MS)
    while True:
        wall, stats = one_pass(vm, start)
        walls.append(wall)
        if not stats.requested_at_end:
            break
        start = stats.end_ms + PAGE_REPORTING_DELAY_MS
    print(f"full reporting of the idle 64 GiB guest: {len(walls)} passes over "
          f"{stats.end_ms / 1000:.1f} s simulated, {sum(walls) * 1000:.0f} ms wall "
          f"(per pass: median {statistics.median(walls) * 1000:.1f} ms, max {max(walls) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
