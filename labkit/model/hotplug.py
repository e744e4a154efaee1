"""Memory hot(un)plug in the guest kernel: memory blocks added, onlined, offlined and removed, and
``alloc_contig_range`` to take a range of online memory back (mm/memory_hotplug.c, mm/page_alloc.c).

* A hot-plugged memory block (128 MiB, or ``probe_memory_block_size``'s size) is *added* (its
  memmap, 64 B per 4 KiB page = 2 MiB a 128 MiB block, is a GFP_KERNEL allocation: hot-plugged
  memory costs the guest ~1.6 % of itself), then *onlined* (``online_pages``; the pages go to the
  buddy allocator as ``__free_pages_core`` gives them, not through the per-CPU lists) into:

  - ``online_movable``: ZONE_MOVABLE; ``online_kernel``: ZONE_NORMAL (``default_kernel_zone_for_pfn``);
  - ``online`` with ``memory_hotplug.online_policy=contig-zones`` (``default_zone_for_pfn``): the zone
    whose span already covers the block if exactly one of the kernel zone and ZONE_MOVABLE does
    (a block between two movable ones inherits ZONE_MOVABLE), else the kernel zone;
  - ``online`` with ``auto-movable`` (``auto_movable_zone_for_pfn``): ZONE_MOVABLE while MOVABLE
    stays within ``auto_movable_ratio`` (301 %) of the *early* (boot-time present) kernel pages, on
    the whole machine and, with ``auto_movable_numa_aware``, on the block's node too; kernel memory
    other dynamic groups (virtio-mem devices) need for their own MOVABLE is set aside, the group's own
    kernel memory counts for it.

  ``online_pages`` and ``offline_pages`` recompute the watermarks (``init_per_zone_wmark_min``).
* ``alloc_contig_range`` drains the per-CPU lists (``drain_all_pages``), migrates the movable pages
  out of a range and claims it (``init_on_alloc`` zeroes what it claims: the host backs it until the
  unplug discards it). Unmovable pages (slab, page tables: PageState.KERNEL) make it fail with
  -EBUSY. In ZONE_MOVABLE the caller may retry (virtio-mem makes 5 attempts) and transient pins go
  away; in ZONE_NORMAL one attempt is made.

Simplifications: the PCI hole is not modelled (device regions follow boot memory in the page index;
``memaddr`` is reported as QEMU would place it); migrating a page takes no simulated time here
(the virtio-mem driver charges it); a transient pin lasts exactly one attempt.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from labkit.model.pages import (
    PAGEBLOCK_ORDER,
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
NUMA_NO_NODE = -1
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


def plan_layout(boot_pages: int, boot_zones: list[Zone], devices: list[dict],
                block_pages: int = PAGES_PER_MEMORY_BLOCK) -> tuple[int, list[Zone], list[DeviceRegion]]:
    """Place device regions after boot memory (each on a 1 GiB boundary of the page index, or a
    memory block if larger) and create the zones hot-plugged memory can join: one ZONE_MOVABLE per
    node that has hot-pluggable memory, and a ZONE_NORMAL for such a node that has none at boot
    (RAM below 4 GiB is ZONE_DMA32). Returns (n_pages, hot-plug zones, regions)."""
    align = max(DEVICE_MEMORY_ALIGN // PAGE_SIZE, block_pages)
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
    hot = []
    for node in sorted({r.node for r in regions}):
        rs = [r for r in regions if r.node == node]
        a, b = min(r.start for r in rs), max(r.end for r in rs)
        if not any(z.node == node and z.name == "Normal" for z in boot_zones):
            hot.append(Zone("Normal", node, a, a))  # empty until a block is onlined into it
        hot.append(Zone("Movable", node, a, b))
    return n_pages, hot, regions


class MemoryHotplug:
    """The kernel's memory hotplug for one guest (``kernel.hotplug``)."""

    def __init__(self, kernel, online_type: str = "offline", online_policy: str | None = None,
                 regions: list[DeviceRegion] | None = None):
        if online_type not in ONLINE_TYPES:
            raise ValueError(f"memhp_default_state {online_type!r} is not one of {list(ONLINE_TYPES)}")
        params = kernel.params
        online_policy = online_policy or params.online_policy
        if online_policy not in ("contig-zones", "auto-movable"):
            raise ValueError(f"memory_hotplug.online_policy {online_policy!r} is not one of "
                             "['contig-zones', 'auto-movable']")
        self.kernel = kernel
        self.mem: GuestMemory = kernel.mem
        self.block_pages = self.mem.block_pages
        self.online_type = online_type
        self.online_policy = online_policy
        self.auto_movable_ratio = params.auto_movable_ratio
        self.auto_movable_numa_aware = params.auto_movable_numa_aware
        self.regions = list(regions or [])  # each a dynamic memory group (a virtio-mem device)
        self.memmap: dict[int, np.ndarray] = {}  # block -> PFNs of its memmap (KERNEL pages)
        self.online_blocks: dict[int, str] = {}  # block -> "Normal" / "Movable"
        self.migrated_pages = 0

    # --- zones --------------------------------------------------------------------------------
    def zone_index(self, node: int, movable: bool) -> int:
        name = "Movable" if movable else "Normal"
        for i, z in enumerate(self.mem.zones):
            if z.node == node and z.name == name:
                return i
        raise ValueError(f"node {node} has no {name} zone")

    def block_range(self, block: int) -> tuple[int, int]:
        a = block * self.block_pages
        return a, min(a + self.block_pages, self.mem.n_pages)

    def node_of_block(self, block: int, regions: list[DeviceRegion]) -> int:
        a, _ = self.block_range(block)
        for r in regions:
            if r.start <= a < r.end:
                return r.node
        raise ValueError(f"memory block {block} is not in a hot-pluggable region")

    def _group_of(self, block: int) -> DeviceRegion | None:
        a, _ = self.block_range(block)
        return next((r for r in self.regions if r.start <= a < r.end), None)

    # --- add / online / offline / remove ------------------------------------------------------
    def add_memory(self, block: int) -> int:
        """add_memory_driver_managed for one block: memmap from the kernel zones; pages present
        but offline. Returns 0 or -ENOMEM."""
        if block in self.memmap:
            return -errno.EEXIST
        need = self.block_pages * STRUCT_PAGE_SIZE // PAGE_SIZE
        memmap = self.kernel.alloc_pages(need, PageState.KERNEL, movable=False, noretry=True)
        if len(memmap) < need:
            self.kernel.free_pages(memmap)
            return -errno.ENOMEM
        self.kernel.touch(memmap)  # struct pages initialised
        self.memmap[block] = memmap
        a, b = self.block_range(block)
        self.mem.set_range_state(a, b, PageState.OFFLINE)
        return 0

    def choose_zone(self, node: int, online_type: str, block: int | None = None) -> bool:
        """True for ZONE_MOVABLE: ``zone_for_pfn_range`` for ``online_type`` (mm/memory_hotplug.c)."""
        if online_type == "online_movable":
            return True
        if online_type == "online_kernel":
            return False
        if self.online_policy == "auto-movable":
            return self._auto_movable(node, block)
        return self._contig_zones_movable(node, block)

    def _contig_zones_movable(self, node: int, block: int | None) -> bool:
        """``default_zone_for_pfn``: inherit the zone whose span intersects the block, when exactly
        one of the kernel zone and ZONE_MOVABLE does; else the kernel zone (no movable_node)."""
        if block is None:
            return False
        a, b = self.block_range(block)

        def intersects(zi: int) -> bool:
            lo, hi = self.mem.zone_span(zi)
            return hi > lo and lo < b and a < hi

        in_kernel = intersects(self.zone_index(node, movable=False))
        in_movable = intersects(self.zone_index(node, movable=True))
        return in_movable and not in_kernel

    def _present_stats(self, node: int) -> tuple[int, int]:
        """(early kernel pages, movable pages): present pages of the boot-time kernel zones and of
        ZONE_MOVABLE (``auto_movable_stats_account_zone``), on one node or all (NUMA_NO_NODE)."""
        kernel_early = movable = 0
        mem = self.mem
        for i, z in enumerate(mem.zones):
            if node != NUMA_NO_NODE and z.node != node:
                continue
            if z.movable:
                present = mem.counts[i].sum() - mem.counts[i, PageState.ABSENT]
                movable += int(present)
            elif i < mem.n_boot_zones:  # present_early_pages: boot memory only
                state = mem.state[z.start:z.end]
                kernel_early += int(z.pages - np.count_nonzero(state == int(PageState.ABSENT)))
        return kernel_early, movable

    def _group_pages(self, region: DeviceRegion) -> tuple[int, int]:
        """(present kernel pages, present movable pages) of a dynamic memory group."""
        kernel = movable = 0
        for block, zone in self.online_blocks.items():
            a, _ = self.block_range(block)
            if region.start <= a < region.end:
                if zone == "Movable":
                    movable += self.block_pages
                else:
                    kernel += self.block_pages
        return kernel, movable

    def _can_online_movable(self, node: int, group: DeviceRegion | None, nr_pages: int) -> bool:
        """``auto_movable_can_online_movable``."""
        ratio = self.auto_movable_ratio
        kernel_early, movable = self._present_stats(node)
        req_kernel_early = others_movable = 0
        for r in self.regions:  # walk_dynamic_memory_groups, all but this group
            if r is group or (node != NUMA_NO_NODE and r.node != node):
                continue
            g_kernel, g_movable = self._group_pages(r)
            need = g_movable * 100 // ratio - g_kernel if ratio else 0
            req_kernel_early += max(0, need)
            others_movable += g_movable
        if kernel_early <= req_kernel_early:
            return False
        kernel_early -= req_kernel_early
        movable -= others_movable
        if group is not None:
            kernel_early += self._group_pages(group)[0]
        movable += nr_pages
        return movable <= ratio * kernel_early // 100

    def _auto_movable(self, node: int, block: int | None) -> bool:
        """``auto_movable_zone_for_pfn`` for a dynamic group whose unit is one memory block."""
        if not self.auto_movable_ratio:
            return False
        group = self._group_of(block) if block is not None else None
        nr_pages = self.block_pages
        if not self._can_online_movable(NUMA_NO_NODE, group, nr_pages):
            return False
        if self.auto_movable_numa_aware and not self._can_online_movable(node, group, nr_pages):
            return False
        return True

    def online(self, block: int, node: int, movable: bool, plugged: np.ndarray) -> None:
        """online_pages: the block joins a zone; ``plugged`` PFNs go to the buddy allocator, the
        rest stay PageOffline (virtio-mem's online_page callback)."""
        zi = self.zone_index(node, movable)
        self.mem.assign_block(block, zi)
        a, b = self.block_range(block)  # online_pages: every pageblock MIGRATE_MOVABLE
        self.mem.pageblock_unmovable[a >> PAGEBLOCK_ORDER:-(-b >> PAGEBLOCK_ORDER)] = False
        self.online_blocks[block] = "Movable" if movable else "Normal"
        if len(plugged):
            self.kernel.free_pages(plugged, to_buddy=True)  # generic_online_page
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
        of the range back out) and ``drain_all_pages`` of the zone (pages on per-CPU lists reach
        the free lists), then migrate what is in use, then check that every page is isolated
        (``test_pages_isolated``). A page migration cannot isolate fails the range with -EBUSY:
        unmovable kernel pages, pinned pages, and pages an owner holds off the LRU and off the
        movable lists (balloon pages ``leak_balloon`` dequeued and has not released yet, or an
        Out-of-puff fill's local list: mm/balloon_compaction.c ``balloon_page_list_dequeue``
        clears their movable ops; mechanisms.md §5.5). On success the range is zeroed when
        ``init_on_alloc`` is on (``split_map_pages`` -> ``post_alloc_hook``).

        Returns 0, -EBUSY or -ENOMEM (nowhere to migrate to). On failure the range is
        un-isolated (``undo_isolate_page_range``): its free pages go back to the buddy allocator;
        pages already migrated stay where they went, as in Linux."""
        mem, kernel = self.mem, self.kernel
        state = mem.state[start:end]
        if _UNMOVABLE_LUT[state].any() or kernel.held_unmovable(start, end):
            return -errno.EBUSY  # set_migratetype_isolate: has_unmovable_pages, nothing changed
        pinned = (mem.flags[start:end] & np.uint8(PageFlag.MOVABLE_PIN)) != 0
        if pinned.any():
            if attempts <= 1:
                return -errno.EBUSY
            mem.flags[start:end][pinned] &= np.uint8(~int(PageFlag.MOVABLE_PIN) & 0xFF)
        for zi in {int(z) for z in mem.zone_index_of(np.array([start, end - 1]))}:
            if zi >= 0:  # isolated: drain_all_pages(cc.zone) puts per-CPU list pages on the free lists
                kernel.drain_all_pages(zi)
        state = mem.state[start:end]
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
            kernel.free_pages(np.flatnonzero(ours) + start, to_buddy=True)
        elif kernel.params.init_on_alloc:  # split_map_pages -> post_alloc_hook zeroes the range
            kernel.touch(np.arange(start, end, dtype=np.int64), run_start=start, zeroed=True)
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
        """virtio_mem_fake_online: PageOffline pages of an online block back to the buddy
        (``generic_online_page``: no per-CPU list)."""
        self.kernel.free_pages(pfns, to_buddy=True)


assert MiB  # sizes in docstrings
