"""Free page reporting, the guest's mm core: mm/page_reporting.c (Linux 6.x) on the page model.

The device side (virtio-balloon's reporting virtqueue and what QEMU does with a report) lives in
:mod:`labkit.devices.free_page_reporting`; this module is what the kernel does, in the same order:

* **Registration** (``page_reporting_register``) fixes ``page_reporting_order`` (the boot parameter,
  or ``pageblock_order`` 9 when it is -1) and requests an initial pass.
* **Notification** (``page_reporting_notify_free``, called from ``__free_one_page``): only a free that
  *merges* into a block of order >= ``page_reporting_order`` requests a pass. Puts-back after a report
  (``FPI_SKIP_REPORT_NOTIFY``) never notify.
* **State machine** (:class:`PageReportingState`): a request in IDLE schedules the work after
  ``PAGE_REPORTING_DELAY`` (2 s); requests while REQUESTED or ACTIVE only set REQUESTED; a pass that
  ends in REQUESTED (a notification came, or a list's budget ran out) schedules another one 2 s later.
* **A pass** (``page_reporting_process``), for each zone passing the gate (free pages above the low
  watermark + ``PAGE_REPORTING_CAPACITY << order``), for each order from ``page_reporting_order`` to
  ``MAX_PAGE_ORDER``: skip blocks already ``PageReported``; isolate the others (``__isolate_free_page``
  refuses once the zone's free pages would fall to the min watermark + the block), 32 to a report;
  each list gets ``DIV_ROUND_UP(nr_free, 32 * 16)`` + 1 report calls, then REQUESTED is set; the
  last partial batch of a zone is reported at its end.
* **Drain** (``page_reporting_drain``): a block gets ``PageReported`` only if the report succeeded and
  it is still a free block of the same order (it did not merge). The flag is cleared when the block
  leaves the free list: allocated (a split reported block puts its remainders back *unflagged*,
  ``expand()``) or merged with a freed buddy (``del_page_from_free_list``).

Model choices, stated:

* **Migratetypes**: a zone is one free list per order (labkit has no pageblock migratetypes), so the
  budget's ``nr_free`` (all migratetypes in Linux) and the list walked are the same list.
* **Order within a list**: unreported blocks are taken in ascending address order. Linux walks from
  the list head (most recent frees); both skip reported blocks, so only *which* unreported blocks go
  first differs, not how many.
* **Isolation is synchronous**: isolating a batch, the device handling it, and the drain happen in
  one simpy step; the request's round trip (``request_ms`` of the reporting device) is waited *after*
  the drain. So isolated pages are never visible to the allocator (they stay FREE, never handed
  out in between), at the price that MemFree does not dip by the batch (<= 64 MiB) during the
  ~0.5 ms a request takes. Within a batch the isolation watermark check does count the pages
  already isolated, as ``__isolate_free_page`` sees them gone from the zone's free count.
* ``PageReported`` is a flag on a block's head page in Linux; labkit sets it on every page of the
  block (the page map shows whole blocks); a block counts as reported when its first page has it.
* Frees merge at once (no per-CPU lists in between), so a notification is immediate.

>>> import labkit
>>> vm = labkit.open(backend="model", memory="1G", balloon={"free_page_reporting": True})
>>> core = vm.reporting.core
>>> core.order, core.state.name
(9, 'REQUESTED')
>>> vm.advance(PAGE_REPORTING_DELAY_MS + 100)
>>> core.passes >= 1 and core.reported_now_pages > 0
True
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import simpy

from labkit.model.block_scan import (
    WINDOW_ORDER,
    expand_blocks,
    free_runs_of,
    hit_runs,
    merged_runs,
    reporting_free_lists,
    still_own_block,
    window_pfns,
    window_rows,
)
from labkit.model.pages import (
    MAX_PAGE_ORDER,
    NR_PAGE_ORDERS,
    PAGEBLOCK_ORDER,
    GuestMemory,
    PageFlag,
    PageState,
    Zone,
)

PAGE_REPORTING_CAPACITY = 32  # include/linux/page_reporting.h: scatterlist entries per report
PAGE_REPORTING_DELAY_MS = 2000  # mm/page_reporting.c: PAGE_REPORTING_DELAY (2 * HZ)
PAGE_REPORTING_BUDGET_DIVISOR = 16  # mm/page_reporting.c page_reporting_cycle: nr_free / (32 * 16)
PAGE_REPORTING_ORDER_UNSET = -1  # mm/page_reporting.c: page_reporting_order's initial value
if TYPE_CHECKING:
    from labkit.model.kernel import Kernel

HISTORY = 512  # passes whose statistics are kept (labkit's, for tests and notebooks)

FREE = np.uint8(PageState.FREE)
REPORTED = np.uint8(PageFlag.REPORTED)
NOT_REPORTED = np.uint8(~PageFlag.REPORTED & 0xFF)


class PageReportingState(enum.IntEnum):
    """``prdev->state`` (mm/page_reporting.c)."""

    IDLE = 0
    REQUESTED = 1
    ACTIVE = 2


class ReportingDevice(Protocol):
    """What ``struct page_reporting_dev_info`` gives the core: ``report()`` (0 on success) and,
    in labkit, the simulated time a report request takes."""

    request_ms: float

    def report(self, starts: np.ndarray, orders: np.ndarray) -> int: ...


def resolve_reporting_order(param: int, driver_order: int = 0) -> int:
    """``page_reporting_register``: the boot parameter if set, else the driver's order if it gave
    one in 1..MAX_PAGE_ORDER (virtio-balloon does only on arm64 with 64 KiB pages), else
    ``pageblock_order``.

    >>> resolve_reporting_order(-1), resolve_reporting_order(5)
    (9, 5)
    """
    if not isinstance(param, int) or isinstance(param, bool) or not (
            PAGE_REPORTING_ORDER_UNSET <= param <= MAX_PAGE_ORDER):
        raise ValueError(f"page_reporting.page_reporting_order must be -1 (unset) or 0..{MAX_PAGE_ORDER}, "
                         f"got {param!r}")
    if param != PAGE_REPORTING_ORDER_UNSET:
        return param
    return driver_order if 0 < driver_order <= MAX_PAGE_ORDER else PAGEBLOCK_ORDER


# --- the scatterlist and the statistics -------------------------------------------------------------
class Scatterlist:
    """The ``sgl`` of one zone's processing: isolated blocks waiting to be reported, by order."""

    def __init__(self) -> None:
        self.groups: list[tuple[np.ndarray, int]] = []
        self.entries = 0
        self.pages = 0

    def add(self, starts: np.ndarray, order: int) -> None:
        if len(starts):
            self.groups.append((starts, order))
            self.entries += len(starts)
            self.pages += len(starts) << order

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        starts = np.concatenate([s for s, _ in self.groups])
        orders = np.concatenate([np.full(len(s), k, dtype=np.int64) for s, k in self.groups])
        return starts, orders

    def clear(self) -> None:
        self.__init__()


