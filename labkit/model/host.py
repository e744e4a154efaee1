"""The host: its RAM budget, which guest pages it backs (QEMU's RSS), and its swap.

A guest page is *backed* once the guest has written it: QEMU's guest RAM is an anonymous mapping
populated on first touch, so a page the guest never touched costs the host nothing. A discarded page
(``ram_block_discard_range``: ``MADV_DONTNEED`` on private anonymous RAM; QEMU system/physmem.c) is
unbacked again and reads as zero until the guest touches it, when the host faults in a zero-filled
page. When backed pages exceed the host's RAM, the host swaps out pages by a second-chance clock over
the ``REFERENCED`` bit (an LRU approximation, as Linux's own reclaim is); touching a swapped page swaps
it back in, and each swap-in costs ``swapin_us`` of guest stall time.

>>> import numpy as np
>>> from labkit.model.pages import GuestMemory, Zone
>>> host = Host(ram=1 << 30)
>>> mem = GuestMemory(1024, [Zone("Normal", 0, 0, 1024)])
>>> vm = host.attach(mem, "vm0")
>>> host.touch(vm, np.arange(100))
>>> vm.rss_pages
100
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labkit.errors import HostOutOfMemory
from labkit.model.backing import LOG_MAX, RamBlock, RamDiscard, expand_faults, note_partial_unmap
from labkit.model.pages import GuestMemory, PageFlag
from labkit.units import PAGE_SHIFT, format_size

BACKED = np.uint8(PageFlag.BACKED)
SWAPPED = np.uint8(PageFlag.SWAPPED)
REFERENCED = np.uint8(PageFlag.REFERENCED)
DIRTY_LOG = np.uint8(PageFlag.DIRTY_LOG)
ZEROED = np.uint8(PageFlag.ZEROED)
NOT_ZEROED = ~ZEROED
NOT_SWAPPED = ~SWAPPED
NO_FLAGS = np.uint8(0)
KEPT_ON_DISCARD = ~(BACKED | SWAPPED | REFERENCED | ZEROED)  # a discarded page reads as a fresh zero page
CLOCK_WINDOW = 1 << 16  # pages the clock hand examines per step (a loop over windows, not pages)
RANGE_MIN = 1024  # touch(): from this many pages, check for one ascending run (a slice, no gather)


RUN_CHUNK = 1 << 16  # ascending_run() checks this many steps at a time, in fixed scratch
_steps = np.empty(RUN_CHUNK, dtype=np.int64)  # no fresh temporaries per call, and no scratch that
_unit = np.empty(RUN_CHUNK, dtype=bool)        # grows to the largest handle (1 TiB guests)


def ascending_run(pfns: np.ndarray) -> bool:
    """Is every PFN one more than the one before? (A loop over 64 Ki-page chunks, not pages.)"""
    last = len(pfns) - 1
    for lo in range(0, max(last, 0), RUN_CHUNK):
        hi = min(last, lo + RUN_CHUNK)
        steps = np.subtract(pfns[lo + 1:hi + 1], pfns[lo:hi], out=_steps[:hi - lo])
        if np.count_nonzero(np.not_equal(steps, 1, out=_unit[:hi - lo])):
            return False
    return True


@dataclass
class HostVM:
    """One VM as the host sees it: its guest memory and what the host did for it."""

    mem: GuestMemory
    name: str
    zero_fill_faults: int = 0
    swap_ins: int = 0
    swap_outs: int = 0
    discarded_pages: int = 0
    discarded_zeroed: int = 0  # of those, pages the guest had only zeroed (init_on_alloc) first
    dirty_logging: bool = False
    counters: dict = field(default_factory=dict)
    # the host side of the switches (labkit.model.backing): RAM blocks and their page sizes, QEMU's
    # RAM discard counters, why all RAM is pinned ("" if it is not), QEMU's stderr
    blocks: list[RamBlock] = field(default_factory=list)
    ram_discard: RamDiscard = field(default_factory=RamDiscard)
    pinned: str = ""
    mem_locked: bool = False  # -overcommit mem-lock=on: MADV_DONTNEED fails with EINVAL
    log: list[str] = field(default_factory=list)
    log_lines: int = 0
    private_skipped: int = 0  # pages a discard left alone: private memory of a confidential guest
    _granular: bool = False  # some block faults in more than 4 KiB at once
    large_pages: bool = False  # some block's host page is larger than 4 KiB (hugetlbfs, 64 KiB host)
    _unswappable: np.ndarray | None = None  # per page, when some memory can't be swapped
    _private: list[RamBlock] = field(default_factory=list)
    _warned: set = field(default_factory=set)

    def set_blocks(self, blocks: list[RamBlock]) -> None:
        """The VM's RAM blocks (QEMU creates them before any device): page sizes, THP, hugetlbfs,
        private memory. Pages outside every block (holes of the page index) stay 4 KiB anonymous."""
        self.blocks = list(blocks)
        self._granular = any(b.fault_pages > 1 for b in self.blocks)
        self.large_pages = any(b.page_pages > 1 for b in self.blocks)
        self._private = [b for b in self.blocks if b.backing.guest_memfd]
        for b in self.blocks:
            if not b.backing.swappable:
                self.set_unswappable(b.start, b.end)

    def set_unswappable(self, start: int = 0, end: int | None = None) -> None:
        """Pages [start, end) can't be swapped by the host (hugetlbfs, pinned, locked, private)."""
        if self._unswappable is None:
            self._unswappable = np.zeros(self.mem.n_pages, dtype=bool)
        self._unswappable[start:self.mem.n_pages if end is None else end] = True

    def report(self, text: str) -> None:
        """A line on QEMU's stderr (``error_report``/``warn_report``): kept up to LOG_MAX lines."""
        self.log_lines += 1
        if len(self.log) < LOG_MAX:
            self.log.append(text)

    def warn_once(self, key: str, text: str) -> None:
        """``warn_report_once``: the first time only."""
        if key not in self._warned:
            self._warned.add(key)
            self.report(f"qemu-system-x86_64: warning: {text}")

    @property
    def rss_pages(self) -> int:
        return self.mem.backed_pages

    @property
    def swap_pages(self) -> int:
        return self.mem.swapped_pages


