"""ModelBackend: the numpy page model and its devices on simulated time, speaking QMP.

>>> from labkit.backends.model import ModelBackend
>>> vm = ModelBackend(memory="1G", seed=0)
>>> _ = vm.qmp("balloon", value=512 << 20)
>>> vm.advance(2000)
>>> vm.qmp("query-balloon")
{'actual': 536870912}
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np
import psutil
import simpy

from labkit.backends.base import EventQueue, check_arguments
from labkit.backends.qom import QomObject, QomTree
from labkit.devices.balloon import PROPERTY_DEFAULTS, BalloonDevice, BalloonDriver
from labkit.devices.virtio_mem import PROPERTY_DEFAULTS as VIRTIO_MEM_PROPERTIES
from labkit.devices.virtio_mem import check_block_size
from labkit.devices.virtio_pmem import validate_specs as validate_virtio_pmem
from labkit.errors import QMPError
from labkit.model.bootparams import parse_bootparams
from labkit.model.buddy import buddyinfo
from labkit.model.host import Host
from labkit.model.hotplug import ONLINE_TYPES, MemoryHotplug, plan_layout
from labkit.model.kernel import Kernel
from labkit.model.layout import phys_pfn, probe_memory_block_size, q35_layout, zones_for
from labkit.model.pages import GuestMemory, PageState
from labkit.model.reservations import plan_reservations
from labkit.model.workloads import BootProfile, GuestOps, boot
from labkit.units import GiB, MiB, PAGE_SIZE, TiB, format_size, parse_size

MODEL_DEFAULTS = {
    "balloon_request_ms": 0.5,  # one inflate/deflate round trip of 256 PFNs (assumed; KVM-like)
    "boot": "default",  # BootProfile: "default" (a small cloud guest) or "minimal" (busybox)
    "initrd_bytes": None,  # the initramfs QEMU loads (None: the boot profile's)
    "epoch": 1_767_225_600,  # wall clock at t=0 (2026-01-01 UTC), for event timestamps
}
HOST_DEFAULTS = {"ram": None, "swap": 0, "discard": True, "swapin_us": 100.0}
BYTES_PER_PAGE_NEEDED = 8  # state + flags, plus transient masks while deriving free lists
GUEST_OPS = ("alloc", "touch", "read", "free", "drop_caches", "sync", "handles")
# guest kernel command-line parameters and sysctls: labkit.model.bootparams (CMDLINE_DEFAULTS)
VIRTIO_MEM_DEFAULTS = {k: v for k, v in VIRTIO_MEM_PROPERTIES.items()}
# Mechanisms that attach themselves to a VM when its options ask for them: each module has
# attach(backend) -> object | None, called once the kernel and the balloon exist.
ATTACHMENTS = (
    ("reporting", "labkit.devices.free_page_reporting"),
    ("hinting", "labkit.devices.free_page_hinting"),
    ("migration", "labkit.model.migration"),
    ("virtio_mem", "labkit.devices.virtio_mem_qmp"),
    ("virtio_pmem", "labkit.devices.virtio_pmem"),
)


def _virtio_mem_specs(specs: list[dict] | None, numa_nodes: int) -> list[dict]:
    """Validate virtio-mem device options (QEMU property names with underscores) with QEMU's
    texts; sizes become bytes."""
    out, ids = [], set()
    for i, spec in enumerate(specs or []):
        if not isinstance(spec, dict):
            raise TypeError(f"virtio_mem[{i}] must be a dict of device properties, got {spec!r}")
        opts = _merge(f"virtio_mem[{i}]", spec, VIRTIO_MEM_DEFAULTS)
        if not opts["id"] or opts["id"] in ids:
            raise ValueError(f"virtio_mem[{i}] needs a unique 'id', got {opts['id']!r}")
        ids.add(opts["id"])
        if opts["size"] is None:
            raise ValueError(f"virtio_mem[{i}] needs 'size' (the memory backend's size)")
        for key in ("size", "requested_size", "block_size"):
            opts[key] = parse_size(opts[key], name=key.replace("_", "-"))
        if opts["size"] <= 0 or opts["requested_size"] < 0:
            raise ValueError(f"virtio_mem[{i}]: size must be > 0 and requested-size >= 0, got "
                             f"{spec.get('size')!r}, {spec.get('requested_size')!r}")
        check_block_size(opts["block_size"])
        node = opts["node"]
        if not isinstance(node, int) or isinstance(node, bool) or not 0 <= node < numa_nodes:
            raise ValueError(f"'node' property has value '{node}', which exceedsthe number of "
                             f"numa nodes: {numa_nodes}")
        if opts["size"] % opts["block_size"]:
            raise ValueError(f"'memdev' property memdev size has to be multiples of'block-size' "
                             f"(0x{opts['block_size']:x})")
        if opts["requested_size"] % opts["block_size"]:
            raise ValueError(f"'requested-size' property has to be multiples of 'block-size' "
                             f"(0x{opts['block_size']:x})")
        if opts["size"] % (128 * MiB):
            raise ValueError(f"virtio_mem[{i}] size must be a multiple of 128 MiB (a Linux memory "
                             f"block) in this model, got {spec.get('size')!r}")
        out.append(opts)
    return out


def _merge(name: str, given: dict | None, defaults: dict) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; accepted: {sorted(defaults)}")
    return {**defaults, **given}


def _check_fits(memory: int) -> None:
    need = memory // PAGE_SIZE * BYTES_PER_PAGE_NEEDED
    available = psutil.virtual_memory().available
    if need > available:
        raise ValueError(
            f"memory {format_size(memory)} needs about {format_size(need)} of this machine's RAM "
            f"for its page arrays, but only {format_size(available)} is available")


class ModelBackend:
    """A simulated VM. See :func:`labkit.open` for the arguments."""

    name = "model"

    def __init__(self, memory: int | str = "4G", seed: int = 0, balloon: dict | bool | None = None,
                 host: dict | Host | None = None, numa_nodes: int = 1, model: dict | None = None,
                 cmdline: dict | None = None, vm_name: str = "vm0",
                 virtio_mem: list[dict] | None = None, memhp_default_state: str = "offline",
                 virtio_pmem: list[dict] | None = None):
        size = parse_size(memory, name="memory")
        if size < 64 * MiB or size % MiB:
            raise ValueError(f"memory must be a whole number of MiB, at least 64 MiB, got {memory!r}")
        if size > 16 * TiB:
            raise ValueError(f"memory must be at most 16 TiB, got {memory!r}")
        if not isinstance(numa_nodes, int) or isinstance(numa_nodes, bool) or not (
                1 <= numa_nodes <= 64) or size < numa_nodes * 128 * MiB:
            raise ValueError(f"numa_nodes must be an int from 1 to 64 with at least 128 MiB per "
                             f"node, got {numa_nodes!r} for {format_size(size)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        knobs = _merge("model", model, MODEL_DEFAULTS)
        self.params = parse_bootparams(cmdline)  # the guest kernel's command line and sysctls
        self.cmdline = self.params.cmdline_keys()
        if knobs["boot"] not in ("default", "minimal"):
            raise ValueError(f"model boot {knobs['boot']!r} is not one of ['default', 'minimal']")
        if balloon is True or balloon is None:
            balloon = {}
        balloon_opts = None if balloon is False else _merge("balloon", balloon, PROPERTY_DEFAULTS)
        if balloon_opts and balloon_opts["free_page_hint"] and not balloon_opts["iothread"]:
            raise ValueError("'free-page-hint' requires 'iothread' to be set")
        self.virtio_mem_specs = _virtio_mem_specs(virtio_mem, numa_nodes)
        self.virtio_pmem_specs = validate_virtio_pmem(virtio_pmem, [s["id"] for s in self.virtio_mem_specs],
                                                      memory=size)
        if memhp_default_state not in ONLINE_TYPES:
            raise ValueError(f"memhp_default_state {memhp_default_state!r} is not one of "
                             f"{list(ONLINE_TYPES)}")
        boot_pages = size // PAGE_SIZE
        self.layout = q35_layout(size)
        block = probe_memory_block_size(self.layout)
        for spec in self.virtio_mem_specs:
            if spec["size"] % block:
                raise ValueError(f"virtio_mem {spec['id']!r} size must be a multiple of the guest's "
                                 f"memory block size {format_size(block)}, got {format_size(spec['size'])}")
        boot_zones = zones_for(self.layout, numa_nodes, block // PAGE_SIZE)
        n_pages, hotplug_zones, self.regions = plan_layout(boot_pages, boot_zones,
                                                           self.virtio_mem_specs, block // PAGE_SIZE)
        _check_fits(n_pages * PAGE_SIZE)
        if isinstance(host, Host):
            self.host = host
        else:  # by default the host has twice what the guest could ever be given
            h = _merge("host", host, HOST_DEFAULTS)
            guest_max = size + sum(spec["size"] for spec in self.virtio_mem_specs)
            ram = parse_size(h["ram"], name="host ram") if h["ram"] is not None else 2 * guest_max
            swap = parse_size(h["swap"], name="host swap")
            if ram <= 0 or swap < 0:
                raise ValueError(f"host ram must be > 0 and swap >= 0, got {h['ram']!r}, {h['swap']!r}")
            self.host = Host(ram, swap, discard=bool(h["discard"]), swapin_us=float(h["swapin_us"]))

        self.memory = size
        self.seed = seed
        self.knobs = knobs
        self.env = simpy.Environment()
        self._events = EventQueue(self.env, self.wallclock)
        self.mem = GuestMemory(n_pages, boot_zones, hotplug_zones=hotplug_zones,
                               block_pages=block // PAGE_SIZE)
        self.kernel = Kernel(self.mem, self.host, vm_name, clock=lambda: self.env.now,
                             params=self.params, phys_pfn=self._phys_pfn)
        if self.regions:
            self.kernel.hotplug = MemoryHotplug(self.kernel, memhp_default_state, regions=self.regions)
        profile = BootProfile() if knobs["boot"] == "default" else BootProfile.minimal()
        if knobs["initrd_bytes"] is not None:
            if not isinstance(knobs["initrd_bytes"], int) or not 0 <= knobs["initrd_bytes"] <= 1 << 30:
                raise ValueError(f"model initrd_bytes must be an int from 0 to 1 GiB, "
                                 f"got {knobs['initrd_bytes']!r}")
            profile = dataclasses.replace(profile, initrd=knobs["initrd_bytes"])
        # x86 pci_swiotlb_detect: a bounce buffer once RAM may lie above 4 GiB (RAM there, or a
        # hot-pluggable range in the SRAT, which QEMU builds whenever maxmem is given)
        above_4g = self.layout.above_4g > 0 or bool(self.virtio_mem_specs or self.virtio_pmem_specs)
        self.reservations = plan_reservations(self.layout, numa_nodes, self.params.nr_cpus,
                                              self.params.swiotlb_slabs(above_4g),
                                              initrd_bytes=profile.initrd, block_pages=block // PAGE_SIZE)
        boot(self.kernel, np.random.default_rng(seed), profile, self.reservations)
        self.ops = GuestOps(self.kernel)
        self.qom = QomTree()
        self._qmp_handlers = {name: getattr(self, fn) for name, fn in self._QMP.items()}
        self.sample_hooks: list = []  # callables returning extra sample() fields
        self.balloon_device: BalloonDevice | None = None
        self.balloon: BalloonDriver | None = None
        if balloon_opts is not None:
            self.balloon_device = BalloonDevice(self.env, self.host, self.kernel.host_vm, size,
                                                balloon_opts, self._events.emit, self.wallclock)
            self.balloon = BalloonDriver(self.env, self.kernel, self.balloon_device,
                                         knobs["balloon_request_ms"])
            self._attach_balloon_qom(self.balloon_device)
        self.balloon_options = balloon_opts
        self.guest_ops = {op: None for op in GUEST_OPS}
        for attr, module in ATTACHMENTS:
            setattr(self, attr, importlib.import_module(module).attach(self))
        # the arguments this VM was opened with (for Reset buttons and re-runs)
        self.open_options = {
            "memory": memory, "seed": seed, "balloon": balloon, "host": host,
            "numa_nodes": numa_nodes, "model": model, "cmdline": cmdline, "vm_name": vm_name,
            "virtio_mem": virtio_mem, "memhp_default_state": memhp_default_state,
            "virtio_pmem": virtio_pmem,
        }
        self.closed = False

    def _phys_pfn(self, pfn: int) -> int:
        """The physical frame of page index ``pfn`` (q35's PCI hole; device regions' memaddr)."""
        if pfn < self.mem.boot_pages:
            return phys_pfn(self.layout, pfn)
        for r in self.regions:
            if r.start <= pfn < r.end:
                return r.memaddr // PAGE_SIZE + pfn - r.start
        return pfn

    # --- time ---------------------------------------------------------------------------------
    def wallclock(self) -> float:
        return self.knobs["epoch"] + self.env.now / 1000.0

    @property
    def now_ms(self) -> float:
        return float(self.env.now)

    def advance(self, ms: float) -> None:
        """Run simulated time forward by ``ms`` milliseconds."""
        self._check_open()
        if not isinstance(ms, int | float) or isinstance(ms, bool) or ms < 0:
            raise ValueError(f"advance() takes milliseconds >= 0, got {ms!r}")
        if ms == 0:  # run what is due now; simpy's run() wants a later time
            while self.env.peek() == self.env.now:
                self.env.step()
            return
        self.env.run(until=self.env.now + ms)

    def step(self, max_ms: float = 60_000) -> bool:
        """Run until the balloon driver completes its next request (at most ``max_ms``).

        Returns False, without moving time, if the driver has nothing to do."""
        self._check_open()
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
        handler = self._qmp_handlers.get(command)
        if handler is None:
            raise QMPError("CommandNotFound", f"The command {command} has not been found")
        return handler(**arguments)

    def _need_balloon(self) -> BalloonDevice:
        if self.balloon_device is None:
            raise QMPError("DeviceNotActive", "No balloon device has been activated")
        return self.balloon_device

    def _qmp_balloon(self, **args: Any) -> dict:
        check_arguments(args, {"value": int}, {})
        device = self._need_balloon()
        if args["value"] <= 0:
            raise QMPError("GenericError", "Parameter 'target' expects a size")
        device.to_target(args["value"])
        return {}

    def _qmp_query_balloon(self, **args: Any) -> dict:
        check_arguments(args, {}, {})
        return {"actual": self._need_balloon().logical_actual()}

    def register_guest_op(self, name: str, handler) -> None:
        """Add a guest workload op (e.g. a background writer) that ``guest(name, ...)`` runs."""
        self.guest_ops[name] = handler

    def register_qmp(self, name: str, handler) -> None:
        """Add a QMP command (devices and engines call this when they attach)."""
        self._qmp_handlers[name] = handler

    def _qmp_qom_get(self, **args: Any) -> Any:
        check_arguments(args, {"path": str, "property": str}, {})
        return self.qom.resolve(args["path"]).get(args["property"])

    def _qmp_qom_set(self, **args: Any) -> dict:
        check_arguments(args, {"path": str, "property": str, "value": object}, {})
        self.qom.resolve(args["path"]).set(args["property"], args["value"])
        return {}

    def _qmp_qom_list(self, **args: Any) -> list:
        check_arguments(args, {"path": str}, {})
        return self.qom.resolve(args["path"]).list()

    def _attach_balloon_qom(self, dev: BalloonDevice) -> None:
        """virtio-balloon-pci at /machine/peripheral/<id>, its virtio-backend child, their
        properties (the PCI proxy aliases guest-stats and guest-stats-polling-interval)."""
        base = f"/machine/peripheral/{dev.id}"
        for path, typename, aliases in ((base, "virtio-balloon-pci", (dev.id,)),
                                        (f"{base}/virtio-backend", "virtio-balloon-device", ())):
            obj = self.qom.add(QomObject(path, typename, aliases))
            obj.add("guest-stats", "any", dev.guest_stats)
            obj.add("guest-stats-polling-interval", "int", lambda: dev.stats_poll_interval,
                    dev.set_poll_interval)
            for prop in ("deflate-on-oom", "free-page-hint", "free-page-reporting", "page-poison"):
                obj.add(prop, "bool", lambda p=prop: bool(dev.options[p.replace("-", "_")]))

    def _qmp_query_status(self, **args: Any) -> dict:
        check_arguments(args, {}, {})
        return {"status": "running", "singlestep": False, "running": True}

    def _qmp_query_commands(self, **args: Any) -> list:
        check_arguments(args, {}, {})
        return [{"name": name} for name in sorted(self._qmp_handlers)]

    _QMP = {
        "balloon": "_qmp_balloon",
        "query-balloon": "_qmp_query_balloon",
        "qom-get": "_qmp_qom_get",
        "qom-set": "_qmp_qom_set",
        "qom-list": "_qmp_qom_list",
        "query-status": "_qmp_query_status",
        "query-commands": "_qmp_query_commands",
    }

    # --- guest --------------------------------------------------------------------------------
    def guest(self, op: str, **arguments: Any) -> Any:
        """Run a workload step in the guest: alloc, touch, read, free, drop_caches, sync, handles."""
        self._check_open()
        if op not in self.guest_ops:
            raise ValueError(f"guest op {op!r} is not one of {list(self.guest_ops)}")
        if self.guest_ops[op] is not None:
            return self.guest_ops[op](**arguments)
        ops = self.ops
        try:
            if op == "alloc":
                size = parse_size(arguments.pop("size"), name="size")
                return ops.alloc(size, **arguments)
            if op in ("touch", "read"):
                return ops.touch(arguments.pop("handle"), write=op == "touch", **arguments)
            if op == "free":
                return ops.free(**arguments)
            if op == "handles":
                return [{"handle": h.id, "kind": h.kind, "name": h.name, "alive": h.alive,
                         "size": h.size, "resident": len(h.pages) * PAGE_SIZE}
                        for h in self.kernel.handles.values() if h.kind != "kernel"]
            return getattr(ops, op)(**arguments)
        except KeyError as e:
            raise TypeError(f"guest op {op!r} needs argument {e.args[0]!r}") from None

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
        """One row of metrics, all sizes in bytes.

        ``balloon_actual`` / ``balloon_target`` are logical VM sizes as QEMU reports them;
        ``balloon_size`` is the memory the driver holds (vb->num_pages plus a request being
        filled), which runs ahead of ``actual`` by at most one request (256 pages) while inflating,
        because the driver allocates before it tells the host."""
        self._check_open()
        info = self.kernel.meminfo()
        dev = self.balloon_device
        return {
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
        } | {k: v for hook in self.sample_hooks for k, v in hook().items()}

    def snapshot(self) -> dict:
        """Copies of the page state and flag arrays, with the zone layout, for the page map."""
        return {"t_ms": float(self.env.now), "state": self.mem.state.copy(),
                "flags": self.mem.flags.copy(),
                "zones": [(z.name, z.node, z.start, z.end) for z in self.mem.zones]}

    def events(self) -> list[dict]:
        return list(self._events.delivered)

    # --- lifetime -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this VM was closed; open a new one with labkit.open()")

    def close(self) -> None:
        if not self.closed:
            self.host.detach(self.kernel.host_vm)
            self.closed = True

    def __enter__(self) -> ModelBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ModelBackend {format_size(self.memory)} t={self.env.now:.0f} ms "
                f"host ram {format_size(self.host.ram)}>")


assert GiB  # sizes in docstrings
