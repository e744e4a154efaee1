"""Memory hot(un)plug in the guest kernel: memory blocks added, onlined, offlined and removed, and
``alloc_contig_range`` to take a range of online memory back (mm/memory_hotplug.c, mm/page_alloc.c).

* A hot-plugged 128 MiB memory block is *added* (its memmap, 64 B per 4 KiB page = 2 MiB, is
  allocated from ZONE_NORMAL: hot-plugged memory costs the guest ~1.6 % of itself), then *onlined*
  into ZONE_NORMAL or ZONE_MOVABLE (``memhp_default_state``; with ``memory_hotplug.online_policy=
  auto-movable``, ZONE_MOVABLE while MOVABLE:KERNEL stays within ``auto_movable_ratio`` 301 % on the
  node). Watermarks are recomputed on online and offline, as ``online_pages`` does.
* ``alloc_contig_range`` migrates the movable pages out of a range and claims it. Unmovable pages
  (slab, page tables: PageState.KERNEL) make it fail with -EBUSY. In ZONE_MOVABLE the caller may retry
  (virtio-mem makes 5 attempts) and transient pins go away; in ZONE_NORMAL one attempt is made.

Simplifications: the PCI hole is not modelled (device regions follow boot memory in the page index;
``memaddr`` is reported as QEMU would place it); migrating a page takes no simulated time here
(the virtio-mem driver charges it); a transient pin lasts exactly one attempt.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from labkit.model.pages import (
    PAGES_PER_MEMORY_BLOCK,
    STRUCT_PAGE_SIZE,
    GuestMemory,
    PageFlag,
    PageState,
    Zone,
)
from labkit.units import GiB, MiB, PAGE_SIZE

MEMMAP_PAGES_PER_BLOCK = PAGES_PER_MEMORY_BLOCK * STRUCT_PAGE_SIZE // PAGE_SIZE  # 512 = 2 MiB
AUTO_MOVABLE_RATIO = 301  # mm/memory_hotplug.c auto_movable_ratio (%, MOVABLE:KERNEL)
DEVICE_MEMORY_ALIGN = 1 * GiB  # QEMU aligns the device-memory region (hw/i386/pc.c)
ONLINE_TYPES = ("offline", "online", "online_kernel", "online_movable")
MOVABLE_STATES = (PageState.ANON, PageState.SHMEM, PageState.FILE_CLEAN, PageState.FILE_DIRTY,
                  PageState.BALLOON)
UNMOVABLE_STATES = (PageState.KERNEL, PageState.RESERVED, PageState.HINTED)
_UNMOVABLE_LUT = np.zeros(256, dtype=bool)  # one gather a page instead of np.isin's sort
_UNMOVABLE_LUT[list(UNMOVABLE_STATES)] = True
_MOVABLE_LUT = np.zeros(256, dtype=bool)
_MOVABLE_LUT[list(MOVABLE_STATES)] = True


@dataclass(frozen=True)
class DeviceRegion:
    """Where a hot-pluggable device's memory lives: PFNs [start, end) and its guest address."""

    id: str
    node: int
    start: int
    end: int
    memaddr: int

    @property
    def pages(self) -> int:
        return self.end - self.start


