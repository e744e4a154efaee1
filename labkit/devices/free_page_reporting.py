"""Free page reporting over virtio-balloon: the Linux driver's reporting virtqueue and QEMU's device.

The guest's mm core (``mm/page_reporting.c``: when a pass runs, which blocks it reports, PageReported)
is :mod:`labkit.model.page_reporting`; this module is the virtio glue around it, as the real split is:

* **Negotiation** (drivers/virtio/virtio_balloon.c ``virtballoon_validate`` and probe), from the guest's
  command line and QEMU's ``page-poison`` property (on by default):

  - a guest that neither poisons (``page_poison=1``) nor zeroes (``init_on_free=1``) free pages does
    not accept PAGE_POISON; one that does, keeps REPORTING only if PAGE_POISON was offered: with
    ``page_poison=1`` and ``page-poison=off`` on the device, **REPORTING is dropped**, silently;
  - with PAGE_POISON negotiated the driver writes ``poison_val``: 0 if it zeroes on free, else the
    ``PAGE_POISON`` byte repeated. ``page_poison=1`` wins over ``init_on_free=1`` (mm/mm_init.c
    ``mem_debugging_and_hardening_init``: "CONFIG_PAGE_POISONING is on, will take precedence");
  - the reporting vq must have >= ``PAGE_REPORTING_CAPACITY`` entries (QEMU's has 32), and the
    default ``page_reporting_order`` is ``pageblock_order`` (the driver sets none on x86-64).

* **The driver's report** (``virtballoon_free_page_report``): the batch's blocks become in-buffers of
  the reporting vq, one request; the driver waits for the host's ack (``REPORT_REQUEST_MS``).
* **QEMU** (hw/virtio/virtio-balloon.c ``virtio_balloon_handle_report``): each entry is discarded with
  ``ram_block_discard_range`` (host RSS falls by the pages that were backed), **unless** discards are
  inhibited (RAM discard disabled as under VFIO, incoming postcopy, background snapshot) or
  ``poison_val != 0``: then the request is acked and nothing is freed. Entries are 2 MiB-aligned
  guest blocks, so the RAMBlock alignment check always passes with 4 KiB host pages.
* **Refaults**: a reported block the guest reuses was discarded, so its first write faults in a
  zero-filled page on the host (``host.touch`` counts them as zero-fill faults). labkit counts the
  faults reporting caused, ``refaulted_pages``: written pages that a report had taken away from the
  host (backed or swapped when discarded; a never-touched page would have faulted anyway), and their
  cost at ``REFAULT_US`` each. The record is one byte per guest page, kept while reporting is on.

QEMU has no runtime knob for reporting: QOM shows the ``free-page-reporting`` property only.

>>> import labkit
>>> vm = labkit.open(backend="model", memory="2G", balloon={"free_page_reporting": True})
>>> h = vm.guest("alloc", size="1G"); vm.guest("free", handle=h)
>>> rss = vm.sample()["host_rss"]
>>> vm.advance(60_000)
>>> vm.sample()["host_rss"] < rss - (900 << 20), vm.reporting.state.name
(True, 'IDLE')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import simpy

from labkit.devices.balloon import (
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonDevice,
    BalloonDriver,
)
from labkit.model.block_scan import expand_blocks
from labkit.model.host import Host, HostVM
from labkit.model.kernel import Kernel
from labkit.model.page_reporting import (
    PAGE_REPORTING_CAPACITY,
    PageReporting,
    PageReportingState,
    resolve_reporting_order,
)
from labkit.model.pages import PageFlag
from labkit.units import PAGE_SIZE

REPORTING_VQ_SIZE = 32  # hw/virtio/virtio-balloon.c: virtio_add_queue(vdev, 32, ..._handle_report)
PAGE_POISON = 0xAA  # include/linux/poison.h (docs/mechanisms.md §3.4)
# Assumed, not measured: one report request's round trip (virtqueue kick, QEMU's 32 madvise calls
# of up to 4 MiB each, the interrupt back). A few hundred microseconds on KVM; set
# ``vm.reporting.device.request_ms`` to change it for one VM.
REPORT_REQUEST_MS = 0.5
# Assumed, not measured: the host cost of one zero-fill fault on a reused reported 4 KiB page
# (EPT violation exit, host page fault, clearing the page), without THP.
REFAULT_US = 2.0
TOUCHED = np.uint8(PageFlag.BACKED | PageFlag.SWAPPED)


def negotiate(offered: set[int], cmdline: dict) -> tuple[set[int], int | None]:
    """``virtballoon_validate`` and the probe's poison write: the features the driver keeps and
    the ``poison_val`` it writes (None when PAGE_POISON is not negotiated).

    >>> from labkit.devices.balloon import VIRTIO_BALLOON_F_REPORTING as R
    >>> sorted(negotiate({1, 4, 5}, {"page_poison": 0, "init_on_free": 0})[0])   # no poison: 4 dropped
    [1, 5]
    >>> R in negotiate({1, 5}, {"page_poison": 1, "init_on_free": 0})[0]         # poison, no 4 offered
    False
    >>> hex(negotiate({1, 4, 5}, {"page_poison": 1, "init_on_free": 1})[1])      # poisoning wins
    '0xaaaaaaaa'
    """
    poisoning = bool(cmdline.get("page_poison", 0))
    init_on_free = bool(cmdline.get("init_on_free", 0)) and not poisoning
    features = set(offered)
    if not init_on_free and not poisoning:
        features.discard(VIRTIO_BALLOON_F_PAGE_POISON)
    elif VIRTIO_BALLOON_F_PAGE_POISON not in features:
        features.discard(VIRTIO_BALLOON_F_REPORTING)
    if VIRTIO_BALLOON_F_PAGE_POISON not in features:
        return features, None
    return features, 0 if init_on_free else int.from_bytes(bytes([PAGE_POISON]) * 4, "little")


class ReportingVirtqueue:
    """The reporting vq between the driver and QEMU's ``virtio_balloon_handle_report``."""

    def __init__(self, host: Host, host_vm: HostVM, balloon_device: BalloonDevice):
        self.host = host
        self.host_vm = host_vm
        self.balloon_device = balloon_device
        self.size = REPORTING_VQ_SIZE
        self.request_ms = REPORT_REQUEST_MS
        self.requests = 0
        self.skipped_requests = 0  # acked without discarding (inhibited, or poison_val != 0)
        self.discarded_pages = 0
        # pages whose host memory (RAM or swap) a report discarded, until the guest reuses them
        self.taken = np.zeros(host_vm.mem.n_pages, dtype=bool)

    def report(self, starts: np.ndarray, orders: np.ndarray) -> int:
        """``virtballoon_free_page_report``: one request of up to 32 blocks; QEMU handles it."""
        if len(starts) > self.size:
            raise ValueError(f"a report has at most {self.size} entries, got {len(starts)}")
        self.requests += 1
        dev = self.balloon_device
        if dev.inhibited() or dev.config.poison_val:  # QEMU: skip_element, still acked
            self.skipped_requests += 1
            return 0
        for order in np.unique(orders):
            pfns = expand_blocks(starts[orders == order], int(order))
            self.taken[pfns[(self.host_vm.mem.flags[pfns] & TOUCHED) != 0]] = True
            self.discarded_pages += self.host.discard(self.host_vm, pfns)
        return 0


