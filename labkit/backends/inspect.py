"""What views and scenarios read, through the Backend protocol: ``vm.inspect(mechanism)`` returns a
frozen snapshot of one mechanism, and ``vm.advance_until(event)`` moves time to the next event.

Snapshots (:data:`SNAPSHOTS`) are plain data copied out of the machine at one instant, so a view
never holds a device: ``"balloon"`` (:class:`BalloonView`), ``"reporting"``, ``"hinting"``,
``"migration"`` (with one row per dirty-bitmap sync, what the migration view draws),
``"virtio-mem"`` (devices, drivers' block states, the kernel's hot-plugged blocks), ``"virtio-pmem"``
and ``"memory"`` (zones and the guest's counters). A field the backend cannot see is ``None``
(the live backend sees what QMP and the guest's /proc say; a replayed run what was recorded).

``advance_until(event, max_ms=60_000, **data)`` runs time until a QMP event named ``event``
(``"BALLOON_CHANGE"``, ``"MEMORY_DEVICE_SIZE_CHANGE"``, ``"MIGRATION"`` ... with ``data`` matching,
e.g. ``status="completed"``) is emitted, or, on the model, one of its trace points
(:data:`TRACE_POINTS`: ``"balloon-request"``, ``"bitmap-sync"``, ``"reporting-report"``,
``"hint-round"``, ``"virtio-mem-driver"``) moves; at most ``max_ms``. It returns the event (a
trace point gives ``{"event", "t_ms", "count"}``) or ``None`` when time ran out.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0)
>>> _ = vm.qmp("balloon", value=768 << 20)
>>> vm.advance_until("balloon-request")["count"], vm.inspect("balloon").actual_pages
(1, 256)
>>> vm.advance_until("BALLOON_CHANGE", max_ms=5000)["data"]["actual"] < 1 << 30
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from labkit.units import PAGE_SIZE

QEMU_FIRST_HINT_ID = 0x80000001  # VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1: the first round


@dataclass(frozen=True)
class BalloonView:
    """virtio-balloon: QEMU's config (target and actual, logical sizes and pages) and the driver."""

    target: int  # logical VM size QEMU asks for (bytes)
    actual: int  # logical VM size the guest acknowledged (query-balloon)
    num_pages: int  # config num_pages: 4 KiB pages the host wants in the balloon
    actual_pages: int  # config actual
    driver_pages: int | None = None  # vb->num_pages: pages the balloon holds
    in_flight_pages: int | None = None  # allocated or dequeued, not yet on or off the list
    requests: int | None = None  # inflate/deflate requests completed
    out_of_puff: int | None = None
    oom_deflated_pages: int | None = None
    idle: bool | None = None  # the work item is neither queued nor running
    last_request_target: int | None = None
    features: tuple[int, ...] | None = None  # negotiated (VIRTIO_BALLOON_F_*)
    offered: tuple[int, ...] | None = None
    discarded_pages: int | None = None
    stats_poll_interval: int | None = None
    properties: dict | None = None  # the device's QEMU properties (underscores for dashes)


@dataclass(frozen=True)
class ReportingView:
    """Free page reporting: negotiation, the mm core's state, counters, passes."""

    negotiated: bool
    state: str  # PageReportingState: IDLE, REQUESTED, ACTIVE
    order: int
    poison_val: int
    passes: int
    reports: int
    reported_pages: int
    reported_now_pages: int
    discarded_pages: int
    skipped_reports: int
    reused_pages: int
    refaulted_pages: int
    refault_ms: float
    pass_starts_ms: tuple[float, ...] = ()
    why_inactive: str = ""
    request_ms: float | None = None  # one report request's round trip (a model assumption)


@dataclass(frozen=True)
class HintingView:
    """Free page hinting: QEMU's status and IDs, the guest's round, the ring, the blocks held."""

    qemu_status: str
    qemu_cmd_id: int
    config_cmd_id: int
    guest_cmd_id: int
    ring: int
    held_blocks: int
    hinted_bytes: int
    hinted_blocks: int
    ignored_blocks: int
    shrunk_blocks: int
    returned_blocks: int
    rounds: int


@dataclass(frozen=True)
class MigrationView:
    """The outgoing migration: status, run state, the bitmap's counters, the link model, and its
    history (one row per 100 ms window, per sync, and at the end) with the syncs on their own."""

    status: str
    runstate: str
    dirty_sync_count: int
    dirty_pages: int | None = None
    hinted_pages: int | None = None
    transferred: int | None = None
    threshold: float | None = None
    throttle_pct: int | None = None
    link: dict | None = None
    history: tuple[dict, ...] = ()
    syncs: tuple[dict, ...] = ()  # t_ms, count, transferred/normal/zero before it, remaining
    # before and after, last_stage (the VM was stopped), cmd_id (the hinting round it started, -1)


