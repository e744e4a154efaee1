"""The RAM half of pre-copy migration (QEMU migration/ram.c), mixed into ``MigrationState``.

The migration bitmap and its count, the bitmap sync with its precopy notifiers, the dirty-rate
period and auto-converge trigger, ``qemu_guest_free_page_hint``, and ``ram_save_iterate``: finding
dirty pages in address order, zero-page detection, what each page costs on the wire and in time.
See :mod:`labkit.model.migration` for the whole picture and the model's assumptions.
"""

from __future__ import annotations

import math

import numpy as np

from labkit.model.block_scan import block_runs
from labkit.model.pages import PageFlag, PageState
from labkit.model.runstate import PrecopyNotify
from labkit.units import PAGE_SIZE

BUFFER_DELAY = 100  # ms, migration/migration.h: rate-limit and bandwidth window
TIME_EPSILON_MS = 1e-6  # simulated times are floats: a window "ends" within this
XFER_LIMIT_RATIO = 1000 // BUFFER_DELAY
MAX_WAIT = 50  # ms, migration/ram.c: longest ram_save_iterate call
DIRTY_RATE_PERIOD_MS = 1000  # migration_bitmap_sync: rates and auto-converge over periods > 1 s
THROTTLE_HIGH_COUNT = 2  # migration_trigger_throttle: dirty_rate_high_cnt >= 2
TARGET_PAGE_SIZE = PAGE_SIZE
PAGE_HEADER_BYTES = 8  # save_page_header: be64 offset | flags (UNCONFIRMED)
ZERO_PAGE_BYTES = PAGE_HEADER_BYTES + 1  # save_zero_page: header + fill byte (UNCONFIRMED)
NORMAL_PAGE_BYTES = PAGE_HEADER_BYTES + TARGET_PAGE_SIZE  # save_normal_page (UNCONFIRMED header)

DIRTY_LOG = np.uint8(PageFlag.DIRTY_LOG)
CONTENT = np.uint8(PageFlag.BACKED | PageFlag.SWAPPED)


