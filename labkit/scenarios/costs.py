"""What the mechanisms cost: the talk's "overhead" claims as numbers, each labelled by where it comes from.

Every number this module returns carries one of three labels (:data:`PUBLISHED`, :data:`MODELLED`,
:data:`MEASURED`), and the printed tables say which is which:

* **published**: Duyck's free page reporting v17 series (32 GB guest, will-it-scale ``page_fault1``
  with THP): 1 task 1,012,402 vs 1,010,228 with reporting (-0.21 %), 16 tasks 8,827,457 vs 8,756,219
  (-0.81 %) (docs/anchors.md). :func:`published_reporting_overhead`.
* **modelled**: :func:`reporting_overhead` runs the same workload twice on the model, without and with
  free page reporting, and prices what reporting added: host zero-fill faults on pages a report had
  taken away (``REFAULT_US`` = 2 us each, labkit.devices.free_page_reporting) and report requests
  (``request_ms`` = 0.5 ms each, assumed), against the workload's own time at ``GUEST_FAULT_US`` (1 us a
  page: ``page_fault1`` does about a million 4 KiB faults a second per task). Two workloads:
  ``"page_fault1"`` re-uses its memory at once (what Duyck measured: reporting only sees memory that
  stays free for its 2 s delay, so it costs little) and ``"memhog"`` frees a large share of the guest,
  waits past the delay and takes it back (reported pages are faulted in again on the host: the talk's
  "1-2 % in memory-intensive workloads"). :func:`write_tracking_cost` prices the dirty-page tracking a
  migration (and therefore free page hinting, which only runs inside one) needs: a write-protect fault on
  the first write to a page after each bitmap sync, ``WRITE_PROTECT_FAULT_US`` (1.5 us, assumed: an EPT
  write-protection exit and KVM's dirty-log update; Intel PML batches them and costs less).
* **measured**: :func:`resize_speed` times the balloon's inflate/deflate against virtio-mem's
  unplug/plug of the same size, on the model (simulated ms) or on a live QEMU guest (wall ms).
  ``python -m labkit.scenarios.costs --record`` measures it on this machine's QEMU and writes
  ``data/recorded/resize_speed.json``; :func:`recorded_resize_speed` reads it back.

>>> published_reporting_overhead()["page_fault1, 16 tasks"]["overhead"] < 0.01
True
>>> cost = reporting_overhead(ReportingCostParams(workload="page_fault1", duration_s=8))
>>> cost["label"], cost["overhead"] < 0.01
('modelled', True)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import labkit
from labkit.devices.free_page_reporting import REFAULT_US
from labkit.units import GiB, MiB, PAGE_SIZE, format_size, parse_size

PUBLISHED, MODELLED, MEASURED = "published", "modelled", "measured"
GUEST_FAULT_US = 1.0  # page_fault1: ~1,000,000 4 KiB faults/s per task (docs/anchors.md)
WRITE_PROTECT_FAULT_US = 1.5  # assumed: one EPT write-protect exit + dirty-log update (not sourced)
# Duyck, free page reporting v17 (docs/anchors.md): will-it-scale page_fault1 with THP, 32 GB guest
DUYCK_V17 = {"page_fault1, 1 task": (1_012_402, 1_010_228),
             "page_fault1, 16 tasks": (8_827_457, 8_756_219)}
RECORDED_RESIZE = Path(__file__).resolve().parents[2] / "data" / "recorded" / "resize_speed.json"
WORKLOADS = ("page_fault1", "memhog")


def published_reporting_overhead() -> dict[str, dict[str, Any]]:
    """Duyck's v17 figures: operations without and with reporting, and the share lost to it."""
    return {case: {"baseline": base, "with_reporting": rep, "overhead": 1.0 - rep / base,
                   "label": PUBLISHED} for case, (base, rep) in DUYCK_V17.items()}


@dataclass(frozen=True)
class ReportingCostParams:
    """A memory-intensive workload on one guest of ``memory``, run for ``duration_s``.

    ``page_fault1``: ``tasks`` tasks each hold ``chunk`` of anonymous memory, free it and take it
    again at once, every ``period_ms`` (will-it-scale's mmap/touch/munmap loop, scaled to the guest).
    ``memhog``: take ``share`` of the guest's free memory, hold it ``period_ms``, free it, leave it free
    ``period_ms`` (longer than reporting's 2 s delay), repeat.
    """

    workload: str = "page_fault1"
    memory: int | str = 2 * GiB
    tasks: int = 1
    chunk: int | str = 8 * MiB  # 128 MiB per task on a 32 GB guest, scaled to 2 GiB
    share: float = 0.75
    period_ms: float = 100.0
    duration_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload {self.workload!r} is not one of {list(WORKLOADS)}")
        object.__setattr__(self, "memory", parse_size(self.memory, name="memory"))
        object.__setattr__(self, "chunk", parse_size(self.chunk, name="chunk"))
        if not isinstance(self.tasks, int) or not 1 <= self.tasks <= 64:
            raise ValueError(f"tasks must be an int from 1 to 64, got {self.tasks!r}")
        if self.tasks * self.chunk > self.memory // 2:
            raise ValueError(f"tasks x chunk ({format_size(self.tasks * self.chunk)}) must fit in half "
                             f"of memory ({format_size(self.memory)})")
        if not 0 < self.share < 0.9:
            raise ValueError(f"share must be in (0, 0.9), got {self.share!r}")
        if not self.period_ms > 0 or not self.duration_s > 0:
            raise ValueError(f"period_ms and duration_s must be > 0, got {self.period_ms!r}, "
                             f"{self.duration_s!r}")


