"""How the host backs a VM's RAM: one :class:`RamBlock` per memory backend, its page size, and QEMU's
book of who needs RAM discard and who forbids it (docs/mechanisms.md §11.1, §11.3, §12).

* **Page size of a RAM block** (QEMU ``qemu_ram_pagesize``): the host's base page for anonymous
  memory (``memory-backend-ram``, 4 KiB on x86-64, 64 KiB on an arm64 or ppc64 host built so) and for
  shmem (``memory-backend-memfd`` without ``hugetlb``); the huge page size for hugetlbfs
  (``memory-backend-memfd,hugetlb=on,hugetlbsize=2M``, ``memory-backend-file`` on a hugetlbfs mount).
  A first write to any 4 KiB piece makes the host allocate the whole page, so host RSS grows in
  page-size steps; a discard must be aligned to the page (softmmu/physmem.c
  ``ram_block_discard_range``: "Unaligned start address").
* **THP** (transparent huge pages, a host setting): QEMU advises ``MADV_HUGEPAGE`` on anonymous guest
  RAM, so with THP on a first write into an empty, aligned 2 MiB range (512 MiB on a 64 KiB host)
  faults in a whole huge page. A discard of part of it (``MADV_DONTNEED``) splits the mapping into
  4 KiB entries, and faults there are 4 KiB from then on (mm/huge_memory.c ``__split_huge_pmd``).
  The page size of the block stays the base page: the balloon frees 4 KiB pieces.
* **Unswappable memory**: hugetlbfs pages are never swapped; nor is memory pinned for a device
  (VFIO maps all guest RAM, ``vfio_pin_pages_remote``), registered for SEV (``sev_pin_memory``) or
  locked (``-overcommit mem-lock=on``: ``mlockall``); nor private memory of a confidential guest
  (``guest_memfd`` folios are unevictable).
* **RAM discard** (:class:`RamDiscard`, QEMU ``ram_block_discard_disable`` and friends,
  softmmu/physmem.c): four counters per QEMU process. VFIO disables *uncoordinated* discard (the
  balloon, free page reporting), SEV disables all of it, virtio-mem requires *coordinated* discard (it
  tells VFIO through its RamDiscardManager), and a confidential guest's private memory (``guest_memfd``)
  requires discard. A disable while someone requires it, or the reverse, fails with ``-EBUSY``.

>>> d = RamDiscard()
>>> d.uncoordinated_disable(True), d.coordinated_require(True), d.is_disabled()
(0, 0, True)
>>> d.disable(True)  # SEV after virtio-mem: QEMU refuses
-16
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

from labkit.units import GiB, KiB, MiB, PAGE_SIZE

BASE_PAGE = PAGE_SIZE  # the model's page arrays are in 4 KiB units (the balloon's PFN unit)
HOST_PAGE_SIZES = (4 * KiB, 64 * KiB)  # x86-64 / arm64 4K, and arm64 (or ppc64) built with 64 KiB pages
# include/linux/huge_mm.h HPAGE_PMD_SIZE: one page-table page of entries (512 x 4 KiB, 8192 x 64 KiB)
THP_SIZE = {4 * KiB: 2 * MiB, 64 * KiB: 512 * MiB}
# the huge page sizes hugetlbfs offers (x86-64: PMD and PUD; arm64 64K: contiguous PTEs, PMD, contiguous PMDs)
HUGEPAGE_SIZES = {4 * KiB: (2 * MiB, 1 * GiB), 64 * KiB: (2 * MiB, 512 * MiB, 16 * GiB)}
DEFAULT_HUGEPAGE = {4 * KiB: 2 * MiB, 64 * KiB: 512 * MiB}  # /proc/meminfo Hugepagesize
EBUSY = -errno.EBUSY
LOG_MAX = 200  # lines of QEMU's stderr a HostVM keeps (the count goes on)


@dataclass(frozen=True)
class Backing:
    """How one memory backend's RAM is backed on the host.

    ``kind``: ``"anon"`` (memory-backend-ram), ``"shmem"`` (memory-backend-memfd), ``"hugetlb"``
    (hugetlbfs, through memfd or a file), ``"file"`` (memory-backend-file elsewhere). ``page_size`` is
    QEMU's ``qemu_ram_pagesize`` of the block; ``thp``: the host's THP is on for this (anonymous)
    memory; ``guest_memfd``: a confidential guest's private memory lives in KVM's guest_memfd.
    """

    kind: str = "anon"
    page_size: int = BASE_PAGE
    host_page_size: int = BASE_PAGE
    thp: bool = False
    shared: bool = False
    prealloc: bool = False
    guest_memfd: bool = False

    @property
    def thp_size(self) -> int:
        """Bytes a first write populates at once as a transparent huge page (0: THP not used)."""
        return THP_SIZE[self.host_page_size] if self.thp and self.kind == "anon" else 0

    @property
    def fd_backed(self) -> bool:
        """QEMU's ``rb->fd != -1``: discarded with fallocate(PUNCH_HOLE) rather than madvise."""
        return self.kind != "anon"

    @property
    def swappable(self) -> bool:
        return self.kind != "hugetlb" and not self.guest_memfd

    def describe(self) -> str:
        size = _size(self.page_size)
        if self.kind == "hugetlb":
            return f"hugetlbfs {size}"
        if self.kind == "anon":
            return f"anonymous {size}" + (f" + THP {_size(self.thp_size)}" if self.thp else "")
        return f"{self.kind} {size}"


def _size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