@dataclass
class PassStats:
    """One ``page_reporting_process`` run. Keys of the dicts are (zone index, order)."""

    start_ms: float
    end_ms: float = 0.0
    report_calls: int = 0
    zones_skipped: int = 0  # zone gate: free <= low watermark + (32 << order)
    nr_free: dict = field(default_factory=dict)  # blocks on the list when the cycle started
    budget: dict = field(default_factory=dict)  # DIV_ROUND_UP(nr_free, 32 * 16)
    list_calls: dict = field(default_factory=dict)  # report calls made while walking the list
    isolated: dict = field(default_factory=dict)  # blocks isolated from the list
    stop: dict = field(default_factory=dict)  # why the walk ended: "end", "budget", "isolation"
    lowest_free: dict = field(default_factory=dict)  # per zone: free minus isolated, at its lowest
    drained: list = field(default_factory=list)  # (starts, order) given PageReported
    requested_at_end: bool = False

    @property
    def reported_pages(self) -> int:
        return int(sum(len(s) << k for s, k in self.drained))


# --- the core ---------------------------------------------------------------------------------------
class PageReporting:
    """``struct page_reporting_dev_info`` plus mm/page_reporting.c, for one guest kernel.

    ``kernel`` is a :class:`labkit.model.kernel.Kernel`; ``device`` does the report (see
    :class:`ReportingDevice`). Call :meth:`register` once the driver probed.
    """

    def __init__(self, env: simpy.Environment, kernel: Kernel, device: ReportingDevice, order: int):
        self.env = env
        self.kernel = kernel
        self.mem: GuestMemory = kernel.mem
        self.device = device
        self.order = order
        self.state = PageReportingState.IDLE
        self.registered = False
        self.passes = 0
        self.report_calls = 0
        self.reported_blocks = 0  # blocks sent in report calls, cumulative
        self.sent_pages = 0  # pages sent in report calls, cumulative
        self.reported_now_pages = 0  # pages carrying PageReported now
        self.notifications = 0  # frees that merged to >= order and reached __page_reporting_notify
        self.history: deque[PassStats] = deque(maxlen=HISTORY)
        self.on_reuse: Callable[[np.ndarray], None] | None = None  # reported pages being allocated
        self.on_report: Callable[[], None] | None = None  # before each report call
        self._frees = 0  # frees seen: the lists are derived again if one happens mid-pass
        self._lists: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self._lists_at = -1

    # --- registration and notification ------------------------------------------------------
    def register(self) -> None:
        """``page_reporting_register``: hook into the free and alloc paths; request a first pass."""
        if self.registered:
            raise RuntimeError("a page reporting device is already registered (-EBUSY)")
        self.registered = True
        self.kernel.free_hooks.append(self.notify_free)
        self.kernel.alloc_hooks.append(self.on_alloc)
        self.state = PageReportingState.IDLE
        self._request()  # "Begin initial flush of zones"
        self.kernel.log("Free page reporting enabled")

    def _request(self) -> None:
        """``__page_reporting_request``: IDLE -> REQUESTED schedules the work in 2 s."""
        if self.state == PageReportingState.REQUESTED:
            return
        previous, self.state = self.state, PageReportingState.REQUESTED
        if previous == PageReportingState.IDLE:
            self.env.process(self._delayed_work())

    def notify_free(self, pfns: np.ndarray) -> None:
        """The free path (a ``kernel.free_hooks`` entry), for pages already FREE: each freed page's
        merged buddy block leaves the free lists' reported state behind (``del_page_from_free_list``
        on the buddies it absorbed), and a merge to order >= ``page_reporting_order`` notifies."""
        self._frees += 1
        if len(pfns) == 0 or (self.reported_now_pages == 0
                              and self.state == PageReportingState.REQUESTED):
            return
        # a freed page merged to >= order exactly when its 2^order run is entirely free; a run that
        # is not cannot have absorbed a reported block either (those are whole blocks >= order)
        free_runs = free_runs_of(self.mem.state, pfns, self.order)
        if len(free_runs) == 0:
            return
        # a merged block lies within the 4 MiB window of its run: no reported page there, no absorption
        if self.reported_now_pages and np.count_nonzero(window_rows(
                self.mem.flags, free_runs >> (WINDOW_ORDER - self.order), 0) & REPORTED):
            windows, hit = hit_runs(free_runs << self.order, self.mem.n_pages, self.order)
            reported = (window_rows(self.mem.flags, windows, 0) & REPORTED).ravel().view(bool)
            free = window_rows(self.mem.state, windows, PageState.ABSENT) == FREE
            absorbed = np.flatnonzero(merged_runs(free.ravel(), hit, self.order) & reported)
            if len(absorbed):
                self.mem.flags[window_pfns(windows, absorbed)] &= NOT_REPORTED
                self.reported_now_pages -= len(absorbed)
        self.notifications += 1
        self._request()

    def on_alloc(self, pfns: np.ndarray) -> None:
        """The alloc path (a ``kernel.alloc_hooks`` entry, flags not yet cleared): a reported
        block that gave pages loses PageReported on all of it, remainders included (``expand()``
        puts them back unflagged). Reported blocks are whole free blocks of order >= the reporting
        order, so the largest all-reported runs around the allocated pages are those blocks."""
        if len(pfns) == 0 or self.reported_now_pages == 0:
            return
        was = self.mem.flags[pfns]
        np.bitwise_and(was, REPORTED, out=was)
        if not np.count_nonzero(was):
            return
        reused = pfns[was.view(bool)]
        if self.on_reuse is not None:
            self.on_reuse(reused)
        windows, hit = hit_runs(reused, self.mem.n_pages, self.order)
        reported = ((window_rows(self.mem.flags, windows, 0) & REPORTED) != 0).ravel()
        gone = np.flatnonzero(merged_runs(reported, hit, self.order))
        self.mem.flags[window_pfns(windows, gone)] &= NOT_REPORTED
        self.reported_now_pages -= len(gone)

    # --- the work item ------------------------------------------------------------------------
    def _delayed_work(self):
        yield self.env.timeout(PAGE_REPORTING_DELAY_MS)
        yield from self.page_reporting_process()

    def page_reporting_process(self) -> Generator[simpy.Event, None, None]:
        """One pass over every zone (a simpy process body); re-scheduled if it ends REQUESTED."""
        self.state = PageReportingState.ACTIVE
        stats = PassStats(float(self.env.now))
        for zi in range(len(self.mem.zones)):
            yield from self._process_zone(zi, stats)
        stats.end_ms = float(self.env.now)
        self.passes += 1
        if self.state == PageReportingState.REQUESTED:  # atomic_cmpxchg(ACTIVE -> IDLE) failed
            stats.requested_at_end = True
            self.env.process(self._delayed_work())
        else:
            self.state = PageReportingState.IDLE
        self.history.append(stats)

    def _derive(self, zone: Zone) -> None:
        self._lists = reporting_free_lists(self.mem, zone, self.order)
        self._lists_at = self._frees

    def _process_zone(self, zi: int, stats: PassStats):
        """``page_reporting_process_zone``: the gate, every order's list, the leftover batch."""
        zone = self.mem.zones[zi]
        gate = self.kernel.watermarks[zi].low + (PAGE_REPORTING_CAPACITY << self.order)
        if self.kernel.zone_free(zi) <= gate:
            stats.zones_skipped += 1
            return
        sg = Scatterlist()
        self._derive(zone)
        for order in range(self.order, NR_PAGE_ORDERS):
            yield from self._cycle(zi, order, sg, stats)
        if sg.entries:  # "report the leftover pages before going idle"
            yield from self._report(zi, sg, stats)

    def _candidates(self, order: int) -> np.ndarray:
        starts, reported = self._lists
        i = order - self.order
        return starts[i][~reported[i]] if reported[i].any() else starts[i]

    def _take_valid(self, cand: np.ndarray, pos: int, n: int, order: int,
                    zone: Zone) -> tuple[np.ndarray, int]:
        """Up to ``n`` candidates from ``pos`` that are still unreported free blocks of ``order``
        (time may have passed since the lists were read); returns them and the next position."""
        got: list[np.ndarray] = []
        have = 0
        while have < n and pos < len(cand):
            chunk = cand[pos:pos + max(n - have, 1) * 2]
            ok = still_own_block(self.mem.state, chunk, order, zone)
            ok &= (self.mem.flags[chunk] & REPORTED) == 0
            idx = np.flatnonzero(ok)[:n - have]
            got.append(chunk[idx])
            have += len(idx)
            pos += int(idx[-1]) + 1 if have == n else len(chunk)
        return (np.concatenate(got) if got else np.zeros(0, dtype=np.int64)), pos

    def _cycle(self, zi: int, order: int, sg: Scatterlist, stats: PassStats):
        """``page_reporting_cycle`` for one order's list."""
        zone = self.mem.zones[zi]
        wmark_min = self.kernel.watermarks[zi].min
        nr_free = len(self._lists[0][order - self.order])
        if nr_free == 0:  # list_empty(): nothing to do
            return
        key = (zi, order)
        budget = -(-nr_free // (PAGE_REPORTING_CAPACITY * PAGE_REPORTING_BUDGET_DIVISOR))
        stats.nr_free[key], stats.budget[key] = nr_free, budget
        stats.list_calls[key] = stats.isolated[key] = 0
        stats.stop[key] = "end"
        cand, pos = self._candidates(order), 0
        while True:
            if self._lists_at != self._frees:  # a free since the lists were read: read them again
                self._derive(zone)
                cand, pos = self._candidates(order), 0
            first, pos = self._take_valid(cand, pos, 1, order, zone)
            if len(first) == 0:
                return
            pos -= 1  # peeked: the walk is at this page
            if budget < 0:  # "fully consumed our budget": ask for another pass
                self.state = PageReportingState.REQUESTED
                stats.stop[key] = "budget"
                return
            room = PAGE_REPORTING_CAPACITY - sg.entries
            if room:
                # __isolate_free_page: zone free (less what is isolated) must stay > min + block
                free_now = self.kernel.zone_free(zi) - sg.pages
                isolatable = max(0, (free_now - wmark_min - 1) >> order)
                blocks, pos = self._take_valid(cand, pos, min(room, isolatable), order, zone)
                sg.add(blocks, order)
                stats.isolated[key] += len(blocks)
                low = stats.lowest_free.get(zi, free_now)
                stats.lowest_free[zi] = min(low, self.kernel.zone_free(zi) - sg.pages)
                if len(blocks) < room:
                    if isolatable < room and len(blocks) == isolatable and len(
                            self._take_valid(cand, pos, 1, order, zone)[0]):
                        stats.stop[key] = "isolation"
                    return
                continue
            yield from self._report(zi, sg, stats)
            budget -= 1
            stats.list_calls[key] += 1

    def _report(self, zi: int, sg: Scatterlist, stats: PassStats):
        """``prdev->report()`` then ``page_reporting_drain``, then wait for the request's ack."""
        starts, orders = sg.arrays()
        if self.on_report is not None:
            self.on_report()
        err = self.device.report(starts, orders)
        self.report_calls += 1
        self.reported_blocks += len(starts)
        self.sent_pages += int(np.sum(np.left_shift(1, orders)))
        stats.report_calls += 1
        self._drain(zi, sg, err == 0, stats)
        sg.clear()
        yield self.env.timeout(self.device.request_ms)

    def _drain(self, zi: int, sg: Scatterlist, reported: bool, stats: PassStats) -> None:
        """``page_reporting_drain``: put back (to the tail: the allocator's plan is rebuilt, with
        reported blocks last) and flag the blocks that are still free buddies of the same order."""
        zone = self.mem.zones[zi]
        if reported:
            for starts, order in sg.groups:
                ok = still_own_block(self.mem.state, starts, order, zone)
                ok &= (self.mem.flags[starts] & REPORTED) == 0
                flagged = starts[ok]
                if len(flagged):
                    self.mem.flags[expand_blocks(flagged, order)] |= REPORTED
                    self.reported_now_pages += len(flagged) << order
                    stats.drained.append((flagged, order))
        self.kernel.allocators[zi].invalidate()  # __putback_isolated_page(..., FPI_TO_TAIL)

    # --- inspection ---------------------------------------------------------------------------
    def count_reported(self) -> int:
        """PageReported pages, counted from the flags (a full pass; for checks)."""
        return int(np.count_nonzero(self.mem.flags & REPORTED))
