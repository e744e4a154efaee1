"""What the regression notebooks measure: one function per notebook, each returning a flat dict of
numbers (the metrics the fact checks of :mod:`labkit.regress.facts` test).

Every metric is chosen so that the fact it is held against does not depend on the guest's size or
on the guest kernel's defaults (zones, watermarks, per-CPU lists move; the facts do not): ratios
(pages per request, MemTotal drop per balloon byte), cadences (2 s between reporting passes),
granularities (2 MiB), and the published experiments run in their published shape (8 GB for
hinting, 32 GB for reporting), plus figures measured on a real guest (``data/recorded/``).
Only public calls are used (``qmp``, ``guest``, ``advance``, ``sample``, ``meminfo``, ``events``),
except the OOM-event counter, which only the model has.
"""

from __future__ import annotations

import numpy as np

import labkit
from labkit.units import GiB, MiB, PAGE_SIZE, parse_size


def _rss_drops(vm, total_ms: float, every_ms: float = 50.0) -> tuple[list[float], list[int]]:
    """Times (ms since now) and sizes (bytes) of every fall of host RSS, sampled every ``every_ms``."""
    t0, last = vm.sample()["t_ms"], vm.sample()["host_rss"]
    times, sizes = [], []
    for _ in range(int(total_ms // every_ms)):
        vm.advance(every_ms)
        s = vm.sample()
        if s["host_rss"] < last:
            times.append(s["t_ms"] - t0)
            sizes.append(int(last - s["host_rss"]))
        last = s["host_rss"]
    return times, sizes


def balloon(memory: str = "2G", seed: int = 0) -> dict[str, float]:
    """virtio-balloon: request size, MemTotal with and without deflate-on-oom, OOM deflate, the
    BALLOON_CHANGE throttle, discard disabled, and the recorded real guest's MemTotal drop."""
    from labkit.scenarios import guest_demand

    ram = parse_size(memory, name="memory")
    m: dict[str, float] = {}
    with labkit.open(memory=memory, seed=seed) as vm:
        before = vm.sample()
        vm.qmp("balloon", value=ram - 64 * MiB)
        vm.advance(3000)
        m["pages_per_request"] = (64 * MiB // PAGE_SIZE) / vm.balloon.requests
        m["actual_reached_target"] = float(vm.qmp("query-balloon")["actual"] == ram - 64 * MiB)
        m["memtotal_drop_per_balloon_byte"] = (before["memtotal"] - vm.sample()["memtotal"]) / (64 * MiB)
    with labkit.open(memory=memory, seed=seed, balloon={"deflate_on_oom": True}) as vm:
        before = vm.sample()
        vm.qmp("balloon", value=ram - 64 * MiB)
        vm.advance(3000)
        m["doo_memtotal_drop_bytes"] = float(before["memtotal"] - vm.sample()["memtotal"])
        target = guest_demand(vm) + 32 * MiB
        vm.qmp("balloon", value=target)
        vm.advance(3000)
        size = vm.sample()["balloon_size"]
        vm.guest("alloc", size="128M", kind="anon")
        events = vm.kernel.vmstat.oom_events  # the model's count of out_of_memory() calls
        m["oom_events"] = float(events)
        m["oom_pages_per_event"] = (size - vm.sample()["balloon_size"]) / PAGE_SIZE / max(events, 1)
        m["oom_kills_with_doo"] = float(vm.sample()["oom_kills"])
    with labkit.open(memory=memory, seed=seed, model={"balloon_request_ms": 5.0}) as vm:
        vm.qmp("balloon", value=ram - min(GiB, ram // 2))
        delivered, seen = [], 0
        for _ in range(160):  # 8 s, polled every 50 ms
            vm.advance(50)
            if len(vm.events()) > seen:
                delivered.append(vm.sample()["t_ms"])
                seen = len(vm.events())
        gaps = np.diff(delivered)
        m["balloon_change_events"] = float(seen)
        m["balloon_change_min_gap_ms"] = float(gaps.min()) if len(gaps) else float("nan")
    with labkit.open(memory=memory, seed=seed, host={"discard": False}) as vm:
        job = vm.guest("alloc", size=ram // 4, kind="anon")
        vm.guest("free", handle=job)
        vm.qmp("balloon", value=ram // 2)
        # what host RSS gave back, fall by fall: with init_on_alloc the guest zeroes every page it
        # inflates, so RSS may grow (docs/mechanisms.md §10.4) but it never falls
        _, falls = _rss_drops(vm, 2000)
        m["discard_off_balloon_bytes"] = float(vm.sample()["balloon_size"])
        m["discard_off_returned_bytes"] = float(sum(falls))
    m.update(_recorded_balloon())
    return m


def _demo_rows(name: str) -> tuple[list[dict], list[dict]]:
    """The rows of demo ``name`` replayed from its recording of a real guest, and run on the model."""
    from labkit.backends.qemu.demos import model_options, open_demo, run_demo

    vm, _ = open_demo(name, "replay")
    with vm:
        live = run_demo(name, vm)
    with labkit.open(backend="model", **model_options(name)) as model_vm:
        return live, run_demo(name, model_vm)


def _recorded_balloon() -> dict[str, float]:
    live, model = _demo_rows("balloon")
    real = live[0]["memtotal"] - live[1]["memtotal"]
    return {"recorded_memtotal_drop_mib": real / MiB,
            "model_vs_recorded_memtotal_drop": (model[0]["memtotal"] - model[1]["memtotal"]) / real}


def reporting(memory: str = "2G", seed: int = 0, published_memory: str = "32G") -> dict[str, float]:
    """Free page reporting: when passes run, what size they report, Duyck's 32 GB memhog shape,
    the overhead on a memory-intensive workload, and the recorded real guest."""
    ram = parse_size(memory, name="memory")
    m: dict[str, float] = {}
    with labkit.open(memory=memory, seed=seed, balloon={"free_page_reporting": True},
                     host={"ram": 2 * ram}) as vm:
        vm.advance(10_000)  # the boot-time passes are over
        job = vm.guest("alloc", size=ram // 2, kind="anon")
        vm.advance(3000)  # the job runs; the passes its allocation caused are over
        vm.guest("free", handle=job)
        times, sizes = _rss_drops(vm, 40_000)
    m["first_report_after_ms"] = times[0] if times else float("nan")
    m["report_interval_ms"] = float(np.median(np.diff(times))) if len(times) > 1 else float("nan")
    m["returned_share_of_job"] = sum(sizes) / (ram // 2)
    big = parse_size(published_memory, name="published_memory")
    with labkit.open(memory=big, seed=seed, balloon={"free_page_reporting": True},
                     host={"ram": 2 * big}) as vm:
        vm.advance(10_000)
        base = vm.sample()["host_rss"]
        hog = vm.guest("alloc", size=big - 2 * GiB, kind="anon")  # memhog: as much as fits
        vm.guest("free", handle=hog)
        peak = vm.sample()["host_rss"]
        times, sizes = _rss_drops(vm, 60_000, every_ms=500.0)
    returned = sum(sizes)
    m["published_returned_gib"] = returned / GiB
    m["published_returned_share"] = returned / (peak - base)
    done = np.cumsum(sizes) >= 0.95 * returned
    m["published_settle_s"] = times[int(np.argmax(done))] / 1000 if len(times) else float("nan")
    m["overhead_percent"] = _overhead(seed)
    m.update(_recorded_reporting())
    return m


def _overhead(seed: int) -> float:
    from labkit.scenarios.overcommit import OvercommitParams, compare_policies, reporting_overhead

    loop = OvercommitParams(n_vms=1, vm_memory="768M", host_ram="4G", workload="memory-intensive",
                            duration_s=60, chunk="32M", seed=seed)
    pair = compare_policies(loop, ("none", "reporting"))
    return 100 * reporting_overhead(pair["none"], pair["reporting"])["overhead"]


def _recorded_reporting() -> dict[str, float]:
    live, model = _demo_rows("reporting")
    real = max(r["host_rss"] for r in live) - live[-1]["host_rss"]
    mod = max(r["host_rss"] for r in model) - model[-1]["host_rss"]
    return {"recorded_returned_mib": real / MiB, "model_vs_recorded_returned": mod / real}


def hinting(seed: int = 0, published_memory: str = "8G") -> dict[str, float]:
    """Free page hinting in Wei Wang's published setup (8 GB, bandwidth unlimited, downtime limit
    2 s): migration time without and with hinting, idle and during a kernel build."""
    from labkit.scenarios.migration import hinting_anchor, migration_compare, migration_table

    m: dict[str, float] = {}
    for workload, tag in (("idle", "idle"), ("kernel-build", "build")):
        rows = migration_table(migration_compare(hinting_anchor(
            workload, memory=published_memory, seed=seed, policies=("plain", "hinting"),
            prepare_ms=3000)))
        plain, hinted = (float(v) for v in rows["total_time_ms"])
        m[f"{tag}_plain_ms"], m[f"{tag}_hinting_ms"] = plain, hinted
        m[f"{tag}_reduction"] = 1 - hinted / plain
        m[f"{tag}_downtime_max_ms"] = float(np.nanmax(rows["downtime_ms"]))
    m["idle_gains_more_than_build"] = float(m["idle_reduction"] > m["build_reduction"])
    return m


def virtio_mem(memory: str = "1G", seed: int = 0, device_size: str = "2G") -> dict[str, float]:
    """virtio-mem: the default block size, plugging exactly what is requested, and unplugging all of
    it again when the memory was onlined to ZONE_MOVABLE."""
    region = parse_size(device_size, name="device_size")
    m: dict[str, float] = {}
    with labkit.open(memory=memory, seed=seed, balloon=False, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": region, "requested_size": 0}]) as vm:
        block = vm.qmp("qom-get", path="vm0", property="block-size")
        m["block_size_mib"] = block / MiB
        memtotal = vm.meminfo()["MemTotal"] * 1024
        vm.qmp("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        vm.advance(5000)
        plugged = vm.qmp("qom-get", path="vm0", property="size")
        m["plugged_share_of_requested"] = plugged / (256 * MiB)
        m["plugged_bytes_mod_block"] = float(plugged % block)
        m["memtotal_gain_share_of_plugged"] = (vm.meminfo()["MemTotal"] * 1024 - memtotal) / plugged
        vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
        vm.advance(10_000)
        m["movable_left_plugged_bytes"] = float(vm.qmp("qom-get", path="vm0", property="size"))
    return m