@dataclass
class RamBlock:
    """One RAMBlock of a VM: guest pages ``[start, end)`` of the page arrays, named by its memory
    backend (``idstr``), and how they are backed. ``split`` marks THP-sized ranges whose mapping was
    split by a partial discard or a swap-out (faults there are base pages from then on)."""

    name: str
    start: int
    end: int
    backing: Backing = field(default_factory=Backing)
    split: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.backing.thp_size:
            self.split = np.zeros(-(-self.pages // (self.backing.thp_size // BASE_PAGE)), dtype=bool)

    @property
    def pages(self) -> int:
        return self.end - self.start

    @property
    def page_pages(self) -> int:
        """4 KiB pages per host page of this block (1 for base pages of a 4 KiB host)."""
        return self.backing.page_size // BASE_PAGE

    @property
    def fault_pages(self) -> int:
        """4 KiB pages a first write can populate at once (the host page, or a THP)."""
        return max(self.page_pages, self.backing.thp_size // BASE_PAGE)


class RamDiscard:
    """QEMU's RAM discard counters for one QEMU process (softmmu/physmem.c, QEMU 6.1+): each call
    returns 0 or ``-EBUSY`` exactly as ``ram_block_discard_disable`` and its three siblings do."""

    def __init__(self) -> None:
        self.required = 0  # ram_block_discard_required_cnt
        self.coordinated_required = 0  # ram_block_coordinated_discard_required_cnt
        self.disabled = 0  # ram_block_discard_disabled_cnt
        self.uncoordinated_disabled = 0  # ram_block_uncoordinated_discard_disabled_cnt

    def disable(self, state: bool) -> int:
        if not state:
            self.disabled -= 1
        elif self.required or self.coordinated_required:
            return EBUSY
        else:
            self.disabled += 1
        return 0

    def uncoordinated_disable(self, state: bool) -> int:
        if not state:
            self.uncoordinated_disabled -= 1
        elif self.required:
            return EBUSY
        else:
            self.uncoordinated_disabled += 1
        return 0

    def require(self, state: bool) -> int:
        if not state:
            self.required -= 1
        elif self.disabled or self.uncoordinated_disabled:
            return EBUSY
        else:
            self.required += 1
        return 0

    def coordinated_require(self, state: bool) -> int:
        if not state:
            self.coordinated_required -= 1
        elif self.disabled:
            return EBUSY
        else:
            self.coordinated_required += 1
        return 0

    def is_disabled(self) -> bool:
        """``ram_block_discard_is_disabled``: any discard disabled, or only uncoordinated ones."""
        return bool(self.disabled or self.uncoordinated_disabled)

    def is_required(self) -> bool:
        return bool(self.required or self.coordinated_required)


# --- faults in page-size steps ------------------------------------------------------------------
def _expand(starts: np.ndarray, size: int) -> np.ndarray:
    return (starts[:, None] + np.arange(size, dtype=np.int64)).ravel()


def expand_faults(blocks: list[RamBlock], flags: np.ndarray, pfns: np.ndarray, backed_bit: int) -> np.ndarray:
    """The 4 KiB pages a write to ``pfns`` makes the host back: whole host pages in blocks with
    pages larger than 4 KiB, whole THPs where an aligned THP range is empty and not split. ``pfns``
    holds no duplicates; neither does the result. (A loop over blocks, numpy within.)"""
    parts, rest = [], np.ones(len(pfns), dtype=bool)
    for b in blocks:
        g = b.fault_pages
        if g == 1:
            continue
        inside = (pfns >= b.start) & (pfns < b.end)
        if not inside.any():
            continue
        rest &= ~inside
        offsets = pfns[inside] - b.start
        if b.page_pages > 1:  # hugetlbfs, or a 64 KiB host page: always the whole page
            pages = np.unique(offsets // b.page_pages)
            parts.append(b.start + _expand(pages * b.page_pages, b.page_pages))
            continue
        pmds = np.unique(offsets // g)
        full = (pmds + 1) * g <= b.pages  # a THP needs the whole aligned range inside the block
        cand = pmds[full & ~b.split[pmds]]
        if len(cand):
            window = flags[b.start + _expand(cand * g, g)].reshape(len(cand), g)
            cand = cand[~(window & backed_bit).any(axis=1)]  # pmd_none: nothing mapped there yet
        huge = np.isin(offsets // g, cand)
        parts.append(b.start + _expand(cand * g, g))
        parts.append(b.start + offsets[~huge])
    if not parts:
        return pfns
    parts.append(pfns[rest])
    return np.concatenate(parts)


def note_partial_unmap(blocks: list[RamBlock], flags: np.ndarray, pfns: np.ndarray, backed_bit: int) -> None:
    """A discard or swap-out of ``pfns``: THPs it covers only in part are split (their mapping now
    holds 4 KiB entries). Called before the pages lose their backing."""
    for b in blocks:
        if b.split is None:
            continue
        inside = pfns[(pfns >= b.start) & (pfns < b.end)]
        if not len(inside):
            continue
        g = b.backing.thp_size // BASE_PAGE
        pmds, counts = np.unique((inside - b.start) // g, return_counts=True)
        partial = pmds[(counts < g) & ((pmds + 1) * g <= b.pages)]  # a tail range is never a THP
        partial = partial[~b.split[partial]]
        if len(partial):
            window = flags[b.start + _expand(partial * g, g)].reshape(len(partial), g)
            b.split[partial[(window & backed_bit).any(axis=1)]] = True  # mapped: now a page table


def block_of(blocks: list[RamBlock], pfn: int) -> RamBlock | None:
    for b in blocks:
        if b.start <= pfn < b.end:
            return b
    return None


__all__ = ["BASE_PAGE", "DEFAULT_HUGEPAGE", "HOST_PAGE_SIZES", "HUGEPAGE_SIZES", "THP_SIZE", "Backing",
           "RamBlock", "RamDiscard", "block_of", "expand_faults", "note_partial_unmap"]
