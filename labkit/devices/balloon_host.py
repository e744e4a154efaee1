"""virtio-balloon's host half where the host page is larger than the balloon's 4 KiB page: QEMU's
partially-ballooned-page tracking (hw/virtio/virtio-balloon.c ``balloon_inflate_page``, QEMU 4.1+;
docs/mechanisms.md §1.6 and §12.1).

>>> import numpy as np
>>> from labkit.model.backing import Backing, RamBlock
>>> from labkit.model.host import Host
>>> from labkit.model.pages import GuestMemory, Zone
>>> host = Host(ram=1 << 30)
>>> vm = host.attach(GuestMemory(8192, [Zone("Normal", 0, 0, 8192)]), "vm0")
>>> vm.set_blocks([RamBlock("ram0", 0, 8192, Backing("anon", 64 << 10, host_page_size=64 << 10))])
>>> pfns, dropped = inflate_discards(vm, np.r_[np.arange(16, 32), np.arange(40, 44)])
>>> len(pfns), dropped, vm.log
(16, 1, ['qemu-system-x86_64: warning: Balloon used with backing page size > 4kiB, this may not be reliable'])
"""

from __future__ import annotations

import numpy as np

from labkit.model.host import HostVM

BALLOON_LARGE_PAGE_WARNING = "Balloon used with backing page size > 4kiB, this may not be reliable"


def inflate_discards(vm: HostVM, pfns: np.ndarray) -> tuple[np.ndarray, int]:
    """``balloon_inflate_page`` over one request: which 4 KiB pages QEMU discards, and how many
    partially ballooned host pages it gave up on.

    A PFN in a block of 4 KiB pages is discarded at once. In a block with larger pages (hugetlbfs,
    a 64 KiB host) QEMU warns once and tracks one ``PartiallyBalloonedPage``: a bitmap of the
    current host page's 4 KiB pieces. A PFN in another host page drops it ("Too hard, give up on the
    old partial page"); a full bitmap discards the whole host page. Since QEMU 4.1 the tracking lives
    in ``virtio_balloon_handle_output``'s loop over virtqueue elements, so it ends with the request:
    a host page is freed only if all its pieces arrive one after another within one request of at
    most 256 PFNs (1 MiB) -- never for 2 MiB or 1 GiB pages (docs/mechanisms.md §1.6, §12.1)."""
    small = np.zeros(len(pfns), dtype=bool)
    keys = np.full(len(pfns), -1, dtype=np.int64)
    sizes = np.ones(len(pfns), dtype=np.int64)
    for i, b in enumerate(vm.blocks):
        inside = (pfns >= b.start) & (pfns < b.end)
        if b.page_pages == 1:
            small |= inside
        elif inside.any():
            vm.warn_once("balloon-page-size", BALLOON_LARGE_PAGE_WARNING)
            keys[inside] = (np.int64(i) << 40) | ((pfns[inside] - b.start) // b.page_pages)
            sizes[inside] = b.page_pages
    outside = keys < 0
    small |= outside & ~small  # pages in no block: the model's holes, 4 KiB anonymous
    large = np.flatnonzero(~small)
    if len(large) == 0:
        return pfns, 0
    k = keys[large]
    edges = np.flatnonzero(np.diff(k)) + 1
    starts = np.concatenate(([0], edges))
    lengths = np.diff(np.concatenate((starts, [len(k)])))
    full = lengths == sizes[large][starts]  # every piece, one after another: the bitmap is full
    first = pfns[large][starts[full]]
    whole = []
    for i, b in enumerate(vm.blocks):  # the full host pages, expanded to their 4 KiB pieces
        sel = (k[starts[full]] >> 40) == i
        if sel.any():
            base = b.start + (first[sel] - b.start) // b.page_pages * b.page_pages
            whole.append((base[:, None] + np.arange(b.page_pages, dtype=np.int64)).ravel())
    dropped = int(np.count_nonzero(~full))
    return np.concatenate([pfns[small], *whole]), dropped


def report_aligned(vm: HostVM, starts: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """``virtio_balloon_handle_report``'s check, per reported block: discard only if its offset in
    the RAM block and its size are both multiples of the block's page size, and it ends inside the
    block; "For now we will simply ignore unaligned memory regions" (silently). A guest reporting
    2 MiB (order 9) or 4 MiB blocks frees nothing on 1 GiB huge pages (docs/mechanisms.md §3.5)."""
    ok = np.ones(len(starts), dtype=bool)
    sizes = np.left_shift(np.int64(1), orders.astype(np.int64))
    for b in vm.blocks:
        if b.page_pages == 1:
            continue
        inside = (starts >= b.start) & (starts < b.end)
        offsets = starts - b.start
        aligned = ((offsets | sizes) % b.page_pages == 0) & (offsets + sizes <= b.pages)
        ok &= ~inside | aligned
    return ok


__all__ = ["BALLOON_LARGE_PAGE_WARNING", "inflate_discards", "report_aligned"]
