"""The host's page cache for the image files its VMs use, and what a host crash does to it.

One :class:`HostPageCache` per :class:`~labkit.model.host.Host` (``host.page_cache``, created on
first use by :func:`host_page_cache`), keyed by the file's resolved path and shared by every VM on
that host that maps or reads the same file: virtio-pmem's DAX window *is* these pages
(``memory-backend-file,share=on`` maps the file ``MAP_SHARED``), and virtio-blk with ``cache.direct``
off reads and writes through them. One uint8 per 4 KiB page of the file (:class:`FilePage`):

* ``NOT_CACHED``: on disk only; ``CLEAN``: cached, same as the disk; ``DIRTY``: cached, newer than
  the disk; ``WB_ERROR``: cached and looks clean, but its writeback failed, so the disk is stale.
  Linux marks pages clean after a failed writeback and reports the error once, to the next fsync
  (errseq, since 4.13; the 2018 "fsyncgate" discussion): a second fsync returns 0 though the data
  never reached the disk (general knowledge, **UNCONFIRMED** in a file read for labkit).
* Cached pages count as used host RAM (``host.free_pages``, ``host_free`` in ``vm.sample()``);
  when the host needs RAM, clean cached pages go before any guest page is swapped (the host's LRU
  is simplified to: least recently used *file* first, lowest offset first).
* The host is Linux too: its flusher writes back a file (an inode) whose first dirtying is older
  than ``dirty_expire_centisecs`` (3000) every ``dirty_writeback_centisecs`` (500), the
  mm/page-writeback.c defaults. The host has no clock of its own: each VM that uses a file runs the
  host flusher on its own simulated clock (:meth:`HostPageCache.writeback_expired` is idempotent),
  so VMs sharing a host should be advanced in lockstep, as the scenarios do.
* ``fsync`` writes the file's dirty pages and costs ``fsync_latency_ms`` plus the bytes at
  ``disk_write_bytes_per_s`` (model assumptions, not measurements). An injected failure
  (:meth:`CachedFile.inject_fsync_error`) turns the pages it was writing into ``WB_ERROR``.
* :meth:`HostPageCache.crash` (the host loses power): every ``DIRTY`` and ``WB_ERROR`` page's last
  write is lost (``CachedFile.lost``), and the whole cache is gone.

>>> import os, tempfile
>>> from labkit.model.host import Host
>>> host = Host(ram=1 << 30)
>>> cache = host_page_cache(host)
>>> d = tempfile.TemporaryDirectory()
>>> path = os.path.join(d.name, "disk.img")
>>> with open(path, "wb") as f:
...     _ = f.truncate(64 << 20)     # a sparse 64 MiB image: only stat()ed, never read
>>> image = cache.open(path)
>>> cache.read(image, 0, 256, now=0.0)   # 1 MiB through the host page cache: (hits, disk reads)
(0, 256)
>>> cache.write(image, 0, 16, now=0.0)   # 16 pages dirtied, none newly cached
0
>>> image.counts()["dirty"], host.free_pages == (1 << 18) - 256
(16, True)
>>> cache.crash()[image.path]            # the host loses power: the dirty pages' data is lost
16
>>> d.cleanup()
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass, field

import numpy as np

from labkit.units import MiB, PAGE_SIZE

# mm/page-writeback.c defaults, the same sysctls on the host and in the guest
DIRTY_WRITEBACK_CENTISECS = 500  # dirty_writeback_interval: the flusher wakes every 5 s
DIRTY_EXPIRE_CENTISECS = 3000  # dirty_expire_interval: data older than 30 s is written back
DIRTY_BACKGROUND_RATIO = 10  # dirty_background_ratio: % of dirtyable memory, background writeback
VM_DIRTY_RATIO = 20  # vm_dirty_ratio: writers are throttled above it (not modelled)
# model assumptions for the host's disk (not QEMU or Linux facts)
DISK_READ_BYTES_PER_S = 500 * MiB
DISK_WRITE_BYTES_PER_S = 300 * MiB
FSYNC_LATENCY_MS = 2.0  # one device cache flush
COPY_US_PER_PAGE = 1.0  # a host page cache hit: one 4 KiB copy (or a minor fault for DAX)


class FilePage(enum.IntEnum):
    """State of one 4 KiB page of a file in the host page cache."""

    NOT_CACHED = 0
    CLEAN = 1
    DIRTY = 2
    WB_ERROR = 3  # cached, marked clean after a failed writeback: the disk has older data


PAGE_STATE_NAMES = ("not_cached", "clean", "dirty", "wb_error")


@dataclass
class CachedFile:
    """One file in the host page cache: its pages' states and what was lost in a crash."""

    path: str
    size: int  # bytes, from stat()
    state: np.ndarray = field(repr=False)  # uint8 FilePage per page
    lost: np.ndarray = field(repr=False)  # bool: the disk holds older data than the last write
    dirtied_when: float | None = None  # inode->dirtied_when of the host's inode (ms), None: clean
    last_used: float = 0.0
    fsync_errors_to_inject: int = 0
    stats: dict = field(default_factory=lambda: {
        "disk_reads": 0, "cache_hits": 0, "writes": 0, "written_back": 0, "fsyncs": 0,
        "fsync_errors": 0, "lost_pages": 0})

    @property
    def n_pages(self) -> int:
        return len(self.state)

    def counts(self) -> dict[str, int]:
        """Pages per :class:`FilePage` state, by lowercase name."""
        c = np.bincount(self.state, minlength=len(FilePage))
        return {name: int(n) for name, n in zip(PAGE_STATE_NAMES, c, strict=True)}

    def cached_pages(self) -> int:
        return int(np.count_nonzero(self.state))

    def inject_fsync_error(self, count: int = 1) -> None:
        """Make the next ``count`` writebacks of this file fail with EIO (a disk error)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        self.fsync_errors_to_inject = count

    def check_range(self, first: int, n: int) -> None:
        if first < 0 or n < 0 or first + n > self.n_pages:
            raise ValueError(f"pages [{first}, {first + n}) are outside {self.path} "
                             f"({self.n_pages} pages of 4 KiB)")


class HostPageCache:
    """The host's page cache of image files (see the module docstring)."""

    def __init__(self, host):
        self.host = host
        self.files: dict[str, CachedFile] = {}
        self.private: dict[str, np.ndarray] = {}  # MAP_PRIVATE copies (share=off), per owner
        self.dirty_writeback_centisecs = DIRTY_WRITEBACK_CENTISECS
        self.dirty_expire_centisecs = DIRTY_EXPIRE_CENTISECS
        self.disk_read_bytes_per_s = DISK_READ_BYTES_PER_S
        self.disk_write_bytes_per_s = DISK_WRITE_BYTES_PER_S
        self.fsync_latency_ms = FSYNC_LATENCY_MS
        self.crashes = 0
        self._protect: tuple[CachedFile, int, int] | None = None

    # --- files --------------------------------------------------------------------------------
    def open(self, path: str, min_size: int = 0) -> CachedFile:
        """The cache entry of ``path`` (stat()ed; never read). Raises OSError as open(2) would."""
        real = os.path.realpath(path)
        st = os.stat(real)  # FileNotFoundError, PermissionError...
        if not os.path.isfile(real):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not os.access(real, os.R_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        n = -(-max(st.st_size, min_size) // PAGE_SIZE)
        f = self.files.get(real)
        if f is None:
            f = CachedFile(real, st.st_size, np.zeros(n, np.uint8), np.zeros(n, bool))
            self.files[real] = f
        elif n > f.n_pages:  # the file grew since: more pages to track
            f.state = np.concatenate([f.state, np.zeros(n - f.n_pages, np.uint8)])
            f.lost = np.concatenate([f.lost, np.zeros(n - f.n_pages, bool)])
            f.size = st.st_size
        return f

    # --- accounting ---------------------------------------------------------------------------
    @property
    def cached_pages(self) -> int:
        return sum(f.cached_pages() for f in self.files.values())

    @property
    def dirty_pages(self) -> int:
        return sum(int(np.count_nonzero(f.state == FilePage.DIRTY)) for f in self.files.values())

    @property
    def private_pages(self) -> int:
        return sum(int(np.count_nonzero(p)) for p in self.private.values())

    @property
    def host_pages(self) -> int:
        """Host RAM this cache holds: cached file pages plus MAP_PRIVATE copies."""
        return self.cached_pages + self.private_pages

    def _reserve(self, f: CachedFile, first: int, n: int, n_new: int) -> None:
        """Find host RAM for ``n_new`` more pages (clean cache first, then swap; may raise
        HostOutOfMemory), keeping the whole window [first, first + n) of ``f`` out of the
        eviction: the access is about to use every page of it, cached or not."""
        if n_new <= 0 or n_new <= self.host.free_pages:
            return
        self._protect = (f, first, first + n)
        try:
            self.host._make_room(n_new)
        finally:
            self._protect = None

    # --- access -------------------------------------------------------------------------------
    def read(self, f: CachedFile, first: int, n: int, now: float) -> tuple[int, int]:
        """A buffered read of pages [first, first + n): returns (cache hits, disk reads)."""
        f.check_range(first, n)
        window = f.state[first:first + n]
        misses = int(np.count_nonzero(window == FilePage.NOT_CACHED))
        self._reserve(f, first, n, misses)
        window = f.state[first:first + n]
        window[window == FilePage.NOT_CACHED] = FilePage.CLEAN
        f.last_used = now
        f.stats["disk_reads"] += misses
        f.stats["cache_hits"] += n - misses
        return n - misses, misses

    def write(self, f: CachedFile, first: int, n: int, now: float) -> int:
        """A buffered write (or a DAX store) of whole pages: they become DIRTY; returns how many
        were not cached before."""
        f.check_range(first, n)
        window = f.state[first:first + n]
        new = int(np.count_nonzero(window == FilePage.NOT_CACHED))
        self._reserve(f, first, n, new)
        f.state[first:first + n] = FilePage.DIRTY
        if f.dirtied_when is None:  # __mark_inode_dirty: the inode's first dirtying time
            f.dirtied_when = now
        f.last_used = now
        f.stats["writes"] += n
        return new

    def direct_write(self, f: CachedFile, first: int, n: int, now: float) -> None:
        """An O_DIRECT write (``cache.direct=on``): to the disk, and cached copies stay coherent."""
        f.check_range(first, n)
        window = f.state[first:first + n]
        window[window != FilePage.NOT_CACHED] = FilePage.CLEAN
        f.lost[first:first + n] = False
        f.last_used = now
        f.stats["writes"] += n

    def fsync_cost_ms(self, pages: int) -> float:
        return self.fsync_latency_ms + pages * PAGE_SIZE * 1000.0 / self.disk_write_bytes_per_s

    def read_cost_ms(self, hits: int, misses: int) -> float:
        return hits * COPY_US_PER_PAGE / 1000.0 + misses * PAGE_SIZE * 1000.0 / self.disk_read_bytes_per_s

    def dirty_snapshot(self, f: CachedFile) -> np.ndarray:
        """The page indices an fsync starting now will write (its ``dirty`` set)."""
        return np.flatnonzero(f.state == FilePage.DIRTY)

    def fsync(self, f: CachedFile, pages: np.ndarray | None = None) -> int:
        """Write back ``pages`` (default: every dirty page) of ``f``: 0, or -EIO if the disk
        failed (the pages become WB_ERROR: cached, marked clean, not on disk)."""
        if pages is None:
            pages = self.dirty_snapshot(f)
        still = pages[f.state[pages] == FilePage.DIRTY]
        f.stats["fsyncs"] += 1
        if f.fsync_errors_to_inject > 0:
            f.fsync_errors_to_inject -= 1
            f.state[still] = FilePage.WB_ERROR
            f.stats["fsync_errors"] += 1
            self._after_clean(f)
            return -errno.EIO
        f.state[still] = FilePage.CLEAN
        f.lost[still] = False
        f.stats["written_back"] += len(still)
        self._after_clean(f)
        return 0

    def _after_clean(self, f: CachedFile) -> None:
        if not (f.state == FilePage.DIRTY).any():
            f.dirtied_when = None

    def writeback_expired(self, now: float) -> int:
        """The host flusher's kupdate pass: write back files dirtied more than
        ``dirty_expire_centisecs`` ago; returns pages written."""
        older_than = now - self.dirty_expire_centisecs * 10.0
        written = 0
        for f in self.files.values():
            if f.dirtied_when is not None and f.dirtied_when <= older_than:
                dirty = self.dirty_snapshot(f)
                written += len(dirty) if self.fsync(f, dirty) == 0 else 0
        return written

    def drop_caches(self) -> int:
        """``echo 1 > /proc/sys/vm/drop_caches`` on the host: drop clean pages; returns how many."""
        return self.shrink(self.cached_pages)

    # --- reclaim and crash ----------------------------------------------------------------------
    def shrink(self, n: int) -> int:
        """Drop up to ``n`` clean (and WB_ERROR) pages, least recently used file first; returns
        pages freed. A dropped WB_ERROR page takes the last write with it (``lost``)."""
        freed = 0
        for f in sorted(self.files.values(), key=lambda f: f.last_used):
            if freed >= n:
                break
            droppable = (f.state == FilePage.CLEAN) | (f.state == FilePage.WB_ERROR)
            if self._protect is not None and self._protect[0] is f:
                droppable[self._protect[1]:self._protect[2]] = False
            idx = np.flatnonzero(droppable)[: n - freed]
            err = idx[f.state[idx] == FilePage.WB_ERROR]
            f.lost[err] = True
            f.stats["lost_pages"] += len(err)
            f.state[idx] = FilePage.NOT_CACHED
            freed += len(idx)
        return freed

    def crash(self) -> dict[str, int]:
        """The host loses power: dirty and WB_ERROR pages lose their last write, the cache and
        every MAP_PRIVATE copy are gone. Returns pages lost per file path."""
        out = {}
        for f in self.files.values():
            unwritten = (f.state == FilePage.DIRTY) | (f.state == FilePage.WB_ERROR)
            f.lost |= unwritten
            out[f.path] = int(np.count_nonzero(unwritten))
            f.stats["lost_pages"] += out[f.path]
            f.state[:] = FilePage.NOT_CACHED
            f.dirtied_when = None
        for owner in self.private:
            self.private[owner][:] = False
        self.crashes += 1
        return out


def host_page_cache(host) -> HostPageCache:
    """The page cache of ``host``, created (and attached as ``host.page_cache``) on first use."""
    cache = getattr(host, "page_cache", None)
    if cache is None:
        cache = HostPageCache(host)
        host.page_cache = cache
    return cache


def host_crash(host, vms=()) -> dict[str, int]:
    """Crash ``host``: guest page cache not yet written to the host is lost with the VMs in ``vms``
    (they are closed), then :meth:`HostPageCache.crash`. Returns pages lost per file path."""
    cache = host_page_cache(host)
    for vm in vms:
        attachment = getattr(vm, "virtio_pmem", None)
        if attachment is not None:
            attachment.blk.on_host_crash()
    lost = cache.crash()
    for vm in vms:
        vm.close()
    return {path: int(np.count_nonzero(cache.files[path].lost)) for path in lost}
