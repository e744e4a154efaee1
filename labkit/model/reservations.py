"""Boot memory reservations (memblock) of the live backend's kernel on a q35 guest.

What a guest never sees in MemTotal is what memblock kept before the buddy allocator got the rest
(mm/memblock.c ``memblock_free_all``). Measured on Debian's 6.1 cloud kernel under QEMU 7.2 (dmesg's
"Memory: ... reserved", /proc/zoneinfo's present - managed, at 512 MiB to 6 GiB), it is:

* the first megabyte: frame 0 and 0x9f000-0xfffff are no RAM (e820); the 158 frames between are
  reserved (arch/x86/realmode/init.c: the low 1 MiB is always reserved);
* the kernel image at 16 MiB: text, rodata, data and bss (8095 pages); its ``__init`` sections and
  the alignment gaps between sections (2145 pages) are freed once booted (``free_initmem``,
  ``mark_rodata_ro``: "Freeing unused kernel image ... memory");
* the initramfs QEMU loaded at the top of memory below 4 GiB (labkit's is 3824 kB), freed once
  unpacked ("Freeing initrd memory");
* the memmap: 64 bytes of ``struct page`` per 4 KiB page (``STRUCT_PAGE_SIZE``) of every present
  128 MiB section, at the top of its node;
* the dentry and inode hash tables (fs/dcache.c, fs/inode.c ``alloc_large_system_hash``: one 8-byte
  bucket per 2^13 and 2^14 bytes of low memory, rounded up to a power of two);
* the swiotlb bounce buffer (kernel/dma/swiotlb.c): 64 MiB below the initramfs and 24 bytes of slot
  metadata per 2 KiB slab, when RAM may lie above 4 GiB (:meth:`BootParams.swiotlb_slabs`);
* ``NODE_DATA`` (43 pages), the first per-CPU chunk (61 pages a CPU) and 21 pages of small early
  allocations (8 beside the kernel image, 13 at the top of memory; one more when RAM lies above
  4 GiB).

The late part (``__init`` and the initramfs, 3101 pages here) is still reserved when the watermarks
are computed (``init_per_zone_wmark_min`` is a postcore initcall; the initramfs is freed by a rootfs
initcall and ``__init`` after all of them), which is why a real guest's watermarks are a little lower
than its final managed pages would give.

>>> from labkit.model.layout import q35_layout
>>> plan = plan_reservations(q35_layout(1 << 30), numa_nodes=1, nr_cpus=1, swiotlb_slabs=0)
>>> plan.permanent_pages(), plan.late_pages()
(12858, 3101)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labkit.model.layout import LEGACY_HOLE, ZONE_DMA_END, Q35Layout, node_ranges
from labkit.model.pages import MEMORY_BLOCK_SIZE, STRUCT_PAGE_SIZE
from labkit.units import PAGE_SIZE

PAGES_PER_SECTION = MEMORY_BLOCK_SIZE // PAGE_SIZE  # SECTION_SIZE_BITS 27 on x86-64
KERNEL_IMAGE_ADDR = 16 << 20  # CONFIG_PHYSICAL_START 0x1000000
IO_TLB_SLOT_BYTES = 24  # sizeof(struct io_tlb_slot) (kernel/dma/swiotlb.c, 6.1)
TOP_GAP_PAGES = 40  # QEMU loads the initramfs below ACPI_DATA_SIZE (160 KiB) from the top
DENTRY_HASH_SCALE, INODE_HASH_SCALE = 13, 14  # fs/dcache.c, fs/inode.c
HASH_BUCKET_BYTES = 8  # struct hlist_bl_head / hlist_head


@dataclass(frozen=True)
class KernelImage:
    """The kernel's own reservations, in pages (measured: Debian 6.1.0-5x cloud-amd64)."""

    resident: int = 8095  # text + rodata + data + bss kept for good
    bss: int = 1359  # of which bss (5436K): zeroed at boot, reads as zero
    init: int = 2145  # __init, the section gaps and unused decrypted memory: freed at the end of boot
    node_data: int = 43  # NODE_DATA(nid): struct pglist_data
    percpu_per_cpu: int = 61  # "percpu: Embedded 61 pages/cpu"
    early_low: int = 8  # early allocations near the image
    early_top: int = 13  # early allocations at the top of memory


DEBIAN_61 = KernelImage()
# labkit's busybox initramfs with memhold ("Freeing initrd memory: 3824K"; 3708K before memhold's
# write command): a live recording's facts carry the size it booted with (``initrd_bytes``)
LIVE_INITRD_BYTES = 3824 << 10


