"""The open problems' switches as QEMU takes them, read into :class:`VmOptions` (docs/mechanisms.md §12).

* **Backing and page size**: ``-object memory-backend-memfd,id=m0,size=..,hugetlb=on,hugetlbsize=2M``
  and ``-object memory-backend-file,id=m0,size=..,mem-path=/dev/hugepages`` give a RAM block of huge
  pages (:func:`backend_page_size`); ``-machine memory-backend=m0`` or ``-numa node,memdev=m0`` put the
  guest's RAM there, ``-device virtio-mem-pci,memdev=m0`` a virtio-mem device. The host's base page
  (64 KiB on some arm64 and ppc64 hosts) has no QEMU syntax: ``labkit.open(host_page_size="64K")``.
* **Device assignment**: ``-device vfio-pci,host=0000:01:00.0`` (:func:`vfio_device`).
* **Confidential guests**: ``-object sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1``
  (``policy=0x5`` for SEV-ES), ``-object sev-snp-guest,...``, ``-object tdx-guest,...``, each named by
  ``-machine confidential-guest-support=sev0`` (:func:`confidential_guest`).
* **Locked memory**: ``-overcommit mem-lock=on``.
* **virtio-mem's realize** against all of these (:func:`realize_virtio_mem`): the default block size
  follows the memory backend's page size, and QEMU's refusals, in its order and words.

>>> backend_page_size("memory-backend-memfd", {"size": 1 << 30, "hugetlb": True, "hugetlbsize": 2 << 20},
...                   4096)
(True, 2097152)
>>> vfio_device({"host": "0000:01:00.0", "id": "gpu0"}).host
'0000:01:00.0'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any

from labkit.backends.options_data import ConfidentialGuest, VfioOptions, VirtioMemOptions
from labkit.devices.virtio_mem import default_block_size
from labkit.errors import NotModelled
from labkit.model.backing import DEFAULT_HUGEPAGE, HOST_PAGE_SIZES, HUGEPAGE_SIZES
from labkit.units import KiB, format_size, parse_size

# -object properties of the confidential-guest objects labkit reads (target/i386/sev.c,
# target/i386/kvm/tdx.c); the others a real QEMU takes are refused on the model, passed on live
CONFIDENTIAL_PROPERTIES = {
    "sev-guest": {"id": "id", "cbitpos": "uint32", "reduced-phys-bits": "uint32", "policy": "uint32",
                  "handle": "uint32", "dh-cert-file": "str", "session-file": "str",
                  "sev-device": "str", "kernel-hashes": "bool"},
    "sev-snp-guest": {"id": "id", "cbitpos": "uint32", "reduced-phys-bits": "uint32", "policy": "uint64",
                      "sev-device": "str", "kernel-hashes": "bool", "author-key-enabled": "bool",
                      "vcek-disabled": "bool", "guest-visible-workarounds": "str", "id-block": "str",
                      "id-auth": "str", "host-data": "str"},
    "tdx-guest": {"id": "id", "attributes": "uint64", "sept-ve-disable": "bool", "mrconfigid": "str",
                  "mrowner": "str", "mrownerconfig": "str", "quote-generation-socket": "str"},
}
SEV_POLICY_ES = 0x4  # SEV policy bit 2: the guest is an SEV-ES guest (sev_es_enabled())
# The QEMU release each switch first appeared in (docs/mechanisms.md §12.4)
SINCE = {"sev-guest": "2.12", "sev-snp-guest": "9.1", "tdx-guest": "10.1"}
HUGETLBFS_DEFAULT_MOUNT = "/dev/hugepages"  # systemd's dev-hugepages.mount, the default huge page size
_BDF = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def page_size_keyword(value: Any, name: str, accepted: tuple[int, ...] = HOST_PAGE_SIZES) -> int:
    """``host_page_size=``/``guest_page_size=``: 4K (x86-64, arm64 4K) or 64K (arm64, ppc64)."""
    if value is None:
        return 4 * KiB
    size = parse_size(value, name=name)
    if size not in accepted:
        raise ValueError(f"{name} must be one of {[format_size(a) for a in accepted]} (a page size the "
                         f"model knows: x86-64's 4 KiB or arm64's 64 KiB), got {value!r}")
    return size


def check_large_guest(opts: Any) -> Any:
    """A 64 KiB guest on the model: free page hinting would hint blocks of MAX_ORDER - 1 = 13 guest
    pages (512 MiB), which the model's 4 KiB buddy allocator cannot hold (labkit.model.guest_pages):
    refused as not modelled rather than hinting the wrong blocks."""
    if opts.backend == "model" and opts.guest_page_size != 4 * KiB and opts.balloon is not None \
            and opts.balloon.free_page_hint:
        raise NotModelled(f"free-page-hint on a guest with {opts.guest_page_size // KiB} KiB pages is not "
                          f"modelled: it hints 512 MiB blocks (order 13), beyond labkit's 4 KiB buddy "
                          f"allocator")
    return opts


# --- memory backends ----------------------------------------------------------------------------
def hugetlbfs_mount(path: str, mounts: str | None = None, assume_default: bool = True) -> int | None:
    """The huge page size of the hugetlbfs mount holding ``path`` (QEMU: ``qemu_fd_getpagesize``,
    i.e. statfs's f_bsize), or None when ``path`` is not on hugetlbfs. Read from /proc/mounts;
    ``/dev/hugepages`` counts as systemd's mount of the default size (2 MiB on x86-64) even where
    it is not mounted (``assume_default``), so the model takes the usual command line on any machine."""
    if mounts is None:
        try:
            with open("/proc/mounts", encoding="utf-8") as f:
                mounts = f.read()
        except OSError:
            mounts = ""
    path = os.path.abspath(path)
    best, size = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        point = fields[1]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            options = dict(o.partition("=")[::2] for o in fields[3].split(","))
            best, size = point, parse_size(options["pagesize"]) if "pagesize" in options else 2 << 20
    default_mount = path == HUGETLBFS_DEFAULT_MOUNT or path.startswith(HUGETLBFS_DEFAULT_MOUNT + "/")
    if size is None and assume_default and default_mount:
        return DEFAULT_HUGEPAGE[4 * KiB]
    return size


def backend_page_size(qom_type: str, values: dict, host_page_size: int) -> tuple[bool, int]:
    """(hugetlbfs?, the RAM block's page size) of a memory backend, with QEMU's texts where QEMU
    refuses (backends/hostmem-memfd.c, util/memfd.c ``qemu_memfd_create``)."""
    if qom_type == "memory-backend-memfd" and values.get("hugetlb", False):
        size = values.get("hugetlbsize") or DEFAULT_HUGEPAGE[host_page_size]
        if size not in HUGEPAGE_SIZES[host_page_size]:  # memfd_create(MFD_HUGETLB | log2 << 26): EINVAL
            raise ValueError("failed to create memfd: Invalid argument")
        if values["size"] % size:  # ftruncate of a hugetlbfs file to a partial huge page: EINVAL
            raise ValueError(f"failed to resize memfd to {values['size']}: Invalid argument")
        return True, size
    if qom_type == "memory-backend-file":
        size = hugetlbfs_mount(values["mem-path"])
        if size is not None:
            if values["size"] < size:  # softmmu/physmem.c file_ram_alloc
                raise ValueError(f"memory size 0x{values['size']:x} must be equal to or larger than page "
                                 f"size 0x{size:x}")
            if values["size"] % size:  # QEMU rounds the mapping up; the model's RAM block can't
                raise ValueError(f"labkit's model needs a whole number of huge pages in '{values['id']}': "
                                 f"size 0x{values['size']:x} on {format_size(size)} pages of "
                                 f"{values['mem-path']} (QEMU would round the mapping up)")
            return True, size
    return False, host_page_size


# --- devices and objects ------------------------------------------------------------------------
def vfio_device(props: dict) -> VfioOptions:
    """``-device vfio-pci``: ``host=[DDDD:]BB:DD.F`` (qdev's PCI host address) or ``sysfsdev=``."""
    host = props.get("host")
    if host is None and props.get("sysfsdev") is None:
        raise ValueError("No provided host device\nUse -device vfio-pci,host=DDDD:BB:DD.F or "
                         "-device vfio-pci,sysfsdev=PATH_TO_DEVICE")
    if host is not None:
        match = _BDF.match(str(host))
        if not match:
            raise ValueError(f"Property 'vfio-pci.host' doesn't take value '{host}'")
        domain, bus, slot, function = match.groups()
        host = f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{function}"
    else:
        host = os.path.basename(str(props["sysfsdev"]))
    return VfioOptions(props.get("id"), host, bool(props.get("x-enable-migration", False)))


def confidential_guest(qom_type: str, values: dict) -> ConfidentialGuest:
    """A confidential-guest object: which technology, from its type and (SEV) its policy."""
    policy = int(values.get("policy", 0))
    kind = {"sev-guest": "SEV-ES" if policy & SEV_POLICY_ES else "SEV", "sev-snp-guest": "SEV-SNP",
            "tdx-guest": "TDX"}[qom_type]
    return ConfidentialGuest(values["id"], qom_type, kind, policy)


# --- what a machine with these switches refuses -------------------------------------------------
@dataclass(frozen=True)
class Realize:
    """The machine a device is realized in: the host's page size, ``-overcommit mem-lock``, and the
    confidential guest (which decides whether RAM discard is disabled, or memory is private)."""

    host_page_size: int = 4 * KiB
    mem_lock: bool = False
    confidential: ConfidentialGuest | None = None


def realize_virtio_mem(d: VirtioMemOptions, block_given: bool, page_size: int,
                       machine: Realize) -> tuple[VirtioMemOptions, list[str]]:
    """The part of ``virtio_mem_device_realize`` the switches decide (hw/virtio/virtio-mem.c, QEMU
    7.2): ``mem-lock``, the default block size from the memory backend's page size, the page-size
    minimum. The device with its block size resolved, and the warnings QEMU prints; ``ValueError``
    with QEMU's text when QEMU refuses. The alignment checks follow (options_keywords), then
    :func:`realize_discard`."""
    if machine.mem_lock:
        raise ValueError("Incompatible with mlock")
    default = default_block_size(page_size, machine.host_page_size)
    block = d.block_size if block_given else default
    warnings = []
    if block < page_size:
        raise ValueError(f"'block-size' property has to be at least the page size (0x{page_size:x})")
    if block < default:  # QEMU prints the MiB count with PRIx64: 512 MiB reads "200 MiB"
        warnings.append(f"qemu-system-x86_64: warning: 'block-size' property is smaller than the default "
                        f"block size ({default >> 20:x} MiB)")
    return replace(d, block_size=block), warnings


def realize_discard(machine: Realize) -> None:
    """The end of ``virtio_mem_device_realize``: ``ram_block_coordinated_discard_require(true)``
    fails when all RAM discard is disabled, as an SEV or SEV-ES guest does at KVM init
    (target/i386/sev.c ``sev_kvm_init``: ``ram_block_discard_disable(true)``); and a confidential
    guest's private memory (guest_memfd, SEV-SNP and TDX) already has a RamDiscardManager, so
    ``memory_region_set_ram_discard_manager`` fails (QEMU 10.1, "Enable shared device assignment";
    from 9.1 to 10.0 virtio-mem was accepted and its unplug discarded the shared half only)."""
    c = machine.confidential
    if c is not None and not c.private_memory:
        raise ValueError("Discarding RAM is disabled")
    if c is not None:
        raise ValueError("Failed to set RamDiscardManager")


__all__ = ["CONFIDENTIAL_PROPERTIES", "SINCE", "Realize", "backend_page_size", "check_large_guest",
           "confidential_guest",
           "hugetlbfs_mount", "page_size_keyword", "realize_discard", "realize_virtio_mem",
           "vfio_device"]
