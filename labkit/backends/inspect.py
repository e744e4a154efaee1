"""What views and scenarios read, through the Backend protocol: ``vm.inspect(mechanism)`` returns a
frozen snapshot of one mechanism, and ``vm.advance_until(event)`` moves time to the next event.

Snapshots (:data:`SNAPSHOTS`) are plain data copied out of the machine at one instant, so a view
never holds a device: ``"balloon"`` (:class:`BalloonView`), ``"reporting"``, ``"hinting"``,
``"migration"`` (with one row per dirty-bitmap sync, what the migration view draws),
``"virtio-mem"`` (devices, drivers' block states, the kernel's hot-plugged blocks), ``"virtio-pmem"``,
``"memory"`` (zones and the guest's counters) and ``"host"`` (RAM blocks, backing, pinning, QEMU's
discard counters and stderr: the open problems' switches). A field the backend cannot see is ``None``
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
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    deflate_requests: int | None = None  # of the device: deflateq requests QEMU processed
    out_of_puff: int | None = None
    oom_deflated_pages: int | None = None
    idle: bool | None = None  # the work item is neither queued nor running
    last_request_target: int | None = None
    features: tuple[int, ...] | None = None  # negotiated (VIRTIO_BALLOON_F_*)
    offered: tuple[int, ...] | None = None
    discarded_pages: int | None = None
    zeroed_pages: int | None = None  # of those, pages only init_on_alloc had written (zeros)
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
    # before and after, threshold, last_stage (the VM was stopped), cmd_id (the hinting round it
    # started, -1)


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
    # per unit: it is in an online block and holds a page alloc_contig_range can't move (an unplug
    # of it fails with -EBUSY); False elsewhere
    unmovable_units: np.ndarray | None = None


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
    """The guest's memory: zones with their free pages (buddy lists; ``pcp``: on per-CPU lists, the
    model only) and watermarks, the host's view."""

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


@dataclass(frozen=True)
class HostView:
    """The host side of one VM (docs/mechanisms.md §11-§12): its RAM blocks and how each is backed,
    what is pinned, QEMU's RAM discard counters, its migration blockers and its stderr."""

    blocks: tuple[dict, ...]  # name, start, end (PFNs), size, kind, page_size, thp, guest_memfd, rss
    switches: dict  # vfio, confidential, mem_lock, host_page_size, guest_page_size (from the options)
    rss_pages: int | None = None
    pinned: str | None = None  # why all guest RAM stays in host memory ("" when it does not)
    discard_disabled: bool | None = None  # ram_block_discard_is_disabled()
    discard_counters: dict | None = None  # QEMU's four counters (required, disabled, ...)
    migration_blockers: tuple[str, ...] | None = None
    qemu_log: tuple[str, ...] = ()  # what QEMU printed (warnings, error_report lines)
    qemu_log_lines: int | None = None
    private_skipped_pages: int | None = None  # discards that left a confidential guest's private page
    balloon_partial_pages_dropped: int | None = None  # PartiallyBalloonedPage given up on
    report_unaligned_entries: int | None = None  # reported blocks QEMU ignored (host page alignment)
    hugepages: dict | None = None  # live: this machine's huge page pools {size: {"total", "free"}}


SNAPSHOTS = {"balloon": BalloonView, "reporting": ReportingView, "hinting": HintingView,
             "migration": MigrationView, "virtio-mem": VirtioMemView, "virtio-pmem": PmemView,
             "memory": MemoryView, "host": HostView}
ARRAY_FIELDS = ("plugged_units", "block_states", "unmovable_units")


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


# the model's trace points (labkit.backends.inspect_model): what advance_until can wait for besides
# QMP events
TRACE_POINTS = ("balloon-request", "bitmap-sync", "reporting-report", "hint-round", "virtio-mem-driver")


def check_wait(max_ms: Any, now: float = 0.0) -> float:
    """``advance_until``'s ``max_ms``, checked as every time is (:func:`labkit.backends.base.check_ms`)."""
    from labkit.backends.base import check_ms

    return check_ms(max_ms, "advance_until() max_ms", now)


def unknown_mechanism(mechanism: str) -> ValueError:
    return ValueError(f"inspect() takes one of {list(SNAPSHOTS)}, got {mechanism!r}")


__all__ = ["SNAPSHOTS", "TRACE_POINTS", "BalloonView", "HintingView", "HostView", "MemoryView",
           "MigrationView", "PmemView", "ReportingView", "VirtioMemDeviceView", "VirtioMemView", "as_dict",
           "check_wait", "from_dict"]
