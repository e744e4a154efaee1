"""virtio-balloon: the Linux driver (guest) and the QEMU device (host), talking through requests.

Faithful to docs/mechanisms.md §1 (virtio-balloon; drivers/virtio/virtio_balloon.c, Linux 6.x;
hw/virtio/virtio-balloon.c and system/balloon.c, QEMU 7.x-9.x):

* QEMU turns the QMP ``balloon`` value (the target *logical* VM size) into ``num_pages`` and raises a
  config interrupt every time, even for an unchanged target.
* The driver's work item moves at most ``VIRTIO_BALLOON_ARRAY_PFNS_MAX`` (256) PFNs per run, tells the
  host synchronously, writes ``actual``, and re-queues itself while the target is unmet. The target
  is read once per run: a request in flight when it changes still lands, so ``actual`` may pass the
  new target by that one request before the next run turns back (``last_request_target``).
* Balloon pages are ``__GFP_NORETRY``: reclaim of page cache is tried once, then the driver logs
  "Out of puff!", sleeps 200 ms, sends what it got and retries.
* Without DEFLATE_ON_OOM every balloon page leaves MemTotal (``adjust_managed_page_count(page, -1)``);
  with it, MemTotal stays and the OOM notifier gives back 256 pages per OOM event. The driver does not
  re-inflate by itself afterwards; only the next config change (the next ``balloon`` command) does.
* QEMU discards inflated pages (``ram_block_discard_range``), so host RSS falls only by the pages that
  were backed; deflated pages are merely ``MADV_WILLNEED``-ed and stay unbacked until touched. With RAM
  discard disabled (as under VFIO) requests are acked and nothing is freed.

Simplifications: a request's round trip takes a fixed ``request_ms`` of simulated time (a model knob;
the live backend measures the real one); balloon compaction (migrating balloon pages) is not modelled;
the OOM notifier's deflate takes no simulated time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from labkit.devices.properties import QomProperty
from labkit.model.host import Host, HostVM
from labkit.model.kernel import Kernel
from labkit.model.pages import PageState
from labkit.units import PAGE_SHIFT

# include/uapi/linux/virtio_balloon.h
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5
VIRTIO_BALLOON_PFN_SHIFT = 12
# drivers/virtio/virtio_balloon.c
VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256
VIRTIO_BALLOON_PAGES_PER_PAGE = 1  # PAGE_SIZE >> VIRTIO_BALLOON_PFN_SHIFT on x86-64
VIRTIO_BALLOON_OOM_NR_PAGES = 256
VIRTIO_BALLOON_OOM_NOTIFY_PRIORITY = 80
OUT_OF_PUFF_SLEEP_MS = 200  # fill_balloon: msleep(200) after a failed balloon_page_alloc()
UINT32_MAX = 0xFFFFFFFF
STAT_UNSET = (1 << 64) - 1  # QEMU resets stats to -1 (u64 max) before each update
NO_PAGES = np.zeros(0, dtype=np.int64)  # an empty PFN list (read-only, shared)
NO_PAGES.flags.writeable = False

# (tag, kernel name from VIRTIO_BALLOON_S_NAMES, QMP name from QEMU's balloon_stat_names)
STATS = [
    (0, "swap-in", "stat-swap-in"),
    (1, "swap-out", "stat-swap-out"),
    (2, "major-faults", "stat-major-faults"),
    (3, "minor-faults", "stat-minor-faults"),
    (4, "free-memory", "stat-free-memory"),
    (5, "total-memory", "stat-total-memory"),
    (6, "available-memory", "stat-available-memory"),
    (7, "disk-caches", "stat-disk-caches"),
    (8, "hugetlb-allocations", "stat-htlb-pgalloc"),
    (9, "hugetlb-failures", "stat-htlb-pgfail"),
]
VIRTIO_BALLOON_S_NR = len(STATS)  # 10 before Linux 6.12 / QEMU 9.1, the versions labkit models

# QEMU device properties (hw/virtio/virtio-balloon.c virtio_balloon_properties), underscores for dashes
PROPERTY_DEFAULTS = {
    "deflate_on_oom": False,
    "free_page_hint": False,
    "free_page_reporting": False,
    "page_poison": True,
    "iothread": None,
    "id": "balloon0",
}


@dataclass
class BalloonConfig:
    """struct virtio_balloon_config: four little-endian u32s."""

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0


class BalloonDevice:
    """QEMU's virtio-balloon device: target, ``actual``, discards, stats and their poll timer."""

    def __init__(self, env: simpy.Environment, host: Host, host_vm: HostVM, vm_ram_size: int,
                 options: dict, emit: Callable[[str, dict], None],
                 wallclock: Callable[[], float]):
        self.env = env
        self.host = host
        self.host_vm = host_vm
        self.vm_ram_size = vm_ram_size
        self.options = options
        self.id = options["id"]
        self.config = BalloonConfig()
        self.emit = emit
        self.wallclock = wallclock
        self.driver: BalloonDriver | None = None
        self.stats = {name: STAT_UNSET for _, _, name in STATS}
        self.stats_last_update = 0
        self.stats_poll_interval = 0
        self._stats_timer: simpy.Process | None = None
        self.inflate_requests = 0
        self.deflate_requests = 0
        self.discarded_pages = 0

    @property
    def features(self) -> set[int]:
        """virtio_balloon_get_features: STATS_VQ always, the rest from properties."""
        f = {VIRTIO_BALLOON_F_STATS_VQ}
        if self.options["deflate_on_oom"]:
            f.add(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        if self.options["free_page_hint"]:
            f.add(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
        if self.options["page_poison"]:
            f.add(VIRTIO_BALLOON_F_PAGE_POISON)
        if self.options["free_page_reporting"]:
            f.add(VIRTIO_BALLOON_F_REPORTING)
        return f

    # --- QMP side -----------------------------------------------------------------------------
    def to_target(self, target: int) -> None:
        """virtio_balloon_to_target: clamp to vm_ram_size, set num_pages, notify config."""
        target = min(target, self.vm_ram_size)
        if target:
            self.config.num_pages = (self.vm_ram_size - target) >> VIRTIO_BALLOON_PFN_SHIFT
            if self.driver is not None:
                self.driver.config_changed()

    def logical_actual(self) -> int:
        """query-balloon's ``actual``: vm_ram_size minus the balloon, in bytes."""
        return self.vm_ram_size - (self.config.actual << VIRTIO_BALLOON_PFN_SHIFT)

    def logical_target(self) -> int:
        return self.vm_ram_size - (self.config.num_pages << VIRTIO_BALLOON_PFN_SHIFT)

    def set_config(self, actual: int) -> None:
        """virtio_balloon_set_config: the guest wrote ``actual``; BALLOON_CHANGE if it moved."""
        old = self.config.actual
        self.config.actual = actual
        if actual != old:
            self.emit("BALLOON_CHANGE", {"actual": self.logical_actual()})

    # --- virtqueues ---------------------------------------------------------------------------
    def inhibited(self) -> bool:
        """virtio_balloon_inhibited: RAM discard disabled (VFIO), incoming postcopy, snapshot."""
        return not self.host.discard_enabled

    def handle_inflate(self, pfns: np.ndarray) -> None:
        """balloon_inflate_page for each PFN: discard the 4 KiB backing page."""
        self.inflate_requests += 1
        if not self.inhibited():
            self.discarded_pages += self.host.discard(self.host_vm, pfns)

    def handle_deflate(self, pfns: np.ndarray) -> None:
        """balloon_deflate_page: only MADV_WILLNEED; nothing is repopulated."""
        self.deflate_requests += 1

    # --- stats --------------------------------------------------------------------------------
    def receive_stats(self, values: dict[int, int]) -> None:
        """virtio_balloon_receive_stats: reset to -1, store what the guest sent, stamp the time."""
        self.stats = {name: STAT_UNSET for _, _, name in STATS}
        for tag, _, name in STATS:
            if tag in values:
                self.stats[name] = int(values[tag])
        self.stats_last_update = int(self.wallclock())

    def guest_stats(self) -> dict:
        """The QOM property ``guest-stats``."""
        return {"stats": dict(self.stats), "last-update": self.stats_last_update}

    def set_poll_interval(self, value: int) -> None:
        """balloon_stats_set_poll_interval (QEMU's checks and texts); seconds, 0 disables."""
        if value < 0:
            raise ValueError("timer value must be greater than zero")
        if value > UINT32_MAX:
            raise ValueError("timer value is too big")
        if value == self.stats_poll_interval:
            return
        self.stats_poll_interval = value
        if self._stats_timer is not None and self._stats_timer.is_alive:
            self._stats_timer.interrupt()
            self._stats_timer = None
        if value:
            # the first poll fires at once (balloon_stats_change_timer(s, 0)), then every interval
            self._stats_timer = self.env.process(self._poll_stats(first_delay_ms=0))

    def _poll_stats(self, first_delay_ms: float):
        try:
            yield self.env.timeout(first_delay_ms)
            while True:
                # balloon_stats_poll_cb: hand the buffer back; the guest refills it at once
                if self.driver is not None:
                    self.driver.stats_request()
                yield self.env.timeout(self.stats_poll_interval * 1000)
        except simpy.Interrupt:
            return


class BalloonDriver:
    """Linux's virtio_balloon driver: the work item chasing ``num_pages``, OOM notifier, stats."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, device: BalloonDevice,
                 request_ms: float):
        self.env = env
        self.kernel = kernel
        self.device = device
        self.request_ms = request_ms
        self.features = set(device.features)
        self.num_pages = 0  # vb->num_pages: pages the balloon holds
        self._pages = np.zeros(1024, dtype=np.int64)  # the balloon page list (a LIFO stack)
        self.out_of_puff = 0
        self.requests = 0
        self.oom_deflated_pages = 0
        self._queued = False
        self._wake: simpy.Event | None = None
        self.in_flight = NO_PAGES
        self.request_target = 0  # num_pages as the run in progress (or the last one) read it
        # num_pages the last completed request chased, read when its run started (None: an OOM
        # deflate, which chases nothing); the target may have changed while it was in flight
        self.last_request_target: int | None = None
        self._request_done: simpy.Event | None = None
        device.driver = self
        if self.deflate_on_oom:
            kernel.oom_notifiers.append(self.oom_notify)
        kernel.remap_hooks.append(self._migrated)  # balloon compaction: virtballoon_migratepage
        self._worker = env.process(self._work())
        self.stats_request()  # init_vqs primes the stats queue with one buffer at probe

    @property
    def deflate_on_oom(self) -> bool:
        return VIRTIO_BALLOON_F_DEFLATE_ON_OOM in self.features

    @property
    def idle(self) -> bool:
        """The work item is neither queued nor running: nothing happens until a config change."""
        return not self._queued and self._wake is not None and not self._wake.triggered

    @property
    def pages(self) -> np.ndarray:
        return self._pages[:self.num_pages]

    @property
    def request_done(self) -> simpy.Event:
        """An event that fires when the driver next writes ``actual`` (after its next request).
        Made only when asked for: most requests have no one waiting on them."""
        if self._request_done is None:
            self._request_done = self.env.event()
        return self._request_done

    def config_changed(self) -> None:
        """virtballoon_changed: queue update_balloon_size_work (a no-op if already queued)."""
        self._queued = True
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def towards_target(self) -> int:
        target = -(-self.device.config.num_pages // VIRTIO_BALLOON_PAGES_PER_PAGE) * (
            VIRTIO_BALLOON_PAGES_PER_PAGE)
        return target - self.num_pages

    def _work(self):
        """update_balloon_size_func, one batch per run, re-queued while the target is unmet."""
        while True:
            if not self._queued:
                self._wake = self.env.event()
                yield self._wake
            self._queued = False
            # towards_target() is read once per run: a request is sized by the target of that
            # moment and is not cut short if the target changes while it is in flight (the
            # msleep(200) of an out-of-puff fill, or the wait for the host's ack)
            self.request_target = target = self.device.config.num_pages
            diff = self.towards_target()
            if diff == 0:
                continue
            if diff > 0:
                diff -= yield from self._fill(diff)
            else:
                diff += yield from self._leak(-diff)
            self._update_balloon_size(target)
            if diff:
                self._queued = True

    def _fill(self, num: int):
        """fill_balloon: allocate up to 256 pages one by one, tell the host, count them."""
        num = min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX)
        pfns = self.kernel.alloc_pages(num, PageState.BALLOON, movable=True, noretry=True)
        if len(pfns) < num:
            self.out_of_puff += 1
            self.kernel.log(f"virtio_balloon virtio0: Out of puff! Can't get "
                            f"{VIRTIO_BALLOON_PAGES_PER_PAGE} pages")
            self.in_flight = pfns  # allocated, on the local list, not yet on the balloon list
            yield self.env.timeout(OUT_OF_PUFF_SLEEP_MS)
            self.in_flight = NO_PAGES
        if len(pfns):
            self._push(pfns)
            if not self.deflate_on_oom:
                self.kernel.adjust_managed_page_count(-len(pfns))
            self.device.handle_inflate(pfns)  # tell_host(inflate_vq) waits for the ack
            yield self.env.timeout(self.request_ms)
        return len(pfns)

    def _leak(self, num: int):
        """leak_balloon: dequeue up to 256 pages, tell the host first, then free them."""
        pfns = self._dequeue(min(num, VIRTIO_BALLOON_ARRAY_PFNS_MAX))
        if len(pfns):
            self.in_flight = pfns  # off the balloon list, not yet back in the buddy allocator
            self.device.handle_deflate(pfns)
            yield self.env.timeout(self.request_ms)
            self.in_flight = NO_PAGES
            self._release(pfns)
        return len(pfns)

    def _dequeue(self, num: int) -> np.ndarray:
        num = min(num, self.num_pages)
        pfns = self._pages[self.num_pages - num:self.num_pages][::-1].copy()
        self.num_pages -= num
        return pfns

    def _release(self, pfns: np.ndarray) -> None:
        """release_pages_balloon: managed count back, pages to the buddy allocator."""
        if not self.deflate_on_oom:
            self.kernel.adjust_managed_page_count(len(pfns))
        self.kernel.free_pages(pfns, was=PageState.BALLOON)

    def _push(self, pfns: np.ndarray) -> None:
        need = self.num_pages + len(pfns)
        if need > len(self._pages):
            grown = np.zeros(max(need, 2 * len(self._pages)), dtype=np.int64)
            grown[:self.num_pages] = self._pages[:self.num_pages]
            self._pages = grown
        self._pages[self.num_pages:need] = pfns
        self.num_pages = need

    def _migrated(self, old_sorted: np.ndarray, new_sorted: np.ndarray) -> None:
        """Balloon pages moved by page migration: the balloon list follows them."""
        pages = self._pages[:self.num_pages]
        at = np.searchsorted(old_sorted, pages)
        at[at == len(old_sorted)] = 0
        hit = old_sorted[at] == pages
        pages[hit] = new_sorted[at[hit]]

    def _update_balloon_size(self, chased: int | None) -> None:
        """update_balloon_size: write ``actual`` into config space (``chased``: the target the
        request was sized for, for ``last_request_target``)."""
        self.requests += 1
        self.last_request_target = chased
        self.device.set_config(self.num_pages)
        done, self._request_done = self._request_done, None
        if done is not None:
            done.succeed()

    def oom_notify(self) -> int:
        """virtio_balloon_oom_notify: deflate VIRTIO_BALLOON_OOM_NR_PAGES, report them freed."""
        pfns = self._dequeue(VIRTIO_BALLOON_OOM_NR_PAGES)
        if len(pfns) == 0:
            return 0
        self.device.handle_deflate(pfns)
        self._release(pfns)
        self.oom_deflated_pages += len(pfns)
        self._update_balloon_size(None)
        return len(pfns) // VIRTIO_BALLOON_PAGES_PER_PAGE

    # --- stats --------------------------------------------------------------------------------
    def collect_stats(self) -> dict[int, int]:
        """update_balloon_stats: vm events, si_meminfo, si_mem_available, NR_FILE_PAGES."""
        k = self.kernel
        info = k.meminfo()
        v = k.vmstat
        return {
            0: v.pswpin << PAGE_SHIFT,
            1: v.pswpout << PAGE_SHIFT,
            2: v.pgmajfault,
            3: v.pgfault,
            4: info["MemFree"] * 1024,
            5: info["MemTotal"] * 1024,
            6: info["MemAvailable"] * 1024,
            7: info["Cached"] * 1024,
            8: 0,
            9: 0,
        }

    def stats_request(self) -> None:
        """stats_request -> update_balloon_stats_func: refill the buffer and send it back."""
        self.device.receive_stats(self.collect_stats())


# QOM: the PCI proxy at /machine/peripheral/<id> and its virtio-backend child show the same
# properties (the proxy aliases them); the feature bits are qdev properties, fixed once realized
QOM_TYPE = "virtio-balloon-pci"
QOM_VIRTIO_TYPE = "virtio-balloon-device"
def _feature(name: str) -> QomProperty:
    key = name.replace("-", "_")
    return QomProperty(name, "bool", lambda d: bool(d.options[key]), static=True)


QOM_PROPERTIES = (
    QomProperty("guest-stats", "any", BalloonDevice.guest_stats),
    QomProperty("guest-stats-polling-interval", "int", lambda d: d.stats_poll_interval,
                BalloonDevice.set_poll_interval),
    *(_feature(name) for name in ("deflate-on-oom", "free-page-hint", "free-page-reporting", "page-poison")),
)
