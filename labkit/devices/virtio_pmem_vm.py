"""virtio-pmem on one model VM: its devices and drivers, their guest ops; and, because they are the
other half of the same story, the guest's writeback and virtio-blk, which the machine builds first.

``vm.virtio_pmem`` (always present; ``devices`` may be empty):

* QMP (the monitor's, :mod:`labkit.backends.monitor_devices`): ``query-memory-devices`` entries of
  type ``virtio-pmem`` (``memaddr``, ``size``, ``memdev``, ``id``) after virtio-mem's; ``info
  memory-devices``; ``object-add`` of a ``memory-backend-file`` and ``device_add`` of
  ``virtio-pmem-pci`` (hot-plug works, §4.3, through :meth:`VirtioPmem.plug`) or
  ``virtio-blk-pci``; ``device_del`` refuses virtio-pmem with QEMU 8.2's text; ``migrate`` is
  refused while a virtio-pmem device exists (a labkit blocker: QEMU has no vmstate for it).
* Guest ops: ``pmem_read``, ``pmem_write`` (DAX loads and stores: host page cache pages, no guest
  page cache), ``pmem_flush`` (``requests`` concurrent fsync/msync calls: each one FLUSH request;
  runs simulated time until every one is answered), ``pmem_mmap`` (``map_sync=True`` ->
  EOPNOTSUPP), ``pmem_devices``; with virtio-blk's ``blk_read``, ``blk_write`` and the
  writeback's ``sync`` (all dirty page cache, then every disk and every pmem region flushed; the
  latter runs the clock) and ``sysctl`` (``vm.dirty_*``).
* Knobs: :meth:`VirtioPmem.inject_fsync_error` (the host's disk fails the next fsyncs: the guest
  gets EIO); ``vm.host.page_cache`` for the host's cache and its sysctls.
* ``vm.sample()`` gains ``host_page_cache``, ``host_page_cache_dirty`` (host-wide), ``guest_dirty``,
  ``pmem_size`` and ``pmem_memmap`` (guest RAM holding the regions' struct pages).
"""

from __future__ import annotations

import errno

import numpy as np
import simpy

from labkit.devices.virtio_blk import VirtioBlk
from labkit.devices.virtio_pmem import PMEM_REGION_ALIGN, VirtioPmemDevice, VirtioPmemDriver
from labkit.model.host import Host
from labkit.model.kernel import Kernel
from labkit.model.pagecache import FilePage, host_page_cache
from labkit.model.pages import PageState
from labkit.model.writeback import GuestWriteback
from labkit.units import PAGE_SIZE, parse_size

MAX_FLUSH_REQUESTS = 100_000


