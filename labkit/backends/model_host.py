"""The host side of one model VM, from its options: RAM blocks with their backing, and what device
assignment, a confidential guest or locked memory do to them (docs/mechanisms.md §11-§12).

QEMU creates the RAM blocks (boot RAM per NUMA node, then each memory device's backend) before it
realizes any device, and a confidential guest's KVM setup runs before the devices too; so does
:func:`attach_host`, called by :class:`labkit.backends.model.ModelBackend` right after the guest's
memory exists and before the guest boots:

* **vfio-pci** (hw/vfio/common.c ``vfio_connect_container``): ``ram_block_uncoordinated_discard_disable``
  and every RAM section DMA-mapped, i.e. pinned (type1 IOMMU ``vfio_pin_pages_remote``): host RSS is
  all boot RAM from the start and none of it can be swapped. A virtio-mem device's plugged blocks are
  mapped (pinned) when plugged and unmapped before they are discarded (RamDiscardListener). Migration:
  "VFIO device doesn't support migration" unless ``x-enable-migration=on`` (QEMU 7.2,
  hw/vfio/migration.c ``vfio_migration_probe``).
* **SEV, SEV-ES** (target/i386/sev.c ``sev_kvm_init``): ``ram_block_discard_disable(true)``; every RAM
  block is registered with KVM, which pins it (``sev_pin_memory``); migration is blocked ("SEV:
  Migration is not implemented").
* **SEV-SNP, TDX** (QEMU 9.1 / 10.1): private memory in guest_memfd for every RAM block, which
  requires (coordinated, since 10.1) discard; private pages are not freed by a discard of the shared
  mapping and can't be swapped; not pinned up front. Migration blocked ("SEV-SNP: Migration is not
  implemented"; TDX's text is UNCONFIRMED here).
* **mem-lock** (``-overcommit mem-lock=on``: ``mlockall(MCL_CURRENT | MCL_FUTURE)``): all RAM
  populated and locked; a discard's ``MADV_DONTNEED`` fails with EINVAL.
* ``prealloc=on`` on a memory backend populates its block.
"""

from __future__ import annotations

import numpy as np

from labkit.backends.options_data import MemoryBackend, VmOptions
from labkit.model.backing import Backing, RamBlock
from labkit.model.host import Host, HostVM
from labkit.model.hotplug import DeviceRegion
from labkit.model.pages import GuestMemory
from labkit.units import PAGE_SIZE

VFIO_MIGRATION_BLOCKER = "VFIO device doesn't support migration"
MIGRATION_BLOCKERS = {"SEV": "SEV: Migration is not implemented",
                      "SEV-ES": "SEV: Migration is not implemented",
                      "SEV-SNP": "SEV-SNP: Migration is not implemented",
                      # TDX: QEMU's own text was not found in labkit's sources (UNCONFIRMED)
                      "TDX": "TDX: migration is not supported (labkit's text; QEMU's is UNCONFIRMED)"}


def backing_of(backend: MemoryBackend | None, options: VmOptions, thp: bool) -> Backing:
    """How a memory backend's RAM is backed (None: labkit's own memory-backend-ram)."""
    host_page = options.host_page_size
    private = options.confidential is not None and options.confidential.private_memory
    if backend is None or backend.qom_type == "memory-backend-ram":
        return Backing("anon", host_page, host_page, thp=thp,
                       prealloc=bool(backend and backend.prealloc), guest_memfd=private)
    kind = "hugetlb" if backend.hugetlbfs else ("shmem" if backend.qom_type == "memory-backend-memfd"
                                                else "file")
    return Backing(kind, backend.page_size, host_page, shared=backend.share, prealloc=backend.prealloc,
                   guest_memfd=private)


def ram_blocks(options: VmOptions, mem: GuestMemory, regions: list[DeviceRegion],
               thp: bool) -> list[RamBlock]:
    """Boot RAM (one block per NUMA node, named by its memory backend) and one per virtio-mem
    device's backend, in QEMU's order."""
    backends = {b.id: b for b in options.memory_backends}
    blocks = []
    start = 0
    for node, size in enumerate(options.node_sizes):
        name = options.node_memdevs[node] if node < len(options.node_memdevs) else ""
        name = name or options.ram_memdev
        end = start + size // PAGE_SIZE
        blocks.append(RamBlock(name, start, end, backing_of(backends.get(name), options, thp)))
        start = end
    by_id = {d.id: d for d in options.virtio_mem}
    for r in regions:
        memdev = by_id[r.id].memdev if r.id in by_id else f"mem-{r.id}"
        blocks.append(RamBlock(memdev, r.start, r.end, backing_of(backends.get(memdev), options, thp)))
    return blocks


def _populate(host: Host, vm: HostVM, block: RamBlock) -> None:
    host.touch(vm, np.arange(block.start, block.end, dtype=np.int64))


def attach_host(host: Host, vm: HostVM, options: VmOptions, regions: list[DeviceRegion],
                thp: bool) -> list[str]:
    """Give ``vm`` its RAM blocks and apply the switches; returns the migration blockers QEMU adds,
    in the order it adds them."""
    blocks = ram_blocks(options, vm.mem, regions, thp)
    vm.set_blocks(blocks)
    for text in options.qemu_warnings:
        vm.report(text)
    boot = blocks[:len(options.node_sizes)]
    device_blocks = blocks[len(options.node_sizes):]
    blockers: list[str] = []
    c = options.confidential
    if c is not None:
        if c.private_memory:  # ram_block_add: guest_memfd per block (QEMU 10.1: coordinated)
            for _ in blocks:
                vm.ram_discard.coordinated_require(True)
        else:
            vm.ram_discard.disable(True)
            vm.pinned = f"{c.kind} guest: KVM pins every RAM block it registers"
            for b in blocks:
                _populate(host, vm, b)
            vm.set_unswappable()
    if options.vfio:
        if vm.ram_discard.uncoordinated_disable(True):  # -EBUSY: a plain discard requirer exists
            raise ValueError(f"vfio {options.vfio[0].host}: Cannot set discarding of RAM broken: "
                             f"Device or resource busy")
        vm.pinned = vm.pinned or f"vfio-pci {options.vfio[0].host}: all guest RAM is DMA-mapped (pinned)"
        for b in boot:
            _populate(host, vm, b)
        vm.set_unswappable()  # plugged virtio-mem blocks are pinned when plugged
        blockers += [VFIO_MIGRATION_BLOCKER for d in options.vfio if not d.x_enable_migration]
    if options.mem_lock:
        vm.mem_locked = True
        vm.pinned = vm.pinned or "-overcommit mem-lock=on: mlockall(MCL_CURRENT | MCL_FUTURE)"
        for b in boot + device_blocks:
            _populate(host, vm, b)
        vm.set_unswappable()
    for b in blocks:
        if b.backing.prealloc and not vm.pinned:
            _populate(host, vm, b)
    if c is not None:  # added when the guest launches (sev_launch_finish), after the devices
        blockers.append(MIGRATION_BLOCKERS[c.kind])
    return blockers


__all__ = ["MIGRATION_BLOCKERS", "VFIO_MIGRATION_BLOCKER", "attach_host", "backing_of", "ram_blocks"]