class Host:
    """A host with ``ram`` bytes for guest memory and ``swap`` bytes of swap.

    ``discard=False`` is the model's host-wide switch for uncoordinated discards: the balloon's and
    free page reporting's RAM is never discarded (QEMU still acks their requests,
    hw/virtio/virtio-balloon.c ``virtio_balloon_inhibited``), while virtio-mem's coordinated
    discards still free memory (:meth:`discard`). The per-VM switches QEMU itself has (a vfio-pci
    device, a confidential guest, ``mem-lock``) live on each :class:`HostVM` (``ram_discard``,
    ``pinned``), set from the VM's command line.
    """

    def __init__(self, ram: int, swap: int = 0, *, discard: bool = True, swapin_us: float = 100.0,
                 thp: bool = False):
        if ram <= 0:
            raise ValueError(f"host ram must be positive, got {ram}")
        if swap < 0:
            raise ValueError(f"host swap must be >= 0, got {swap}")
        self.ram = ram
        self.swap = swap
        self.discard_enabled = discard
        self.swapin_us = swapin_us
        self.thp = thp  # transparent_hugepage/enabled is madvise or always (QEMU madvises guest RAM)
        self.vms: list[HostVM] = []
        self._hand_vm = 0
        self._hand_pfn = 0
        self.page_cache = None  # labkit.model.pagecache.HostPageCache, created on first use

    def attach(self, mem: GuestMemory, name: str) -> HostVM:
        vm = HostVM(mem, name)
        self.vms.append(vm)
        return vm

    def detach(self, vm: HostVM) -> None:
        if vm in self.vms:
            self.vms.remove(vm)
            self._hand_vm = 0

    # --- accounting ---------------------------------------------------------------------------
    @property
    def ram_pages(self) -> int:
        return self.ram >> PAGE_SHIFT

    @property
    def used_pages(self) -> int:
        cache = self.page_cache.host_pages if self.page_cache is not None else 0
        return sum(vm.rss_pages for vm in self.vms) + cache

    @property
    def swap_used_pages(self) -> int:
        return sum(vm.swap_pages for vm in self.vms)

    @property
    def free_pages(self) -> int:
        return self.ram_pages - self.used_pages

    # --- guest touches and discards -----------------------------------------------------------
    def touch(self, vm: HostVM, pfns: np.ndarray, run_start: int | None = None,
              zeroed: bool = False) -> None:
        """The guest wrote ``pfns`` (unique page numbers: a page listed twice would be counted
        twice): fault in what is not backed (swap-in or zero-fill).
        ``run_start``: the caller knows ``pfns`` is the run ``run_start, run_start + 1, ...``.
        ``zeroed``: all it wrote is zeros (``init_on_alloc``): the pages it faulted in for that get
        ``ZEROED`` (backed, holding nothing the guest wrote: discarding them returns nothing)."""
        n = len(pfns)
        if n == 0:
            return
        flags = vm.mem.flags
        if vm._granular:  # pages larger than 4 KiB, or THP: a fault backs the whole page
            pfns = expand_faults(vm.blocks, flags, np.asarray(pfns, dtype=np.int64), BACKED)
            n, run_start = len(pfns), None
        # one ascending run (most of a process's memory is): work on a view, no gather or scatter
        ranged = run_start is not None or (
            n >= RANGE_MIN and int(pfns[-1]) - int(pfns[0]) == n - 1 and ascending_run(pfns))
        f = flags[int(pfns[0]):int(pfns[0]) + n] if ranged else flags[pfns]
        backed = f & BACKED
        if zeroed:  # faulted in now, or earlier by zeroing and never written since
            only_zeros = (backed == 0) | ((f & ZEROED) != 0)
        n_missing = n - int(np.count_nonzero(backed))
        faulted = NO_FLAGS
        if n_missing:
            n_swapped = int(np.count_nonzero(f & SWAPPED))  # a swapped page is never also backed
            if self._make_room(n_missing, exclude=vm):
                # the clock hand may have aged or swapped out some of these pages: fault in only
                # the ones that were missing
                unbacked = backed == 0
                if not ranged:
                    f = flags[pfns]
                f[unbacked] = (f[unbacked] & NOT_SWAPPED) | BACKED
            else:  # backed pages carry no SWAPPED bit: clearing it everywhere touches only the others
                f &= NOT_SWAPPED
                faulted = BACKED
            vm.mem.backed_pages += n_missing
            vm.mem.swapped_pages -= n_swapped
            vm.swap_ins += n_swapped
            vm.zero_fill_faults += n_missing - n_swapped
        f &= NOT_ZEROED
        f |= faulted | ((REFERENCED | DIRTY_LOG) if vm.dirty_logging else REFERENCED)
        if zeroed:
            f[only_zeros] |= ZEROED
        if not ranged:
            flags[pfns] = f

    def discard(self, vm: HostVM, pfns: np.ndarray, chunk: int | None = None, *,
                coordinated: bool = False) -> int:
        """``ram_block_discard_range`` on ``pfns``: returns how many backed pages were freed.

        ``pfns`` covers whole host pages of their RAM blocks (the devices check alignment as QEMU's
        callers do); ``chunk``: pages per ``ram_block_discard_range`` call (the balloon makes one per
        4 KiB page; None: one call). Locked anonymous memory (``-overcommit mem-lock=on``) is not
        freed: ``MADV_DONTNEED`` fails with EINVAL and QEMU reports each call. Private memory of a
        confidential guest is not freed either (QEMU discards the shared mapping; the page lives in
        guest_memfd).

        The host-wide ``discard=False`` disables only *uncoordinated* discards (the balloon, free
        page reporting); a ``coordinated`` discard (virtio-mem, whose RamDiscardManager tells VFIO
        to unmap first: ``ram_block_coordinated_discard_require`` in hw/virtio/virtio-mem.c) still
        frees the memory."""
        if (not self.discard_enabled and not coordinated) or len(pfns) == 0:
            return 0
        flags = vm.mem.flags
        if vm.mem_locked and not any(b.backing.fd_backed for b in vm.blocks
                                     if b.start <= int(pfns[0]) < b.end):
            # mm/madvise.c madvise_dontneed_free_valid_vma: VM_LOCKED -> -EINVAL (a file-backed
            # block is punched with fallocate first, which works: not modelled as a failure)
            chunk = chunk or len(pfns)
            firsts = pfns[::chunk][:max(0, LOG_MAX - len(vm.log))]
            for pfn in firsts.tolist():
                block = next((b for b in vm.blocks if b.start <= pfn < b.end), None)
                name, base = (block.name or "pc.ram", block.start) if block is not None else ("pc.ram", 0)
                vm.report(f"qemu-system-x86_64: ram_block_discard_range: Failed to discard range "
                          f"{name}:{(pfn - base) << PAGE_SHIFT:x} +{chunk << PAGE_SHIFT:x} (-22)")
            vm.log_lines += -(-len(pfns) // chunk) - len(firsts)
            return 0
        if vm._private:
            keep = np.zeros(len(pfns), dtype=bool)
            for b in vm._private:
                keep |= (pfns >= b.start) & (pfns < b.end)
            vm.private_skipped += int(np.count_nonzero(keep))
            pfns = pfns[~keep]
            if len(pfns) == 0:
                return 0
        if vm._granular:
            note_partial_unmap(vm.blocks, flags, pfns, BACKED)
        f = flags[pfns]
        held = np.bincount(f & (BACKED | SWAPPED | ZEROED), minlength=71)  # one pass for all counts
        backed = int(held[BACKED] + held[BACKED | SWAPPED] + held[BACKED | ZEROED])
        swapped = int(held[SWAPPED] + held[BACKED | SWAPPED])
        flags[pfns] = f & KEPT_ON_DISCARD
        vm.mem.backed_pages -= backed
        vm.mem.swapped_pages -= swapped
        vm.discarded_pages += backed
        vm.discarded_zeroed += int(held[BACKED | ZEROED])
        return backed

    def stall_ms(self, vm: HostVM) -> float:
        """Guest time lost waiting for host swap-ins so far."""
        return vm.swap_ins * self.swapin_us / 1000.0

    # --- host reclaim -------------------------------------------------------------------------
    def _make_room(self, n: int, exclude: HostVM | None = None) -> bool:
        """Make room for ``n`` more backed pages; True if the host had to swap pages out."""
        need = n - self.free_pages
        if need <= 0:
            return False
        if self.page_cache is not None:  # clean page cache is dropped before anything is swapped
            need -= self.page_cache.shrink(need)
            if need <= 0:
                return False
        swap_free = (self.swap >> PAGE_SHIFT) - self.swap_used_pages
        if need > swap_free:
            raise HostOutOfMemory(
                f"host out of memory: {format_size(n << PAGE_SHIFT)} more needed with "
                f"{format_size(max(self.free_pages, 0) << PAGE_SHIFT)} RAM and "
                f"{format_size(swap_free << PAGE_SHIFT)} swap free (ram {format_size(self.ram)}, "
                f"swap {format_size(self.swap)})"
            )
        self._swap_out(need)
        return True

    def _swap_out(self, need: int) -> None:
        """Second-chance clock over every VM's backed pages, one window at a time."""
        total_pages = sum(vm.mem.n_pages for vm in self.vms)
        scanned = 0
        while need > 0 and scanned <= 2 * total_pages + CLOCK_WINDOW:
            vm = self.vms[self._hand_vm % len(self.vms)]
            start = self._hand_pfn
            end = min(start + CLOCK_WINDOW, vm.mem.n_pages)
            window = vm.mem.flags[start:end]
            backed = (window & BACKED) != 0
            if vm._unswappable is not None:  # hugetlbfs, pinned or private pages stay
                backed &= ~vm._unswappable[start:end]
            referenced = backed & ((window & REFERENCED) != 0)
            candidates = np.flatnonzero(backed & ~referenced)
            take = candidates[:need]
            if len(take) == need and need > 0:
                # the hand stops after the last page it took; referenced pages before it lose the bit
                stop = int(take[-1]) + 1
                window[:stop][referenced[:stop]] &= ~REFERENCED
                self._hand_pfn = start + stop
            else:
                window[referenced] &= ~REFERENCED
                self._hand_pfn = end
            pfns = take + start
            if vm._granular and len(pfns):
                note_partial_unmap(vm.blocks, vm.mem.flags, pfns, BACKED)
            vm.mem.flags[pfns] = (vm.mem.flags[pfns] & ~BACKED) | SWAPPED
            vm.mem.backed_pages -= len(pfns)
            vm.mem.swapped_pages += len(pfns)
            vm.swap_outs += len(pfns)
            need -= len(pfns)
            scanned += end - start
            if self._hand_pfn >= vm.mem.n_pages:
                self._hand_pfn = 0
                self._hand_vm = (self._hand_vm + 1) % len(self.vms)
        if need > 0:
            raise HostOutOfMemory(f"host could not find {need} pages to swap out")
