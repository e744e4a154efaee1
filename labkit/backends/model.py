"""ModelBackend: the numpy page model and its devices on simulated time, speaking QMP.

``ModelBackend._assemble`` builds the machine where a reader looks for it, in QEMU's order, each
part a typed attribute built from explicit arguments: memory (page arrays, zones, NUMA nodes,
device regions, the host) -> the guest kernel -> its boot -> virtio-balloon (+ free page reporting,
+ free page hinting) -> virtio-mem -> the guest's writeback and virtio-blk -> virtio-pmem -> the
migration engine (and the workloads that dirty memory for it) -> the monitor. The options come
checked from :func:`labkit.backends.options.parse_options`; the QMP commands are the monitor's one
table (:mod:`labkit.backends.monitor`); the guest ops are the one table of :meth:`_guest_ops`.

>>> from labkit.backends.model import ModelBackend
>>> vm = ModelBackend(memory="1G", seed=0)
>>> _ = vm.qmp("balloon", value=512 << 20)
>>> vm.advance(2000)
>>> vm.qmp("query-balloon")
{'actual': 536870912}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import simpy

from labkit.backends.base import EventQueue, check_ms
from labkit.backends.guest_ops import check as check_guest_op
from labkit.backends.inspect_model import ModelInspection
from labkit.backends.model_host import attach_host
from labkit.backends.monitor import Monitor
from labkit.backends.options import HostOptions, VmOptions, check_fits, parse_options
from labkit.devices.balloon import BalloonDevice, BalloonDriver
from labkit.devices.free_page_hinting import FreePageHintDevice, FreePageHinting, HintTiming
from labkit.devices.free_page_hinting_guest import FreePageHintDriver
from labkit.devices.free_page_reporting import FreePageReporting
from labkit.devices.virtio_blk import VirtioBlk
from labkit.devices.virtio_mem_vm import VirtioMem
from labkit.devices.virtio_pmem_vm import VirtioPmem
from labkit.errors import QMPError
from labkit.model.bootparams import parse_bootparams
from labkit.model.buddy import buddyinfo
from labkit.model.guest_pages import LARGE_PAGE_FACTS
from labkit.model.host import Host
from labkit.model.hotplug import MemoryHotplug, plan_layout, q35_device_memory_base
from labkit.model.kernel import Kernel
from labkit.model.layout import phys_pfn, probe_memory_block_size, q35_layout, zones_for
from labkit.model.migration import MigrationState
from labkit.model.migration_workloads import Workloads
from labkit.model.pages import GuestMemory, PageState, Zone
from labkit.model.reservations import plan_reservations
from labkit.model.runstate import RunState
from labkit.model.workloads import BootProfile, GuestOps, boot
from labkit.model.writeback import GuestWriteback
from labkit.units import PAGE_SIZE, format_size, parse_size


class HostFootprint:
    """What a VM being built adds to its host, to take back if the build fails: its guest RAM
    (attached with the kernel, backed as boot touches it), the host page cache it created and the
    private copies of ``share=off`` virtio-pmem files. A failed ``labkit.open`` leaves a shared host
    as it found it (pages of other VMs a failed boot pushed to swap stay there, as on a real host).

    On a shared host each VM needs its own ``vm_name``: it keys the VM's private copies."""

    def __init__(self, host: Host, vm_name: str):
        taken = [vm.name for vm in host.vms]
        if vm_name in taken:
            raise ValueError(f"vm_name {vm_name!r} is already a VM on this host (its VMs: {taken}); "
                             f"give each VM on a shared Host its own vm_name")
        self.host = host
        self.vms = list(host.vms)
        self.cache = host.page_cache
        self.private = set(self.cache.private) if self.cache is not None else set()
        self.files = set(self.cache.files) if self.cache is not None else set()

    def undo(self) -> None:
        host = self.host
        for vm in [vm for vm in host.vms if vm not in self.vms]:
            host.detach(vm)
        if self.cache is None:
            host.page_cache = None
            return
        for owner in set(self.cache.private) - self.private:
            del self.cache.private[owner]
        for path in set(self.cache.files) - self.files:
            if self.cache.files[path].cached_pages() == 0:  # opened, never read: stat()ed only
                del self.cache.files[path]


def guest_sizes(options: VmOptions) -> dict:
    """virtio-mem's driver sizes of a guest with pages larger than 4 KiB (labkit.model.guest_pages)."""
    facts = LARGE_PAGE_FACTS.get(options.guest_page_size)
    return {} if facts is None else {"pageblock_bytes": facts["pageblock_bytes"],
                                     "memory_block_bytes": facts["memory_block_bytes"]}


