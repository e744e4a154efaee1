"""virtio-pmem: a host file mapped into the guest as persistent memory, flushed with fsync.

``labkit.open(virtio_pmem=[{"id": "vpmem0", "path": "disk.img", "size": "4G"}])`` is QEMU's
``-object memory-backend-file,id=mem-vpmem0,share=on,mem-path=disk.img,size=4G
-device virtio-pmem-pci,memdev=mem-vpmem0,id=vpmem0`` (docs/mechanisms.md §4). The pieces:

* **QEMU device** (:class:`VirtioPmemDevice`, hw/virtio/virtio-pmem.c): config ``start`` and ``size``
  (u64 LE, include/uapi/linux/virtio_pmem.h), no feature bits offered (``VIRTIO_PMEM_F_SHMEM_REGION``
  is not), one virtqueue of ``VIRTIO_PMEM_QUEUE_SIZE`` (128). A request is one u32 ``type``, only
  ``VIRTIO_PMEM_REQ_TYPE_FLUSH`` (0); QEMU runs ``fsync(fd)`` of the backing file in the main
  AioContext's thread pool (``THREAD_POOL_MAX_THREADS`` 64, util/thread-pool.c) and answers ``ret``
  0, or 1 if fsync failed. QEMU 6.x and later store ``ret`` with ``virtio_stl_p`` (32 bits); older
  QEMU used ``virtio_stw_p``, a 16-bit store into the 32-bit field, leaving the upper half as the
  guest left it (fixed by Wang Liang's 2021 patch, seen as patch text, merged through the virtio
  tree; docs/mechanisms.md §8.10 and §9.10). The model answers with the 32-bit value.
* **Linux driver** (:class:`VirtioPmemDriver`, drivers/nvdimm/virtio_pmem.c, nd_virtio.c): reads
  ``start``/``size``, registers an nvdimm region with ``ND_REGION_PAGEMAP`` and ``ND_REGION_ASYNC``;
  ``async_pmem_flush`` -> ``virtio_pmem_flush`` queues one FLUSH and sleeps until the host acks; a
  full ring (-ENOSPC) puts the caller on ``req_list``, woken by the next completion; any nonzero
  ``ret`` becomes -EIO. The region is not System RAM: not in MemTotal, no zone, no buddy pages; its
  ``struct page``s (``devm_memremap_pages`` without an altmap, the raw-namespace path of
  drivers/nvdimm/pmem.c ``pmem_attach_disk`` when ``pmem_should_map_pages``) take 64 B of guest RAM
  per 4 KiB page (read as patch and blame text; that a fresh virtio-pmem namespace is raw, with its
  struct pages in guest RAM, is measured on a real guest: 4.17-4.21 MiB for a 256 MiB region against
  the model's 4.00, tests/live/test_live_pmem.py). ``MAP_SYNC`` is refused (the region is async,
  so the dax device is not synchronous): only fsync/msync make data durable.
* **DAX**: the guest's loads and stores reach the host page cache pages of the file directly (no
  guest page cache, :mod:`labkit.model.pagecache`); with ``share=off`` QEMU maps the file
  ``MAP_PRIVATE``: reads share the host page cache, the first write to a page makes a private copy in
  QEMU's memory, and nothing written ever reaches the file (fsync returns 0 all the same). The docs
  show ``share=on``; QEMU does not enforce it (**UNCONFIRMED** for the newest QEMU).

Limits shown as errors (:mod:`labkit.devices.virtio_pmem_vm` and the monitor): no hot-unplug (QEMU 8.2+:
virtio-md-pci without ``unplug_request_check``), no migration (no vmstate in QEMU; labkit blocks
``migrate``), raw images only (QEMU would map a qcow2 file's bytes as they are: labkit refuses it).

>>> import os, tempfile, labkit
>>> d = tempfile.TemporaryDirectory()
>>> path = os.path.join(d.name, "disk.img")
>>> with open(path, "wb") as f:
...     _ = f.truncate(256 << 20)
>>> vm = labkit.open(memory="512M", virtio_pmem=[{"id": "vpmem0", "path": path, "size": "256M"}])
>>> vm.guest("pmem_write", device="vpmem0", offset=0, size="1M")["dirty_pages"]
256
>>> vm.guest("pmem_flush", device="vpmem0")["ret"]
0
>>> vm.qmp("query-memory-devices")[0]["type"]
'virtio-pmem'
>>> vm.close(); d.cleanup()
"""

from __future__ import annotations

import errno
import os
from collections import deque
from dataclasses import dataclass

import numpy as np
import simpy

from labkit.devices.properties import QomProperty
from labkit.model.kernel import Kernel
from labkit.model.pagecache import CachedFile, HostPageCache
from labkit.model.pages import STRUCT_PAGE_SIZE, PageState
from labkit.model.workloads import new_handle
from labkit.units import MiB, PAGE_SIZE, format_size