class VirtioPmem:
    """The virtio-pmem devices of one VM, with the guest's writeback and its virtio-blk disks.

    ``memaddr_base`` is the first guest address free for memory devices (after boot RAM and the
    virtio-mem regions); ``vm_name`` names this VM's private copies of ``share=off`` files."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, host: Host, writeback: GuestWriteback,
                 blk: VirtioBlk, memaddr_base: int, vm_name: str):
        self.env = env
        self.kernel = kernel
        self.host = host
        self.cache = host_page_cache(host)
        self.writeback = writeback
        self.blk = blk
        self.blk.on_host_dirty = self._arm_host_flusher
        # sync(2) -> ->sync_fs of the DAX filesystem -> REQ_PREFLUSH -> async_pmem_flush
        self.writeback.sync_hooks.append(self._sync_pmem)
        self.memaddr_base = memaddr_base
        self.vm_name = vm_name
        self.devices: list[VirtioPmemDevice] = []
        self.drivers: list[VirtioPmemDriver] = []
        self.closed = False  # the machine sets it when the VM is closed: the host flusher stops
        self._host_flusher_armed = False

    # --- devices ----------------------------------------------------------------------------------
    def _next_memaddr(self) -> int:
        """First free address after the memory-device base and earlier pmem regions."""
        end = self.memaddr_base
        for d in self.devices:
            end = max(end, d.config.start + d.config.size)
        return -(-end // PMEM_REGION_ALIGN) * PMEM_REGION_ALIGN

    def plug(self, spec: dict, memdev: str) -> VirtioPmemDevice:
        """Realize a virtio-pmem device on ``memdev`` (``spec``: id, path, size, share) and probe
        the guest's driver: the region's struct pages come out of guest RAM."""
        device = VirtioPmemDevice(self.env, self.cache, spec, self._next_memaddr(), self.vm_name, memdev)
        driver = VirtioPmemDriver(self.env, self.kernel, device, len(self.drivers))
        self.devices.append(device)
        self.drivers.append(driver)
        return device

    def _find(self, device: str) -> tuple[VirtioPmemDevice, VirtioPmemDriver]:
        for d, drv in zip(self.devices, self.drivers, strict=True):
            if device in (d.id, drv.disk):
                return d, drv
        raise ValueError(f"no virtio-pmem device {device!r} in this guest; devices: "
                         f"{[d.id for d in self.devices]}")

    def inject_fsync_error(self, device: str, count: int = 1) -> None:
        """Host side: the next ``count`` fsyncs of the device's backing file fail (EIO)."""
        self._find(device)[0].file.inject_fsync_error(count)

    def _arm_host_flusher(self) -> None:
        """The host's flusher, run on this VM's clock while the host page cache holds dirty data."""
        if self._host_flusher_armed or self.cache.dirty_writeback_centisecs <= 0:
            return
        self._host_flusher_armed = True

        def flusher():
            while True:
                yield self.env.timeout(self.cache.dirty_writeback_centisecs * 10.0)
                self.cache.writeback_expired(self.env.now)
                if self.cache.dirty_pages == 0 or self.closed:
                    self._host_flusher_armed = False
                    return

        self.env.process(flusher())

    # --- guest ops ------------------------------------------------------------------------------
    def _range(self, d: VirtioPmemDevice, offset, size) -> tuple[int, int]:
        offset = parse_size(offset, name="offset")
        size = d.config.size - offset if size is None else parse_size(size, name="size")
        if offset < 0 or size <= 0 or offset + size > d.config.size:
            raise ValueError(f"offset {offset} + size {size} is outside {d.id}'s region "
                             f"({d.config.size} bytes)")
        first = offset // PAGE_SIZE
        return first, -(-(offset + size) // PAGE_SIZE) - first

    def read(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        """DAX loads of [offset, offset + size): host page cache hits, or reads from the disk."""
        d, _ = self._find(device)
        first, n = self._range(d, offset, size)
        private = 0
        if not d.share:  # pages this VM wrote are its private copies
            private = int(self.cache.private[d.owner][first:first + n].sum())
        hits, disk = self.cache.read(d.file, first, n, self.env.now)
        return {"pages": n, "host_cache_hits": hits, "disk_reads": disk, "private_pages": private,
                "guest_page_cache_pages": 0, "elapsed_ms": self.cache.read_cost_ms(hits, disk)}

    def write(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        """DAX stores to [offset, offset + size) (whole pages)."""
        d, _ = self._find(device)
        first, n = self._range(d, offset, size)
        if d.share:
            self.cache.write(d.file, first, n, self.env.now)
            self._arm_host_flusher()
        else:  # MAP_PRIVATE: the page is read from the file, then copied on write into QEMU
            private = self.cache.private[d.owner]
            new = int(n - private[first:first + n].sum())
            self.cache.read(d.file, first, n, self.env.now)
            if new > self.host.free_pages:
                self.host._make_room(new)
            private[first:first + n] = True
        return {"pages": n, "dirty_pages": int(np.count_nonzero(d.file.state == FilePage.DIRTY)),
                "private_pages": int(self.cache.private[d.owner].sum()) if not d.share else 0}

    def flush(self, device: str, requests: int = 1) -> dict:
        """``requests`` guest threads call fsync (or msync) at once: each sends one FLUSH and sleeps
        until QEMU's fsync answers. Runs the VM's clock until all are answered."""
        d, drv = self._find(device)
        if not isinstance(requests, int) or isinstance(requests, bool) or not (
                1 <= requests <= MAX_FLUSH_REQUESTS):
            raise ValueError(f"requests must be an int from 1 to {MAX_FLUSH_REQUESTS}, got {requests!r}")
        start, written = self.env.now, d.file.stats["written_back"]
        drv.max_in_flight = 0
        procs = [self.env.process(drv.flush()) for _ in range(requests)]
        self.env.run(until=simpy.AllOf(self.env, procs))
        rets = [p.value for p in procs]
        worst = min(rets)
        return {"ret": worst, "error": "EIO" if worst == -errno.EIO else None,
                "eio": sum(r != 0 for r in rets), "elapsed_ms": float(self.env.now - start),
                "written_bytes": (d.file.stats["written_back"] - written) * PAGE_SIZE,
                "max_in_flight": drv.max_in_flight, "dirty_pages": int(np.count_nonzero(
                    d.file.state == FilePage.DIRTY))}

    def _sync_pmem(self) -> None:
        for d in self.devices:
            self.flush(d.id)

    def mmap(self, device: str, map_sync: bool = False) -> dict:
        """mmap(MAP_SHARED_VALIDATE | MAP_SYNC) of a file on the DAX filesystem: refused, because
        the region is ND_REGION_ASYNC (drivers/nvdimm/pmem.c is_nvdimm_sync; §4.2)."""
        self._find(device)
        if map_sync:
            return {"ret": -errno.EOPNOTSUPP, "error": "EOPNOTSUPP",
                    "why": "virtio-pmem is asynchronous: durability needs fsync/msync, not MAP_SYNC"}
        return {"ret": 0, "error": None}

    def guest_devices(self) -> list[dict]:
        """What the guest sees: /dev/pmemN, its region, and that it is not synchronous."""
        return [{"device": d.id, "disk": drv.disk, "start": drv.start, "size": drv.size,
                 "sync": False, "memmap_bytes": drv.memmap_bytes, "flushes": drv.flushes,
                 "eio": drv.eio} for d, drv in zip(self.devices, self.drivers, strict=True)]

    # --- observation -------------------------------------------------------------------------------
    def sample(self) -> dict:
        """Extra ``vm.sample()`` columns, in bytes."""
        return {"host_page_cache": self.cache.cached_pages * PAGE_SIZE,
                "host_page_cache_dirty": self.cache.dirty_pages * PAGE_SIZE,
                "guest_dirty": self.kernel.mem.count(PageState.FILE_DIRTY) * PAGE_SIZE,
                "pmem_size": sum(d.config.size for d in self.devices),
                "pmem_memmap": sum(drv.memmap_bytes for drv in self.drivers)}