def _run_workload(p: ReportingCostParams, reporting: bool) -> dict[str, float]:
    """Run the workload on a fresh VM; the counters of the run (from ``vm.sample()``)."""
    balloon = {"free_page_reporting": True} if reporting else {}
    with labkit.open(memory=p.memory, seed=p.seed, balloon=balloon) as vm:
        vm.advance(3000)  # boot: reporting's first passes over the boot-time free memory
        start = vm.sample()
        rss0 = start["host_rss"]
        allocated = 0
        end_ms = start["t_ms"] + p.duration_s * 1000.0
        if p.workload == "page_fault1":
            handles = [vm.guest("alloc", size=p.chunk, kind="anon") for _ in range(p.tasks)]
            allocated += p.tasks * p.chunk
            while vm.sample()["t_ms"] < end_ms:
                vm.advance(p.period_ms)
                for i, handle in enumerate(handles):  # munmap, then mmap + touch again at once
                    vm.guest("free", handle=handle)
                    handles[i] = vm.guest("alloc", size=p.chunk, kind="anon")
                allocated += p.tasks * p.chunk
        else:
            while vm.sample()["t_ms"] < end_ms:
                size = int(vm.meminfo()["MemFree"] * 1024 * p.share) // MiB * MiB
                handle = vm.guest("alloc", size=size, kind="anon")
                allocated += size
                vm.advance(p.period_ms)
                vm.guest("free", handle=handle)
                vm.advance(p.period_ms)
        end = vm.sample()
        return {"zero_fill_bytes": float(max(0.0, end["host_rss"] - rss0)),
                "refaulted_bytes": end.get("reporting_refaulted_bytes", 0.0)
                - start.get("reporting_refaulted_bytes", 0.0),
                "reports": end.get("reporting_reports", 0.0) - start.get("reporting_reports", 0.0),
                "discarded_bytes": end.get("reporting_discarded_bytes", 0.0)
                - start.get("reporting_discarded_bytes", 0.0),
                "allocated_bytes": float(allocated), "host_rss_end": end["host_rss"]}


def reporting_overhead(params: ReportingCostParams | None = None, *, refault_us: float = REFAULT_US,
                       request_ms: float = 0.5, guest_fault_us: float = GUEST_FAULT_US) -> dict[str, Any]:
    """What free page reporting added to the workload of ``params`` (modelled, see the module).

    ``overhead`` = (refaulted pages x ``refault_us`` + report requests x ``request_ms``) / the workload's
    own time: ``page_fault1`` is CPU-bound (will-it-scale counts loops of a task that does nothing but
    fault), so its own time is ``tasks x duration_s`` (the model's loop has its memory pattern, not its
    rate); ``memhog``'s is the pages it allocated x ``guest_fault_us``. Not modelled: zone-lock
    contention between the reporting worker and many faulting tasks, which is the likeliest reason
    Duyck's 16-task loss (0.81 %) is four times his 1-task loss (0.21 %).
    """
    p = params or ReportingCostParams()
    without, with_reporting = _run_workload(p, False), _run_workload(p, True)
    refaulted_pages = with_reporting["refaulted_bytes"] / PAGE_SIZE
    extra_s = refaulted_pages * refault_us / 1e6
    report_s = with_reporting["reports"] * request_ms / 1e3
    if p.workload == "page_fault1":  # CPU-bound: every task faults all the time (the loop is scaled)
        own_s = p.tasks * p.duration_s
    else:  # memhog's own work: faulting in what it takes
        own_s = with_reporting["allocated_bytes"] / PAGE_SIZE * guest_fault_us / 1e6
    return {"label": MODELLED, "workload": p.workload, "tasks": p.tasks,
            "refaulted_pages": refaulted_pages, "reports": with_reporting["reports"],
            "returned_bytes": with_reporting["discarded_bytes"],
            "host_rss_without": without["host_rss_end"], "host_rss_with": with_reporting["host_rss_end"],
            "extra_s": extra_s, "report_s": report_s, "own_s": own_s,
            "overhead": (extra_s + report_s) / own_s, "params": asdict(p)}