VIRTIO_ID_PMEM = 27  # include/uapi/linux/virtio_ids.h
VIRTIO_PMEM_QUEUE_SIZE = 128  # hw/virtio/virtio-pmem.c virtio_add_queue(vdev, 128, ...)
VIRTIO_PMEM_REQ_TYPE_FLUSH = 0  # include/uapi/linux/virtio_pmem.h
VIRTIO_PMEM_RESP_OK = 0
VIRTIO_PMEM_RESP_FSYNC_FAILED = 1  # hw/virtio/virtio-pmem.c worker_cb: err = 1 when fsync fails
VIRTIO_PMEM_F_SHMEM_REGION = 0  # newer Linux; QEMU does not offer it
THREAD_POOL_MAX_THREADS = 64  # util/thread-pool.c: the main AioContext's pool
MEMMAP_MAX_SHARE = 4  # labkit refuses regions whose struct pages need more than 1/4 of guest RAM
PMEM_REGION_ALIGN = 2 * MiB  # where the model places regions (model choice; QEMU: first fit)
QCOW2_MAGIC = b"QFI\xfb"
IMAGE_MAGICS = {QCOW2_MAGIC: "qcow2", b"KDMV": "vmdk", b"vhdxfile": "vhdx", b"conectix": "vpc (VHD)"}
PROPERTY_DEFAULTS = {
    "id": None,  # the virtio-pmem-pci device id; the backend is mem-<id>
    "path": None,  # memory-backend-file mem-path
    "size": None,  # memory-backend-file size
    "share": True,  # memory-backend-file share (QEMU's default is off; the docs use on)
}


def _image_format(path: str) -> str | None:
    """The container format a file starts with, if any (reads at most 8 bytes)."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in IMAGE_MAGICS.items():
        if head.startswith(magic):
            return name
    return None


def check_backing_file(path: str, size: int, backend_id: str) -> None:
    """What QEMU checks when it opens a memory-backend-file, with its texts, plus labkit's own
    rules (the file must already exist; raw images only). Raises ValueError; creates nothing."""
    where = f"can't open backing store {path} for guest RAM"
    if not os.path.exists(path):
        raise ValueError(f"{where}: No such file or directory (labkit never creates it; QEMU "
                         f"would create an empty file here)")
    if os.path.isdir(path):
        raise ValueError(f"{where}: Is a directory (QEMU would back the RAM with an unlinked "
                         f"temporary file there: nothing shared, nothing persistent)")
    if not os.access(path, os.R_OK) or not os.access(path, os.W_OK):
        raise ValueError(f"{where}: Permission denied (QEMU opens it read-write)")
    file_size = os.stat(path).st_size
    if file_size < size:
        raise ValueError(f"{backend_id} backing store size 0x{file_size:x} is too small for "
                         f"'size' option 0x{size:x} plus 'offset' option 0x0")
    kind = _image_format(path)
    if kind is not None:
        raise ValueError(f"{path} is a {kind} image: virtio-pmem maps the file's bytes as they are, "
                         f"so the guest would see the {kind} container, not the disk in it "
                         f"(QEMU does not check this; labkit refuses). Convert it first: "
                         f"qemu-img convert -O raw {os.path.basename(path)} disk.raw")


def memmap_bytes(size: int) -> int:
    """Guest RAM for the struct pages of a ``size``-byte region (64 B per 4 KiB page)."""
    return -(-(size // PAGE_SIZE) * STRUCT_PAGE_SIZE // PAGE_SIZE) * PAGE_SIZE


@dataclass
class VirtioPmemConfig:
    """struct virtio_pmem_config (include/uapi/linux/virtio_pmem.h)."""

    start: int  # guest-physical base of the region
    size: int


class VirtioPmemDevice:
    """QEMU's virtio-pmem device over a memory-backend-file (hw/virtio/virtio-pmem.c)."""

    def __init__(self, env: simpy.Environment, cache: HostPageCache, spec: dict, memaddr: int,
                 owner: str, memdev: str | None = None):
        self.env = env
        self.cache = cache
        self.id = spec["id"]
        self.qom_path = f"/machine/peripheral/{self.id}"  # the machine renames a device without id
        self.memdev = memdev or f"mem-{spec['id']}"
        self.path = spec["path"]
        self.share = spec["share"]
        self.config = VirtioPmemConfig(memaddr, spec["size"])
        self.features = 0  # virtio_pmem_get_features returns what it was given: nothing extra
        self.file: CachedFile = cache.open(spec["path"], spec["size"])
        self.pages = spec["size"] // PAGE_SIZE
        self.owner = f"{owner}/{self.id}"  # key of this mapping's MAP_PRIVATE copies (share=off)
        if not self.share:
            cache.private[self.owner] = np.zeros(self.pages, bool)
        self.pool = simpy.Resource(env, capacity=THREAD_POOL_MAX_THREADS)
        self.in_flight = 0  # requests popped from the ring and not yet pushed back
        self.requests = 0
        self.responses = {VIRTIO_PMEM_RESP_OK: 0, VIRTIO_PMEM_RESP_FSYNC_FAILED: 0}


    def device_info(self) -> dict:
        """virtio_pmem_fill_device_info, as query-memory-devices returns it."""
        data = {"memaddr": self.config.start, "size": self.config.size, "memdev": f"/objects/{self.memdev}"}
        if self.id is not None:
            data["id"] = self.id
        return {"type": "virtio-pmem", "data": data}

    def ring_full(self) -> bool:
        return self.in_flight >= VIRTIO_PMEM_QUEUE_SIZE

    def submit(self, req_type: int = VIRTIO_PMEM_REQ_TYPE_FLUSH) -> simpy.Event:
        """The guest kicked the queue with one request: returns the event QEMU's ``done_cb``
        triggers with the response's ``ret``."""
        if self.ring_full():
            raise RuntimeError("virtio-pmem ring full: the driver must wait (-ENOSPC)")
        if req_type != VIRTIO_PMEM_REQ_TYPE_FLUSH:
            raise ValueError(f"virtio-pmem request type {req_type} is not FLUSH (0)")
        self.in_flight += 1
        self.requests += 1
        done = self.env.event()
        self.env.process(self._flush(done))
        return done

    def _flush(self, done: simpy.Event):
        """virtio_pmem_flush -> thread_pool_submit_aio(worker_cb = fsync(fd)) -> done_cb."""
        with self.pool.request() as worker:
            yield worker
            pages = self.cache.dirty_snapshot(self.file)
            yield self.env.timeout(self.cache.fsync_cost_ms(len(pages)))
            err = self.cache.fsync(self.file, pages)
        ret = VIRTIO_PMEM_RESP_OK if err == 0 else VIRTIO_PMEM_RESP_FSYNC_FAILED
        self.responses[ret] += 1
        self.in_flight -= 1
        done.succeed((ret, len(pages)))


