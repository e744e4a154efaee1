"""Guest workloads that keep writing memory, on the guest's own clock: what makes pre-copy work.

The model backend's guest ops, built with the migration engine (the live backend runs the same ops over its
serial shell):

* ``vm.guest("writer", handle=h, rate="200M", wss="256M")``: a background process writes random
  pages of the first ``wss`` bytes of anonymous (or shmem) handle ``h`` at ``rate`` bytes per second
  (sizes as everywhere: "200M" is 200 MiB/s), like Clark et al.'s "MMuncher". Seeded. ``rate=0`` or
  ``vm.guest("writer_stop", handle=h)`` stops it. Returns ``h``.
* ``vm.guest("kernel_build", jobs=4)``: a ``make -j4``-like mix: the source tree is read into the
  page cache, each job maps and writes an anonymous working set (compiler memory), keeps rewriting
  part of it, writes an object file (dirty page cache) and exits; writeback every 5 s. Returns an id
  for ``vm.guest("kernel_build_stop", build=id)``.

Both stop while the VM is stopped for the final stop-and-copy of a migration (the guest's time
stands still) and run ``1 - cpu-throttle-percentage`` as fast under auto-converge. Writes go
through the guest kernel (``Kernel.touch``): the host backs the page and, while a migration's dirty
logging is on, the page is dirty-logged.

The kernel build is a caricature with assumed sizes and rates (job memory 32-192 MiB, lifetime
0.4-1.6 s, 32 MiB/s of rewrites per job, objects 1/8 of the job's memory, the tree read at
64 MiB/s up to min(1 GiB, memory / 8)): enough to keep memory in use and churning during a migration,
not a measured trace.

>>> import labkit
>>> vm = labkit.open(memory="512M", seed=0)
>>> h = vm.guest("alloc", size="64M")
>>> vm.guest("writer", handle=h, rate="100M", wss="32M") == h
True
>>> vm.advance(1000)
>>> vm.migration.workloads.writers[h].bytes_written >= 99 << 20
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from labkit.model.kernel import Handle, Kernel
from labkit.model.pages import PageState
from labkit.model.workloads import GuestOps, new_handle
from labkit.units import MiB, PAGE_SIZE, format_size, parse_size

WRITER_TICK_MS = 10.0  # how often a writer's batch of writes lands (model resolution)
BUILD_TICK_MS = 50.0
WRITEBACK_MS = 5000.0  # dirty_writeback_centisecs = 500


@dataclass
class Writer:
    handle: int
    rate: float  # bytes per second
    wss_pages: int
    rng: np.random.Generator
    bytes_written: int = 0
    stopped: bool = False
    _carry: float = 0.0


@dataclass
class KernelBuild:
    id: int
    jobs: int
    rng: np.random.Generator
    tree_bytes: int
    source: Handle | None = None
    objects: Handle | None = None
    job_handles: set = field(default_factory=set)
    jobs_done: int = 0
    bytes_written: int = 0
    stopped: bool = False


class Workloads:
    """The writers and kernel builds of one VM (``vm.migration.workloads``): guest processes that
    run on the VM's clock (``migration`` gives the run state and the CPU throttle), allocate and
    free through ``ops`` and draw from a generator seeded with ``seed``."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, ops: GuestOps, migration, seed: int):
        self.env = env
        self.kernel = kernel
        self.ops = ops
        self.migration = migration
        self.seed = seed
        self.writers: dict[int, Writer] = {}
        self.builds: dict[int, KernelBuild] = {}
        self._started = 0
        migration.workloads = self

    def _rng(self) -> np.random.Generator:
        self._started += 1
        return np.random.default_rng([self.seed, 0x6D6967, self._started])

    def _sleep(self, ms: float):
        """Guest time: wait while the VM is stopped, and run slower under the CPU throttle."""
        yield from self.migration.wait_guest_running()
        yield self.env.timeout(ms / max(self.migration.speed, 0.01))
        yield from self.migration.wait_guest_running()

    def _write(self, pfns: np.ndarray) -> None:
        if len(pfns):
            self.kernel.touch(pfns)

    # --- the writer ---------------------------------------------------------------------------
    def writer(self, handle: int, rate: int | str, wss: int | str | None = None) -> int:
        h = self.ops._handle(handle)
        if h.kind not in ("anon", "shmem") or not h.alive:
            raise ValueError(f"writer needs a live anon or shmem handle, got handle {handle} "
                             f"({h.kind}{'' if h.alive else ', not alive'})")
        rate_bytes = parse_size(rate, name="rate")
        if rate_bytes < 0:
            raise ValueError(f"rate must be >= 0 bytes per second, got {rate!r}")
        resident = len(h.pages) * PAGE_SIZE
        wss_bytes = resident if wss is None else parse_size(wss, name="wss")
        if wss_bytes <= 0 or wss_bytes % PAGE_SIZE or wss_bytes > resident:
            raise ValueError(f"wss must be a positive multiple of 4 KiB up to the handle's "
                             f"{format_size(resident)}, got {wss!r}")
        old = self.writers.pop(handle, None)
        if old is not None:
            old.stopped = True
        if rate_bytes == 0:
            return handle
        w = Writer(handle, float(rate_bytes), wss_bytes // PAGE_SIZE, self._rng())
        self.writers[handle] = w
        self.env.process(self._run_writer(w, h))
        return handle

    def writer_stop(self, handle: int) -> int:
        if handle not in self.writers:
            raise ValueError(f"no writer runs on handle {handle!r}; writers: {sorted(self.writers)}")
        self.writers.pop(handle).stopped = True
        return handle

    def _run_writer(self, w: Writer, h: Handle):
        while not w.stopped:
            yield from self._sleep(WRITER_TICK_MS)
            if w.stopped or not h.alive:
                break
            w._carry += w.rate * WRITER_TICK_MS / 1000.0 / PAGE_SIZE
            n = int(w._carry)
            w._carry -= n
            if n:
                wss = h.pages[:w.wss_pages]
                self._write(wss[_uniform_indices(w.rng, len(wss), n)])
                w.bytes_written += n * PAGE_SIZE

    # --- the kernel build ---------------------------------------------------------------------
    def kernel_build(self, jobs: int = 4, tree: int | str | None = None) -> int:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 64:
            raise ValueError(f"jobs must be an int from 1 to 64, got {jobs!r}")
        memory = self.kernel.mem.n_pages * PAGE_SIZE
        tree_bytes = min(1 << 30, memory // 8) if tree is None else parse_size(tree, name="tree")
        if tree_bytes < 0 or tree_bytes > memory // 2:
            raise ValueError(f"tree must be between 0 and half the guest's memory, got {tree!r}")
        build = KernelBuild(len(self.builds) + 1, jobs, self._rng(), tree_bytes)
        build.source = new_handle(self.kernel, "file", np.zeros(0, np.int64), tree_bytes or PAGE_SIZE,
                                  name=f"kernel-build-{build.id} sources")
        build.objects = new_handle(self.kernel, "file", np.zeros(0, np.int64), PAGE_SIZE,
                                   name=f"kernel-build-{build.id} objects")
        self.builds[build.id] = build
        self.env.process(self._read_tree(build))
        self.env.process(self._writeback(build))
        for _ in range(jobs):
            self.env.process(self._job(build))
        return build.id

    def kernel_build_stop(self, build: int) -> int:
        if build not in self.builds:
            raise ValueError(f"no kernel build {build!r}; builds: {sorted(self.builds)}")
        b = self.builds.pop(build)
        b.stopped = True
        for handle in list(b.job_handles):
            if handle in self.kernel.handles:
                self.ops.free(handle)
        b.job_handles.clear()
        return build

    def _file_pages(self, h: Handle, n: int, state: PageState) -> int:
        pfns = self.kernel.alloc_pages(n, state)
        self._write(pfns)  # the host fills the page (DMA from disk, or the compiler's write)
        h.pages = np.concatenate([h.pages, pfns]) if len(h.pages) else pfns
        h.size = max(h.size, len(h.pages) * PAGE_SIZE)
        return len(pfns)

    def _read_tree(self, b: KernelBuild):
        per_tick = int(64 * MiB * BUILD_TICK_MS / 1000) // PAGE_SIZE
        while not b.stopped and len(b.source.pages) * PAGE_SIZE < b.tree_bytes:
            yield from self._sleep(BUILD_TICK_MS)
            left = b.tree_bytes // PAGE_SIZE - len(b.source.pages)
            if not b.stopped and left > 0:
                self._file_pages(b.source, min(per_tick, left), PageState.FILE_CLEAN)

    def _writeback(self, b: KernelBuild):
        while not b.stopped:
            yield from self._sleep(WRITEBACK_MS)
            self.ops.sync()

    def _job(self, b: KernelBuild):
        memory = self.kernel.mem.n_pages * PAGE_SIZE
        while not b.stopped:
            size = int(b.rng.uniform(32, 192) * MiB) // PAGE_SIZE * PAGE_SIZE
            size = max(PAGE_SIZE, min(size, memory // 32 // PAGE_SIZE * PAGE_SIZE))
            life_ms = float(b.rng.uniform(400, 1600))
            handle = self.ops.alloc(size, "anon")  # maps and writes its memory
            b.job_handles.add(handle)
            b.bytes_written += size
            h = self.kernel.handles.get(handle)
            rewrites = int(32 * MiB * BUILD_TICK_MS / 1000) // PAGE_SIZE
            for _ in range(int(life_ms // BUILD_TICK_MS)):
                yield from self._sleep(BUILD_TICK_MS)
                if b.stopped or h is None or not h.alive:
                    break
                self._write(h.pages[_uniform_indices(b.rng, len(h.pages), rewrites)])
                b.bytes_written += rewrites * PAGE_SIZE
            if b.stopped:
                break
            if h is not None and h.alive:
                obj = max(1, len(h.pages) // 8)
                b.bytes_written += self._file_pages(b.objects, obj, PageState.FILE_DIRTY) * PAGE_SIZE
                self.ops.free(handle)
            b.job_handles.discard(handle)
            b.jobs_done += 1


def _uniform_indices(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """``n`` indices drawn uniformly from ``range(size)`` (with replacement; faster than
    ``rng.integers`` for the small batches of a tick)."""
    return (rng.random(n) * size).astype(np.int64)