@dataclass(frozen=True)
class VirtioMemDeviceView:
    """One virtio-mem device (QEMU's config) and its Linux driver."""

    id: str | None
    memaddr: int
    node: int
    block_size: int
    requested_size: int
    size: int  # plugged
    region_size: int
    usable_region_size: int | None = None
    requests: dict | None = None
    responses: dict | None = None
    first_block: int | None = None  # the driver's first memory block number
    blocks: int | None = None  # memory blocks in the region
    big_block_mode: bool | None = None
    units_per_block: int | None = None
    blocks_per_unit: int | None = None
    unit_bytes: int | None = None
    plugged_units: np.ndarray | None = None  # the driver's subblock (or big block) bitmap
    block_states: np.ndarray | None = None  # SbmState per memory block
    next_block: int | None = None
    offline_size: int | None = None
    retry_ms: float | None = None
    last_rc: int | None = None
    broken: bool | None = None
    region_start_pfn: int | None = None
    history: tuple = ()  # (t_ms, "plug"/"unplug"/"idle", rc)


@dataclass(frozen=True)
class VirtioMemView:
    devices: tuple[VirtioMemDeviceView, ...]
    added_blocks: tuple[int, ...] | None = None  # memory blocks with a memmap (added)
    online_blocks: dict | None = None  # block -> "Normal" / "Movable"
    migrated_pages: int | None = None  # alloc_contig_range's migrations, cumulative


@dataclass(frozen=True)
class PmemView:
    """virtio-pmem devices, the guest's writeback and the host page cache."""

    devices: tuple[dict, ...]
    host_page_cache_pages: int | None = None
    host_page_cache_dirty_pages: int | None = None
    writeback_runs: int | None = None
    written_pages: int | None = None
    sysctl: dict | None = None
    guest_cached_pages: int | None = None  # guest page cache holding virtio-blk disks' data


@dataclass(frozen=True)
class MemoryView:
    """The guest's memory: zones with their free pages and watermarks, the host's view."""

    zones: tuple[dict, ...]
    n_pages: int | None = None
    host_rss_pages: int | None = None
    host_swap_pages: int | None = None
    zero_fill_faults: int | None = None
    host_ram_pages: int | None = None
    host_discard: bool | None = None
    swap_ins: int | None = None  # pages this VM faulted back from host swap
    swap_outs: int | None = None  # pages of this VM the host swapped out
    discarded_pages: int | None = None  # backed pages the host freed on discards (any mechanism)


SNAPSHOTS = {"balloon": BalloonView, "reporting": ReportingView, "hinting": HintingView,
             "migration": MigrationView, "virtio-mem": VirtioMemView, "virtio-pmem": PmemView,
             "memory": MemoryView}
ARRAY_FIELDS = ("plugged_units", "block_states")


def from_dict(mechanism: str, data: dict) -> Any:
    """A snapshot back from its JSON form (a recording)."""
    cls = SNAPSHOTS[mechanism]
    if cls is VirtioMemView:
        devices = tuple(VirtioMemDeviceView(**{k: (np.asarray(v) if k in ARRAY_FIELDS and v is not None
                                                   else (tuple(v) if k == "history" else v))
                                               for k, v in d.items()}) for d in data["devices"])
        return VirtioMemView(**{**data, "devices": devices})
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def as_dict(snapshot: Any) -> dict:
    """A snapshot as JSON-friendly data (arrays as lists)."""
    return json_ready(dataclasses.asdict(snapshot))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def unknown_mechanism(mechanism: str) -> ValueError:
    return ValueError(f"inspect() takes one of {list(SNAPSHOTS)}, got {mechanism!r}")


# --- the model --------------------------------------------------------------------------------
def _driver_signature(vm: Any) -> tuple:
    """What changes at every virtio-mem driver event: requests, work runs, blocks added/online."""
    drivers = vm.virtio_mem.drivers if vm.virtio_mem is not None else []
    hotplug = vm.kernel.hotplug
    return (sum(sum(d.device.requests.values()) for d in drivers), sum(len(d.history) for d in drivers),
            len(hotplug.memmap) if hotplug else 0,
            tuple(sorted(hotplug.online_blocks.items())) if hotplug else ())


