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
from labkit.model.pages import GuestMemory, PageFlag, PageState
from labkit.model.reservations import LIVE_INITRD_BYTES, ReservationPlan
from labkit.units import MiB, PAGE_SIZE, format_size

INIT_ANON = 4 * MiB  # pid 1's own memory: the OOM killer never chooses init
ALLOC_CHUNK_PAGES = 1 << 18  # alloc() populates at most 1 GiB at a time (bounded temporaries)
# "slab": unmovable kernel memory a workload makes the kernel allocate (dentries, inodes, page
# tables): it lands wherever the unmovable allocation finds room, and pins that memory block
KINDS = {"anon": PageState.ANON, "shmem": PageState.SHMEM, "file": PageState.FILE_CLEAN,
         "slab": PageState.KERNEL}


@dataclass(frozen=True)
class BootProfile:
    """What a freshly booted guest holds besides memblock's reservations, in bytes.

    ``slab_fixed`` + ``slab_per_gib`` x GiB is the unmovable kernel memory after boot (slab, kernel
    stacks, page tables, vmalloc'd module memory), ``slab_reclaimable`` of it counts as SReclaimable;
    ``slab_per_op``: what each workload step leaves in the dentry and inode caches (on the live
    backend every step is a process the shell starts: measured 44 kB);
    ``shmem`` is what the initramfs unpacked into its tmpfs root; ``page_cache`` what booting read
    from disk; ``anon`` init and daemons; ``initrd`` the initramfs QEMU loaded (freed once unpacked).
    Defaults: a small Debian cloud guest (systemd, booted from disk); :meth:`minimal` is the live
    backend's busybox guest, measured (1 GiB: Slab 16 MiB, MemFree 933 MiB of 973 MiB).
    """

    slab_fixed: int = 24 * MiB
    slab_per_gib: int = 5 * MiB
    slab_reclaimable: int = 9 * MiB
    shmem: int = 0
    page_cache: int = 160 * MiB
    anon: int = 64 * MiB
    initrd: int = 28 * MiB
    churn: float = 0.3  # share of boot-time allocations that were transient and freed again
    slab_per_op: int = 0

    @staticmethod
    def minimal() -> BootProfile:
        """The live backend's busybox initramfs guest, as measured at 512 MiB - 6 GiB: unmovable
        kernel memory 24.4 MiB + 1.3 MiB per GiB, SReclaimable 8.8 MiB, the unpacked initramfs
        3.6 MiB of shmem, 0.2 MiB of anon, its initramfs (3824 kB)."""
        return BootProfile(slab_fixed=24_937 << 10, slab_per_gib=1_335 << 10, slab_reclaimable=9_028 << 10,
                           shmem=3_716 << 10, page_cache=0, anon=176 << 10, initrd=LIVE_INITRD_BYTES,
                           churn=0.1, slab_per_op=44 << 10)


def reserve_boot_memory(mem: GuestMemory, plan: ReservationPlan) -> list[tuple[int, int]]:
    """memblock's reservations (:mod:`labkit.model.reservations`): RESERVED pages (the late ones
    too, until :func:`free_late_reservations`), ABSENT holes. Returns the late ranges."""
    late = []
    for a, b, _, kind in plan.ranges:
        mem.set_range_state(a, b, PageState.ABSENT if kind == "absent" else PageState.RESERVED)
        if kind == "late":
            late.append((a, b))
    return late


