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
  "Out of puff!" (``dev_info_ratelimited``: at most 10 lines per 5 s, then "fill_balloon: N callbacks
  suppressed" when the next interval opens, lib/ratelimit.c), sleeps 200 ms, sends what it got and
  retries.
* Without DEFLATE_ON_OOM every balloon page leaves MemTotal (``adjust_managed_page_count(page, -1)``);
  with it, MemTotal stays and the OOM notifier gives back 256 pages per OOM event. The driver does not
  re-inflate by itself afterwards; only the next config change (the next ``balloon`` command) does.
* QEMU discards inflated pages (``ram_block_discard_range``), so host RSS falls only by the pages that
  were backed; deflated pages are merely ``MADV_WILLNEED``-ed and stay unbacked until touched. With RAM
  discard disabled (as under VFIO) requests are acked and nothing is freed.
* Pages on the balloon list are movable (balloon compaction, ``virtballoon_migratepage``): when
  virtio-mem takes a range back, they migrate and the list follows. Pages in flight are not: those
  ``leak_balloon`` dequeued and has not released yet (``balloon_page_list_dequeue`` takes them off
  the list and clears their movable ops, mm/balloon_compaction.c) and those an Out-of-puff fill
  holds on its local list across its 200 ms sleep; a range holding one fails with -EBUSY.

Simplifications: a request's round trip takes a fixed ``request_ms`` of simulated time (a model knob;
the live backend measures the real one); compaction for its own sake (not for a virtio-mem unplug)
is not modelled; the OOM notifier's deflate takes no simulated time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from labkit.devices.balloon_host import inflate_discards
from labkit.devices.properties import QomProperty
from labkit.model.guest_pages import alloc_groups
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
DEFAULT_RATELIMIT_INTERVAL_MS = 5000  # include/linux/ratelimit_types.h: 5 * HZ
DEFAULT_RATELIMIT_BURST = 10
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
        self.zeroed_pages = 0  # of the discarded pages, those only init_on_alloc had written
        self.wanted_pages = 0  # (vm_ram_size - target) >> 12 before the u32 truncation
        self.partial_pages_dropped = 0  # host pages QEMU's per-request tracking gave up on

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
        """virtio_balloon_to_target: clamp to vm_ram_size, set num_pages, notify config.

        ``num_pages`` is a ``uint32_t`` (include/hw/virtio/virtio-balloon.h) and the right side a
        64-bit ``ram_addr_t``: a balloon of 2^32 pages (16 TiB) or more is truncated modulo 2^32,
        without a word (docs/mechanisms.md §12.5). ``wanted_pages`` keeps what was asked for."""
        target = min(target, self.vm_ram_size)
        if target:
            self.wanted_pages = (self.vm_ram_size - target) >> VIRTIO_BALLOON_PFN_SHIFT
            self.config.num_pages = self.wanted_pages & UINT32_MAX
            if self.driver is not None:
                self.driver.config_changed()

    def logical_actual(self) -> int:
        """query-balloon's ``actual``: vm_ram_size minus the balloon, in bytes (``actual`` is a u32:
        ``virtio_balloon_stat`` can never show a balloon of 16 TiB or more)."""
        return self.vm_ram_size - ((self.config.actual & UINT32_MAX) << VIRTIO_BALLOON_PFN_SHIFT)

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
        """virtio_balloon_inhibited: RAM discard disabled (``ram_block_discard_is_disabled``: a
        vfio-pci device, an SEV guest; or the model's host-wide ``discard=False``). Incoming postcopy
        and background snapshots, the other two reasons, are not modelled."""
        return not self.host.discard_enabled or self.host_vm.ram_discard.is_disabled()

    def handle_inflate(self, pfns: np.ndarray) -> None:
        """virtio_balloon_handle_output on the inflate queue: one request (one virtqueue element)
        of 4 KiB PFNs, each through ``balloon_inflate_page`` (see :func:`inflate_discards`)."""
        self.inflate_requests += 1
        if self.inhibited() or len(pfns) == 0:
            return
        vm = self.host_vm
        if vm.large_pages:
            pfns, dropped = inflate_discards(vm, pfns)
            self.partial_pages_dropped += dropped
        if len(pfns):  # balloon_inflate_page: one ram_block_discard_range per 4 KiB PFN
            zeroed = vm.discarded_zeroed
            self.discarded_pages += self.host.discard(vm, pfns, chunk=1)
            # pages backed only because init_on_alloc zeroed them: discarding them returns nothing
            self.zeroed_pages += vm.discarded_zeroed - zeroed

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
        """balloon_stats_set_poll_interval (QEMU's checks and texts); seconds, 0 disables. A new
        timer polls at once (``balloon_stats_change_timer(s, 0)``); changing the interval of a
        running one re-arms it one *new* interval from now (``balloon_stats_change_timer(s, value)``)."""
        if value < 0:
            raise ValueError("timer value must be greater than zero")
        if value > UINT32_MAX:
            raise ValueError("timer value is too big")
        if value == self.stats_poll_interval:
            return
        running = self._stats_timer is not None and self._stats_timer.is_alive
        self.stats_poll_interval = value
        if running:
            self._stats_timer.interrupt()
            self._stats_timer = None
        if value:
            first = value * 1000 if running else 0
            self._stats_timer = self.env.process(self._poll_stats(first_delay_ms=first))

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
                 request_ms: float, pages_per_page: int = VIRTIO_BALLOON_PAGES_PER_PAGE):
        self.env = env
        self.kernel = kernel
        self.device = device
        self.request_ms = request_ms
        # VIRTIO_BALLOON_PAGES_PER_PAGE: 4 KiB balloon PFNs per guest page (16 on a 64 KiB arm64
        # guest, labkit.model.guest_pages); every count below is in 4 KiB balloon pages
        self.pages_per_page = pages_per_page
        self.features = set(device.features)
        self.num_pages = 0  # vb->num_pages: pages the balloon holds
        self._pages = np.zeros(1024, dtype=np.int64)  # the balloon page list (a LIFO stack)
        self.out_of_puff = 0
        self._ratelimit = [None, 0, 0]  # ___ratelimit's begin (ms), printed, missed
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
        # pages in flight (dequeued by leak_balloon and not yet released, or held on an
        # Out-of-puff fill's local list) are not movable: migration cannot isolate them
        kernel.unmovable_holders.append(lambda: self.in_flight)
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
        """towards_target: num_pages aligned *up* to a whole guest page ("to avoid inflating and
        deflating balloon endlessly"), minus what the balloon holds."""
        per = self.pages_per_page
        target = -(-self.device.config.num_pages // per) * per
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
        if self.pages_per_page == 1:
            pfns = self.kernel.alloc_pages(num, PageState.BALLOON, movable=True, noretry=True)
        else:  # whole guest pages, each named by pages_per_page PFNs; the driver pops them LIFO
            per = self.pages_per_page
            pfns = alloc_groups(self.kernel, num // per, per, PageState.BALLOON)
            pfns = pfns.reshape(-1, per)[::-1].ravel()
        if len(pfns) < num:
            self.out_of_puff += 1
            if self._ratelimited():
                self.kernel.log(f"virtio_balloon virtio0: Out of puff! Can't get "
                                f"{self.pages_per_page} pages")
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

    def _ratelimited(self) -> bool:
        """lib/ratelimit.c ``___ratelimit`` with dev_info_ratelimited's static state: at most
        ``DEFAULT_RATELIMIT_BURST`` messages per ``DEFAULT_RATELIMIT_INTERVAL``; the first call of a
        new interval reports what the last one suppressed."""
        state = self._ratelimit
        now = self.env.now
        if state[0] is None:
            state[0] = now
        if now > state[0] + DEFAULT_RATELIMIT_INTERVAL_MS:
            if state[2]:
                self.kernel.log(f"fill_balloon: {state[2]} callbacks suppressed")
                state[2] = 0
            state[0], state[1] = now, 0
        if state[1] < DEFAULT_RATELIMIT_BURST:
            state[1] += 1
            return True
        state[2] += 1
        return False

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
        """Balloon pages moved by page migration (``virtballoon_migratepage``): the balloon list
        follows them, the new page is inflated (the host discards it) and the old one deflated.
        Linux tells the host page by page; here one request each way per migrated batch."""
        pages = self._pages[:self.num_pages]
        if len(pages) == 0:
            return
        at = np.searchsorted(old_sorted, pages)
        at[at == len(old_sorted)] = 0
        hit = old_sorted[at] == pages
        if not hit.any():
            return
        old = pages[hit]
        pages[hit] = new_sorted[at[hit]]
        self.device.handle_inflate(pages[hit])
        self.device.handle_deflate(old)

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
        return len(pfns) // self.pages_per_page

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
    QomProperty("iothread", "link<iothread>",
                lambda d: f"/objects/{d.options['iothread']}" if d.options.get("iothread") else "",
                static=True),
)
