"""virtio-mem, guest side: Linux's drivers/virtio/virtio_mem.c (6.x), per docs/mechanisms.md §5.3-§5.7.

* Sub Block Mode when the subblock (max(pageblock 2 MiB, device block size)) is smaller than a memory
  block (128 MiB): 64 subblocks of 2 MiB per block with QEMU's defaults. Big Block Mode otherwise.
* Plug order (SBM): partially plugged added blocks (KERNEL_PARTIAL, MOVABLE_PARTIAL, OFFLINE_PARTIAL,
  lowest block first, lowest subblocks first), then UNUSED blocks, then new blocks from ``next_mb_id``,
  each plugged *before* ``add_memory``. New memory is added only while added-but-offline memory stays
  within ``offline_threshold`` (max(2 memory blocks, 1 GiB)): without auto-onlining, plugging stalls
  there with -ENOSPC and no retry timer.
* Unplug order (SBM): OFFLINE_PARTIAL, OFFLINE, MOVABLE_PARTIAL, KERNEL_PARTIAL, MOVABLE, KERNEL,
  highest block first; in an online block the whole block at once if possible, else single subblocks
  from the top, skipping busy ones. Online memory is taken back with ``alloc_contig_range`` (5 attempts
  in ZONE_MOVABLE, 1 in ZONE_NORMAL): an unmovable kernel page anywhere in a subblock makes it -EBUSY.
* The work loop (``virtio_mem_run_wq``) first cancels the retry timer, then reads the config and
  plugs or unplugs the difference; it retries -EBUSY / -ETXTBSY (device BUSY, e.g. during migration)
  / -ENOMEM on a timer that starts at 50 s and doubles up to 300 s, reset to 50 s after a success.
  A config change (``qom-set requested-size``) seen before a request makes that request return
  -EAGAIN (``virtio_mem_send_plug_request`` / ``_unplug_request``): the run restarts at once with
  the new target instead of finishing the old one.

Simplifications: a request, adding and onlining a block, and each migrated page take fixed model
times (``TIMING``: assumed, to be measured against the live backend); kdump and suspend are not
modelled; BBM's optional ``bbm_block_size`` is not offered.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

import numpy as np
import simpy

from labkit.devices.virtio_mem import Request, Response, VirtioMemDevice
from labkit.model.hotplug import DeviceRegion, MemoryHotplug
from labkit.model.pages import PAGEBLOCK_ORDER, PageState
from labkit.units import GiB, PAGE_SIZE

VIRTIO_MEM_RETRY_TIMER_MIN_MS = 50_000
VIRTIO_MEM_RETRY_TIMER_MAX_MS = 300_000
VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD = 1 * GiB
FAKE_OFFLINE_ATTEMPTS_MOVABLE = 5  # virtio_mem_fake_offline: ZONE_MOVABLE retries


@dataclass(frozen=True)
class Timing:
    """Model times in ms (assumed, not from a source; the live backend measures the real ones)."""

    request_ms: float = 0.05  # one virtqueue request round trip
    add_memory_ms: float = 2.0  # add_memory + memmap init of one 128 MiB block
    online_ms: float = 1.0  # onlining one block
    migrate_page_us: float = 1.0  # alloc_contig_range: migrating one 4 KiB page


TIMING = Timing()


class SbmState(enum.IntEnum):
    UNUSED = 0
    PLUGGED = 1
    OFFLINE = 2
    OFFLINE_PARTIAL = 3
    KERNEL = 4
    KERNEL_PARTIAL = 5
    MOVABLE = 6
    MOVABLE_PARTIAL = 7


class VirtioMemDriver:
    """One virtio_mem driver instance bound to a device and its region."""

    def __init__(self, env: simpy.Environment, kernel, device: VirtioMemDevice,
                 region: DeviceRegion, hotplug: MemoryHotplug, timing: Timing = TIMING,
                 unplug_online: bool = True, pageblock_bytes: int = PAGE_SIZE << PAGEBLOCK_ORDER,
                 memory_block_bytes: int | None = None):
        self.env, self.kernel, self.device, self.region = env, kernel, device, region
        self.hotplug, self.timing, self.unplug_online = hotplug, timing, unplug_online
        self.node = region.node
        self.pages_per_mb = hotplug.block_pages  # memory_block_size_bytes() of this guest
        self.memory_block_bytes = self.pages_per_mb * PAGE_SIZE
        # virtio_mem_init_hotplug: the subblock is at least a pageblock (512 MiB on a 64 KiB arm64
        # guest, whose memory block is 512 MiB too: big block mode there; ``memory_block_bytes``
        # gives that guest's block, the model's own blocks stay x86's)
        guest_block = memory_block_bytes or self.memory_block_bytes
        self.sb_size = max(pageblock_bytes, device.block_size)
        self.bbm = self.sb_size >= guest_block
        self.unit_pages = (max(device.block_size, guest_block) if self.bbm else
                           self.sb_size) // PAGE_SIZE  # a big block, or a subblock
        self.unit_bytes = self.unit_pages * PAGE_SIZE
        self.first_mb = region.start // self.pages_per_mb
        self.n_mb = region.pages // self.pages_per_mb
        self.mbs_per_unit = max(1, self.unit_pages // self.pages_per_mb)
        self.units_per_mb = max(1, self.pages_per_mb // self.unit_pages)
        n_units = region.pages // self.unit_pages
        self.plugged = np.zeros(n_units, dtype=bool)  # the driver's subblock / big block bitmap
        self.mb_state = np.zeros(self.n_mb, dtype=np.int8)
        self.next_mb = 0
        self.plugged_size = device.size
        self.offline_size = 0
        self.offline_threshold = max(2 * self.memory_block_bytes, VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD,
                                     2 * self.unit_bytes if self.bbm else 0)
        self.retry_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
        self.broken = False
        self.last_rc = 0
        self.history: list[tuple[float, str, int]] = []  # (t, what, rc)
        self._pending = True  # probe queues the work once
        self.config_changed_flag = True  # vm->config_changed: probe reads the config first
        self.eagain_restarts = 0  # runs restarted because the config changed mid-run
        self._wake: simpy.Event = env.event()
        self._retry_timer: simpy.Process | None = None
        device.config_changed = self.config_changed
        self.process = env.process(self._work())

    # --- helpers ------------------------------------------------------------------------------
    def unit_range(self, unit: int) -> tuple[int, int]:
        a = self.region.start + unit * self.unit_pages
        return a, a + self.unit_pages

    def unit_addr(self, unit: int) -> int:
        return self.region.memaddr + unit * self.unit_bytes

    def mb_units(self, mb: int) -> slice:
        return slice(mb * self.units_per_mb, (mb + 1) * self.units_per_mb)

    def mb_online_zone(self, mb: int) -> str | None:
        return self.hotplug.online_blocks.get(self.first_mb + mb)

    def _refresh_state(self, mb: int) -> None:
        bits = self.plugged[self.mb_units(mb)] if not self.bbm else self.plugged[
            mb // self.mbs_per_unit: mb // self.mbs_per_unit + 1]
        added = (self.first_mb + mb) in self.hotplug.memmap
        if not added:
            self.mb_state[mb] = SbmState.UNUSED
            return
        full = bool(bits.all())
        zone = self.mb_online_zone(mb)
        base = {None: SbmState.OFFLINE, "Normal": SbmState.KERNEL, "Movable": SbmState.MOVABLE}[zone]
        self.mb_state[mb] = base if full else base + 1

    # --- the work item ------------------------------------------------------------------------
    def config_changed(self) -> None:
        """virtio_mem_config_changed: ``atomic_set(&vm->config_changed, 1)``, queue the work."""
        self.config_changed_flag = True
        self._kick()

    def _kick(self) -> None:
        self._pending = True
        if not self._wake.triggered:
            self._wake.succeed()

    def memory_notify_online(self) -> None:
        """MEM_ONLINE: recount offline memory; retry once half the threshold could be added."""
        self.offline_size = sum(
            self.memory_block_bytes for mb in range(self.n_mb)
            if (self.first_mb + mb) in self.hotplug.memmap and self.mb_online_zone(mb) is None)
        for mb in range(self.n_mb):
            self._refresh_state(mb)
        if self.offline_size + self.offline_threshold // 2 <= self.offline_threshold:
            self._kick()  # virtio_mem_retry: queue the work (the config did not change)

    def _work(self):
        """virtio_mem_run_wq."""
        while True:
            if not self._pending:
                self._wake = self.env.event()
                yield self._wake
            self._pending = False
            self._cancel_retry()  # hrtimer_cancel(&vm->retry_timer)
            if self.broken:
                continue
            while True:  # retry:
                if self.config_changed_flag:  # virtio_mem_refresh_config
                    self.config_changed_flag = False
                rc = 0
                requested, plugged = self.device.requested_size, self.plugged_size
                if requested > plugged:
                    rc = yield from self._plug_request(requested - plugged)
                    what = "plug"
                elif requested < plugged:
                    rc = yield from self._unplug_request(plugged - requested)
                    what = "unplug"
                else:
                    what = "idle"
                self.last_rc = rc
                self.history.append((self.env.now, what, rc))
                if rc != -errno.EAGAIN:
                    break
                self.eagain_restarts += 1  # "Retry immediately (e.g., the config changed)."
            if rc == 0:
                self.retry_ms = VIRTIO_MEM_RETRY_TIMER_MIN_MS
            elif rc in (-errno.ETXTBSY, -errno.EBUSY, -errno.ENOMEM):
                self._arm_retry()
            elif rc != -errno.ENOSPC:
                self.kernel.log(f"virtio_mem: unknown error, marking device broken: {rc}")
                self.broken = True

    def _arm_retry(self) -> None:
        """hrtimer_start(&vm->retry_timer, retry_timer_ms)."""
        self._cancel_retry()
        self._retry_timer = self.env.process(self._retry(self.retry_ms))

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None and self._retry_timer.is_alive:
            self._retry_timer.interrupt("cancel")
        self._retry_timer = None

    def _retry(self, delay: float):
        try:
            yield self.env.timeout(delay)
        except simpy.Interrupt:
            return
        # virtio_mem_timer_expired: double the delay (up to the max), then queue the work
        self.retry_ms = min(self.retry_ms * 2, VIRTIO_MEM_RETRY_TIMER_MAX_MS)
        self._retry_timer = None
        self._kick()

    # --- requests to the device ---------------------------------------------------------------
    def _send(self, kind: Request, unit: int, count: int):
        """virtio_mem_send_plug_request / _unplug_request: -EAGAIN if the config changed."""
        if self.config_changed_flag:
            return -errno.EAGAIN
        yield self.env.timeout(self.timing.request_ms)
        nb_blocks = count * self.unit_bytes // self.device.block_size
        resp, _ = self.device.request(kind, self.unit_addr(unit), nb_blocks)
        if resp == Response.ACK:
            delta = count * self.unit_bytes
            self.plugged_size += delta if kind == Request.PLUG else -delta
            self.plugged[unit:unit + count] = kind == Request.PLUG
            return 0
        return {Response.NACK: -errno.EAGAIN, Response.BUSY: -errno.ETXTBSY,
                Response.ERROR: -errno.EINVAL}[resp]

    def _could_add_memory(self, size: int) -> bool:
        return self.offline_size + size <= self.offline_threshold

    # --- plug ---------------------------------------------------------------------------------
    def _plug_request(self, diff: int):
        """virtio_mem_sbm_plug_request / virtio_mem_bbm_plug_request."""
        nb = diff // self.unit_bytes
        if nb == 0:
            return 0
        if not self.bbm:
            for state in (SbmState.KERNEL_PARTIAL, SbmState.MOVABLE_PARTIAL,
                          SbmState.OFFLINE_PARTIAL):
                for mb in np.flatnonzero(self.mb_state[:self.next_mb] == state):
                    rc, nb = yield from self._plug_any_sb(int(mb), nb)
                    if rc or not nb:
                        return rc
        for mb in np.flatnonzero(self.mb_state[:self.next_mb] == SbmState.UNUSED):
            if self.bbm and mb % self.mbs_per_unit:
                continue
            if not self._could_add_memory(self.mbs_per_unit * self.memory_block_bytes):
                return -errno.ENOSPC
            rc, nb = yield from self._plug_and_add(int(mb), nb)
            if rc or not nb:
                return rc
        while nb:
            if not self._could_add_memory(self.mbs_per_unit * self.memory_block_bytes):
                return -errno.ENOSPC
            last_usable = (self.device.config.usable_region_size // self.memory_block_bytes)
            if self.next_mb + self.mbs_per_unit > min(last_usable, self.n_mb):
                return -errno.ENOSPC
            mb = self.next_mb
            self.next_mb += self.mbs_per_unit
            rc, nb = yield from self._plug_and_add(mb, nb)
            if rc:
                return rc
        return 0

    def _plug_and_add(self, mb: int, nb: int):
        """Plug the first subblocks of a block (or a whole big block), then add (and online) it."""
        count = 1 if self.bbm else min(nb, self.units_per_mb)
        unit = mb // self.mbs_per_unit if self.bbm else mb * self.units_per_mb
        rc = yield from self._send(Request.PLUG, unit, count)
        if rc:
            return rc, nb
        for i in range(self.mbs_per_unit):
            yield self.env.timeout(self.timing.add_memory_ms)
            rc = self.hotplug.add_memory(self.first_mb + mb + i)
            if rc:  # undo: unplug again
                yield from self._send(Request.UNPLUG, unit, count)
                return rc, nb
            self.offline_size += self.memory_block_bytes
            self._auto_online(mb + i)
            self._refresh_state(mb + i)
        return 0, nb - count

    def _auto_online(self, mb: int) -> None:
        online_type = self.hotplug.online_type
        if online_type == "offline":
            return
        self.online_block(mb, self.hotplug.choose_zone(self.node, online_type, self.first_mb + mb))

    def online_block(self, mb: int, movable: bool) -> None:
        """Online a block: plugged units go to the buddy allocator, the rest stay offline."""
        a = (self.first_mb + mb) * self.pages_per_mb
        units = np.flatnonzero(self.plugged[self.mb_units(mb)] if not self.bbm else
                               self.plugged[mb // self.mbs_per_unit:mb // self.mbs_per_unit + 1])
        if self.bbm or len(units) == self.units_per_mb:  # the whole block: one arange
            plugged = np.arange(a, a + self.pages_per_mb * (len(units) > 0), dtype=np.int64)
        else:
            plugged = (units[:, None] * self.unit_pages + np.arange(self.unit_pages, dtype=np.int64)
                       ).ravel() + a
        self.hotplug.online(self.first_mb + mb, self.node, movable, plugged)
        self.offline_size -= self.memory_block_bytes
        self._refresh_state(mb)

    def _plug_any_sb(self, mb: int, nb: int):
        """Plug the lowest unplugged subblocks of an added block, as contiguous runs."""
        while nb:
            bits = self.plugged[self.mb_units(mb)]
            free = np.flatnonzero(~bits)
            if len(free) == 0:
                break
            first = int(free[0])
            run = first
            while run + 1 < len(bits) and not bits[run + 1] and run + 1 - first < nb:
                run += 1
            count = min(run - first + 1, nb)
            unit = mb * self.units_per_mb + first
            rc = yield from self._send(Request.PLUG, unit, count)
            if rc:
                return rc, nb
            nb -= count
            if self.mb_online_zone(mb) is not None:
                a, _ = self.unit_range(unit)
                self.hotplug.fake_online(np.arange(a, a + count * self.unit_pages, dtype=np.int64))
            self._refresh_state(mb)
        return 0, nb

    # --- unplug -------------------------------------------------------------------------------
    def _unplug_request(self, diff: int):
        """virtio_mem_sbm_unplug_request / virtio_mem_bbm_unplug_request."""
        nb = diff // self.unit_bytes
        if nb == 0:
            return 0
        if self.bbm:
            return (yield from self._bbm_unplug(nb))
        order = (SbmState.OFFLINE_PARTIAL, SbmState.OFFLINE, SbmState.MOVABLE_PARTIAL,
                 SbmState.KERNEL_PARTIAL, SbmState.MOVABLE, SbmState.KERNEL)
        for i, state in enumerate(order):
            for mb in np.flatnonzero(self.mb_state[:self.next_mb] == state)[::-1]:
                rc, nb = yield from self._unplug_any_sb(int(mb), nb)
                if rc or not nb:
                    return rc
            if not self.unplug_online and i == 1:
                return 0
        return -errno.EBUSY if nb else 0

    def _unplug_any_sb(self, mb: int, nb: int):
        online = self.mb_online_zone(mb)
        sl = self.mb_units(mb)
        if online is None:  # offline block: unplug from the top, as runs
            while nb:
                bits = self.plugged[sl]
                on = np.flatnonzero(bits)
                if len(on) == 0:
                    break
                last = int(on[-1])
                first = last
                while first - 1 >= 0 and bits[first - 1] and last - first + 1 < nb:
                    first -= 1
                rc = yield from self._send(Request.UNPLUG, mb * self.units_per_mb + first,
                                           last - first + 1)
                if rc:
                    return rc, nb
                nb -= last - first + 1
        else:
            if nb >= self.units_per_mb and self.plugged[sl].all():
                rc = yield from self._unplug_online(mb, 0, self.units_per_mb)
                if rc == 0:
                    nb -= self.units_per_mb
                elif rc != -errno.EBUSY:
                    return rc, nb
            for sb in range(self.units_per_mb - 1, -1, -1):
                if not nb:
                    break
                if not self.plugged[sl][sb]:
                    continue
                rc = yield from self._unplug_online(mb, sb, 1)
                if rc == -errno.EBUSY:
                    continue
                if rc:
                    return rc, nb
                nb -= 1
        self._try_remove(mb)
        self._refresh_state(mb)
        return 0, nb

    def _unplug_online(self, mb: int, sb: int, count: int):
        """virtio_mem_sbm_unplug_sb_online: fake-offline (migrate), then UNPLUG; undo on failure."""
        unit = mb * self.units_per_mb + sb
        a, _ = self.unit_range(unit)
        b = a + count * self.unit_pages
        movable = self.mb_online_zone(mb) == "Movable"
        before = self.hotplug.migrated_pages
        rc = self.hotplug.alloc_contig_range(
            a, b, attempts=FAKE_OFFLINE_ATTEMPTS_MOVABLE if movable else 1)
        moved = self.hotplug.migrated_pages - before
        yield self.env.timeout(moved * self.timing.migrate_page_us / 1000.0)
        if rc:
            return rc
        rc = yield from self._send(Request.UNPLUG, unit, count)
        if rc:  # the host said no: give the pages back to the buddy allocator
            self.hotplug.fake_online(np.arange(a, b, dtype=np.int64))
            return rc
        return 0

    def _try_remove(self, mb: int) -> None:
        """virtio_mem_sbm_try_remove_unplugged_mb: a fully unplugged block is offlined and
        removed; if that fails, cleanup is retried later (have_unplugged_mb)."""
        if self.plugged[self.mb_units(mb)].any():
            return
        block = self.first_mb + mb
        if block not in self.hotplug.memmap:
            return
        was_offline = self.mb_online_zone(mb) is None
        if self.hotplug.offline_and_remove(block) == 0 and was_offline:
            self.offline_size -= self.memory_block_bytes

    def _bbm_unplug(self, nb: int):
        """BBM: scan big blocks downward in 3 passes (offline; online only in ZONE_MOVABLE; any)."""
        units = np.flatnonzero(self.plugged)[::-1]
        for pass_ in range(3):
            for unit in units:
                if not nb or not self.plugged[unit]:
                    continue
                mbs = [int(unit) * self.mbs_per_unit + i for i in range(self.mbs_per_unit)]
                zones = [self.mb_online_zone(mb) for mb in mbs]
                if pass_ == 0 and any(zones):
                    continue
                if pass_ == 1 and any(z == "Normal" for z in zones):
                    continue
                a, b = self.unit_range(int(unit))
                attempts = FAKE_OFFLINE_ATTEMPTS_MOVABLE if "Normal" not in zones else 1
                if any(zones) and self.hotplug.alloc_contig_range(a, b, attempts=attempts):
                    continue  # busy: skipped
                rc = yield from self._send(Request.UNPLUG, int(unit), 1)
                if rc:  # roll back what was fake-offlined: the online memory blocks' pages only
                    for mb, zone in zip(mbs, zones, strict=True):
                        if zone is not None:
                            lo, hi = self.hotplug.block_range(self.first_mb + mb)
                            self.hotplug.fake_online(np.flatnonzero(
                                self.kernel.mem.state[lo:hi] == int(PageState.OFFLINE)) + lo)
                    return rc
                for mb in mbs:
                    was_offline = self.mb_online_zone(mb) is None
                    self.hotplug.offline_and_remove(self.first_mb + mb)
                    if was_offline:
                        self.offline_size -= self.memory_block_bytes
                    self._refresh_state(mb)
                nb -= 1
        return -errno.EBUSY if nb else 0