class VirtioPmemDriver:
    """The Linux virtio_pmem driver and its nvdimm region (drivers/nvdimm/virtio_pmem.c, nd_virtio.c)."""

    ND_REGION_PAGEMAP = True
    ND_REGION_ASYNC = True

    def __init__(self, env: simpy.Environment, kernel: Kernel, device: VirtioPmemDevice, index: int):
        self.env = env
        self.kernel = kernel
        self.device = device
        self.start = device.config.start  # virtio_cread_le(vdev, struct virtio_pmem_config, start)
        self.size = device.config.size
        self.disk = f"pmem{index}"
        self.waiters: deque[simpy.Event] = deque()  # vpmem->req_list
        self.flushes = 0
        self.eio = 0
        self.max_in_flight = 0
        # devm_memremap_pages: the region's struct pages come out of guest RAM (64 B / 4 KiB page)
        pfns = kernel.alloc_pages(memmap_bytes(self.size) // PAGE_SIZE, PageState.KERNEL, movable=False)
        kernel.touch(pfns)
        self.memmap = new_handle(kernel, "kernel", pfns, 0, name=f"{self.disk} memmap",
                                 killable=False)
        kernel.log(f"{self.disk}: detected capacity change from 0 to {self.size // 512} "
                   f"(virtio_pmem: {format_size(self.size)} at 0x{self.start:x}, async flush)")

    @property
    def memmap_bytes(self) -> int:
        return len(self.memmap.pages) * PAGE_SIZE

    def flush(self):
        """virtio_pmem_flush: one FLUSH request; sleeps until the host acks; returns 0 or -EIO."""
        self.flushes += 1
        while self.device.ring_full():  # virtqueue_add_sgs returned -ENOSPC: wait on req_list
            wait = self.env.event()
            self.waiters.append(wait)
            yield wait
        done = self.device.submit(VIRTIO_PMEM_REQ_TYPE_FLUSH)
        self.max_in_flight = max(self.max_in_flight, self.device.in_flight)
        ret, _ = yield done
        if self.waiters:  # virtio_pmem_host_ack: a buffer is free, wake the first waiter
            self.waiters.popleft().succeed()
        if ret != VIRTIO_PMEM_RESP_OK:
            self.eio += 1
            return -errno.EIO
        return 0



# QOM of virtio-pmem-pci (the proxy aliases the virtio-pmem device's properties)
QOM_TYPE = "virtio-pmem-pci"
QOM_VIRTIO_TYPE = "virtio-pmem"
QOM_PROPERTIES = (
    QomProperty("memaddr", "uint64", lambda d: d.config.start, static=True),
    QomProperty("memdev", "link<memory-backend>", lambda d: f"/objects/{d.memdev}", static=True),
)
