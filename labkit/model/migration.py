"""QEMU pre-copy live migration on the page model (migration/ram.c, migration.c, options.c).

Faithful to docs/mechanisms.md §6 (pre-copy migration; QEMU 7.x-9.x), as a simpy process on the VM's
clock that reads and writes the page arrays with numpy only:

* **Setup.** The migration bitmap is all ones (``ram_init_bitmaps``), dirty logging starts (the
  host sets ``PageFlag.DIRTY_LOG`` on every guest write) and the first bitmap sync runs, which fires
  the precopy notifiers (free page hinting starts its first round).
* **Two bitmaps, as in QEMU.** ``bitmap`` is the RAMBlock's migration bitmap: the pages still to
  send in this pass; its count is ``migration_dirty_pages`` (``ram.remaining``). ``DIRTY_LOG`` is
  what the migration will still have to send: set on every page at setup and by every guest write,
  cleared when a page is sent or hinted. A *bitmap sync* folds the pages written since the last sync
  into the migration bitmap (``bitmap |= DIRTY_LOG``). Clearing DIRTY_LOG as a page is sent stands
  for QEMU's clearing of the KVM dirty log just before sending (``clear_bmap``, per 1 GiB chunk in
  QEMU, per page here).
* **Iterations.** ``migration_iteration_run``: the pending estimate is the migration bitmap's
  count; **only when it is at most** ``threshold_size`` does QEMU sync the bitmap (§8.9); if the
  re-measured pending is below the threshold (or zero) the VM is stopped and the rest is sent.
  Otherwise ``ram_save_iterate`` sends pages in address order from where the last call stopped, for
  at most ``MAX_WAIT`` (50 ms), under the rate limit: ``max-bandwidth`` per second, accounted per
  ``BUFFER_DELAY`` (100 ms) window (0 disables it). At the end of each window
  ``migration_update_counters`` measures ``bandwidth = bytes / ms`` and sets ``threshold_size =
  bandwidth x downtime-limit`` (``avail-switchover-bandwidth`` replaces the measurement when set).
  Before the first window the threshold is 0.
* **Pages on the wire.** A page that is neither ``BACKED`` nor ``SWAPPED`` reads as zero (never
  touched, or discarded by the balloon or reporting), as does a free page under ``init_on_free=1``:
  it is a zero page (``save_zero_page``: a header and a fill byte, ``ZERO_PAGE_BYTES``); any other
  page costs ``NORMAL_PAGE_BYTES`` (header + 4096). The byte counts are confirmed (docs/mechanisms.md
  §6.4, §9.9). Hinted pages are simply not in the bitmap any more: they cost nothing.
* **Syncs and rates.** Each sync counts ``dirty-sync-count``, fires PRECOPY_NOTIFY_BEFORE/AFTER_
  BITMAP_SYNC and, once a period of more than 1 s has passed, computes ``dirty-pages-rate`` and runs
  the auto-converge check (``migration_trigger_throttle``): if the bytes dirtied in the period exceed
  ``throttle-trigger-threshold`` % of the bytes sent, a counter rises; at 2 it resets and the CPU
  throttle starts at ``cpu-throttle-initial`` or rises by ``cpu-throttle-increment`` (at most
  ``max-cpu-throttle``; ``cpu-throttle-tailslow`` as ``mig_throttle_guest_down``). Guest workloads
  run ``1 - throttle`` as fast. ``MIGRATION_PASS`` is emitted per sync when ``events`` is on.
* **Completion.** The VM stops (runstate ``finish-migrate``: the dirtying workloads of
  :mod:`labkit.model.migration_workloads` and the hinting driver wait; the balloon and reporting
  timers are not paused, a simplification), the final sync runs (hinting gets DONE), the rest is
  sent with the rate limit disabled (``migration_rate_set(RATE_LIMIT_DISABLED)``), plus the device
  state; ``downtime`` is the time from stop to end. The source ends in runstate ``postmigrate``.

The destination and the link are simulated (:class:`LinkModel`, model assumptions, not QEMU facts):
a link of ``link_bandwidth`` bytes/s, and CPU time per page in the migration thread
(``zero_page_us`` to read 4 KiB and find it zero, ``normal_page_us`` to copy one); a batch takes
``max(cpu, bytes / link)``. The defaults (10 Gbit/s, 0.7 us, 0.3 us) are calibrated to the shape of
the published hinting result (docs/results.md), not measured. After completion the model goes on as the
guest on the destination (its workloads resume; QMP still answers as the source: ``postmigrate``).
Not modelled: postcopy (``postcopy-ram`` only disables hinting), XBZRLE and multifd (accepted as
capabilities where QEMU does, pages are sent whole), compression, TLS.

>>> import labkit
>>> vm = labkit.open(memory="256M", seed=0)
>>> vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
{}
>>> vm.advance(5000)
>>> info = vm.qmp("query-migrate")
>>> info["status"], vm.qmp("query-status")["status"]
('completed', 'postmigrate')
>>> info["ram"]["normal"] + info["ram"]["duplicate"] >= 65536
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from labkit.model.kernel import Kernel
from labkit.model.migration_params import default_capabilities, default_parameters
from labkit.model.migration_ram import (
    BUFFER_DELAY,
    DIRTY_LOG,
    TARGET_PAGE_SIZE,
    TIME_EPSILON_MS,
    RamSaving,
)
from labkit.model.runstate import RUNNING_STATES, PrecopyNotify, RunState


@dataclass
class LinkModel:
    """The simulated link and migration-thread costs (model assumptions; see the module doc)."""

    link_bandwidth: float = 1.25e9  # bytes/s: a 10 Gbit/s link
    zero_page_us: float = 0.7  # read a page, buffer_is_zero, write a 9-byte record
    normal_page_us: float = 0.3  # copy a page into the stream (the link is usually slower)
    setup_ms: float = 5.0  # bitmaps, dirty-log start, first sync
    device_state_bytes: int = 512 << 10  # non-RAM device state sent during the downtime
    step_ms: float = 10.0  # model resolution inside one ram_save_iterate call (<= MAX_WAIT)


class MigrationState(RamSaving):
    """One VM's outgoing migration: ``vm.migration``. Its QMP commands are the monitor's
    (:mod:`labkit.backends.monitor_migration`); its parameters are in
    :mod:`labkit.model.migration_params`."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, run_state: RunState,
                 emit: Callable[[str, dict], None], *, init_on_free: bool = False):
        self.env = env
        self.mem = kernel.mem
        self.kernel = kernel
        self.host_vm = kernel.host_vm
        self.run_state = run_state
        run_state.free_page_hint = self.free_page_hint  # qemu_guest_free_page_hint lands here
        self.emit = emit
        self.init_on_free = init_on_free  # free pages read as zero (buffer_is_zero on the source)
        self.link = LinkModel()
        self.parameters = default_parameters()
        self.capabilities = default_capabilities()
        self.error_desc: str | None = None
        self.throttle_pct = 0
        self.uri: str | None = None
        self._thread: simpy.Process | None = None
        self.bitmap = np.zeros(0, dtype=bool)
        self.history: list[dict] = []  # one row per 100 ms window and per sync (for the views)
        self.workloads = None  # the dirtying workloads (labkit.model.migration_workloads)
        self._reset_counters()

    @property
    def status(self) -> str:
        """MigrationStatus: none, setup, active, cancelling, cancelled, completed, failed."""
        return self.run_state.migration_status

    @status.setter
    def status(self, value: str) -> None:
        self.run_state.migration_status = value

    @property
    def runstate(self) -> str:
        """The VM's run state: running, finish-migrate (stopped for the switchover), postmigrate."""
        return self.run_state.state

    @property
    def precopy_notifiers(self) -> list:
        """QEMU's precopy notifier list: callables(reason, vm_running, postcopy_ram)."""
        return self.run_state.precopy_notifiers

    def _reset_counters(self) -> None:
        self.dirty_pages = 0  # migration_dirty_pages
        self.cursor = 0
        self._last_fit = 0
        self.transferred = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.zero_pages = 0
        self.normal_pages = 0
        self.dirty_sync_count = 0
        self.threshold_size = 0.0
        self.expected_downtime = 0
        self.downtime = 0
        self.setup_time = 0
        self.total_time = 0
        self.start_time = 0.0
        self.mbps = 0.0
        self.pages_per_second = 0.0
        self.dirty_pages_rate = 0
        self.dirty_bytes_last_sync = 0
        self.num_dirty_pages_period = 0
        self.time_last_sync: float | None = None
        self.bytes_xfer_prev = 0
        self.dirty_rate_high_cnt = 0
        self.iteration_start = 0.0
        self.iteration_initial_bytes = 0
        self.iteration_initial_pages = 0
        self.hinted_pages = 0  # bits cleared by free page hints

    # --- state the guest side looks at --------------------------------------------------------
    @property
    def guest_running(self) -> bool:
        """False while the VM is stopped for the final stop-and-copy."""
        return self.run_state.running

    def wait_guest_running(self):
        """A simpy generator: return at once, or when the VM runs again."""
        yield from self.run_state.wait_running()

    @property
    def speed(self) -> float:
        """How fast the guest's vCPUs run: 1 - cpu-throttle-percentage."""
        return 1.0 - self.throttle_pct / 100.0

    def is_setup_or_active(self) -> bool:
        return self.status in ("setup", "active")

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, uri: str) -> None:
        """migrate_init + migrate_fd_connect: a fresh migration in status setup."""
        self._reset_counters()
        self.uri = uri
        self.error_desc = None
        self.history = []
        self._set_status("setup")
        self._thread = self.env.process(self._migration_thread())

    def cancel(self) -> None:
        """migrate_fd_cancel: cancelling now; the thread stops at its next step."""
        if self.status not in RUNNING_STATES or self.status == "cancelling":
            return
        self._set_status("cancelling")
        if self._thread is not None and self._thread.is_alive:
            self._thread.interrupt("cancel")

    def fail(self, desc: str) -> None:
        """migrate_fd_error: the connection could not be set up."""
        self.error_desc = desc
        self._set_status("failed")

    def _set_status(self, status: str) -> None:
        self.status = status
        if self.capabilities["events"]:
            self.emit("MIGRATION", {"status": status})

    def _set_runstate(self, runstate: str) -> None:
        self.run_state.set_state(runstate)

    def _notify(self, reason: PrecopyNotify) -> None:
        self.run_state.notify_precopy(reason, self.capabilities["postcopy-ram"])

    # --- the migration thread -----------------------------------------------------------------
    def _migration_thread(self):
        try:
            yield from self._setup()
            while True:
                pending = self.dirty_pages * TARGET_PAGE_SIZE
                if pending <= self.threshold_size:  # ram_state_pending_exact
                    self._bitmap_sync()
                    pending = self.dirty_pages * TARGET_PAGE_SIZE
                if pending == 0 or pending < self.threshold_size:
                    yield from self._completion()
                    break
                yield from self._iterate()
        except simpy.Interrupt:
            pass
        self._finish()

    def _setup(self):
        self.start_time = self.env.now
        self.bitmap = np.ones(self.mem.n_pages, dtype=bool)
        self.dirty_pages = self.mem.n_pages
        self.mem.flags |= DIRTY_LOG
        self.host_vm.dirty_logging = True
        self._notify(PrecopyNotify.SETUP)
        self._bitmap_sync()  # ram_init_bitmaps -> migration_bitmap_sync_precopy
        yield self.env.timeout(self.link.setup_ms)
        self.setup_time = round(self.env.now - self.start_time)
        self._set_status("active")
        self._new_window()

    def _new_window(self) -> None:
        self.iteration_start = self.env.now
        self.iteration_initial_bytes = self.transferred
        self.iteration_initial_pages = self.zero_pages + self.normal_pages

    def _update_counters(self) -> None:
        """migration_update_counters: bandwidth, threshold, mbps, expected downtime."""
        now = self.env.now
        time_spent = now - self.iteration_start
        if time_spent < BUFFER_DELAY - TIME_EPSILON_MS:  # simulated times are floats
            return
        transferred = self.transferred - self.iteration_initial_bytes
        bandwidth = transferred / time_spent  # bytes/ms
        switchover = self.parameters["avail-switchover-bandwidth"]
        expected_bw_per_ms = switchover / 1000 if switchover else bandwidth
        self.threshold_size = expected_bw_per_ms * self.parameters["downtime-limit"]
        self.mbps = transferred * 8.0 / (time_spent / 1000.0) / 1e6
        pages = self.zero_pages + self.normal_pages - self.iteration_initial_pages
        self.pages_per_second = pages / (time_spent / 1000.0)
        if self.dirty_pages_rate and transferred > 10000 and expected_bw_per_ms > 0:
            self.expected_downtime = int(self.dirty_bytes_last_sync / expected_bw_per_ms)
        self._record("window", bandwidth=bandwidth)
        self._new_window()

    def _completion(self):
        """migration_completion: stop the VM, final sync, send the rest at full link speed."""
        self._set_runstate("finish-migrate")
        stopped_at = self.env.now
        self._bitmap_sync(last_stage=True)
        pfns = np.flatnonzero(self.bitmap)
        zero, finish, cum_bytes = self._costs(pfns)
        nbytes = int(cum_bytes[-1]) if len(pfns) else 0
        self._send(pfns, zero, nbytes, downtime=True)
        device = self.link.device_state_bytes
        self.transferred += device
        self.downtime_bytes += device
        duration = (float(finish[-1]) if len(pfns) else 0.0) + device / (self.link.link_bandwidth / 1000)
        yield self.env.timeout(duration)
        if self.status == "cancelling":
            return
        self.downtime = round(self.env.now - stopped_at)
        self.total_time = round(self.env.now - self.start_time)
        transfer_time = self.total_time - self.setup_time
        if transfer_time:
            self.mbps = self.transferred * 8.0 / transfer_time / 1000
        self._set_status("completed")
        self._set_runstate("postmigrate")

    def _finish(self) -> None:
        """migration_iteration_finish + migrate_fd_cleanup: throttle off, logging off, DONE."""
        self.throttle_pct = 0
        self.host_vm.dirty_logging = False
        self.mem.flags &= ~DIRTY_LOG
        self._notify(PrecopyNotify.CLEANUP)
        if self.status == "cancelling":
            self._set_status("cancelled")
            if self.runstate == "finish-migrate":
                self._set_runstate("running")
        self._record("end")

    # --- what query-migrate and the views read ------------------------------------------------
    def _record(self, kind: str, **extra) -> None:
        self.history.append({
            "t_ms": float(self.env.now), "kind": kind, "transferred": self.transferred,
            "remaining": self.dirty_pages * TARGET_PAGE_SIZE, "threshold": self.threshold_size,
            "dirty_sync_count": self.dirty_sync_count, "throttle": self.throttle_pct,
            "normal": self.normal_pages, "zero": self.zero_pages, **extra})

    def sample(self) -> dict[str, float]:
        """Extra ``vm.sample()`` columns."""
        return {
            "migration_active": float(self.status in RUNNING_STATES),
            "migration_transferred": float(self.transferred),
            "migration_remaining": float(self.dirty_pages * TARGET_PAGE_SIZE),
            "migration_threshold": float(self.threshold_size),
            "migration_syncs": float(self.dirty_sync_count),
            "migration_throttle": float(self.throttle_pct),
        }