def write_tracking_cost(run: Any, *, write_fault_us: float = WRITE_PROTECT_FAULT_US) -> dict[str, Any]:
    """The write-tracking a migration needs, priced (modelled): one write-protect fault for every page
    sent again after the first pass (a page is resent only because a write dirtied it after a sync).
    ``run``: a :class:`~labkit.scenarios.migration.MigrationRun`. ``share`` is that time over the
    migration's duration (one vCPU's worth)."""
    s = run.summary
    memory = run.params.memory if run.params is not None else np.nan
    first_pass = memory / PAGE_SIZE
    sent = s["normal_pages"] + s["zero_pages"]
    rewritten = max(0.0, sent - first_pass)
    seconds = rewritten * write_fault_us / 1e6
    duration_s = (s["total_time_ms"] if np.isfinite(s["total_time_ms"]) else s["elapsed_ms"]) / 1e3
    return {"label": MODELLED, "rewritten_pages": rewritten, "tracking_s": seconds,
            "share": seconds / duration_s if duration_s > 0 else np.nan, "hinted_max": s["hinted_max"]}


# --- virtio-mem vs the balloon: speed ------------------------------------------------------------
def _wait(vm: Any, read, target: int, limit_ms: float, poll_ms: float) -> float:
    """Advance ``poll_ms`` at a time until ``read() == target``; the backend's ms it took (NaN past
    ``limit_ms``)."""
    t0 = vm.now_ms
    while read() != target:
        if vm.now_ms - t0 > limit_ms:
            return float("nan")
        vm.advance(poll_ms)
    return float(vm.now_ms - t0)


