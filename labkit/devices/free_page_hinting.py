"""Free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT): the guest driver and the QEMU device.

Faithful to docs/mechanisms.md §2 (free page hinting; drivers/virtio/virtio_balloon.c, Linux 6.x;
hw/virtio/virtio-balloon.c, QEMU 7.x-9.x):

* **Command IDs.** QEMU's device starts at ``VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN`` (0x80000000,
  set in ``virtio_balloon_instance_init``) and adds 1 before each round, so the first round is
  0x80000001; after ``UINT_MAX`` it wraps back to the minimum. ``STOP`` (0) and ``DONE`` (1) are
  reserved. Config space shows the round's ID while the status is REQUESTED, 0 for STOP and 1 for
  DONE (``virtio_balloon_get_config``; START shows 0 too, but the guest only re-reads the ID after
  a config interrupt). QEMU enters START when the guest echoes the ID of a REQUESTED round, and
  honours hints only in START (``get_free_page_hints``).
* **Who drives it.** Only live migration: the precopy notifier (``virtio_balloon_free_page_hint_
  notify``) maps BEFORE_BITMAP_SYNC to STOP, AFTER_BITMAP_SYNC to a new round while the VM runs and
  to DONE when it is stopped (the final sync), CLEANUP (cancel, failure, end) to DONE. With the
  ``postcopy-ram`` capability the notifier does nothing at all.
* **Guest.** ``report_free_page_func`` on ``balloon-wq``: for a new ID, send the ID, then allocate
  order-10 blocks (4 MiB, ``VIRTIO_BALLOON_HINT_BLOCK_ORDER = MAX_PAGE_ORDER``) one by one with
  ``__GFP_NORETRY | __GFP_NOWARN | __GFP_NOMEMALLOC`` and add each to the free page virtqueue, until
  an allocation fails or the ID changes; then send STOP. The blocks (state HINTED) stay on
  ``free_page_list`` until the ID becomes DONE (all given back) or the "virtio-balloon" shrinker
  returns them under memory pressure (``count`` = blocks x 1024 pages, ``scan`` frees
  ``ceil(nr_to_scan / 1024)`` blocks, last hinted first).
* **Which watermark.** The flags carry no ``__GFP_RECLAIM`` bit: no kswapd wake-up, no direct
  reclaim, no compaction. The fast path tries the *low* watermark; the slow path retries at the
  *min* watermark (``ALLOC_WMARK_MIN``; ``__GFP_NOMEMALLOC`` denies ``ALLOC_NON_BLOCK``) and then
  gives up. So a block is taken while ``__zone_watermark_ok`` holds at min for order 10: ``free -
  1023 > min`` and a free block of order 10 exists. The flags have no ``__GFP_MOVABLE`` either, so
  only non-movable zones (ZONE_NORMAL) are used.
* **Ring.** One slot is always kept for the command ID: a block is added only while the ring has
  more than one free entry; otherwise it is freed at once, unhinted, and the loop tries again
  (``get_free_page_and_send``). QEMU gives the free page vq ``VIRTQUEUE_MAX_SIZE`` entries (1024,
  confirmed in docs/mechanisms.md §1.1; modelled as 1024).
* **Host.** Each hinted block is ``qemu_guest_free_page_hint``: its bits leave the migration dirty
  bitmap and the dirty count (:meth:`labkit.model.migration_ram.RamSaving.free_page_hint`); nothing
  happens when no migration is in setup or active. QEMU does not discard hinted pages: host RSS does
  not change. The iothread is blocked while the VM is stopped.

Simplifications (model choices, not Linux or QEMU facts): guest and host work in steps of
``HintTiming.step_ms``, each block costing ``guest_block_us`` in the guest (allocation, add, kick)
and ``host_block_us`` in QEMU's iothread; both are **assumed** round numbers. Order-10 blocks are
taken in ascending address order, unreported before reported (recently freed blocks are not put at
the head of the list). The shrinker is asked for the pages reclaim still wants (Linux scales
``nr_to_scan`` by priority and batches of 128). Hinted blocks are never written by the guest: they
are allocated by the driver; after DONE they are free pages again and a later write is dirty-logged.

>>> import labkit
>>> vm = labkit.open(memory="512M", seed=0, balloon={"free_page_hint": True, "iothread": "io0"})
>>> hex(vm.hinting.device.cmd_id), vm.hinting.device.status.name
('0x80000000', 'STOP')
>>> _ = vm.qmp("migrate", uri="exec:cat > /dev/null")
>>> vm.advance(5)
>>> hex(vm.hinting.device.cmd_id), vm.hinting.driver.num_free_page_blocks > 0
('0x80000001', True)
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from labkit.devices.balloon import BalloonDevice, BalloonDriver
from labkit.model.pages import MAX_PAGE_ORDER, PageFlag
from labkit.model.runstate import PrecopyNotify, RunState
from labkit.units import PAGE_SIZE

REPORTED = np.uint8(PageFlag.REPORTED)

# include/uapi/linux/virtio_balloon.h
VIRTIO_BALLOON_CMD_ID_STOP = 0
VIRTIO_BALLOON_CMD_ID_DONE = 1
# include/hw/virtio/virtio-balloon.h
VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN = 0x80000000
UINT_MAX = 0xFFFFFFFF
# drivers/virtio/virtio_balloon.c
VIRTIO_BALLOON_HINT_BLOCK_ORDER = MAX_PAGE_ORDER
VIRTIO_BALLOON_HINT_BLOCK_PAGES = 1 << VIRTIO_BALLOON_HINT_BLOCK_ORDER
VIRTIO_BALLOON_HINT_BLOCK_BYTES = VIRTIO_BALLOON_HINT_BLOCK_PAGES * PAGE_SIZE
# hw/virtio/virtio-balloon.c: the free page vq is VIRTQUEUE_MAX_SIZE entries (UNCONFIRMED: 1024)
VIRTQUEUE_MAX_SIZE = 1024


class HintStatus(enum.IntEnum):
    """QEMU's FREE_PAGE_HINT_S_* (include/hw/virtio/virtio-balloon.h)."""

    STOP = 0
    REQUESTED = 1
    START = 2
    DONE = 3