def hash_pages(nr_kernel_pages: int, scale: int) -> int:
    """``alloc_large_system_hash`` of 8-byte buckets, one per 2^scale bytes: its pages."""
    entries = -(-nr_kernel_pages // 256) * 256  # round up to a megabyte
    entries >>= scale - 12
    entries = max(entries, PAGE_SIZE // HASH_BUCKET_BYTES)
    entries = 1 << (entries - 1).bit_length()
    return entries * HASH_BUCKET_BYTES // PAGE_SIZE


@dataclass
class ReservationPlan:
    """Page ranges [start, end) of the index space, each with what it is and its ``kind``:
    ``"absent"`` (no RAM there), ``"reserved"`` (for good), ``"zeroed"`` (for good, and all zeros:
    the kernel's bss, the swiotlb buffer) or ``"late"`` (freed at the end of boot)."""

    ranges: list[tuple[int, int, str, str]] = field(default_factory=list)

    def add(self, start: int, end: int, what: str, kind: str = "reserved") -> None:
        if end > start:
            self.ranges.append((start, end, what, kind))

    def pages(self, kind: str) -> int:
        return sum(b - a for a, b, _, k in self.ranges if k == kind)

    def permanent_pages(self) -> int:
        return self.pages("reserved") + self.pages("zeroed")

    def late_pages(self) -> int:
        return self.pages("late")


def plan_reservations(layout: Q35Layout, numa_nodes: int, nr_cpus: int, swiotlb_slabs: int,
                      image: KernelImage = DEBIAN_61, initrd_bytes: int = LIVE_INITRD_BYTES,
                      block_pages: int = PAGES_PER_SECTION) -> ReservationPlan:
    """Where memblock's reservations lie in the page index (pages, not bytes: memblock packs small
    allocations; the counts are what /proc/zoneinfo shows)."""
    plan = ReservationPlan()
    plan.add(0, 1, "no RAM (e820 reserved)", "absent")
    plan.add(1, LEGACY_HOLE[0], "low 1 MiB (reserved)")
    plan.add(LEGACY_HOLE[0], LEGACY_HOLE[1], "legacy BIOS hole (no RAM)", "absent")
    k = KERNEL_IMAGE_ADDR // PAGE_SIZE
    plan.add(k, k + image.resident - image.bss, "kernel image")
    plan.add(k + image.resident - image.bss, k + image.resident, "kernel bss", "zeroed")
    plan.add(k + image.resident, k + image.resident + image.init, "kernel __init", "late")
    k += image.resident + image.init
    plan.add(k, k + image.early_low, "early allocations")
    # top of low memory: the initramfs, the swiotlb bounce buffer below it
    top = layout.below_4g_pages - TOP_GAP_PAGES
    initrd = -(-initrd_bytes // PAGE_SIZE)
    plan.add(top - initrd, top, "initramfs", "late")
    top -= initrd
    swiotlb = swiotlb_slabs * 2048 // PAGE_SIZE
    plan.add(top - swiotlb, top, "swiotlb", "zeroed")
    low_top = top - swiotlb
    # node tops: memmap of each node; hashes and the rest at the top of the last node
    nodes = node_ranges(layout.pages, numa_nodes, block_pages)
    nr_kernel_pages = sum(_freesize(layout, a, b) for a, b in nodes)
    hashes = hash_pages(nr_kernel_pages, DENTRY_HASH_SCALE) + hash_pages(nr_kernel_pages, INODE_HASH_SCALE)
    extras = (hashes + -(-swiotlb_slabs * IO_TLB_SLOT_BYTES // PAGE_SIZE)
              + image.percpu_per_cpu * nr_cpus + image.early_top + (1 if layout.above_4g else 0))
    for node, (a, b) in enumerate(nodes):
        sections = -(-(b - a) // PAGES_PER_SECTION)
        size = sections * PAGES_PER_SECTION * STRUCT_PAGE_SIZE // PAGE_SIZE + image.node_data
        if node == len(nodes) - 1:
            size += extras
        end = b if b > layout.below_4g_pages or b < low_top else low_top
        if node < len(nodes) - 1:
            plan.add(end - size, end, f"node {node}: memmap, NODE_DATA")
            continue
        # the hash tables are allocated HASH_ZERO (dcache_init_early, inode_init_early): zeros
        plan.add(end - size, end - hashes, f"node {node}: memmap, NODE_DATA, percpu")
        plan.add(end - hashes, end, "dentry and inode hash tables", "zeroed")
    return plan


def _freesize(layout: Q35Layout, a: int, b: int) -> int:
    """``free_area_init_core``'s freesize summed over a node's zones: present pages less the
    memmap ``calc_memmap_size`` charges (for ``nr_kernel_pages``)."""
    total = 0
    phys_end_low = layout.below_4g_pages
    zone_limits = [(0, ZONE_DMA_END // PAGE_SIZE), (ZONE_DMA_END // PAGE_SIZE, 1 << 20),
                   (1 << 20, 1 << 62)]
    phys_a = a if a < phys_end_low else a + (1 << 20) - phys_end_low
    phys_b = b if b <= phys_end_low else b + (1 << 20) - phys_end_low
    for lo, hi in zone_limits:
        start, end = max(phys_a, lo, 1), min(phys_b, hi)
        if start >= end:
            continue
        present = _present(start, end, phys_end_low)
        spanned = end - start
        pages = present if spanned > present + (present >> 4) else spanned
        total += present - (pages * STRUCT_PAGE_SIZE + PAGE_SIZE - 1) // PAGE_SIZE
    return total


def _present(start: int, end: int, below: int) -> int:
    """RAM frames in physical [start, end): less the legacy hole and the PCI hole."""
    n = end - start
    n -= max(0, min(end, LEGACY_HOLE[1]) - max(start, LEGACY_HOLE[0]))
    n -= max(0, min(end, 1 << 20) - max(start, below))
    return n