TRACE_POINTS: dict[str, Callable[[Any], Any]] = {
    "balloon-request": lambda vm: vm.balloon.requests if vm.balloon is not None else None,
    "bitmap-sync": lambda vm: vm.migration.dirty_sync_count,
    "reporting-report": lambda vm: vm.reporting.reports if vm.reporting is not None else None,
    "hint-round": lambda vm: vm.hinting.device.rounds if vm.hinting is not None else None,
    "virtio-mem-driver": _driver_signature,
}


def _matches(event: dict, name: str, data: dict) -> bool:
    return event["event"] == name and all(event["data"].get(k) == v for k, v in data.items())


def check_wait(max_ms: Any) -> float:
    if not isinstance(max_ms, int | float) or isinstance(max_ms, bool) or not math.isfinite(max_ms) \
            or max_ms < 0:
        raise ValueError(f"max_ms must be a finite number of milliseconds >= 0, got {max_ms!r}")
    return float(max_ms)


class ModelInspection:
    """``inspect`` and ``advance_until`` for :class:`labkit.backends.model.ModelBackend`."""

    def inspect(self, mechanism: str) -> Any:
        """A frozen snapshot of ``mechanism`` now (see the module docstring)."""
        self._check_open()
        builder = _BUILDERS.get(mechanism)
        if builder is None:
            raise unknown_mechanism(mechanism)
        return builder(self)

    def advance_until(self, event: str, max_ms: float = 60_000.0, **data: Any) -> dict | None:
        """Run until ``event`` (a QMP event name or a trace point), at most ``max_ms``."""
        self._check_open()
        max_ms = check_wait(max_ms)
        env: simpy.Environment = self.env
        deadline = env.now + max_ms
        if event in TRACE_POINTS:
            probe = TRACE_POINTS[event]
            before = probe(self)
            if before is None:
                raise ValueError(f"this VM has nothing that makes {event!r}")
            found = lambda: probe(self) != before  # noqa: E731
        else:
            if not isinstance(event, str) or not event.isupper():
                raise ValueError(f"advance_until() takes a QMP event name (e.g. 'BALLOON_CHANGE') or "
                                 f"one of {list(TRACE_POINTS)}, got {event!r}")
            seen = len(self.event_queue.delivered)
            found = lambda: any(_matches(e, event, data)  # noqa: E731
                                for e in self.event_queue.delivered[seen:])
        while env.peek() <= deadline:
            env.step()
            if found():
                if event in TRACE_POINTS:
                    return {"event": event, "t_ms": float(env.now), "count": probe(self)}
                return next(e for e in self.event_queue.delivered[seen:] if _matches(e, event, data))
        if deadline > env.now:
            env.run(until=deadline)
        return None


def _need(vm: Any, attr: str, how: str) -> Any:
    value = getattr(vm, attr)
    if value is None:
        raise ValueError(f"this VM has no {attr.replace('_', '-')}: open it with {how}")
    return value


def _balloon(vm: Any) -> BalloonView:
    dev = _need(vm, "balloon_device", "a balloon (balloon={} or -device virtio-balloon-pci)")
    drv = vm.balloon
    return BalloonView(
        target=dev.logical_target(), actual=dev.logical_actual(), num_pages=dev.config.num_pages,
        actual_pages=dev.config.actual, driver_pages=drv.num_pages, in_flight_pages=len(drv.in_flight),
        requests=drv.requests, out_of_puff=drv.out_of_puff, oom_deflated_pages=drv.oom_deflated_pages,
        idle=drv.idle, last_request_target=drv.last_request_target, features=tuple(sorted(drv.features)),
        offered=tuple(sorted(dev.features)), discarded_pages=dev.discarded_pages,
        stats_poll_interval=dev.stats_poll_interval, properties=dict(dev.options))


def _reporting(vm: Any) -> ReportingView:
    r = _need(vm, "reporting", "balloon={'free_page_reporting': True}")
    starts = tuple(p.start_ms for p in r.core.history) if r.core is not None else ()
    return ReportingView(r.negotiated, r.state.name, r.order, r.poison_val, r.passes, r.reports,
                         r.reported_pages, r.reported_now_pages, r.discarded_pages, r.skipped_reports,
                         r.reused_pages, r.refaulted_pages, r.refault_ms, starts, r.why_inactive,
                         r.device.request_ms)


def _hinting(vm: Any) -> HintingView:
    h = _need(vm, "hinting", "balloon={'free_page_hint': True, 'iothread': 'iothread0'}")
    dev, drv = h.device, h.driver
    return HintingView(dev.status.name, dev.cmd_id, dev.config_cmd_id(), drv.cmd_id_active, len(dev.ring),
                       drv.num_free_page_blocks, drv.hinted_bytes, dev.hinted_blocks, dev.ignored_blocks,
                       drv.shrunk_blocks, drv.returned_blocks, dev.rounds)


