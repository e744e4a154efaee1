"""A guest whose pages are larger than the model's 4 KiB page (arm64 with 64 KiB pages), modelled at
the driver/device boundary (docs/mechanisms.md §12.2).

labkit's page arrays stay in 4 KiB units: the guest kernel, its zones and its buddy allocator run as
for a 4 KiB guest. A 64 KiB guest page is an aligned group of 16 of them, and the mechanisms whose
behaviour depends on the guest's page size take memory in such groups:

* the balloon driver allocates whole guest pages (:func:`alloc_groups`) and names each with
  ``VIRTIO_BALLOON_PAGES_PER_PAGE`` 4 KiB PFNs (drivers/virtio/virtio_balloon.c ``set_page_pfns``);
* free page reporting and hinting work on blocks of a *guest* order: order 5 of 64 KiB pages is 2 MiB
  (4 KiB order 9), the pageblock order 13 is 512 MiB (4 KiB order 17, beyond the model's buddy
  allocator: :func:`free_runs` counts such blocks in the page arrays instead);
* virtio-mem's driver sizes its units from the guest's pageblock and memory block (512 MiB each).

Simplification: the model's own allocations (the workload, the page cache) are still 4 KiB, so a
64 KiB page is free here when its 16 pieces are; a real 64 KiB guest never splits one.

>>> from labkit.model.pages import GuestMemory, Zone, PageState
>>> mem = GuestMemory(64, [Zone("Normal", 0, 0, 64)])
>>> mem.set_state(np.arange(3, 5), PageState.ANON)
>>> int(free_runs(mem.state, 0, 64, 16))
3
"""

from __future__ import annotations

import numpy as np

from labkit.model.pages import PageFlag, PageState

FREE = np.uint8(PageState.FREE)
GUEST_PAGE_SIZES = (4096, 64 << 10)
# arm64 with 64 KiB pages (arch/arm64/Kconfig): pageblock_order = HPAGE_PMD_ORDER = 13, a 512 MiB
# memory block (SECTION_SIZE_BITS 29), MAX_ORDER 14 (largest block order 13); UNCONFIRMED for the
# exact Kconfig values of every release (6.1 read for the driver's comments, which state 512 MiB)
LARGE_PAGE_FACTS = {64 << 10: {"pageblock_bytes": 512 << 20, "memory_block_bytes": 512 << 20,
                               "max_block_bytes": 512 << 20, "reporting_driver_order": 5}}


def _free_groups(state: np.ndarray, start: int, end: int, per: int) -> np.ndarray:
    """Start PFNs of the aligned groups of ``per`` pages in [start, end) that are all free."""
    a, b = -(-start // per) * per, end // per * per
    if b <= a:
        return np.zeros(0, dtype=np.int64)
    groups = state[a:b].reshape(-1, per)
    return a + np.flatnonzero((groups == FREE).all(axis=1)).astype(np.int64) * per


def free_runs(state: np.ndarray, start: int, end: int, pages: int) -> int:
    """How many aligned blocks of ``pages`` 4 KiB pages in [start, end) are entirely free."""
    return len(_free_groups(state, start, end, pages))


def alloc_groups(kernel, groups: int, per: int, state: PageState, *, movable: bool = True) -> np.ndarray:
    """Allocate up to ``groups`` guest pages of ``per`` 4 KiB pages each, as the balloon's
    ``balloon_page_alloc`` does for a large-page guest (``__GFP_NORETRY``: no reclaim, fewer when the
    zones are at their low watermark). Returns the PFNs, group by group, each group ascending."""
    mem = kernel.mem
    counts = mem.counts
    parts = []
    for zi in kernel.zonelist(movable, None):
        if groups <= 0:
            break
        z = mem.zones[zi]
        headroom = int(counts[zi, int(PageState.FREE)]) - kernel.watermarks[zi].low
        allow = min(groups, headroom // per)
        if allow <= 0:
            continue
        starts = _free_groups(mem.state, z.start, z.end, per)[:allow]
        if not len(starts):
            continue
        pfns = (starts[:, None] + np.arange(per, dtype=np.int64)).ravel()
        mem.move_known(pfns, PageState.FREE, state, zi)
        parts.append(pfns)
        groups -= len(starts)
    pfns = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    for hook in kernel.alloc_hooks:  # as alloc_pages: reporting sees the pages leave the free lists
        hook(pfns)
    mem.clear_flag(pfns, PageFlag.REPORTED)
    return pfns


__all__ = ["GUEST_PAGE_SIZES", "LARGE_PAGE_FACTS", "alloc_groups", "free_runs"]
