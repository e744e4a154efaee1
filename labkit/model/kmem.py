"""The kernel memory a workload costs besides its own pages: incidental, unmovable allocations.

A real guest does not give a workload its pages for free (measured on the live Debian 6.1 guest):

* anonymous memory needs page tables: one PTE page per ``PTRS_PER_PTE`` = 512 pages (2 MiB)
  (PageTables +544 kB for 256 MiB);
* the page cache needs xarray nodes (one 576-byte ``xa_node`` per 64 pages), and a file on a block
  device a 104-byte ``buffer_head`` per 4 KiB block (Slab +7.5 MiB for a 256 MiB ext2 file);
* every process the shell starts leaves dentries, inodes and /proc entries behind (Slab +44 kB per
  alloc/free of an anonymous holder): reclaimable by a shrinker, but unmovable while cached.

All of it is GFP_KERNEL: unmovable, placed in the highest kernel zone (ZONE_NORMAL first, which
includes hot-plugged ZONE_NORMAL memory blocks, where it pins them against virtio-mem unplug), in
UNMOVABLE pageblocks (:mod:`labkit.model.allocator`). This mixin of
:class:`labkit.model.kernel.Kernel` keeps it per handle (``Handle.overhead``) and frees it with the
workload's pages.
"""

from __future__ import annotations

import numpy as np

from labkit.model.handles import Handle
from labkit.model.pages import PageState
from labkit.model.reclaim import Shrinker

PTRS_PER_PTE = 512  # arch/x86: one page-table page maps 2 MiB of anonymous memory
XA_CHUNK_PAGES = 64  # include/linux/xarray.h XA_CHUNK_SIZE: page cache entries per xa_node
XA_NODE_BYTES = 576  # sizeof(struct xa_node) on x86-64 (slab radix_tree_node)
BUFFER_HEAD_BYTES = 104  # sizeof(struct buffer_head) on x86-64
DENTRIES_PER_PAGE = 21  # 192-byte dentries in a 4 KiB slab page
PGD_ALLOCATION_ORDER = 1  # arch/x86/include/asm/pgalloc.h with CONFIG_PAGE_TABLE_ISOLATION (Debian)


class KernelMemory:
    """Mixed into :class:`labkit.model.kernel.Kernel`."""

    # --- incidental kernel memory -------------------------------------------------------------
    @staticmethod
    def overhead_pages(kind: str, pages: int) -> int:
        """The unmovable memory ``pages`` pages of a workload cost the kernel: page tables for an
        anonymous mapping (one PTE page per ``PTRS_PER_PTE`` pages; measured: +544 kB for 256 MiB),
        page cache xarray nodes (one 576-byte ``xa_node`` per 64 pages) for tmpfs and files, and a
        104-byte ``buffer_head`` per page of a file on a block device (ext2/ext4 with 4 KiB blocks;
        measured: Slab +7.5 MiB for a 256 MiB file)."""
        if kind == "anon":
            return -(-pages // PTRS_PER_PTE)
        if kind == "shmem":
            return -(-(-(-pages // XA_CHUNK_PAGES) * XA_NODE_BYTES) // 4096)
        if kind == "file":
            return -(-(-(-pages // XA_CHUNK_PAGES) * XA_NODE_BYTES + pages * BUFFER_HEAD_BYTES) // 4096)
        return 0

    def grow_overhead(self, h: Handle, pages: int, node: int | None = None) -> None:
        """Allocate what ``h`` needs for ``pages`` pages: GFP_KERNEL, the highest kernel zone first
        (where a real guest leaves them, pinning hot-plugged ZONE_NORMAL blocks)."""
        have = 0 if h.overhead is None else len(h.overhead)
        need = self.overhead_pages(h.kind, pages) - have
        if need <= 0:
            return
        pfns = self.alloc_pages(need, PageState.KERNEL, movable=False, node=node)
        self.touch(pfns)  # page table entries, xa_node slots, buffer heads written
        h.overhead = pfns if h.overhead is None else np.concatenate([h.overhead, pfns])
        if h.kind == "anon":
            self.page_table_pages += len(pfns)
        else:
            self.slab_reclaimable += len(pfns)

    def trim_overhead(self, h: Handle) -> None:
        """``h`` lost pages (reclaim, drop_caches): its page cache nodes and buffer heads go too."""
        if h.overhead is None:
            return
        excess = len(h.overhead) - self.overhead_pages(h.kind, len(h.pages))
        if excess > 0:
            pfns, h.overhead = h.overhead[-excess:], h.overhead[:-excess]
            self._drop_overhead(h.kind, pfns)

    def release_overhead(self, h: Handle) -> None:
        if h.overhead is not None and len(h.overhead):
            self._drop_overhead(h.kind, h.overhead)
        h.overhead = None

    def _drop_overhead(self, kind: str, pfns: np.ndarray) -> None:
        if kind == "anon":
            self.page_table_pages -= len(pfns)
        else:
            self.slab_reclaimable -= len(pfns)
        self.free_pages(pfns, was=PageState.KERNEL)

    def exit_mm(self) -> int:
        """A process exited (or the one that freed a file): the last page its mm frees is the pgd,
        of order ``PGD_ALLOCATION_ORDER`` (``__mmdrop`` -> ``pgd_free``). In 6.1 an order 1-3 free
        while ``free_factor`` > 0 is a "free_high" free (mm/page_alloc.c ``free_unref_page_commit``:
        ``nr_pcp_high`` is 0 and ``nr_pcp_free`` returns ``pcp->count``): when the exit freed enough
        to make bulk frees, the freeing CPU's list of the pgd's zone goes back to the buddy allocator
        whole. Measured on the live guest: pcp count 167 after a 256 MiB holder exits, ~13300 (near
        ``high``) after a 256 MiB balloon deflate, which frees order-0 pages only. Returns the pages."""
        zone = next((z for z in self.zonelist(False, None) if self.pcp[z][0].high), None)
        if zone is None:
            return 0
        pcp = self.pcp[zone][0]
        pcp.touch_clock(self.clock())
        if not pcp.free_factor:
            return 0
        pages = pcp.drain()
        if len(pages):
            self.mem.move_known(pages, PageState.PCP, PageState.FREE, zone)
            self._to_buddy(zone, pages)
        return len(pages)

    def process_slab(self) -> None:
        """A process started and went (the live backend runs one per workload step): the dentry,
        inode and /proc caches keep ``slab_per_op_pages`` more (the busybox guest: 11 pages,
        measured), unmovable but reclaimable (the "dcache" shrinker gives them back under
        pressure). A guest whose workload steps are no processes keeps none."""
        if not self.slab_per_op_pages:
            return
        if self._dcache is None:
            self._dcache = self.new_handle("kernel", np.zeros(0, dtype=np.int64), 0, name="dcache",
                                           killable=False)
            self.shrinkers.append(Shrinker(lambda: len(self._dcache.pages) * DENTRIES_PER_PAGE,
                                           self._shrink_dcache, name="dcache"))
        pfns = self.alloc_pages(self.slab_per_op_pages, PageState.KERNEL, movable=False, noretry=True)
        self.touch(pfns)
        self._dcache.pages = np.concatenate([self._dcache.pages, pfns])
        self.slab_reclaimable += len(pfns)

    def _shrink_dcache(self, nr: int) -> int:
        pages = self._dcache.pages
        n = min(len(pages), -(-nr // DENTRIES_PER_PAGE))
        if n == 0:
            return 0
        self._dcache.pages, gone = pages[:-n], pages[-n:]
        self.slab_reclaimable -= n
        self.free_pages(gone, was=PageState.KERNEL)
        return n