class RamSaving:
    """ram.c's part of the migration state's behaviour (the state itself is MigrationState's)."""

    # --- QEMU's qemu_guest_free_page_hint -----------------------------------------------------
    def free_page_hint(self, starts: np.ndarray, npages: int) -> None:
        """Clear the bits of ``npages``-page blocks at ``starts`` and subtract them from the dirty
        count; a no-op unless a migration is in setup or active (migration/ram.c)."""
        if not self.is_setup_or_active() or len(starts) == 0:
            return
        cleared = 0
        for a, b in zip(*block_runs(starts, npages), strict=True):
            cleared += int(np.count_nonzero(self.bitmap[a:b]))
            self.bitmap[a:b] = False
            self.mem.flags[a:b] &= ~DIRTY_LOG
        self.dirty_pages -= cleared
        self.hinted_pages += cleared

    def _bitmap_sync(self, last_stage: bool = False) -> None:
        """migration_bitmap_sync_precopy: notifiers around the fold of the dirty log."""
        self._notify(PrecopyNotify.BEFORE_BITMAP_SYNC)
        self.dirty_sync_count += 1
        now = self.env.now
        if self.time_last_sync is None:
            self.time_last_sync = now
        pending_before = self.dirty_pages * TARGET_PAGE_SIZE
        logged = (self.mem.flags & DIRTY_LOG) != 0
        new = int(np.count_nonzero(logged & ~self.bitmap))
        self.bitmap |= logged
        self.dirty_pages += new
        self.num_dirty_pages_period += new
        self.dirty_bytes_last_sync = self.dirty_pages * TARGET_PAGE_SIZE
        if now > self.time_last_sync + DIRTY_RATE_PERIOD_MS:
            self._trigger_throttle()
            self.dirty_pages_rate = int(self.num_dirty_pages_period * 1000 / (now - self.time_last_sync))
            self.time_last_sync = now
            self.num_dirty_pages_period = 0
            self.bytes_xfer_prev = self.transferred
        if self.capabilities["events"]:
            self.emit("MIGRATION_PASS", {"pass": self.dirty_sync_count})
        self._record("sync", new_dirty=new, last_stage=last_stage, pending_before=pending_before)
        self._notify(PrecopyNotify.AFTER_BITMAP_SYNC)

    def _trigger_throttle(self) -> None:
        """migration_trigger_throttle and mig_throttle_guest_down (auto-converge)."""
        p = self.parameters
        bytes_xfer_period = self.transferred - self.bytes_xfer_prev
        bytes_dirty_period = self.num_dirty_pages_period * TARGET_PAGE_SIZE
        bytes_dirty_threshold = bytes_xfer_period * p["throttle-trigger-threshold"] / 100
        if bytes_dirty_period <= bytes_dirty_threshold:
            return
        self.dirty_rate_high_cnt += 1
        if self.dirty_rate_high_cnt < THROTTLE_HIGH_COUNT:
            return
        self.dirty_rate_high_cnt = 0
        if not self.capabilities["auto-converge"]:
            return
        if self.throttle_pct == 0:
            self.throttle_pct = p["cpu-throttle-initial"]
            return
        increment = p["cpu-throttle-increment"]
        if p["cpu-throttle-tailslow"]:
            cpu_now = 100 - self.throttle_pct
            cpu_ideal = cpu_now * (bytes_dirty_threshold / bytes_dirty_period)
            increment = min(int(cpu_now - cpu_ideal), increment)
        self.throttle_pct = min(self.throttle_pct + increment, p["max-cpu-throttle"])

    # --- sending ------------------------------------------------------------------------------
    def _rate_limit(self) -> float:
        """Bytes allowed per BUFFER_DELAY window (inf when max-bandwidth is 0)."""
        limit = self.parameters["max-bandwidth"]
        return math.inf if limit == 0 else limit / XFER_LIMIT_RATIO

    def _iterate(self):
        """One ram_save_iterate step: send dirty pages in address order for at most step_ms,
        within the window's byte budget. Candidates are scanned in growing batches, so a step
        costs about what it sends, not a pass over the bitmap."""
        if self.dirty_pages == 0:
            return
        used = self.transferred - self.iteration_initial_bytes
        budget_bytes = self._rate_limit() - used
        if budget_bytes <= 0:  # migration_rate_limit: sleep to the end of the window
            yield self.env.timeout(max(0.0, self.iteration_start + BUFFER_DELAY - self.env.now))
            self._update_counters()
            return
        step = min(self.link.step_ms, MAX_WAIT)
        sent, zero_parts = [], []
        cpu_us, nbytes, elapsed = 0.0, 0, 0.0
        pos, lap_left, want = self.cursor, self.mem.n_pages, max(1024, self._last_fit * 5 // 4)
        ended_by = "empty"
        while lap_left > 0:
            pfns, pos, lap_left = self._scan(pos, lap_left, want)
            if len(pfns) == 0:
                break
            zero = self._is_zero(pfns)
            cum_cpu = cpu_us + np.cumsum(np.where(zero, self.link.zero_page_us, self.link.normal_page_us))
            cum_bytes = nbytes + np.cumsum(np.where(zero, ZERO_PAGE_BYTES, NORMAL_PAGE_BYTES))
            finish = np.maximum(cum_cpu / 1000.0, cum_bytes / (self.link.link_bandwidth / 1000))
            fits_time = int(np.searchsorted(finish, step, side="right"))
            fits_bytes = int(np.searchsorted(cum_bytes, budget_bytes, side="right"))
            fits = min(fits_time, fits_bytes)
            if fits == 0 and not sent:
                fits = 1  # at least one page per call
            if fits:
                sent.append(pfns[:fits])
                zero_parts.append(zero[:fits])
                cpu_us, nbytes = float(cum_cpu[fits - 1]), int(cum_bytes[fits - 1])
                elapsed = float(finish[fits - 1])
            if fits < len(pfns):
                ended_by = "bytes" if fits_bytes < fits_time else "time"
                break
            want *= 2
        if not sent:  # the count said dirty, the bitmap did not: trust the bitmap, let time pass
            self.dirty_pages = int(np.count_nonzero(self.bitmap))
            yield self.env.timeout(step)
            return
        pfns = np.concatenate(sent)
        self._last_fit = len(pfns)
        self._send(pfns, np.concatenate(zero_parts), nbytes, downtime=False)
        # the call ends when its time is up, or early when the pages or the window's bytes ran out
        yield self.env.timeout(step if ended_by == "time" else max(elapsed, 1e-3))
        if self.env.now >= self.iteration_start + BUFFER_DELAY - TIME_EPSILON_MS:
            self._update_counters()

    def _scan(self, pos: int, lap_left: int, limit: int) -> tuple[np.ndarray, int, int]:
        """Up to ``limit`` dirty PFNs from ``pos`` on, within ``lap_left`` pages of this lap
        (wrapping at the end of RAM: find_dirty_block's complete_round)."""
        n = self.mem.n_pages
        parts, got = [], 0
        chunk = max(1 << 16, 4 * limit)
        while got < limit and lap_left > 0:
            end = min(pos + chunk, n, pos + lap_left)
            idx = np.flatnonzero(self.bitmap[pos:end])
            if len(idx) > limit - got:
                idx = idx[:limit - got]
                end = int(idx[-1]) + pos + 1
            if len(idx):
                parts.append(idx + pos)
                got += len(idx)
            lap_left -= end - pos
            pos = end % n
            chunk *= 2
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), pos, lap_left

    def _costs(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Zero mask, finish time (ms) and cumulative bytes of sending ``pfns`` in order."""
        zero = self._is_zero(pfns)
        cpu_us = np.where(zero, self.link.zero_page_us, self.link.normal_page_us)
        cum_bytes = np.cumsum(np.where(zero, ZERO_PAGE_BYTES, NORMAL_PAGE_BYTES))
        finish = np.maximum(np.cumsum(cpu_us) / 1000.0, cum_bytes / (self.link.link_bandwidth / 1000))
        return zero, finish, cum_bytes

    def _is_zero(self, pfns: np.ndarray) -> np.ndarray:
        """buffer_is_zero on the source: never touched or discarded, or zeroed on free."""
        at = _as_slice(pfns)
        zero = (self.mem.flags[at] & CONTENT) == 0
        if self.init_on_free:
            zero |= self.mem.state[at] == int(PageState.FREE)
        return zero

    def _send(self, pfns: np.ndarray, zero: np.ndarray, nbytes: int, *, downtime: bool) -> None:
        if len(pfns) == 0:
            return
        n_zero = int(np.count_nonzero(zero))
        self.zero_pages += n_zero
        self.normal_pages += len(pfns) - n_zero
        at = _as_slice(pfns)
        self.bitmap[at] = False
        self.mem.flags[at] &= ~DIRTY_LOG
        self.dirty_pages -= len(pfns)
        self.transferred += int(nbytes)
        if downtime:
            self.downtime_bytes += int(nbytes)
        else:
            self.precopy_bytes += int(nbytes)
        self.cursor = (int(pfns[-1]) + 1) % self.mem.n_pages



def _as_slice(pfns: np.ndarray) -> np.ndarray | slice:
    """A contiguous ascending run of PFNs as a slice (views, no gathers), else the array itself."""
    if len(pfns) and int(pfns[-1]) - int(pfns[0]) + 1 == len(pfns):
        return slice(int(pfns[0]), int(pfns[-1]) + 1)
    return pfns
