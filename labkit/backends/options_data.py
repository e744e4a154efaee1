"""The options of one VM as data: :class:`VmOptions` and its parts (frozen dataclasses), the limits
of each backend and the guest kernel parameters the model honours. They are read and checked by
:func:`labkit.backends.options.parse_options`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from labkit.devices.virtio_mem import PROPERTY_DEFAULTS as VIRTIO_MEM_DEFAULTS
from labkit.model.host import Host
from labkit.units import MiB, TiB

EPOCH = 1_767_225_600  # the model's wall clock at t=0 (2026-01-01 UTC), for event timestamps
BYTES_PER_PAGE_NEEDED = 8  # the model's state + flags, plus transient masks while deriving free lists
KEYWORDS = ("memory", "seed", "balloon", "host", "numa_nodes", "model", "cmdline", "vm_name",
            "virtio_mem", "virtio_pmem", "memhp_default_state", "qemu_args")


@dataclass(frozen=True)
class Limits:
    """What a backend can hold: guest RAM and NUMA nodes."""

    name: str
    min_memory: int
    max_memory: int
    max_numa_nodes: int


LIMITS = {"model": Limits("model", 64 * MiB, 16 * TiB, 64), "qemu": Limits("live", 128 * MiB, TiB, 8)}


@dataclass(frozen=True)
class BalloonOptions:
    """virtio-balloon-pci properties (hw/virtio/virtio-balloon.c), underscores for dashes."""

    id: str | None = "balloon0"
    deflate_on_oom: bool = False
    free_page_hint: bool = False
    free_page_reporting: bool = False
    page_poison: bool = True
    iothread: str | None = None

    def properties(self) -> dict:
        """As a dict of properties (what the model's BalloonDevice and the live command line take)."""
        return asdict(self)


@dataclass(frozen=True)
class MemoryBackend:
    """A ``memory-backend-ram`` or ``memory-backend-file`` object (``/objects/<id>``)."""

    id: str
    qom_type: str
    size: int
    share: bool = False
    mem_path: str | None = None
    prealloc: bool = False
    merge: bool = True
    dump: bool = True
    reserve: bool = True
    policy: str = "default"


@dataclass(frozen=True)
class VirtioMemOptions:
    """A virtio-mem-pci device and the size of its memory backend (``memdev``)."""

    id: str | None
    size: int
    memdev: str
    node: int = 0
    requested_size: int = 0
    block_size: int = VIRTIO_MEM_DEFAULTS["block_size"]
    prealloc: bool = False
    unplugged_inaccessible: str = "on"
    dynamic_memslots: bool = False
    memaddr: int | None = None

    def spec(self) -> dict:
        """The device as a dict of properties (sizes in bytes)."""
        return {k: v for k, v in asdict(self).items() if k != "memdev"}


@dataclass(frozen=True)
class VirtioPmemOptions:
    """A virtio-pmem-pci device on a ``memory-backend-file`` (``memdev``)."""

    id: str | None
    path: str
    size: int
    memdev: str
    share: bool = True

    def spec(self) -> dict:
        return {"id": self.id, "path": self.path, "size": self.size, "share": self.share}


@dataclass(frozen=True)
class HostOptions:
    """The model's host: RAM (None: twice the guest's), swap, discard (False: as under VFIO)."""

    ram: int | None = None
    swap: int = 0
    discard: bool = True
    swapin_us: float = 100.0


@dataclass(frozen=True)
class ModelKnobs:
    """Model-only knobs (assumed, not QEMU facts)."""

    balloon_request_ms: float = 0.5  # one inflate/deflate round trip of 256 PFNs (KVM-like)
    boot: str = "default"  # BootProfile: "default" (a small cloud guest) or "minimal" (busybox)
    epoch: float = EPOCH
    migration_link_bandwidth: float = 1.25e9  # bytes/s of the simulated migration link (10 Gbit/s)


@dataclass(frozen=True)
class QemuKnobs:
    """Live-only knobs (see :mod:`labkit.backends.qemu.backend`)."""

    accel: str = "auto"
    kernel: str | None = None
    thp: bool = False
    boot_timeout_s: float = 120.0
    kvm_boot_timeout_s: float = 10.0
    scratch_disk: bool = True
    smp: int = 1
    extra_args: tuple[str, ...] = ()
    poll_ms: float = 50.0
    bios: str | None = "auto"
    pvh: bool = True


# guest kernel command-line parameters the model honours (Documentation/admin-guide/kernel-parameters)
CMDLINE_DEFAULTS = {
    "memory_hotplug.online_policy": "contig-zones",  # or "auto-movable" (mm/memory_hotplug.c)
    "page_poison": 0,  # CONFIG_PAGE_POISONING's page_poison=1: poison pages on free
    "init_on_free": 0,  # zero pages on free
    "page_reporting.page_reporting_order": -1,  # -1: pageblock_order (mm/page_reporting.c)
}
CMDLINE_CHECKS = {
    "memory_hotplug.online_policy": (lambda v: v in ("contig-zones", "auto-movable"),
                                     "accepted: 'contig-zones' or 'auto-movable'"),
    "page_poison": (lambda v: v in (0, 1) and not isinstance(v, bool), "accepted: 0 or 1"),
    "init_on_free": (lambda v: v in (0, 1) and not isinstance(v, bool), "accepted: 0 or 1"),
    "page_reporting.page_reporting_order": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= 10,
        "accepted: -1 (default) or 0..10"),
}


@dataclass(frozen=True)
class VmOptions:
    """One VM, as both backends build it. Sizes in bytes; see :func:`parse_options`."""

    backend: str
    memory: int
    maxmem: int  # -m maxmem: boot RAM plus the space for memory devices
    seed: int = 0
    smp: int = 1
    node_sizes: tuple[int, ...] = ()  # boot RAM per NUMA node
    node_memdevs: tuple[str, ...] = ()  # the node's memory-backend id ("" when labkit names it)
    ram_memdev: str = "pc.ram"  # QEMU's name of the boot RAM backend (info memdev)
    balloon: BalloonOptions | None = field(default_factory=BalloonOptions)
    iothreads: tuple[str, ...] = ()
    memory_backends: tuple[MemoryBackend, ...] = ()
    virtio_mem: tuple[VirtioMemOptions, ...] = ()
    virtio_pmem: tuple[VirtioPmemOptions, ...] = ()
    memhp_default_state: str = "offline"
    cmdline: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType(dict(CMDLINE_DEFAULTS)))
    kernel_params: str = ""  # the cmdline entries given, as kernel parameters
    vm_name: str = "vm0"
    host: HostOptions | Host = field(default_factory=HostOptions)
    model: ModelKnobs = field(default_factory=ModelKnobs)
    qemu: QemuKnobs = field(default_factory=QemuKnobs)
    qemu_args: tuple[str, ...] = ()  # the command line as given (the live backend passes it on)
    passthrough: tuple[tuple[str, ...], ...] = ()  # options labkit does not read (live only)
    from_line: frozenset[str] = frozenset()  # what qemu_args gave: "memory", "smp", "balloon", ...
    keywords: Mapping[str, Any] = field(default_factory=dict)  # labkit.open's arguments, as given

    @property
    def numa_nodes(self) -> int:
        return len(self.node_sizes)

    @property
    def device_memory(self) -> int:
        """Bytes of memory-device backends (virtio-mem and virtio-pmem)."""
        return sum(d.size for d in self.virtio_mem) + sum(d.size for d in self.virtio_pmem)