def _migration(vm: Any) -> MigrationView:
    m = vm.migration
    history = tuple(dict(h) for h in m.history)
    syncs = [h for h in history if h["kind"] == "sync"]
    # the hinting rounds the syncs started (QEMU adds 1 to the ID per round): the last ones
    starts_round = [not h["last_stage"] for h in syncs] if vm.hinting is not None and not \
        m.capabilities["postcopy-ram"] else [False] * len(syncs)
    ids = iter(range(vm.hinting.device.cmd_id - sum(starts_round) + 1, 1 << 32)) if vm.hinting else iter(())
    rows = tuple({"t_ms": h["t_ms"], "count": h["dirty_sync_count"], "transferred": h["transferred"],
                  "normal": h["normal"], "zero": h["zero"], "remaining_before": h["pending_before"],
                  "remaining": h["remaining"], "last_stage": h["last_stage"],
                  "cmd_id": next(ids) if started else -1}
                 for h, started in zip(syncs, starts_round, strict=True))
    return MigrationView(m.status, m.runstate, m.dirty_sync_count, m.dirty_pages, m.hinted_pages,
                         m.transferred, m.threshold_size, m.throttle_pct, dataclasses.asdict(m.link),
                         history, rows)


def _virtio_mem(vm: Any) -> VirtioMemView:
    vmem = _need(vm, "virtio_mem", "virtio_mem=[{'id': 'vm0', 'size': '4G'}] or -device virtio-mem-pci")
    devices = []
    for drv in vmem.drivers:
        d, c = drv.device, drv.device.config
        devices.append(VirtioMemDeviceView(
            d.id, c.addr, c.node_id, c.block_size, c.requested_size, c.plugged_size, c.region_size,
            c.usable_region_size, {r.name: n for r, n in d.requests.items()},
            {r.name: n for r, n in d.responses.items()}, drv.first_mb, drv.n_mb, drv.bbm, drv.units_per_mb,
            drv.mbs_per_unit, drv.unit_bytes, drv.plugged.copy(), drv.mb_state.copy(), drv.next_mb,
            drv.offline_size, drv.retry_ms, drv.last_rc, drv.broken, drv.region.start, tuple(drv.history)))
    hotplug = vm.kernel.hotplug
    return VirtioMemView(tuple(devices), tuple(sorted(hotplug.memmap)), dict(hotplug.online_blocks),
                         hotplug.migrated_pages)


def _pmem(vm: Any) -> PmemView:
    p = vm.virtio_pmem
    rows = []
    for d, drv in zip(p.devices, p.drivers, strict=True):
        rows.append({"id": d.id, "disk": drv.disk, "memaddr": d.config.start, "size": d.config.size,
                     "memdev": d.memdev, "share": d.share, "memmap_bytes": drv.memmap_bytes,
                     "flushes": drv.flushes, "eio": drv.eio, "requests": d.requests,
                     "in_flight": d.in_flight})
    wb = p.writeback
    return PmemView(tuple(rows), p.cache.cached_pages, p.cache.dirty_pages, wb.runs, wb.written_pages,
                    dict(wb.sysctl), p.blk.guest_cached_pages())


def _memory(vm: Any) -> MemoryView:
    k = vm.kernel
    zones = tuple({"name": z.name, "node": z.node, "start": z.start, "end": z.end,
                   "free": int(k.zone_free(i)),
                   "min": int(k.watermarks[i].min), "low": int(k.watermarks[i].low),
                   "high": int(k.watermarks[i].high)} for i, z in enumerate(vm.mem.zones))
    h = k.host_vm
    return MemoryView(zones, vm.mem.n_pages, h.rss_pages, h.swap_pages, h.zero_fill_faults,
                      vm.host.ram // PAGE_SIZE, vm.host.discard_enabled, h.swap_ins, h.swap_outs,
                      h.discarded_pages)


_BUILDERS = {"balloon": _balloon, "reporting": _reporting, "hinting": _hinting, "migration": _migration,
             "virtio-mem": _virtio_mem, "virtio-pmem": _pmem, "memory": _memory}

__all__ = ["SNAPSHOTS", "TRACE_POINTS", "BalloonView", "HintingView", "MemoryView", "MigrationView",
           "ModelInspection", "PmemView", "ReportingView", "VirtioMemDeviceView", "VirtioMemView",
           "as_dict", "from_dict"]
