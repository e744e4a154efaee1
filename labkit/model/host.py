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

    @property
    def rss_pages(self) -> int:
        return self.mem.backed_pages

    @property
    def swap_pages(self) -> int:
        return self.mem.swapped_pages


class Host:
    """A host with ``ram`` bytes for guest memory and ``swap`` bytes of swap.

    ``discard=False`` models a host where RAM discard is disabled, as when a vfio-pci device is
    assigned (``ram_block_uncoordinated_discard_disable``): QEMU still acks balloon and reporting
    requests, but frees nothing (hw/virtio/virtio-balloon.c ``virtio_balloon_inhibited``);
    virtio-mem's coordinated discards still free memory (:meth:`discard`).
    """

    def __init__(self, ram: int, swap: int = 0, *, discard: bool = True, swapin_us: float = 100.0):
        if ram <= 0:
            raise ValueError(f"host ram must be positive, got {ram}")
        if swap < 0:
            raise ValueError(f"host swap must be >= 0, got {swap}")
        self.ram = ram
        self.swap = swap
        self.discard_enabled = discard
        self.swapin_us = swapin_us
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

    def discard(self, vm: HostVM, pfns: np.ndarray, *, coordinated: bool = False) -> int:
        """``ram_block_discard_range`` on ``pfns``: returns how many backed pages were freed.

        ``discard=False`` on the host stands for VFIO, which disables only *uncoordinated*
        discards (the balloon, free page reporting); a ``coordinated`` discard (virtio-mem, whose
        RamDiscardManager tells VFIO to unmap first: ``ram_block_coordinated_discard_require`` in
        hw/virtio/virtio-mem.c) still frees the memory."""
        if (not self.discard_enabled and not coordinated) or len(pfns) == 0:
            return 0
        flags = vm.mem.flags
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
