"""Which of the open problems' switches this machine's QEMU can run, checked before QEMU starts.

The live backend passes a command line to QEMU as given; for the switches of docs/mechanisms.md §12 it
first checks what this host can do, and refuses what it can't with the reason (and QEMU's own text,
where QEMU would refuse too), rather than letting QEMU fail half-way through a boot:

* **hugetlbfs backing** (``memory-backend-memfd,hugetlb=on,hugetlbsize=2M``, or a
  ``memory-backend-file`` on a hugetlbfs mount): accepted when the pool of that page size has
  enough free pages (``/sys/kernel/mm/hugepages/hugepages-<kB>kB/free_hugepages``); a memfd
  reserves them when QEMU maps it, so without them QEMU fails with "unable to map backing store for
  guest RAM: Cannot allocate memory". ``sysctl -w vm.nr_hugepages=N`` (root) fills the 2 MiB pool;
  1 GiB pages can in practice only be reserved at boot (``hugepagesz=1G hugepages=N``).
* **vfio-pci**: needs the host device in an IOMMU group (``/sys/kernel/iommu_groups``) bound to
  vfio-pci (``/dev/vfio``). Refused when there are none.
* **SEV / SEV-ES** (``sev-guest``): needs ``/dev/sev`` and KVM with SEV; **SEV-SNP** and **TDX**
  (``sev-snp-guest``, ``tdx-guest``) need a QEMU that has the object (9.1 / 10.1) and the hardware.
* **host_page_size / guest_page_size** other than 4 KiB: an arm64/ppc64 host or guest: model only.
* ``-overcommit mem-lock=on``: QEMU runs it (locking all guest RAM needs RLIMIT_MEMLOCK or root).

>>> from labkit.backends.options import parse_options
>>> opts = parse_options("qemu", memory="512M", host_page_size="64K")
>>> refusal(opts, hugepages={}, iommu_groups=0, dev_sev=False, qemu_objects=("sev-guest",))[:60]
"host_page_size=64K: this machine's pages are 4 KiB (getconf "
"""

from __future__ import annotations

import functools
import mmap
import subprocess
from pathlib import Path

from labkit.backends.options_data import VmOptions
from labkit.backends.options_switches import SINCE, hugetlbfs_mount
from labkit.backends.qemu.process import QEMU_BINARY
from labkit.units import format_size

HUGEPAGES_DIR = Path("/sys/kernel/mm/hugepages")
IOMMU_GROUPS_DIR = Path("/sys/kernel/iommu_groups")


def hugepage_pools(root: Path = HUGEPAGES_DIR) -> dict[int, dict[str, int]]:
    """This machine's huge page pools: {page size in bytes: {"total", "free", "reserved"}}."""
    pools = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return {}
    for entry in entries:
        if not entry.name.startswith("hugepages-") or not entry.name.endswith("kB"):
            continue
        size = int(entry.name[len("hugepages-"):-2]) * 1024

        def read(name: str, entry: Path = entry) -> int:
            try:
                return int((entry / name).read_text())
            except (OSError, ValueError):
                return 0

        pools[size] = {"total": read("nr_hugepages"), "free": read("free_hugepages"),
                       "reserved": read("resv_hugepages")}
    return pools


def iommu_group_count(root: Path = IOMMU_GROUPS_DIR) -> int:
    try:
        return sum(1 for _ in root.iterdir())
    except OSError:
        return 0


@functools.cache
def qemu_object_types() -> tuple[str, ...]:
    """The user-creatable object types of this machine's QEMU (``-object help``)."""
    try:
        out = subprocess.run([QEMU_BINARY, "-object", "help"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines()[1:] if line.strip())


def refusal(options: VmOptions, *, hugepages: dict | None = None, iommu_groups: int | None = None,
            dev_sev: bool | None = None, qemu_objects: tuple[str, ...] | None = None) -> str | None:
    """Why this machine can't run ``options``' switches, or None (the keywords stand in for what is
    read from the machine, for tests)."""
    pools = hugepage_pools() if hugepages is None else hugepages
    groups = iommu_group_count() if iommu_groups is None else iommu_groups
    sev = Path("/dev/sev").exists() if dev_sev is None else dev_sev
    objects = qemu_object_types() if qemu_objects is None else qemu_objects
    if options.host_page_size != mmap.PAGESIZE:
        return (f"host_page_size={options.host_page_size // 1024}K: this machine's pages are "
                f"{mmap.PAGESIZE // 1024} KiB (getconf PAGESIZE); a 64 KiB host is an arm64 or ppc64 "
                f"machine: use backend='model'")
    if options.guest_page_size != 4096:
        return (f"guest_page_size={options.guest_page_size // 1024}K: the live guest is x86-64, whose "
                f"pages are 4 KiB; a 64 KiB guest is arm64: use backend='model'")
    for d in options.vfio:
        if groups == 0 or not Path("/dev/vfio").exists():
            return (f"-device vfio-pci,host={d.host}: vfio-pci needs the host device in an IOMMU group, "
                    f"bound to the vfio-pci driver (/dev/vfio); this machine has "
                    f"{groups} IOMMU groups and {'a' if Path('/dev/vfio').exists() else 'no'} /dev/vfio "
                    f"(QEMU would say: vfio /sys/bus/pci/devices/{d.host}: no such host device). "
                    f"Use backend='model'")
    c = options.confidential
    if c is not None:
        if c.qom_type not in objects:
            return (f"-object {c.qom_type}: this machine's QEMU has no such object (QEMU says: "
                    f"Parameter 'qom-type' does not accept value '{c.qom_type}'); it came with QEMU "
                    f"{SINCE[c.qom_type]}. Use backend='model'")
        if c.qom_type == "sev-guest" and not sev:
            return (f"-object sev-guest ({c.kind}): this machine has no /dev/sev (an AMD EPYC host with "
                    f"SEV enabled in firmware and KVM); QEMU would fail in sev_kvm_init. Use backend='model'")
        return (f"-object {c.qom_type} ({c.kind}): labkit's live backend boots a plain kernel with "
                f"-kernel, not the OVMF firmware a confidential guest needs. Use backend='model'")
    for b in options.memory_backends:
        if not b.hugetlbfs:
            continue
        if b.qom_type == "memory-backend-file" and hugetlbfs_mount(b.mem_path, assume_default=False) is None:
            return (f"memory backend '{b.id}': mem-path {b.mem_path} is not on a mounted hugetlbfs here "
                    f"(as root: mount -t hugetlbfs -o pagesize=2M none DIR); QEMU would back the guest "
                    f"with an ordinary file there")
        pool = pools.get(b.page_size, {"total": 0, "free": 0})
        need = -(-b.size // b.page_size)
        if pool["free"] < need:
            hint = ("as root: sysctl -w vm.nr_hugepages=N" if b.page_size == 2 << 20 else
                    "1 GiB pages are reserved at boot: hugepagesz=1G hugepages=N")
            return (f"memory backend '{b.id}' ({format_size(b.size)} on {format_size(b.page_size)} huge "
                    f"pages) needs {need} free {format_size(b.page_size)} huge pages; this machine has "
                    f"{pool['free']} free of {pool['total']} ({hint}); QEMU would fail: unable to map "
                    f"backing store for guest RAM: Cannot allocate memory")
    return None


__all__ = ["hugepage_pools", "iommu_group_count", "qemu_object_types", "refusal"]