def resize_speed(backend: str = "model", *, boot: int | str = 512 * MiB, size: int | str = 256 * MiB,
                 used: int | str | None = None, poll_ms: float = 20.0,
                 limit_ms: float = 60_000.0) -> dict[str, Any]:
    """Remove and give back ``size`` with the balloon (inflate, deflate) and with virtio-mem (unplug,
    plug into ZONE_MOVABLE), each on a fresh VM; the time until QEMU's view reached the target
    (``query-balloon`` actual, ``qom-get size``), in the backend's ms (simulated on the model, wall on
    a live guest, so a live result is ``measured``).

    Then the same removal again with ``used`` bytes of the guest's data in memory (``*_used_ms``):
    the balloon takes free pages around the data; virtio-mem's plugged blocks hold the data
    (movable allocations fill ZONE_MOVABLE first), so ``alloc_contig_range`` must migrate every used
    page out before a block can go (§5.5). ``used`` defaults to three quarters of ``size``; 0 skips it."""
    boot, size = parse_size(boot, name="boot"), parse_size(size, name="size")
    used = size * 3 // 4 if used is None else parse_size(used, name="used")
    if used >= size:
        raise ValueError(f"used ({format_size(used)}) must be smaller than size ({format_size(size)}): the "
                         f"data must fit in the device's memory and leave the guest room to take it")
    out: dict[str, Any] = {"label": MEASURED if backend != "model" else MODELLED, "backend": backend,
                           "boot": boot, "size": size, "used": used, "poll_ms": poll_ms}
    with labkit.open(backend=backend, memory=boot + size, seed=0, balloon={}) as vm:
        actual = lambda: int(vm.qmp("query-balloon")["actual"])  # noqa: E731
        vm.qmp("balloon", value=boot)
        out["balloon_inflate_ms"] = _wait(vm, actual, boot, limit_ms, poll_ms)
        vm.qmp("balloon", value=boot + size)
        out["balloon_deflate_ms"] = _wait(vm, actual, boot + size, limit_ms, poll_ms)
        if used:
            vm.guest("alloc", size=used)
            vm.qmp("balloon", value=boot)
            out["balloon_inflate_used_ms"] = _wait(vm, actual, boot, limit_ms, poll_ms)
        out["accel"] = getattr(vm, "accel", None)  # live: kvm or tcg (the model has none)
    with labkit.open(backend=backend, memory=boot, seed=0, balloon=False,
                     memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": 2 * size, "requested_size": 0}]) as vm:
        plugged = lambda: int(vm.qmp("qom-get", path="vm0", property="size"))  # noqa: E731
        vm.qmp("qom-set", path="vm0", property="requested-size", value=size)
        out["virtio_mem_plug_ms"] = _wait(vm, plugged, size, limit_ms, poll_ms)
        vm.advance(1000)  # the last memory block is added and onlined after its PLUG is acked
        vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
        out["virtio_mem_unplug_ms"] = _wait(vm, plugged, 0, limit_ms, poll_ms)
        out["virtio_mem_block_size"] = int(vm.qmp("qom-get", path="vm0", property="block-size"))
        if used:
            vm.qmp("qom-set", path="vm0", property="requested-size", value=size)
            _wait(vm, plugged, size, limit_ms, poll_ms)
            vm.advance(1000)
            vm.guest("alloc", size=used)  # lands in the plugged ZONE_MOVABLE blocks first
            vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
            out["virtio_mem_unplug_used_ms"] = _wait(vm, plugged, 0, limit_ms, poll_ms)
    out["remove_ratio"] = out["virtio_mem_unplug_ms"] / out["balloon_inflate_ms"]
    out["add_ratio"] = out["virtio_mem_plug_ms"] / out["balloon_deflate_ms"]
    if used:
        out["remove_used_ratio"] = out["virtio_mem_unplug_used_ms"] / out["balloon_inflate_used_ms"]
    return out


def record_resize_speed(path: str | Path = RECORDED_RESIZE, repeats: int = 3) -> Path:
    """Measure :func:`resize_speed` on a live QEMU guest ``repeats`` times and save every run (and
    this machine's facts) as JSON; returns the path."""
    runs = [resize_speed("qemu") for _ in range(repeats)]
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          check=False).stdout.splitlines()[:1]
    doc = {"format": 1, "note": "labkit.scenarios.costs.resize_speed on a live guest",
           "facts": {"qemu": qemu[0] if qemu else "", "machine": platform.machine(),
                     "python": platform.python_version(),
                     "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
           "runs": runs}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return Path(path)


def recorded_resize_speed(path: str | Path = RECORDED_RESIZE) -> dict[str, Any]:
    """The recorded live runs' medians (label ``measured``) and the facts of the machine."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    keys = ("balloon_inflate_ms", "balloon_deflate_ms", "virtio_mem_plug_ms", "virtio_mem_unplug_ms",
            "remove_ratio", "add_ratio", "balloon_inflate_used_ms", "virtio_mem_unplug_used_ms",
            "remove_used_ratio")
    out = {k: float(np.median([r[k] for r in doc["runs"]])) for k in keys if all(k in r for r in doc["runs"])}
    first = doc["runs"][0]
    return out | {"label": MEASURED, "runs": len(doc["runs"]), "size": first["size"],
                  "boot": first["boot"], "used": first.get("used", 0), "facts": doc["facts"]}


def cost_table(rows: list[tuple[str, float | str, str]]) -> str:
    """Plain text: one line per (what, value, label)."""
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{what.ljust(width)}  {value!s:>12}  [{label}]" for what, value, label in rows)


def summary_rows(fast: bool = True) -> list[tuple[str, str, str]]:
    """Every number of this module in one list, for ``python -m labkit.scenarios.costs``."""
    rows: list[tuple[str, str, str]] = []
    for case, r in published_reporting_overhead().items():
        rows.append((f"reporting overhead, {case} (Duyck v17)", f"{100 * r['overhead']:.2f} %", PUBLISHED))
    duration = 10.0 if fast else 30.0
    for workload in WORKLOADS:
        p = ReportingCostParams(workload=workload, duration_s=duration,
                                period_ms=100.0 if workload == "page_fault1" else 3000.0)
        r = reporting_overhead(p)
        rows.append((f"reporting overhead, {workload} on the model", f"{100 * r['overhead']:.2f} %",
                     MODELLED))
    model = resize_speed("model")
    for key in ("balloon_inflate_ms", "virtio_mem_unplug_ms", "balloon_deflate_ms", "virtio_mem_plug_ms"):
        rows.append((f"{key} ({format_size(model['size'])}, model)", f"{model[key]:.0f} ms", MODELLED))
    if RECORDED_RESIZE.exists():
        live = recorded_resize_speed()
        for key in ("balloon_inflate_ms", "virtio_mem_unplug_ms", "balloon_deflate_ms", "virtio_mem_plug_ms"):
            rows.append((f"{key} ({format_size(int(live['size']))}, live QEMU)", f"{live[key]:.0f} ms",
                         MEASURED))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.scenarios.costs",
                                     description="the cost model's numbers, labelled by source")
    parser.add_argument("--record", action="store_true",
                        help="measure resize speed on a live QEMU guest and save it to data/recorded/")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.record:
        print(f"recorded {record_resize_speed(repeats=args.repeats)}")
    print(cost_table(summary_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DUYCK_V17", "MEASURED", "MODELLED", "PUBLISHED", "ReportingCostParams", "recorded_resize_speed",
           "record_resize_speed", "reporting_overhead", "resize_speed", "published_reporting_overhead",
           "write_tracking_cost"]
