"""The options of one VM as data: :class:`VmOptions` and its parts (frozen dataclasses), the limits
of each backend and the guest kernel parameters the model honours. They are read and checked by
:func:`labkit.backends.options.parse_options`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from labkit.devices.virtio_mem import VIRTIO_MEM_DEFAULT_BLOCK_SIZE
from labkit.model.bootparams import CHECKS as BOOT_CHECKS
from labkit.model.bootparams import CMDLINE_DEFAULTS as BOOT_CMDLINE_DEFAULTS
from labkit.model.host import Host
from labkit.units import MiB, TiB

EPOCH = 1_767_225_600  # the model's wall clock at t=0 (2026-01-01 UTC), for event timestamps
BYTES_PER_PAGE_NEEDED = 8  # the model's state + flags, plus transient masks while deriving free lists
KEYWORDS = ("memory", "seed", "balloon", "host", "numa_nodes", "model", "cmdline", "vm_name",
            "virtio_mem", "virtio_pmem", "memhp_default_state", "qemu_args", "host_page_size",
            "guest_page_size")


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
    stats_polling_interval: int = 0  # guest-stats-polling-interval (s), given on a -device line

    def properties(self) -> dict:
        """As a dict of properties (what the model's BalloonDevice and the live command line take)."""
        return {k: v for k, v in asdict(self).items() if k != "stats_polling_interval"}


@dataclass(frozen=True)
class MemoryBackend:
    """A ``memory-backend-ram``, ``-memfd`` or ``-file`` object (``/objects/<id>``). ``page_size`` is
    the RAM block's page size QEMU will find (``qemu_ram_pagesize``): the host's base page, or the
    huge page size of hugetlbfs (``hugetlb=on,hugetlbsize=...``, or a ``mem-path`` on hugetlbfs)."""

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
    hugetlb: bool = False
    hugetlbsize: int = 0
    page_size: int = 4096

    @property
    def hugetlbfs(self) -> bool:
        """Backed by hugetlbfs (memfd with hugetlb=on, or a file on a hugetlbfs mount)."""
        return self.hugetlb


@dataclass(frozen=True)
class VfioOptions:
    """A ``vfio-pci`` device (hw/vfio/pci.c): the host device it assigns (``host=DDDD:BB:DD.F``)."""

    id: str | None
    host: str
    x_enable_migration: bool = False  # QEMU 7.2's experimental VFIO migration (off by default)


@dataclass(frozen=True)
class ConfidentialGuest:
    """``-object sev-guest|sev-snp-guest|tdx-guest,id=...`` named by ``-machine
    confidential-guest-support``. ``kind`` is "SEV", "SEV-ES" (SEV with policy bit 2), "SEV-SNP" or "TDX"."""

    id: str
    qom_type: str
    kind: str
    policy: int = 0

    @property
    def private_memory(self) -> bool:
        """Private memory in KVM's guest_memfd (SEV-SNP, TDX; QEMU 9.1+) rather than pinned,
        encrypted ordinary memory (SEV, SEV-ES)."""
        return self.kind in ("SEV-SNP", "TDX")


@dataclass(frozen=True)
class VirtioMemOptions:
    """A virtio-mem-pci device and the size of its memory backend (``memdev``)."""

    id: str | None
    size: int
    memdev: str
    node: int = 0
    requested_size: int = 0
    block_size: int = VIRTIO_MEM_DEFAULT_BLOCK_SIZE  # parse_options resolves QEMU's default from the memdev
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
    """The model's host: RAM (None: twice the guest's), swap, discard (False: no RAM of any VM is
    ever discarded), THP (the host's ``transparent_hugepage/enabled`` is ``madvise`` or ``always``:
    QEMU's anonymous guest RAM is then faulted in as 2 MiB huge pages where it can be)."""

    ram: int | None = None
    swap: int = 0
    discard: bool = True
    swapin_us: float = 100.0
    thp: bool = False


@dataclass(frozen=True)
class ModelKnobs:
    """Model-only knobs (assumed, not QEMU facts)."""

    balloon_request_ms: float = 0.5  # one inflate/deflate round trip of 256 PFNs (KVM-like)
    boot: str = "default"  # BootProfile: "default" (a small cloud guest) or "minimal" (busybox)
    epoch: float = EPOCH
    migration_link_bandwidth: float = 1.25e9  # bytes/s of the simulated migration link (10 Gbit/s)
    initrd_bytes: int | None = None  # the initramfs QEMU loads (None: the boot profile's)


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


# guest kernel command-line parameters and sysctls, with the live backend's Debian 6.1 kernel's
# defaults and the kernel's own checks (labkit.model.bootparams)
CMDLINE_DEFAULTS = BOOT_CMDLINE_DEFAULTS
CMDLINE_CHECKS = BOOT_CHECKS


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
    # the open problems' switches (docs/mechanisms.md §12): device assignment, confidential guests,
    # locked memory, page sizes, and what QEMU printed while it realized the devices
    vfio: tuple[VfioOptions, ...] = ()
    confidential: ConfidentialGuest | None = None
    mem_lock: bool = False
    host_page_size: int = 4096
    guest_page_size: int = 4096
    qemu_warnings: tuple[str, ...] = ()
    from_line: frozenset[str] = frozenset()  # what qemu_args gave: "memory", "smp", "balloon", ...
    keywords: Mapping[str, Any] = field(default_factory=dict)  # labkit.open's arguments, as given

    @property
    def numa_nodes(self) -> int:
        return len(self.node_sizes)

    @property
    def device_memory(self) -> int:
        """Bytes of memory-device backends (virtio-mem and virtio-pmem)."""
        return sum(d.size for d in self.virtio_mem) + sum(d.size for d in self.virtio_pmem)
