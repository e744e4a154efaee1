"""Migration benchmark: a 64 GiB idle guest live-migrated under each policy (target <= 2 s wall per
migration). A script, not a test: it prints, it asserts nothing.

    .venv/bin/python benchmarks/bench_migration.py            # about half a minute on 2 cores
    .venv/bin/python benchmarks/bench_migration.py --quick    # plain and hinting only

For each policy a fresh 64 GiB guest boots (not timed), the policy prepares it (timed apart: the
balloon inflates down to what the guest uses plus 512 MiB; reporting gets 30 s of simulated time
to discard free memory), then ``migrate`` runs with the published hinting setup (no rate limit, a
10 Gbit/s simulated link, 2 s downtime limit) and ``vm.advance`` is called in 100 ms steps until
``query-migrate`` says completed. The timed part is that loop: the whole pre-copy of 16 Mi pages
(setup, bitmap syncs, every ram_save_iterate step, zero-page detection, the stop-and-copy) and, for
hinting, the guest's rounds of order-10 allocations and QEMU's bitmap clearing, plus the DONE that
gives the blocks back. Each line prints CPU time of this process and wall time (on a shared 2-core
machine wall time stretches with the load average, printed first), the simulated migration time,
downtime and bytes sent, and ratios to the plain migration.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import labkit
from labkit.scenarios.migration import POLICIES, hinting_anchor
from labkit.units import format_size

GiB = 1 << 30
MiB = 1 << 20
TARGET_S = 2.0
REPORTING_PREPARE_MS = 30_000
BALLOON_SETTLE_S = 60


def migrate(policy: str) -> dict:
    params = hinting_anchor("idle", memory=64 * GiB).checked()
    pol = POLICIES[policy]
    with labkit.open(memory=params.memory, seed=params.seed, balloon=dict(pol.balloon)) as vm:
        t = time.perf_counter()
        if pol.prepare is not None:
            pol.prepare(vm, params)
            for _ in range(BALLOON_SETTLE_S):  # until the driver is idle (or out of puff)
                if vm.balloon is None or vm.balloon.idle:
                    break
                vm.advance(1000)
        vm.advance(REPORTING_PREPARE_MS if policy == "reporting" else 100)
        prepare_wall = time.perf_counter() - t
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": params.bandwidth,
                                            "downtime-limit": params.downtime_limit_ms})
        cpu, wall = time.process_time(), time.perf_counter()
        vm.qmp("migrate", uri=params.uri)
        while vm.qmp("query-migrate")["status"] != "completed":
            vm.advance(100)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        info = vm.qmp("query-migrate")
        return {"policy": policy, "cpu": cpu, "wall": wall, "prepare_wall": prepare_wall,
                "total_ms": info["total-time"], "downtime_ms": info["downtime"],
                "sent": info["ram"]["transferred"], "zero": info["ram"]["duplicate"],
                "normal": info["ram"]["normal"], "syncs": info["ram"]["dirty-sync-count"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plain and hinting only")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print("64 GiB idle guest, max-bandwidth 0 (10 Gbit/s link), downtime-limit 2000 ms")
    policies = ("plain", "hinting") if args.quick else tuple(POLICIES)
    plain = None
    for policy in policies:
        r = migrate(policy)
        plain = plain or r
        ok = r["wall"] <= TARGET_S
        print(f"{r['policy']}: measured {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU (target <= "
              f"{TARGET_S:.0f} s wall) [{'ok' if ok else 'MISSED'}]  prepare {r['prepare_wall']:.2f} s wall")
        print(f"    simulated: migration {r['total_ms']} ms, downtime {r['downtime_ms']} ms, sent "
              f"{format_size(r['sent'])}, {r['normal']} normal + {r['zero']} zero pages, "
              f"{r['syncs']} bitmap syncs")
        print(f"    ratios to plain: simulated time {r['total_ms'] / plain['total_ms']:.3f}, "
              f"bytes {r['sent'] / plain['sent']:.3f}, wall {r['wall'] / plain['wall']:.2f}, "
              f"CPU {r['cpu'] / plain['cpu']:.2f}", flush=True)


if __name__ == "__main__":
    main()