class FreePageReporting:
    """Free page reporting on one VM (``vm.reporting``), built with the balloon when its
    ``free-page-reporting`` property is on; ``cmdline`` is the guest's kernel command line.

    ``core`` is the mm side (None when the driver dropped REPORTING), ``device`` the virtqueue and
    QEMU's handling; the properties are the counters notebooks and tests read.
    """

    def __init__(self, env: simpy.Environment, kernel: Kernel, host: Host, driver: BalloonDriver,
                 balloon_device: BalloonDevice, cmdline: Mapping[str, Any]):
        self.env = env
        self.kernel = kernel
        self.offered = set(balloon_device.features)
        features, poison_val = negotiate(set(driver.features), cmdline)
        driver.features = features
        if poison_val is not None:
            balloon_device.config.poison_val = poison_val  # virtio_cwrite_le(.., poison_val, ..)
        self.poison_val = balloon_device.config.poison_val
        self.negotiated = VIRTIO_BALLOON_F_REPORTING in features
        self.device = ReportingVirtqueue(host, kernel.host_vm, balloon_device)
        self.order = resolve_reporting_order(cmdline.get("page_reporting.page_reporting_order", -1))
        self.core: PageReporting | None = None
        self._pending: list[np.ndarray] = []  # reused pages a report took from the host, unwritten
        self._refaulted = 0
        self._faults_seen = -1  # the host's fault count at the last refresh
        self.reused_pages = 0  # reported pages allocated again
        self.why_inactive = ""
        if not self.negotiated:
            self.why_inactive = ("the guest dropped VIRTIO_BALLOON_F_REPORTING: it poisons free pages "
                                 "(page_poison=1) or zeroes them (init_on_free=1) and the device did "
                                 "not offer PAGE_POISON (page-poison=off)")
            return
        if self.device.size < PAGE_REPORTING_CAPACITY:  # virtballoon_probe: -ENOSPC
            raise ValueError(f"reporting vq has {self.device.size} entries, fewer than "
                             f"PAGE_REPORTING_CAPACITY {PAGE_REPORTING_CAPACITY}")
        self.core = PageReporting(env, kernel, self.device, self.order)
        self.core.on_reuse = self._reused
        self.core.on_report = self._refresh
        self.core.register()

    # --- refaults -----------------------------------------------------------------------------
    def _reused(self, pfns: np.ndarray) -> None:
        """Reported pages being allocated: those a report discarded fault when first written."""
        self._refresh()
        self.reused_pages += len(pfns)
        taken = self.device.taken
        refault = pfns[taken[pfns] & ((self.kernel.mem.flags[pfns] & TOUCHED) == 0)]
        taken[pfns] = False
        if len(refault):
            self._pending.append(refault)

    def _refresh(self) -> None:
        """Count pending pages the guest has written since (the host backs or swapped them)."""
        if not self._pending:
            return
        # a pending page is neither backed nor swapped; it becomes so only through a host fault,
        # which the host counts: no fault since the last look, nothing pending was written
        host_vm = self.kernel.host_vm
        faults = host_vm.zero_fill_faults + host_vm.swap_ins
        if faults == self._faults_seen:
            return
        self._faults_seen = faults
        # no page is pending twice: one is added only while ``taken``, which a report sets only on
        # a written page, and the refresh before every report has dropped written pages by then
        pending = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        written = (self.kernel.mem.flags[pending] & TOUCHED) != 0
        self._refaulted += int(np.count_nonzero(written))
        rest = pending[~written]
        self._pending = [rest] if len(rest) else []

    # --- counters -----------------------------------------------------------------------------
    @property
    def state(self) -> PageReportingState:
        return self.core.state if self.core else PageReportingState.IDLE

    @property
    def passes(self) -> int:
        return self.core.passes if self.core else 0

    @property
    def reports(self) -> int:
        """Report requests sent on the reporting vq."""
        return self.device.requests

    @property
    def reported_pages(self) -> int:
        """Pages sent to the host in reports, cumulative."""
        return self.core.sent_pages if self.core else 0

    @property
    def reported_now_pages(self) -> int:
        """Free pages carrying PageReported now."""
        return self.core.reported_now_pages if self.core else 0

    @property
    def discarded_pages(self) -> int:
        """Backed pages the host freed on reports (host RSS given back)."""
        return self.device.discarded_pages

    @property
    def skipped_reports(self) -> int:
        """Reports QEMU acked without discarding (discards inhibited, or poison_val != 0)."""
        return self.device.skipped_requests

    @property
    def refaulted_pages(self) -> int:
        """Reused reported pages the guest wrote, each a zero-fill fault on the host."""
        self._refresh()
        return self._refaulted

    @property
    def refault_ms(self) -> float:
        """Host time spent on those faults, at the assumed ``REFAULT_US`` each."""
        return self.refaulted_pages * REFAULT_US / 1000.0

    def counters(self) -> dict:
        """All counters in one dict (``state`` as its name)."""
        return {"state": self.state.name, "negotiated": self.negotiated, "order": self.order,
                "poison_val": self.poison_val, "passes": self.passes, "reports": self.reports,
                "reported_pages": self.reported_pages, "reported_now_pages": self.reported_now_pages,
                "discarded_pages": self.discarded_pages, "skipped_reports": self.skipped_reports,
                "reused_pages": self.reused_pages, "refaulted_pages": self.refaulted_pages,
                "refault_ms": self.refault_ms}

    def sample(self) -> dict:
        """Extra fields of ``vm.sample()``, in bytes."""
        return {"reported_bytes": self.reported_now_pages * PAGE_SIZE,
                "reporting_passes": self.passes,
                "reporting_reports": self.reports,
                "reporting_discarded_bytes": self.discarded_pages * PAGE_SIZE,
                "reporting_refaulted_bytes": self.refaulted_pages * PAGE_SIZE}

    def __repr__(self) -> str:
        if not self.negotiated:
            return "<FreePageReporting not negotiated>"
        return (f"<FreePageReporting order {self.order} {self.state.name} passes {self.passes} "
                f"reports {self.reports} discarded {self.discarded_pages} pages>")

