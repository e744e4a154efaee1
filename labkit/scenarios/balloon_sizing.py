"""Inflate by how much? One guest, one working set, balloon targets from generous to too aggressive.

The guest runs an application (anonymous memory), has read files (page cache) and once ran a job
that exited (memory the guest freed but the host still backs). Each target gets a fresh, identical
VM (same seed); the balloon is asked for the target, the driver chases it for ``settle_ms``, then the
application grows by ``growth`` of the guest and time runs on for ``after_ms``. What each row shows,
with the facts of docs/mechanisms.md §1 (virtio-balloon) behind it:

* **host memory returned**: the drop of host RSS. QEMU discards each inflated page (§1.6), so RSS
  falls only by the balloon pages that were *backed*; a never-touched page costs the host nothing
  before or after.
* **page cache reclaimed**: balloon pages are ``__GFP_NORETRY`` allocations; kswapd and one direct
  reclaim pass free page cache for them (§1.2), so a deep balloon empties the guest's cache.
* **Out of puff retries**: when even reclaim finds nothing, the driver logs "Out of puff!", sleeps
  200 ms and retries; ``actual`` stalls above the target (§1.2).
* **OOM**: the application then grows. Without deflate-on-oom the guest's MemTotal has shrunk by the
  balloon (§1.3) and the OOM killer kills a process; with it the OOM notifier deflates 256 pages
  (1 MiB) per OOM event instead (§1.4), and the driver, still short of its target, takes them back
  on its next retry.
* **host memory left idle**: guest-free pages the host still backs (state FREE, flag BACKED). A too
  small balloon leaves them, and only a deeper balloon (or free page reporting) returns them.

>>> from labkit.scenarios.balloon_sizing import SizingParams, balloon_sizing, sizing_table
>>> runs = balloon_sizing(SizingParams(memory="1G", targets=(1.0, 0.3)))
>>> rows = sizing_table(runs)
>>> bool(rows["out_of_puff"][1] > 0), bool(rows["reached"][0])
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

import labkit
from labkit.backends.base import Backend
from labkit.devices.balloon import VIRTIO_BALLOON_OOM_NR_PAGES
from labkit.errors import GuestError
from labkit.model.pages import PageFlag, PageState
from labkit.model.watermarks import MIN_FREE_KBYTES_MAX, MIN_FREE_KBYTES_MIN, ZONE_MOVABLE
from labkit.scenarios.base import Run, record, table
from labkit.units import GiB, MiB, PAGE_SIZE, format_size, parse_size

OOM_DEFLATE_BYTES = VIRTIO_BALLOON_OOM_NR_PAGES * PAGE_SIZE  # 1 MiB per OOM event
MAX_ANON_SHARE = 0.8  # anonymous memory the working set may hold at once, as a share of memory

TABLE_COLUMNS = (
    "target", "actual", "reached", "out_of_puff", "host_returned", "cache_reclaimed",
    "memtotal", "memavailable", "idle_backed", "oom_deflated", "oom_kills", "app_alive",
    "actual_end",
)


@dataclass(frozen=True)
class SizingParams:
    """Parameters of the sizing scenario. Sizes in bytes (a string like ``"2G"`` is parsed).

    ``targets``: logical guest sizes for the ``balloon`` command, as fractions of ``memory``
    (1.0 = no balloon). The working set is drawn once from ``seed``: ``anon_share``, ``cache_share``
    and ``transient_share`` are (low, high) ranges of fractions of ``memory``. ``growth``: how much
    the application allocates after the balloon settled, as a fraction of ``memory``.
    """

    memory: int | str = 2 * GiB
    seed: int = 0
    deflate_on_oom: bool = False
    targets: tuple[float, ...] = (1.0, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3)
    anon_share: tuple[float, float] = (0.30, 0.40)
    cache_share: tuple[float, float] = (0.15, 0.25)
    transient_share: tuple[float, float] = (0.10, 0.20)
    growth: float = 0.10
    settle_ms: float = 3000.0
    after_ms: float = 1000.0
    sample_ms: float = 100.0
    discard: bool = True
    backend: str = "model"

    def __post_init__(self) -> None:
        memory = parse_size(self.memory, name="memory")
        if memory < 256 * MiB or memory % MiB:
            raise ValueError(f"memory must be a whole number of MiB, at least 256 MiB, got "
                             f"{self.memory!r}")
        object.__setattr__(self, "memory", memory)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        targets = tuple(float(t) for t in self.targets)
        if not targets or any(not 0.0 < t <= 1.0 for t in targets):
            raise ValueError(f"targets are fractions of memory in (0, 1], got {self.targets!r}")
        object.__setattr__(self, "targets", targets)
        for name in ("anon_share", "cache_share", "transient_share"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high < 1.0:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high < 1, got "
                                 f"{getattr(self, name)!r}")
        if not 0.0 <= self.growth < 1.0:
            raise ValueError(f"growth is a fraction of memory in [0, 1), got {self.growth!r}")
        peak = self.anon_share[1] + max(self.transient_share[1], self.growth)
        if peak > MAX_ANON_SHARE:
            raise ValueError(f"anon_share high + max(transient_share high, growth) is {peak:.2f}; "
                             f"keep it at or under {MAX_ANON_SHARE} of memory (the guest has no "
                             "swap, and the kernel needs the rest)")
        for name in ("settle_ms", "after_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.sample_ms <= 0:
            raise ValueError(f"sample_ms must be > 0, got {self.sample_ms!r}")


@dataclass(frozen=True)
class WorkingSet:
    """The guest's working set in bytes (whole MiB), drawn from the parameters' seed."""

    anon: int
    cache: int
    transient: int
    growth: int


def working_set(params: SizingParams) -> WorkingSet:
    """Draw the working set: the same for every target of one parameter set."""
    rng = np.random.default_rng(params.seed)

    def mib(share: tuple[float, float]) -> int:
        return max(1, int(params.memory * rng.uniform(*share)) // MiB) * MiB

    return WorkingSet(anon=mib(params.anon_share), cache=mib(params.cache_share),
                      transient=mib(params.transient_share),
                      growth=max(MiB, int(params.memory * params.growth) // MiB * MiB))


# --- measurements that work on any backend ---------------------------------------------------------
def min_free_bytes(vm_ram_size: int) -> int:
    """``min_free_kbytes`` by the square-root rule alone (mm/page_alloc.c ``calculate_min_free_kbytes``:
    sqrt(lowmem_kbytes * 16), clamped to [128, 262144] kB), in bytes, from the VM's RAM size: the
    estimate when a backend has no ``zoneinfo()``. A guest with transparent huge pages raises it
    (mm/khugepaged.c), which :func:`balloon_floor_bytes` reads from the guest itself."""
    kbytes = math.isqrt(vm_ram_size // 1024 * 16)
    return min(max(kbytes, MIN_FREE_KBYTES_MIN), MIN_FREE_KBYTES_MAX) * 1024


def balloon_floor_bytes(vm: Backend, vm_ram_size: int) -> int:
    """What balloon allocations must leave free: in each zone the min watermark plus its
    ``lowmem_reserve`` for a ZONE_MOVABLE allocation (``GFP_HIGHUSER_MOVABLE``), from
    ``vm.zoneinfo()`` (/proc/zoneinfo on a live guest); the square-root estimate without it."""
    zoneinfo = getattr(vm, "zoneinfo", None)
    if zoneinfo is None:
        return min_free_bytes(vm_ram_size)
    zones = zoneinfo()
    floor = sum(min(z["managed"], z["min"] + z["protection"][ZONE_MOVABLE]) for z in zones)
    return floor * PAGE_SIZE


def guest_demand(vm: Backend) -> int:
    """The smallest logical size (a ``balloon`` value, bytes) the guest can shrink to right now.

    Everything the guest holds except free memory and page cache cannot go into the balloon (it has
    no swap: anon, shmem, slab, reserved), and balloon allocations stop at the min watermark. So:
    ``logical size - free - (Cached - Shmem) + floor`` (:func:`balloon_floor_bytes`), where free is
    MemFree plus the per-CPU lists' pages (free too, but not in MemFree; ``zoneinfo()``). Inflate
    below it and the driver runs "Out of puff"; inflate to it and the cache is gone and any growth
    of the guest means OOM.

    >>> import labkit
    >>> with labkit.open(memory="1G", seed=0) as vm:
    ...     demand = guest_demand(vm)
    ...     _ = vm.qmp("balloon", value=demand + (32 << 20))
    ...     vm.advance(2000)
    ...     vm.qmp("query-balloon")["actual"] == demand + (32 << 20)
    True
    """
    sample = vm.sample()
    info = vm.meminfo()
    logical = int(sample["balloon_actual"])
    vm_ram = logical + int(sample["balloon_size"])
    reclaimable = (info["MemFree"] + info["Cached"] - info["Shmem"]) * 1024
    zoneinfo = getattr(vm, "zoneinfo", None)
    if zoneinfo is not None:
        reclaimable += sum(p["count"] for z in zoneinfo() for p in z["pcp"]) * PAGE_SIZE
    return max(0, logical - reclaimable) + balloon_floor_bytes(vm, vm_ram)


def idle_backed_bytes(vm: Backend) -> int:
    """Guest-free memory the host still backs: what a too small balloon leaves idle on the host.

    Exact from a page snapshot when the backend has one: pages with flag BACKED that are free, on the
    buddy lists (FREE) or on a per-CPU list (PCP: free pages the allocator holds back from MemFree,
    mm/page_alloc.c free_unref_page_commit(), docs/mechanisms.md §10.3), the same pages the host view
    paints as idle waste. Otherwise an estimate from the sample: host RSS minus what the guest uses
    (logical size minus MemFree), which counts per-CPU pages as used, as MemFree does.
    """
    snapshot = getattr(vm, "snapshot", None)
    if snapshot is not None:
        snap = snapshot()
        state = snap["state"]
        free_backed = ((state == int(PageState.FREE)) | (state == int(PageState.PCP))) & (
            (snap["flags"] & np.uint8(PageFlag.BACKED)) != 0)
        return int(np.count_nonzero(free_backed)) * PAGE_SIZE
    s = vm.sample()
    return int(max(0.0, s["host_rss"] - (s["balloon_actual"] - s["memfree"])))


def out_of_puff_retries(vm: Backend) -> int:
    """How many times the balloon driver failed to allocate and slept 200 ms ("Out of puff!").

    The model's driver counts them; a real guest only logs them (rate-limited), so there the count
    from dmesg is a lower bound."""
    counted = vm.inspect("balloon").out_of_puff  # None on a live guest
    if counted is not None:
        return int(counted)
    dmesg = getattr(vm, "dmesg", None)
    return sum("Out of puff" in line for line in dmesg()) if dmesg else 0


def _alive(vm: Backend, handle: int | None) -> bool:
    if handle is None:
        return False
    return any(h["handle"] == handle and h["alive"] for h in vm.guest("handles"))


# --- the scenario ------------------------------------------------------------------------------------
def open_vm(params: SizingParams) -> tuple[Backend, dict[str, int]]:
    """Open the scenario's VM and build its working set; returns the VM and the app's handles."""
    ws = working_set(params)
    vm = labkit.open(backend=params.backend, memory=params.memory, seed=params.seed,
                     balloon={"deflate_on_oom": params.deflate_on_oom},
                     host={"discard": params.discard})
    try:
        app = vm.guest("alloc", size=ws.anon, kind="anon")
        files = vm.guest("alloc", size=ws.cache, kind="file")
        job = vm.guest("alloc", size=ws.transient, kind="anon")
        vm.guest("free", handle=job)  # the job exited: guest-free, still backed on the host
    except BaseException:
        vm.close()
        raise
    return vm, {"app": app, "files": files}


def run_target(params: SizingParams, target: float) -> Run:
    """One row of the sizing table: a fresh VM, the balloon to ``target`` x memory, then growth.

    >>> run = run_target(SizingParams(memory="1G"), 0.9)
    >>> run.summary["reached"], run.summary["oom_kills"]
    (1.0, 0.0)
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target is a fraction of memory in (0, 1], got {target!r}")
    ws = working_set(params)
    target_bytes = int(params.memory * target) // PAGE_SIZE * PAGE_SIZE
    vm, handles = open_vm(params)
    with vm:
        idle = lambda v: {"idle_backed": float(idle_backed_bytes(v))}  # noqa: E731
        before = {**vm.sample(), **idle(vm)}
        rows = [before]
        demand = guest_demand(vm)
        vm.qmp("balloon", value=target_bytes)
        record(vm, params.settle_ms, params.sample_ms, rows, idle)
        inflated = rows[-1]
        puffs = out_of_puff_retries(vm)

        # the application grows: an allocation after the balloon has settled
        panicked = 0.0
        try:
            grow = vm.guest("alloc", size=ws.growth, kind="anon")
        except GuestError:
            grow, panicked = None, 1.0
        grown = {**vm.sample(), **idle(vm)}
        rows.append(grown)
        if not panicked:
            record(vm, params.after_ms, params.sample_ms, rows, idle)
        end = rows[-1]
        app_alive = _alive(vm, handles["app"]) if not panicked else False
        grow_alive = _alive(vm, grow) if not panicked else False
        events = vm.events()
        puffs_end = out_of_puff_retries(vm)

    oom_deflated = max(0.0, inflated["balloon_size"] - grown["balloon_size"])
    summary = {
        "target": float(target_bytes),
        "target_share": float(target),
        "demand": float(demand),
        "actual": float(inflated["balloon_actual"]),
        "reached": float(inflated["balloon_actual"] == target_bytes),
        "balloon_size": float(inflated["balloon_size"]),
        "out_of_puff": float(puffs),
        "host_rss_before": float(before["host_rss"]),
        "host_rss_after": float(inflated["host_rss"]),
        "host_returned": float(before["host_rss"] - inflated["host_rss"]),
        "cache_before": float(before["cached"]),
        "cache_after": float(inflated["cached"]),
        "cache_reclaimed": float(before["cached"] - inflated["cached"]),
        "memtotal": float(inflated["memtotal"]),
        "memfree": float(inflated["memfree"]),
        "memavailable": float(inflated["memavailable"]),
        "idle_backed_before": float(before["idle_backed"]),
        "idle_backed": float(inflated["idle_backed"]),
        "growth": float(ws.growth),
        "oom_deflated": float(oom_deflated),
        "oom_deflate_events": float(oom_deflated // OOM_DEFLATE_BYTES),
        "oom_kills": float(grown["oom_kills"] - inflated["oom_kills"]),
        "panicked": panicked,
        "app_alive": float(app_alive),
        "growth_alive": float(grow_alive),
        "memtotal_end": float(end["memtotal"]),
        "memavailable_end": float(end["memavailable"]),
        "actual_end": float(end["balloon_actual"]),
        "out_of_puff_end": float(puffs_end),
    }
    run = Run.from_rows(rows, summary=summary, events=events, params=params)
    run.series["target_share"] = np.full(len(run), float(target))
    return run


def balloon_sizing(params: SizingParams | None = None, **overrides: Any) -> list[Run]:
    """Run every target of ``params`` (keywords override fields); one :class:`Run` per target."""
    params = replace(params or SizingParams(), **overrides) if overrides else (params or SizingParams())
    return [run_target(params, t) for t in params.targets]


def sizing_table(runs: list[Run]) -> dict[str, np.ndarray]:
    """One row per target: every summary metric as a column (bytes, counts, 0/1 flags)."""
    return table(runs)


def format_table(rows: dict[str, np.ndarray], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """A plain-text table for notebooks and reports: sizes in MiB, counts and flags as integers."""
    missing = [c for c in columns if c not in rows]
    if missing:
        raise KeyError(f"columns {missing} not in the table; it has {sorted(rows)}")
    flags = {"reached", "app_alive", "panicked", "growth_alive"}
    counts = {"out_of_puff", "oom_kills", "oom_deflate_events", "out_of_puff_end"}
    heads = [c if c in flags | counts else f"{c} MiB" for c in columns]

    def cell(column: str, value: float) -> str:
        if column in flags:
            return "yes" if value else "no"
        if column in counts:
            return f"{int(value)}"
        return f"{value / MiB:.0f}"

    body = [[cell(c, float(rows[c][i])) for c in columns] for i in range(len(rows[columns[0]]))]
    widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, body)])


def describe(ws: WorkingSet) -> str:
    """One line naming the working set, for notebook prose."""
    return (f"app {format_size(ws.anon)} anon, {format_size(ws.cache)} page cache, a finished job "
            f"left {format_size(ws.transient)} freed, then the app grows by {format_size(ws.growth)}")
