"""``inspect`` and ``advance_until`` on the model: the snapshots of :mod:`labkit.backends.inspect`
copied out of the machine's devices, and time run event by event until a QMP event or a trace point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import simpy

from labkit.backends.inspect import (
    TRACE_POINTS,
    BalloonView,
    HintingView,
    HostView,
    MemoryView,
    MigrationView,
    PmemView,
    ReportingView,
    VirtioMemDeviceView,
    VirtioMemView,
    check_wait,
    unknown_mechanism,
)
from labkit.model.hotplug import UNMOVABLE_STATES
from labkit.model.pages import PAGES_PER_MEMORY_BLOCK, PageFlag, PageState
from labkit.units import PAGE_SIZE


def _driver_signature(vm: Any) -> tuple:
    """What changes at every virtio-mem driver event: requests, work runs, blocks added/online."""
    drivers = vm.virtio_mem.drivers if vm.virtio_mem is not None else []
    hotplug = vm.kernel.hotplug
    return (sum(sum(d.device.requests.values()) for d in drivers), sum(len(d.history) for d in drivers),
            len(hotplug.memmap) if hotplug else 0,
            tuple(sorted(hotplug.online_blocks.items())) if hotplug else ())


PROBES: dict[str, Callable[[Any], Any]] = {
    "balloon-request": lambda vm: vm.balloon.requests if vm.balloon is not None else None,
    "bitmap-sync": lambda vm: vm.migration.dirty_sync_count,
    "reporting-report": lambda vm: vm.reporting.reports if vm.reporting is not None else None,
    "hint-round": lambda vm: vm.hinting.device.rounds if vm.hinting is not None else None,
    "virtio-mem-driver": _driver_signature,
}


def _matches(event: dict, name: str, data: dict) -> bool:
    return event["event"] == name and all(event["data"].get(k) == v for k, v in data.items())


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
        env: simpy.Environment = self.env
        max_ms = check_wait(max_ms, env.now)
        deadline = env.now + max_ms
        if event in PROBES:
            probe = PROBES[event]
            before = probe(self)
            if before is None:
                raise ValueError(f"this VM has nothing that makes {event!r}")
            found = lambda: probe(self) != before  # noqa: E731
        else:
            if not isinstance(event, str) or not event.isupper():
                raise ValueError(f"advance_until() takes a QMP event name (e.g. 'BALLOON_CHANGE') or "
                                 f"one of {list(PROBES)}, got {event!r}")
            seen = len(self.event_queue.delivered)
            found = lambda: any(_matches(e, event, data)  # noqa: E731
                                for e in self.event_queue.delivered[seen:])
        while env.peek() <= deadline:
            env.step()
            if found():
                if event in PROBES:
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
        requests=drv.requests, deflate_requests=dev.deflate_requests, out_of_puff=drv.out_of_puff,
        oom_deflated_pages=drv.oom_deflated_pages,
        idle=drv.idle, last_request_target=drv.last_request_target, features=tuple(sorted(drv.features)),
        offered=tuple(sorted(dev.features)), discarded_pages=dev.discarded_pages,
        zeroed_pages=dev.zeroed_pages, stats_poll_interval=dev.stats_poll_interval,
        properties=dict(dev.options))


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
                  "remaining": h["remaining"], "threshold": h["threshold"], "last_stage": h["last_stage"],
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
            drv.offline_size, drv.retry_ms, drv.last_rc, drv.broken, drv.region.start, tuple(drv.history),
            _unmovable_units(vm, drv)))
    hotplug = vm.kernel.hotplug
    return VirtioMemView(tuple(devices), tuple(sorted(hotplug.memmap)), dict(hotplug.online_blocks),
                         hotplug.migrated_pages)


_UNMOVABLE = np.zeros(256, dtype=bool)
_UNMOVABLE[list(UNMOVABLE_STATES)] = True


def _unmovable_units(vm: Any, drv: Any) -> np.ndarray:
    """Units of ``drv`` in online blocks that hold an unmovable page (numpy over those blocks)."""
    out = np.zeros(len(drv.plugged), dtype=bool)
    online = np.array([b - drv.first_mb for b in vm.kernel.hotplug.online_blocks
                       if drv.first_mb <= b < drv.first_mb + drv.n_mb], dtype=np.int64)
    if len(online) == 0:
        return out
    per_block = PAGES_PER_MEMORY_BLOCK
    region = vm.mem.state[drv.region.start:drv.region.start + drv.n_mb * per_block]
    state = region.reshape(drv.n_mb, per_block)
    busy_pages = _UNMOVABLE[state[online]]  # (online blocks, pages)
    if drv.bbm:  # a big block spans mbs_per_unit memory blocks
        np.logical_or.at(out, online // drv.mbs_per_unit, busy_pages.any(axis=1))
    else:
        upm = drv.units_per_mb
        units = (online[:, None] * upm + np.arange(upm)).ravel()
        out[units] = busy_pages.reshape(len(online) * upm, -1).any(axis=1)
    return out


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
                   "free": int(k.zone_free(i)), "pcp": int(vm.mem.counts[i, PageState.PCP]),
                   "min": int(k.watermarks[i].min), "low": int(k.watermarks[i].low),
                   "high": int(k.watermarks[i].high)} for i, z in enumerate(vm.mem.zones))
    h = k.host_vm
    return MemoryView(zones, vm.mem.n_pages, h.rss_pages, h.swap_pages, h.zero_fill_faults,
                      vm.host.ram // PAGE_SIZE, vm.host.discard_enabled, h.swap_ins, h.swap_outs,
                      h.discarded_pages)


BACKED = np.uint8(PageFlag.BACKED)


def switches_of(options: Any) -> dict:
    """The switches a VM was opened with, from its options (both backends)."""
    c = options.confidential
    return {"vfio": [d.host for d in options.vfio], "confidential": c.kind if c is not None else None,
            "mem_lock": options.mem_lock, "host_page_size": options.host_page_size,
            "guest_page_size": options.guest_page_size}


def _host(vm: Any) -> HostView:
    h = vm.kernel.host_vm
    blocks = tuple({"name": b.name, "start": b.start, "end": b.end, "size": b.pages * PAGE_SIZE,
                    "kind": b.backing.kind, "page_size": b.backing.page_size, "thp": b.backing.thp,
                    "guest_memfd": b.backing.guest_memfd, "backing": b.backing.describe(),
                    "rss": int(np.count_nonzero(h.mem.flags[b.start:b.end] & BACKED)) * PAGE_SIZE}
                   for b in h.blocks)
    d = h.ram_discard
    counters = {"required": d.required, "coordinated_required": d.coordinated_required,
                "disabled": d.disabled, "uncoordinated_disabled": d.uncoordinated_disabled}
    dev = vm.balloon_device
    return HostView(blocks, switches_of(vm.options), h.rss_pages, h.pinned,
                    d.is_disabled() or not vm.host.discard_enabled, counters, tuple(vm.migration_blockers),
                    tuple(h.log), h.log_lines, h.private_skipped,
                    dev.partial_pages_dropped if dev is not None else None,
                    vm.reporting.device.unaligned_entries if vm.reporting is not None else None)


_BUILDERS = {"balloon": _balloon, "reporting": _reporting, "hinting": _hinting, "migration": _migration,
             "virtio-mem": _virtio_mem, "virtio-pmem": _pmem, "memory": _memory, "host": _host}


assert set(PROBES) == set(TRACE_POINTS)  # the protocol's list and the model's probes agree
__all__ = ["PROBES", "ModelInspection"]