class HintDriver(Protocol):
    """What the device needs of the guest's driver (:mod:`labkit.devices.free_page_hinting_guest`)."""

    hinted_bytes: int

    def config_changed(self) -> None: ...


@dataclass
class HintTiming:
    """Model knobs (assumed, not measured): microseconds per block on each side, step length."""

    guest_block_us: float = 2.0
    host_block_us: float = 2.0
    step_ms: float = 1.0


class FreePageHintDevice:
    """QEMU's side: command IDs, the status machine, the free page vq and the hint itself.

    Built with the balloon (``balloon_device`` holds the config space, ``balloon_driver`` gets the
    config interrupt) and the VM's ``run_state``: it joins the precopy notifiers there and sends
    its hints to ``run_state.free_page_hint`` (the migration engine, once there is one)."""

    def __init__(self, balloon_device: BalloonDevice, balloon_driver: BalloonDriver | None,
                 run_state: RunState):
        self.balloon_device = balloon_device
        self.balloon_driver = balloon_driver
        self.run_state = run_state
        self.cmd_id = VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        self._status = HintStatus.STOP
        self.ring: deque = deque()  # available entries: ("id", value) or ("block", start_pfn)
        self.ring_size = VIRTQUEUE_MAX_SIZE
        self.driver: HintDriver | None = None  # set by the driver at probe
        self.hinted_blocks = 0  # blocks whose bits QEMU cleared (status START)
        self.ignored_blocks = 0  # blocks consumed outside START (no hint)
        self.rounds = 0
        run_state.precopy_notifiers.append(self.precopy_notify)  # precopy_add_notifier at realize

    @property
    def status(self) -> HintStatus:
        return self._status

    @status.setter
    def status(self, value: HintStatus) -> None:
        """Config space is read live (virtio_balloon_get_config): keep its ID field in step."""
        self._status = value
        self.balloon_device.config.free_page_hint_cmd_id = self.config_cmd_id()

    # --- precopy notifier ---------------------------------------------------------------------
    def precopy_notify(self, reason: PrecopyNotify, vm_running: bool, postcopy_ram: bool) -> None:
        """virtio_balloon_free_page_hint_notify."""
        if postcopy_ram:  # hinted pages would stall postcopy faults: never start hinting
            return
        if reason is PrecopyNotify.BEFORE_BITMAP_SYNC:
            self._stop()
        elif reason is PrecopyNotify.AFTER_BITMAP_SYNC and vm_running:
            self._start()
        elif reason in (PrecopyNotify.AFTER_BITMAP_SYNC, PrecopyNotify.CLEANUP):
            self._done()  # the final sync with the VM stopped, or cancel/failure/cleanup

    def _start(self) -> None:
        """virtio_balloon_free_page_start: next ID (wrapping after UINT_MAX), REQUESTED."""
        if self.cmd_id == UINT_MAX:
            self.cmd_id = VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        else:
            self.cmd_id += 1
        self.status = HintStatus.REQUESTED
        self.rounds += 1
        self._notify_config()

    def _stop(self) -> None:
        if self.status != HintStatus.STOP:
            self.status = HintStatus.STOP
            self._notify_config()

    def _done(self) -> None:
        if self.status != HintStatus.DONE:
            self.status = HintStatus.DONE
            self._notify_config()

    def config_cmd_id(self) -> int:
        """free_page_hint_cmd_id as virtio_balloon_get_config fills it."""
        if self.status == HintStatus.REQUESTED:
            return self.cmd_id
        if self.status == HintStatus.DONE:
            return VIRTIO_BALLOON_CMD_ID_DONE
        return VIRTIO_BALLOON_CMD_ID_STOP

    def _notify_config(self) -> None:
        """virtio_notify_config: the balloon config changed (virtballoon_changed in the guest)."""
        if self.balloon_driver is not None:
            self.balloon_driver.config_changed()
        if self.driver is not None:
            self.driver.config_changed()

    # --- the iothread's bottom half -----------------------------------------------------------
    def consume(self, budget: int) -> int:
        """get_free_page_hints for up to ``budget`` entries; returns how many were consumed."""
        done = 0
        starts = []
        while self.ring and done < budget:
            kind, value = self.ring.popleft()
            done += 1
            if kind == "id":
                if self.status == HintStatus.REQUESTED and value == self.cmd_id:
                    self.status = HintStatus.START
                elif self.status == HintStatus.START:  # a stop sign (or a stale ID) ends START
                    self._hint(starts)
                    starts = []
                    self.status = HintStatus.STOP
            elif self.status == HintStatus.START:
                starts.append(value)
            else:
                self.ignored_blocks += 1
        self._hint(starts)
        return done

    def _hint(self, starts: list[int]) -> None:
        """qemu_guest_free_page_hint for each block (a no-op unless a migration is running)."""
        if not starts:
            return
        self.hinted_blocks += len(starts)
        if self.run_state.free_page_hint is not None:
            self.run_state.free_page_hint(np.asarray(starts, dtype=np.int64),
                                          VIRTIO_BALLOON_HINT_BLOCK_PAGES)


def expand_blocks(starts: np.ndarray) -> np.ndarray:
    """All PFNs of the order-10 blocks starting at ``starts``."""
    offsets = np.arange(VIRTIO_BALLOON_HINT_BLOCK_PAGES, dtype=np.int64)
    return (np.asarray(starts, dtype=np.int64)[:, None] + offsets).ravel()


def block_rows(array: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``array``'s values over each order-10 block, one row per block (a copy)."""
    size = VIRTIO_BALLOON_HINT_BLOCK_PAGES
    if len(starts) and not (starts % size).any():  # aligned: whole rows of a 2-D view
        return array[:len(array) // size * size].reshape(-1, size)[starts // size]
    return array[expand_blocks(starts)].reshape(len(starts), size)


@dataclass
class FreePageHinting:
    """Free page hinting on one VM (``vm.hinting``): the device, the driver and the timing knobs.
    The machine builds it with the balloon when ``free-page-hint`` is on (QEMU's realize refuses
    that without ``iothread``: "'free-page-hint' requires 'iothread' to be set")."""

    device: FreePageHintDevice
    driver: HintDriver
    timing: HintTiming

    def sample(self) -> dict[str, float]:
        return {"hinted": float(self.driver.hinted_bytes)}