def boot(kernel: Kernel, rng: np.random.Generator, profile: BootProfile,
         plan: ReservationPlan | None = None) -> None:
    """Boot as the kernel does: memblock reservations; the watermarks (``init_per_zone_wmark_min``,
    then THP's ``hugepage_init``) while the late reservations are still held; the kernel's own
    allocations and the unpacked initramfs; the initramfs and ``__init`` freed (through the per-CPU
    lists, as ``free_reserved_area`` frees); then user space: seeded chunks of page cache and anon,
    a share of them transient and freed again, leaving boot-time fragmentation behind."""
    mem = kernel.mem
    if plan is None:
        from labkit.model.layout import q35_layout
        from labkit.model.reservations import plan_reservations

        plan = plan_reservations(q35_layout(mem.boot_pages * PAGE_SIZE), len(mem.nodes),
                                 kernel.params.nr_cpus, 0, initrd_bytes=profile.initrd)
    late = reserve_boot_memory(mem, plan)
    for a, b, _, kind in plan.ranges:  # bss, swiotlb: written, but with zeros
        if kind == "zeroed":
            kernel.touch(np.arange(a, b, dtype=np.int64), run_start=a, zeroed=True)
    reserved = mem.pages_in(PageState.RESERVED, 0, mem.boot_pages)
    written = reserved[(mem.flags[reserved] & PageFlag.ZEROED) == 0]
    kernel.touch(written)  # loaded (image, initramfs) or written at boot (memmap)
    kernel.boot_watermarks()
    gib = mem.boot_pages * PAGE_SIZE / (1 << 30)  # hot-pluggable regions are not there yet
    slab = int((profile.slab_fixed + profile.slab_per_gib * gib) // PAGE_SIZE)
    free_now = kernel.mem.count(PageState.FREE)
    scale = min(1.0, 0.5 * free_now / max(1, slab + (profile.page_cache + profile.anon
                                                      + profile.shmem) // PAGE_SIZE))
    kernel.slab_per_op_pages = -(-profile.slab_per_op // PAGE_SIZE)
    kernel_pages = kernel.alloc_pages(int(slab * scale), PageState.KERNEL, movable=False)
    kernel.touch(kernel_pages)
    kernel.slab_reclaimable = min(len(kernel_pages), int(profile.slab_reclaimable * scale) // PAGE_SIZE)
    rootfs = kernel.alloc_pages(int(profile.shmem * scale) // PAGE_SIZE, PageState.SHMEM)
    kernel.touch(rootfs)
    for a, b in late:  # free_initrd_mem, free_initmem: free_reserved_area -> free_reserved_page
        kernel.free_pages(np.arange(a, b, dtype=np.int64), was=PageState.RESERVED)
    if kernel.params.min_free_kbytes is not None:  # sysctl.vm.min_free_kbytes: do_sysctl_args
        kernel.set_min_free_kbytes(kernel.params.min_free_kbytes)
    budget = {"file": int(profile.page_cache * scale) // PAGE_SIZE,
              "anon": int(profile.anon * scale) // PAGE_SIZE}
    kept: dict[str, list[np.ndarray]] = {"file": [], "anon": []}
    transient = []
    left = dict(budget)
    while any(v > 0 for v in left.values()):
        kinds = [k for k, v in left.items() if v > 0]
        kind = kinds[int(rng.integers(len(kinds)))]
        n = int(min(left[kind], rng.integers(8, 512)))
        state = {"file": PageState.FILE_CLEAN, "anon": PageState.ANON}[kind]
        pfns = kernel.alloc_pages(n, state)
        kernel.touch(pfns)
        left[kind] -= n
        if rng.random() < profile.churn:
            transient.append(pfns)
        else:
            kept[kind].append(pfns)
    for pfns in transient:
        kernel.free_pages(pfns)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    new_handle(kernel, "kernel", kernel_pages, 0, name="kernel", killable=False)
    if len(rootfs):
        new_handle(kernel, "shmem", rootfs, 0, name="rootfs", killable=False)
    new_handle(kernel, "file", cat(kept["file"]), 0, name="boot page cache")
    anon = cat(kept["anon"])
    init_pages = min(len(anon), INIT_ANON // PAGE_SIZE)
    new_handle(kernel, "anon", anon[:init_pages], 0, name="init", killable=False)
    if len(anon) > init_pages:  # journald, udevd, sshd...: what the OOM killer can choose
        new_handle(kernel, "anon", anon[init_pages:], 0, name="daemons")


def new_handle(kernel: Kernel, kind: str, pfns: np.ndarray, size: int, *, name: str = "",
               killable: bool = True) -> Handle:
    return kernel.new_handle(kind, pfns, size, name=name, killable=killable)


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
        self.kernel.process_slab()
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
            chunk = min(step, n - done)
            # the page tables (or page cache xarray nodes) its pages need, unmovable
            self.kernel.grow_overhead(h, done + chunk, node)
            pfns = self.kernel.alloc_pages(chunk, state, movable=movable, node=node)
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
                self.kernel.grow_overhead(h, len(h.pages) + missing)
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
        self.kernel.release_overhead(h)
        self.kernel.exit_mm()  # the process that held (or removed) it exits
        self.kernel.process_slab()
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
            self.kernel.trim_overhead(h)
            freed += len(victims)
        return freed

    def sync(self) -> int:
        """Write back dirty page cache; returns pages written."""
        dirty = self.kernel.mem.pages_in(PageState.FILE_DIRTY)
        self.kernel.mem.set_state(dirty, PageState.FILE_CLEAN)
        self.kernel.vmstat.pgwriteback += len(dirty)
        return len(dirty)
