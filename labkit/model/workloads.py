"""What runs inside the guest: boot, and the workload steps ``vm.guest(op, ...)`` performs.

Every step is seeded and goes through the kernel's allocator, so fragmentation, reclaim and reuse come
out of the same code the mechanisms use. The ops and their meaning (the live backend does the same
inside a real guest over its serial shell):

* ``alloc(size, kind)``: ``anon`` maps and populates memory (like ``memhog``: every page is written,
  so the host backs it); ``shmem`` writes a tmpfs file; ``file`` reads a file into the page cache
  (``dirty=True`` writes it instead); ``slab`` makes the kernel allocate unmovable memory (what
  walking a large directory tree does to the dentry and inode caches). Returns a handle.
* ``touch(handle)``: write every page again (file: re-read what reclaim dropped; ``write=True`` dirties).
* ``free(handle)``: the process exits / the file is removed; its pages go back to the buddy allocator.
* ``drop_caches``: ``echo 3 > /proc/sys/vm/drop_caches``: clean page cache is freed.
* ``sync``: dirty page cache is written back and becomes clean.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from labkit.model.kernel import Handle, Kernel
from labkit.model.pages import STRUCT_PAGE_SIZE, GuestMemory, PageState
from labkit.units import MiB, PAGE_SIZE, format_size

INIT_ANON = 4 * MiB  # pid 1's own memory: the OOM killer never chooses init
ALLOC_CHUNK_PAGES = 1 << 18  # alloc() populates at most 1 GiB at a time (bounded temporaries)
# "slab": unmovable kernel memory a workload makes the kernel allocate (dentries, inodes, page
# tables): it lands wherever the unmovable allocation finds room, and pins that memory block
KINDS = {"anon": PageState.ANON, "shmem": PageState.SHMEM, "file": PageState.FILE_CLEAN,
         "slab": PageState.KERNEL}


@dataclass(frozen=True)
class BootProfile:
    """What a freshly booted guest holds, in bytes (defaults: a small Debian cloud guest).

    ``kernel_image``: text, data and bss (memblock-reserved); memmap costs ``STRUCT_PAGE_SIZE`` (64 B)
    per 4 KiB page, reserved at the top of each node; ``slab`` is unmovable kernel memory (a fixed part
    plus a share of RAM); ``page_cache`` is what booting read from disk; ``anon`` is init and daemons.
    """

    kernel_image: int = 32 * MiB
    slab_fixed: int = 24 * MiB
    slab_per_gib: int = 5 * MiB
    page_cache: int = 160 * MiB
    anon: int = 64 * MiB
    churn: float = 0.3  # share of boot-time allocations that were transient and freed again

    @staticmethod
    def minimal() -> BootProfile:
        """A busybox initramfs guest, as the live backend boots."""
        return BootProfile(kernel_image=16 * MiB, slab_fixed=8 * MiB, slab_per_gib=2 * MiB,
                           page_cache=8 * MiB, anon=4 * MiB, churn=0.1)


def reserve_boot_memory(mem: GuestMemory, profile: BootProfile) -> None:
    """memblock reservations: the kernel image low in node 0, each node's memmap at its top."""
    image = min(profile.kernel_image // PAGE_SIZE, mem.n_pages // 8)
    mem.set_range_state(256, 256 + image, PageState.RESERVED)  # loaded at 1 MiB
    for node in mem.nodes:
        boot = [z for z in mem.zones if z.node == node and z.end <= mem.boot_pages]
        if not boot:
            continue
        start, end = min(z.start for z in boot), max(z.end for z in boot)
        memmap = -(-(end - start) * STRUCT_PAGE_SIZE // PAGE_SIZE)
        mem.set_range_state(end - memmap, end, PageState.RESERVED)


def boot(kernel: Kernel, rng: np.random.Generator, profile: BootProfile) -> None:
    """Boot: reserve memory, then interleave slab, page cache and anon allocations in seeded chunks,
    and free the transient share again, leaving boot-time fragmentation behind."""
    mem = kernel.mem
    reserve_boot_memory(mem, profile)
    # init_per_zone_wmark_min runs once memblock has handed the rest to the buddy allocator:
    # watermarks come from managed pages, not the zones' spans
    kernel.recompute_watermarks()
    gib = mem.boot_pages * PAGE_SIZE / (1 << 30)  # hot-pluggable regions are not there yet
    budget = {
        "kernel": int((profile.slab_fixed + profile.slab_per_gib * gib) // PAGE_SIZE),
        "file": profile.page_cache // PAGE_SIZE,
        "anon": profile.anon // PAGE_SIZE,
    }
    free_now = kernel.mem.count(PageState.FREE)
    scale = min(1.0, 0.5 * free_now / max(1, sum(budget.values())))
    budget = {k: int(v * scale) for k, v in budget.items()}
    kept = {"kernel": [], "file": [], "anon": []}
    transient = []
    left = dict(budget)
    while any(v > 0 for v in left.values()):
        kinds = [k for k, v in left.items() if v > 0]
        kind = kinds[int(rng.integers(len(kinds)))]
        n = int(min(left[kind], rng.integers(8, 512)))
        state = {"kernel": PageState.KERNEL, "file": PageState.FILE_CLEAN, "anon": PageState.ANON}[kind]
        pfns = kernel.alloc_pages(n, state, movable=kind != "kernel")
        kernel.touch(pfns)
        left[kind] -= n
        if kind != "kernel" and rng.random() < profile.churn:
            transient.append(pfns)
        else:
            kept[kind].append(pfns)
    for pfns in transient:
        kernel.free_pages(pfns)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    new_handle(kernel, "kernel", cat(kept["kernel"]), 0, name="kernel", killable=False)
    new_handle(kernel, "file", cat(kept["file"]), 0, name="boot page cache")
    anon = cat(kept["anon"])
    init_pages = min(len(anon), INIT_ANON // PAGE_SIZE)
    new_handle(kernel, "anon", anon[:init_pages], 0, name="init", killable=False)
    if len(anon) > init_pages:  # journald, udevd, sshd...: what the OOM killer can choose
        new_handle(kernel, "anon", anon[init_pages:], 0, name="daemons")


def new_handle(kernel: Kernel, kind: str, pfns: np.ndarray, size: int, *, name: str = "",
               killable: bool = True) -> Handle:
    h = Handle(kernel._next_handle, kind, size or len(pfns) * PAGE_SIZE, pfns, name=name,
               killable=killable, created_ms=kernel.clock())
    kernel.handles[h.id] = h
    kernel._next_handle += 1
    return h


class GuestOps:
    """The workload steps of ``Backend.guest(op, ...)`` on the model."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def _handle(self, handle: int) -> Handle:
        # numpy integers are handles too (a handle read out of an array); bools are not
        if isinstance(handle, numbers.Integral) and not isinstance(handle, bool | np.bool_):
            handle = int(handle)
        h = self.kernel.handles.get(handle) if isinstance(handle, int) else None
        if h is None or h.name in ("kernel",):
            user = [i for i, x in self.kernel.handles.items() if x.alive and x.kind != "kernel"]
            raise ValueError(f"handle {handle!r} does not exist; live handles are {user}")
        return h

    def alloc(self, size: int, kind: str = "anon", *, node: int | None = None,
              dirty: bool = False) -> int:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {sorted(KINDS)}")
        if node is not None and node not in self.kernel.mem.nodes:
            raise ValueError(f"node {node!r} does not exist; nodes are {self.kernel.mem.nodes}")
        total = self.kernel.mem.n_pages * PAGE_SIZE
        if size <= 0 or size % PAGE_SIZE or size > total:
            raise ValueError(f"size must be a positive multiple of 4 KiB up to the guest's "
                             f"{format_size(total)}, got {size}")
        state = PageState.FILE_DIRTY if (kind == "file" and dirty) else KINDS[kind]
        h = new_handle(self.kernel, kind, np.zeros(0, np.int64), size, name=f"{kind}-{size}")
        n = size // PAGE_SIZE
        # When memory is tight, populate 1 MiB at a time as a faulting process does, so the OOM
        # killer can choose the growing process itself (it is the largest).
        movable = kind != "slab"
        zones = self.kernel.zonelist(movable, node)
        headroom = sum(self.kernel.zone_free(z) - self.kernel.watermarks[z].low for z in zones)
        # A large allocation goes in chunks of ALLOC_CHUNK_PAGES: the allocator's and the host's
        # temporaries (~26 bytes a page) stay bounded; only the handle's page list (8 bytes a
        # page) grows with the size. A faulting process populates its memory piece by piece too.
        step = min(n, ALLOC_CHUNK_PAGES) if headroom >= n else 256
        done = 0
        held = None  # h.pages grows in place in here (the OOM killer reads it as it grows)
        while done < n:
            pfns = self.kernel.alloc_pages(min(step, n - done), state, movable=movable, node=node)
            if not h.alive:  # the OOM killer chose this process: its pages are gone
                self.kernel.free_pages(pfns)
                break
            self.kernel.touch(pfns)
            have = len(h.pages)
            if have == 0 and len(pfns) == n:
                h.pages = pfns
            else:
                if held is None or h.pages.base is not held:  # reclaim may take from this file
                    start, held = h.pages, np.empty(n, dtype=np.int64)  # have <= done: room for all
                    held[:have] = start
                held[have:have + len(pfns)] = pfns
                h.pages = held[:have + len(pfns)]
            done += len(pfns)
        if kind in ("anon", "shmem"):
            self.kernel.vmstat.pgfault += done
        return h.id

    def touch(self, handle: int, *, write: bool = True) -> None:
        h = self._handle(handle)
        if not h.alive:
            raise ValueError(f"handle {handle} was killed by the OOM killer or freed")
        if h.kind == "file":
            missing = h.size // PAGE_SIZE - len(h.pages)
            if missing > 0:
                state = PageState.FILE_DIRTY if write else PageState.FILE_CLEAN
                # allocate first: reclaim inside alloc_pages may take pages from this very file
                fresh = self.kernel.alloc_pages(missing, state)
                h.pages = np.concatenate([h.pages, fresh])
                self.kernel.vmstat.pgmajfault += missing
            if write:
                self.kernel.mem.set_state(h.pages, PageState.FILE_DIRTY)
        self.kernel.touch(h.pages, run_start=h.run_start())

    def free(self, handle: int) -> None:
        h = self._handle(handle)
        if h.kind == "kernel" or not h.killable:
            raise ValueError(f"handle {handle} belongs to the guest's own {h.name}; not freeable")
        pages, h.pages, h.alive = h.pages, np.zeros(0, np.int64), False
        self.kernel.free_pages(pages)
        del self.kernel.handles[h.id]

    def drop_caches(self) -> int:
        """Free clean page cache; returns pages freed."""
        freed = 0
        for h in self.kernel.handles.values():
            if h.kind != "file" or len(h.pages) == 0:
                continue
            clean = self.kernel.mem.state[h.pages] == int(PageState.FILE_CLEAN)
            victims = h.pages[clean]
            h.pages = h.pages[~clean]
            self.kernel.free_pages(victims)
            freed += len(victims)
        return freed

    def sync(self) -> int:
        """Write back dirty page cache; returns pages written."""
        dirty = self.kernel.mem.pages_in(PageState.FILE_DIRTY)
        self.kernel.mem.set_state(dirty, PageState.FILE_CLEAN)
        self.kernel.vmstat.pgwriteback += len(dirty)
        return len(dirty)