def _host(options: VmOptions) -> Host:
    """The host: a shared one, or one with ``host`` options (by default twice the guest's RAM)."""
    if isinstance(options.host, Host):
        return options.host
    h: HostOptions = options.host
    ram = h.ram if h.ram is not None else 2 * (options.memory + sum(d.size for d in options.virtio_mem))
    return Host(ram, h.swap, discard=h.discard, swapin_us=h.swapin_us, thp=h.thp)


class ModelBackend(ModelInspection):
    """A simulated VM. ``ModelBackend(**labkit.open options)`` or ``ModelBackend(vm_options)``."""

    name = "model"

    def __init__(self, options: VmOptions | None = None, /, **keywords: Any):
        if options is None:
            options = parse_options("model", **keywords)
        elif keywords:
            raise TypeError(f"pass VmOptions or keywords, not both (got {sorted(keywords)})")
        self.options = options
        self.memory, self.seed = options.memory, options.seed
        self.knobs = asdict(options.model)
        self.cmdline = dict(options.cmdline)
        self.open_options = dict(options.keywords)  # how to open it again (Reset buttons, re-runs)

        # the guest kernel's command line and sysctls (labkit.model.bootparams)
        self.params = parse_bootparams(self.cmdline)

        # memory: q35's layout (RAM below 4 GiB up to the PCI hole, the rest above), the zones of
        # each NUMA node (DMA, DMA32, Normal), device regions after boot RAM; the host
        boot_pages = options.memory // PAGE_SIZE
        self.layout = q35_layout(options.memory)
        block = probe_memory_block_size(self.layout)
        for d in options.virtio_mem:  # memory blocks: Linux adds hot-plugged memory by whole blocks
            if d.size % block:
                raise ValueError(f"virtio_mem {d.id!r} size must be a multiple of the guest's memory "
                                 f"block size {format_size(block)}, got {format_size(d.size)}")
        boot_zones = zones_for(self.layout, block_pages=block // PAGE_SIZE, node_sizes=options.node_sizes)
        n_pages, hotplug_zones, self.regions = plan_layout(
            boot_pages, boot_zones, [d.spec() for d in options.virtio_mem], block // PAGE_SIZE)
        check_fits(n_pages)
        self.host = _host(options)
        footprint = HostFootprint(self.host, options.vm_name)
        try:  # a machine that fails to build leaves nothing on its host (a shared one above all)
            self._assemble(options, n_pages, boot_zones, hotplug_zones, block // PAGE_SIZE)
        except BaseException:
            footprint.undo()
            raise
        self.closed = False

    def _assemble(self, options: VmOptions, n_pages: int, boot_zones: list[Zone],
                  hotplug_zones: list[Zone], block_pages: int) -> None:
        """Everything after the host, in QEMU's order."""
        self.env = simpy.Environment()
        self.run_state = RunState(self.env)
        self.event_queue = EventQueue(self.env, self.wallclock)
        emit = self.event_queue.emit
        self.mem = GuestMemory(n_pages, boot_zones, hotplug_zones=hotplug_zones, block_pages=block_pages)

        # the guest kernel; the host's RAM blocks and what the switches do to them (before any
        # device); then its boot: memblock reservations first, then the boot's allocations
        self.kernel = Kernel(self.mem, self.host, options.vm_name, clock=lambda: self.env.now,
                             params=self.params, phys_pfn=self._phys_pfn)
        self.migration_blockers = attach_host(self.host, self.kernel.host_vm, options, self.regions,
                                              self.host.thp)
        if self.regions:
            self.kernel.hotplug = MemoryHotplug(self.kernel, options.memhp_default_state,
                                                regions=self.regions)
        profile = BootProfile() if options.model.boot == "default" else BootProfile.minimal()
        if options.model.initrd_bytes is not None:
            profile = dataclasses.replace(profile, initrd=options.model.initrd_bytes)
        # x86 pci_swiotlb_detect: a bounce buffer once RAM may lie above 4 GiB (RAM there, or a
        # hot-pluggable range in the SRAT, which QEMU builds whenever maxmem is given)
        above_4g = self.layout.above_4g > 0 or bool(options.virtio_mem or options.virtio_pmem)
        self.reservations = plan_reservations(self.layout, len(options.node_sizes), self.params.nr_cpus,
                                              self.params.swiotlb_slabs(above_4g),
                                              initrd_bytes=profile.initrd, block_pages=block_pages)
        boot(self.kernel, np.random.default_rng(options.seed), profile, self.reservations)
        self.ops = GuestOps(self.kernel)

        # virtio-balloon, and what rides on it: free page reporting and free page hinting
        self.balloon_device: BalloonDevice | None = None
        self.balloon: BalloonDriver | None = None
        self.reporting: FreePageReporting | None = None
        self.hinting: FreePageHinting | None = None
        self.balloon_options = options.balloon.properties() if options.balloon is not None else None
        if options.balloon is not None:
            self.balloon_device = BalloonDevice(self.env, self.host, self.kernel.host_vm, options.memory,
                                                self.balloon_options, emit, self.wallclock)
            self.balloon = BalloonDriver(self.env, self.kernel, self.balloon_device,
                                         options.model.balloon_request_ms,
                                         pages_per_page=options.guest_page_size // PAGE_SIZE)
            if options.balloon.stats_polling_interval:  # -device ...,guest-stats-polling-interval=N
                self.balloon_device.set_poll_interval(options.balloon.stats_polling_interval)
            if options.balloon.free_page_reporting:
                self.reporting = FreePageReporting(self.env, self.kernel, self.host, self.balloon,
                                                   self.balloon_device, options.cmdline,
                                                   guest_page_size=options.guest_page_size)
            if options.balloon.free_page_hint:
                timing = HintTiming()
                device = FreePageHintDevice(self.balloon_device, self.balloon, self.run_state)
                driver = FreePageHintDriver(self.env, self.kernel, device, timing, self.run_state)
                self.hinting = FreePageHinting(device, driver, timing)

        # virtio-mem: devices on their regions, Linux's driver on each
        self.virtio_mem: VirtioMem | None = None
        if options.virtio_mem:
            specs = [d.spec() | {"memdev": d.memdev} for d in options.virtio_mem]
            self.virtio_mem = VirtioMem(self.env, self.kernel, self.host, specs, self.regions,
                                        lambda: self.run_state.migration_running, emit,
                                        pin_plugged=bool(options.vfio), guest_sizes=guest_sizes(options))

        # the guest's page cache writeback and virtio-blk, then virtio-pmem on the same host cache
        self.writeback = GuestWriteback(self.env, self.kernel, self.ops)
        self.blk = VirtioBlk(self.env, self.kernel, self.host, self.writeback, self.ops)
        memaddr_base = max([q35_device_memory_base(options.memory)] +
                           [r.memaddr + r.pages * PAGE_SIZE for r in self.regions])
        self.virtio_pmem = VirtioPmem(self.env, self.kernel, self.host, self.writeback, self.blk,
                                      memaddr_base, options.vm_name)
        for d in options.virtio_pmem:
            self.virtio_pmem.plug(d.spec(), d.memdev)

        # pre-copy migration, and the guest workloads that keep memory dirty for it
        self.migration = MigrationState(self.env, self.kernel, self.run_state, emit,
                                        init_on_free=bool(options.cmdline["init_on_free"]),
                                        regions=self.regions, virtio_mem=self.virtio_mem)
        self.migration.link.link_bandwidth = options.model.migration_link_bandwidth
        self.workloads = Workloads(self.env, self.kernel, self.ops, self.migration, options.seed)

        self.monitor = Monitor(self, options)
        self.guest_ops = self._guest_ops()


    def _phys_pfn(self, pfn: int) -> int:
        """The physical frame of page index ``pfn`` (q35's PCI hole; device regions' memaddr)."""
        if pfn < self.mem.boot_pages:
            return phys_pfn(self.layout, pfn)
        for r in self.regions:
            if r.start <= pfn < r.end:
                return r.memaddr // PAGE_SIZE + pfn - r.start
        return pfn

    def _guest_ops(self) -> dict[str, Callable[..., Any]]:
        """Every guest op by name: the kernel's, the disks' and pmem's, the dirtying workloads'."""
        pmem, workloads = self.virtio_pmem, self.workloads
        ops: dict[str, Callable[..., Any]] = {
            "alloc": self._alloc, "touch": self._touch, "read": self._read, "free": self.ops.free,
            "drop_caches": self.ops.drop_caches, "sync": self.writeback.sync, "handles": self._handles,
            "sysctl": self.writeback.set_sysctl, "blk_read": self.blk.read, "blk_write": self.blk.write,
            "pmem_read": pmem.read, "pmem_write": pmem.write, "pmem_flush": pmem.flush,
            "pmem_mmap": pmem.mmap, "pmem_devices": pmem.guest_devices,
            "writer": workloads.writer, "writer_stop": workloads.writer_stop,
            "kernel_build": workloads.kernel_build, "kernel_build_stop": workloads.kernel_build_stop,
        }
        if self.virtio_mem is not None:
            ops |= {"memory_blocks": self.virtio_mem.memory_blocks,
                    "online_memory": self.virtio_mem.online_memory}
        return ops

    # --- time ---------------------------------------------------------------------------------
    def wallclock(self) -> float:
        return self.options.model.epoch + self.env.now / 1000.0

    @property
    def now_ms(self) -> float:
        return float(self.env.now)

    def advance(self, ms: float) -> None:
        """Run simulated time forward by ``ms`` milliseconds."""
        self._check_open()
        ms = check_ms(ms, "advance()", self.env.now)
        if ms == 0:  # run what is due now; simpy's run() wants a later time
            while self.env.peek() == self.env.now:
                self.env.step()
            return
        self.env.run(until=self.env.now + ms)

    def step(self, max_ms: float = 60_000) -> bool:
        """Run until the balloon driver completes its next request (at most ``max_ms``).

        Returns False, without moving time, if the driver has nothing to do."""
        self._check_open()
        max_ms = check_ms(max_ms, "step() max_ms", self.env.now)
        b = self.balloon
        nothing_to_do = b is None or (  # target met and acknowledged, nothing queued or held
            not b._queued and b.towards_target() == 0 and len(b.in_flight) == 0
            and self.balloon_device.config.actual == b.num_pages)
        if b is None or b.idle or nothing_to_do:
            return False
        done = self.balloon.request_done
        self.env.run(until=simpy.AnyOf(self.env, [done, self.env.timeout(max_ms)]))
        return done.triggered

    # --- QMP ----------------------------------------------------------------------------------
    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command as QEMU would; raise QMPError with QEMU's class and text."""
        self._check_open()
        return self.monitor.execute(command, arguments)

    def qmp_json(self, command: str, arguments: dict) -> Any:
        """A QMP command whose arguments came as JSON text (``labkit serve``'s socket): 1e400 is a
        number there, as QEMU's parser reads it, not a Python infinity."""
        self._check_open()
        return self.monitor.execute(command, arguments, parsed=True)

    def hmp(self, command_line: str) -> str:
        """An HMP line through ``human-monitor-command`` (QEMU's text, ``\\r\\n`` line ends)."""
        return self.qmp("human-monitor-command", **{"command-line": command_line})

    # --- guest --------------------------------------------------------------------------------
    def guest(self, op: str, **arguments: Any) -> Any:
        """Run a workload step in the guest: alloc, touch, read, free, drop_caches, sync, handles,
        and the ops of the VM's devices (see :meth:`_guest_ops`)."""
        self._check_open()
        if op not in self.guest_ops:
            raise ValueError(f"guest op {op!r} is not one of {list(self.guest_ops)}")
        return self.guest_ops[op](**check_guest_op(op, arguments))

    def _alloc(self, **arguments: Any) -> int:
        size = parse_size(arguments.pop("size"), name="size")
        return self.ops.alloc(size, **arguments)

    def _touch(self, **arguments: Any) -> Any:
        return self.ops.touch(arguments.pop("handle"), write=True, **arguments)

    def _read(self, **arguments: Any) -> Any:
        return self.ops.touch(arguments.pop("handle"), write=False, **arguments)

    def _handles(self) -> list[dict]:
        return [{"handle": h.id, "kind": h.kind, "name": h.name, "alive": h.alive,
                 "size": h.size, "resident": len(h.pages) * PAGE_SIZE}
                for h in self.kernel.handles.values() if h.kind != "kernel"]

    def meminfo(self) -> dict[str, int]:
        self._check_open()
        return self.kernel.meminfo()

    def vmstat(self) -> dict[str, int]:
        """The guest's /proc/vmstat counters the mechanisms move (names as in /proc/vmstat)."""
        self._check_open()
        v = self.kernel.vmstat
        return {"pgfault": v.pgfault, "pgmajfault": v.pgmajfault, "pswpin": v.pswpin,
                "pswpout": v.pswpout, "oom_kill": v.oom_kill, "allocstall_normal": v.allocstall,
                "pgscan_kswapd": v.pgscan_kswapd, "pgscan_direct": v.pgscan_direct,
                "pgsteal_kswapd": v.pgsteal_kswapd, "pgsteal_direct": v.pgsteal_direct}

    def buddyinfo(self) -> str:
        return buddyinfo(self.mem)

    def zoneinfo(self) -> list[dict]:
        """/proc/zoneinfo per node and populated zone: free, min, low, high, spanned, present,
        managed, protection, start_pfn, and per CPU the pcp count, high and batch."""
        self._check_open()
        return self.kernel.zoneinfo()

    def dmesg(self) -> list[str]:
        return [f"[{t / 1000:12.6f}] {msg}" for t, msg in self.kernel.dmesg]

    # --- observation --------------------------------------------------------------------------
    def sample(self) -> dict[str, float]:
        """One row of metrics, all sizes in bytes: the base keys of
        :data:`labkit.backends.base.SAMPLE_KEYS`, then each mechanism's columns.

        ``balloon_actual`` / ``balloon_target`` are logical VM sizes as QEMU reports them;
        ``balloon_size`` is the memory the driver holds (vb->num_pages plus a request being
        filled), which runs ahead of ``actual`` by at most one request (256 pages) while inflating,
        because the driver allocates before it tells the host."""
        self._check_open()
        info = self.kernel.meminfo()
        dev = self.balloon_device
        row = {
            "t_ms": float(self.env.now),
            "memtotal": info["MemTotal"] * 1024,
            "memfree": info["MemFree"] * 1024,
            "memavailable": info["MemAvailable"] * 1024,
            "cached": info["Cached"] * 1024,
            "anon": info["AnonPages"] * 1024,
            "balloon_actual": dev.logical_actual() if dev else self.memory,
            "balloon_target": dev.logical_target() if dev else self.memory,
            "balloon_size": self.mem.count(PageState.BALLOON) * PAGE_SIZE,
            "host_rss": self.kernel.host_vm.rss_pages * PAGE_SIZE,
            "host_swap": self.kernel.host_vm.swap_pages * PAGE_SIZE,
            "host_free": self.host.free_pages * PAGE_SIZE,
            "oom_kills": self.kernel.vmstat.oom_kill,
        }
        if self.reporting is not None:
            row |= self.reporting.sample()
        if self.hinting is not None:
            row |= self.hinting.sample()
        row |= self.migration.sample()
        if self.virtio_mem is not None:
            row |= self.virtio_mem.sample()
        return row | self.virtio_pmem.sample()

    def snapshot(self) -> dict:
        """Copies of the page state and flag arrays, with the zone layout and ``phys``: where each
        run of page indexes lies in guest physical memory, ``(first index, end index, first
        physical frame)`` (q35 leaves the PCI hole out of the index; device regions sit at their
        memaddr), for the page map."""
        return {"t_ms": float(self.env.now), "state": self.mem.state.copy(),
                "flags": self.mem.flags.copy(),
                "zones": [(z.name, z.node, z.start, z.end) for z in self.mem.zones],
                "phys": self._phys_runs()}

    def _phys_runs(self) -> list[tuple[int, int, int]]:
        """The page index runs and their first physical frames (see :meth:`snapshot`)."""
        boot, below = self.mem.boot_pages, self.layout.below_4g_pages
        runs = [(0, min(boot, below), 0)]
        if boot > below:
            runs.append((below, boot, phys_pfn(self.layout, below)))
        runs += [(r.start, r.end, r.memaddr // PAGE_SIZE) for r in self.regions]
        return runs

    def events(self) -> list[dict]:
        return list(self.event_queue.delivered)

    # --- lifetime -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this VM was closed; open a new one with labkit.open()")

    def close(self) -> None:
        """The VM ends: its RAM and its private copies of virtio-pmem files leave the host."""
        if not self.closed:
            self.host.detach(self.kernel.host_vm)
            cache = self.host.page_cache
            for device in self.virtio_pmem.devices:
                if cache is not None and not device.share:
                    cache.private.pop(device.owner, None)
            self.virtio_pmem.closed = True
            self.closed = True

    def __enter__(self) -> ModelBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ModelBackend {format_size(self.memory)} t={self.env.now:.0f} ms "
                f"host ram {format_size(self.host.ram)}>")


__all__ = ["ModelBackend", "QMPError"]