def q35_device_memory_base(ram: int) -> int:
    """Guest-physical base of QEMU's device-memory region on q35: RAM above 4 GiB ends it."""
    lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000
    above_4g = max(0, ram - lowmem)
    return -(-((4 * GiB) + above_4g) // DEVICE_MEMORY_ALIGN) * DEVICE_MEMORY_ALIGN


def plan_layout(boot_pages: int, boot_zones: list[Zone], devices: list[dict]) -> tuple[
        int, list[Zone], list[DeviceRegion]]:
    """Place device regions after boot memory (each on a 1 GiB boundary of the page index) and
    create one ZONE_MOVABLE per node that has hot-pluggable memory. Returns (n_pages, movable
    zones, regions)."""
    align = DEVICE_MEMORY_ALIGN // PAGE_SIZE
    cursor = -(-boot_pages // align) * align
    base = q35_device_memory_base(boot_pages * PAGE_SIZE)
    regions = []
    for d in devices:
        pages = d["size"] // PAGE_SIZE
        memaddr = d["memaddr"] if d.get("memaddr") is not None else base + (cursor * PAGE_SIZE) - (
            -(-boot_pages // align) * align * PAGE_SIZE)
        regions.append(DeviceRegion(d["id"], d["node"], cursor, cursor + pages, memaddr))
        cursor = -(-(cursor + pages) // align) * align
    n_pages = cursor if regions else boot_pages
    movable = []
    for node in sorted({r.node for r in regions}):
        rs = [r for r in regions if r.node == node]
        movable.append(Zone("Movable", node, min(r.start for r in rs), max(r.end for r in rs)))
    return n_pages, movable, regions


class MemoryHotplug:
    """The kernel's memory hotplug for one guest (``kernel.hotplug``)."""

    def __init__(self, kernel, online_type: str = "offline", online_policy: str = "contig-zones"):
        if online_type not in ONLINE_TYPES:
            raise ValueError(f"memhp_default_state {online_type!r} is not one of {list(ONLINE_TYPES)}")
        if online_policy not in ("contig-zones", "auto-movable"):
            raise ValueError(f"memory_hotplug.online_policy {online_policy!r} is not one of "
                             "['contig-zones', 'auto-movable']")
        self.kernel = kernel
        self.mem: GuestMemory = kernel.mem
        self.online_type = online_type
        self.online_policy = online_policy
        self.memmap: dict[int, np.ndarray] = {}  # block -> PFNs of its memmap (KERNEL pages)
        self.online_blocks: dict[int, str] = {}  # block -> "Normal" / "Movable"
        self.migrated_pages = 0

    # --- zones --------------------------------------------------------------------------------
    def zone_index(self, node: int, movable: bool) -> int:
        for i, z in enumerate(self.mem.zones):
            if z.node == node and z.movable == movable:
                return i
        raise ValueError(f"node {node} has no {'Movable' if movable else 'Normal'} zone")

    def block_range(self, block: int) -> tuple[int, int]:
        a = block * PAGES_PER_MEMORY_BLOCK
        return a, min(a + PAGES_PER_MEMORY_BLOCK, self.mem.n_pages)

    def node_of_block(self, block: int, regions: list[DeviceRegion]) -> int:
        a, _ = self.block_range(block)
        for r in regions:
            if r.start <= a < r.end:
                return r.node
        raise ValueError(f"memory block {block} is not in a hot-pluggable region")

    # --- add / online / offline / remove ------------------------------------------------------
    def add_memory(self, block: int) -> int:
        """add_memory_driver_managed for one block: memmap from ZONE_NORMAL; pages present but
        offline. Returns 0 or -ENOMEM."""
        if block in self.memmap:
            return -errno.EEXIST
        memmap = self.kernel.alloc_pages(MEMMAP_PAGES_PER_BLOCK, PageState.KERNEL, movable=False,
                                         noretry=True)
        if len(memmap) < MEMMAP_PAGES_PER_BLOCK:
            self.kernel.free_pages(memmap)
            return -errno.ENOMEM
        self.kernel.touch(memmap)
        self.memmap[block] = memmap
        a, b = self.block_range(block)
        self.mem.set_range_state(a, b, PageState.OFFLINE)
        return 0

    def choose_zone(self, node: int, online_type: str) -> bool:
        """True for ZONE_MOVABLE. ``online`` follows the online policy (auto-movable's ratio)."""
        if online_type == "online_movable":
            return True
        if online_type == "online_kernel" or self.online_policy == "contig-zones":
            return False
        normal = self.zone_index(node, movable=False)
        movable = self.zone_index(node, movable=True)
        managed = self.kernel.zone_managed()
        kernel_pages, movable_pages = int(managed[normal]), int(managed[movable])
        return (movable_pages + PAGES_PER_MEMORY_BLOCK) * 100 <= kernel_pages * AUTO_MOVABLE_RATIO

    def online(self, block: int, node: int, movable: bool, plugged: np.ndarray) -> None:
        """online_pages: the block joins a zone; ``plugged`` PFNs go to the buddy allocator, the
        rest stay PageOffline (virtio-mem's online_page callback)."""
        zi = self.zone_index(node, movable)
        self.mem.assign_block(block, zi)
        self.online_blocks[block] = "Movable" if movable else "Normal"
        if len(plugged):
            self.kernel.free_pages(plugged)
        self.kernel.recompute_watermarks()

    def offline_and_remove(self, block: int) -> int:
        """offline_and_remove_memory for a block whose pages are all PageOffline: 0 or -EBUSY."""
        a, b = self.block_range(block)
        if (self.mem.state[a:b] != int(PageState.OFFLINE)).any():
            return -errno.EBUSY
        if block in self.online_blocks:
            self.mem.assign_block(block, -1)
            del self.online_blocks[block]
            self.kernel.recompute_watermarks()
        self.mem.set_range_state(a, b, PageState.ABSENT)
        self.kernel.free_pages(self.memmap.pop(block))
        return 0

    # --- taking online memory back ------------------------------------------------------------
    def alloc_contig_range(self, start: int, end: int, *, attempts: int = 1) -> int:
        """Migrate movable pages out of [start, end) and claim the range as PageOffline.

        As mm/page_alloc.c ``alloc_contig_range`` does: ``start_isolate_page_range`` first
        (mm/page_isolation.c: the range's free pages leave the free lists, and pages freed into
        it later stay isolated, so reclaim done to allocate migration targets cannot hand a page
        of the range back out), then migrate what is in use, then check that every page is
        isolated (``test_pages_isolated``). A page migration cannot isolate fails the range
        with -EBUSY: unmovable kernel pages, pinned pages, and pages an owner holds off the LRU
        and off the movable lists (balloon pages ``leak_balloon`` dequeued and has not released
        yet, or an Out-of-puff fill's local list: mm/balloon_compaction.c
        ``balloon_page_list_dequeue`` clears their movable ops; mechanisms.md §5.5).

        Returns 0, -EBUSY or -ENOMEM (nowhere to migrate to). On failure the range is
        un-isolated (``undo_isolate_page_range``): its free pages go back to the buddy allocator;
        pages already migrated stay where they went, as in Linux."""
        mem, kernel = self.mem, self.kernel
        state = mem.state[start:end]
        if _UNMOVABLE_LUT[state].any() or kernel.held_unmovable(start, end):
            return -errno.EBUSY
        pinned = (mem.flags[start:end] & np.uint8(PageFlag.MOVABLE_PIN)) != 0
        if pinned.any():
            if attempts <= 1:
                return -errno.EBUSY
            mem.flags[start:end][pinned] &= np.uint8(~int(PageFlag.MOVABLE_PIN) & 0xFF)
        was_offline = state == int(PageState.OFFLINE)  # a copy: unplugged before we came
        has_movable = bool(_MOVABLE_LUT[state].any())
        free = np.flatnonzero(state == int(PageState.FREE)) + start
        # isolating free pages takes them off the free lists: PageReported goes, as on allocation
        for hook in kernel.alloc_hooks:
            hook(free)
        mem.flags[start:end] &= np.uint8(~int(PageFlag.REPORTED) & 0xFF)
        if len(free) == end - start:  # an empty range: slices, not an index array
            mem.set_range_state(start, end, PageState.OFFLINE)
        else:
            mem.set_state(free, PageState.OFFLINE)  # isolated: the allocator can't hand them out
        for zi in {int(z) for z in mem.zone_index_of(np.array([start, end - 1]))}:
            if zi >= 0:
                kernel.allocators[int(zi)].invalidate()
        kernel.isolated.append((start, end))
        try:
            rc = self._migrate_range(start, end) if has_movable else 0
        finally:
            kernel.isolated.remove((start, end))
        if rc == 0 and (mem.state[start:end] != int(PageState.OFFLINE)).any():
            rc = -errno.EBUSY  # test_pages_isolated: a page is not free in the isolated range
        if rc:
            ours = (mem.state[start:end] == int(PageState.OFFLINE)) & ~was_offline
            kernel.free_pages(np.flatnonzero(ours) + start)
        return rc

    def _migrate_range(self, start: int, end: int) -> int:
        """``__alloc_contig_migrate_range`` on an isolated range: each movable state's pages get
        targets outside it, owners follow (``remap_pages``), the old pages stay isolated. The
        targets are allocated with reclaim, which may free pages of the range: those are no
        longer migrated (their owner let go of them) and stay isolated as they were freed."""
        mem, kernel = self.mem, self.kernel
        for s in MOVABLE_STATES:
            old = np.flatnonzero(mem.state[start:end] == s) + start
            if len(old) == 0:
                continue
            new = kernel.alloc_pages(len(old), s, movable=True, noretry=True)
            old = old[mem.state[old] == s]  # reclaim freed some of them into the isolated range
            if len(new) < len(old):
                kernel.free_pages(new)
                return -errno.ENOMEM
            if len(new) > len(old):
                kernel.free_pages(new[len(old):])
                new = new[:len(old)]
            if len(old) == 0:
                continue
            backed = (mem.flags[old] & np.uint8(PageFlag.BACKED | PageFlag.SWAPPED)) != 0
            kernel.touch(new[backed])  # the copy writes the target pages
            kernel.remap_pages(old, new)
            mem.set_state(old, PageState.OFFLINE)  # the old page is freed into the isolated range
            self.migrated_pages += len(old)
        return 0

    def fake_online(self, pfns: np.ndarray) -> None:
        """virtio_mem_fake_online: PageOffline pages of an online block back to the buddy."""
        self.kernel.free_pages(pfns)


assert MiB  # sizes in docstrings
