"""Overcommit benchmark: 8 VMs x 8 GiB on one host for one simulated hour at 1 s steps, per policy.

A script, not a test: it prints wall time, the ratio to the 30 s target and simulated seconds per
wall second, and (``--profile``) the functions where the time goes. Target: <= 30 s wall per run.

    .venv/bin/python benchmarks/bench_overcommit.py                      # none, mom, reporting, both
    .venv/bin/python benchmarks/bench_overcommit.py --policies mom --profile --sort cumulative
    .venv/bin/python benchmarks/bench_overcommit.py --quick              # 10 simulated minutes

The VMs replay the shipped GWA-T-12-format traces (VM i plays trace i mod 4) at real speed; the host
has 24 GiB of RAM for 64 GiB of guests, and 64 GiB of swap.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import time

from labkit.scenarios.overcommit import POLICIES, OvercommitParams, run_overcommit
from labkit.units import GiB, MiB

TARGET_S = 30.0


def params(policy: str, duration_s: float) -> OvercommitParams:
    return OvercommitParams(n_vms=8, vm_memory=8 * GiB, host_ram=24 * GiB, host_swap=64 * GiB,
                            policy=policy, workload="trace", duration_s=duration_s, step_s=1.0,
                            sample_s=1.0, seed=0)


def bench(policy: str, duration_s: float, profile: bool, top: int, sort: str = "tottime") -> None:
    p = params(policy, duration_s)
    profiler = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    run = run_overcommit(p)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    target = TARGET_S * duration_s / 3600
    s = run.summary
    print(f"{policy:>14}: {wall:6.1f} s wall for {duration_s:.0f} simulated s x 8 VMs "
          f"(target {target:.0f} s) -> ratio {wall / target:.2f} of target, "
          f"{duration_s / wall:.0f} simulated s per wall s, {cpu:.1f} s CPU  "
          f"[{'ok' if wall <= target else 'MISSED'}]")
    print(f"{'':>16}swap out {s['swap_out_bytes'] / MiB:.0f} MiB, "
          f"swap in {s['swap_in_bytes'] / MiB:.0f} MiB, "
          f"stall {s['stall_s']:.2f} s, peak RSS {s['peak_host_rss'] / GiB:.2f} GiB, "
          f"returned {s['returned_bytes'] / MiB:.0f} MiB (balloon {s['returned_balloon_bytes'] / MiB:.0f}, "
          f"reporting {s['returned_reporting_bytes'] / MiB:.0f}), under pressure {s['pressure_s']:.0f} s")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(top)
        print(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["none", "mom", "reporting", "reporting+mom"],
                        choices=POLICIES)
    parser.add_argument("--quick", action="store_true", help="10 simulated minutes instead of an hour")
    parser.add_argument("--profile", action="store_true", help="cProfile each run, print the top functions")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (CPU time is less sensitive to load); "
          f"8 VMs x 8 GiB, host 24 GiB RAM + 64 GiB swap, 1 s steps")
    for policy in args.policies:
        bench(policy, 600.0 if args.quick else 3600.0, args.profile, args.top, args.sort)


if __name__ == "__main__":
    main()
