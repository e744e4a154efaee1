"""virtio-blk over an image file: where the guest's file data is cached, on both sides.

QEMU's block layer opens the image with or without ``O_DIRECT`` (``cache.direct``): with
``cache=writeback`` (the default: ``direct=off``) every read and write goes through the **host page
cache**, so a block the guest reads is cached twice: once in the guest's page cache (FILE pages in
guest RAM, which the host backs) and once in the host's (double caching). ``cache=none``
(``direct=on``) bypasses the host cache: the guest's copy is the only one. A guest flush (``sync``,
fsync) makes QEMU ``fdatasync`` the image unless ``cache.no-flush`` (``cache=unsafe``). With
``write-cache=off`` on the device (``cache=writethrough``/``directsync``) every write is followed by
a flush. Facts: QEMU's docs on -drive cache modes (qemu-options.hx), general knowledge; the model
charges no simulated time for block I/O.

QMP, as on a real QEMU: ``blockdev-add`` (``driver: "file"``, ``node-name``, ``filename``,
``cache: {"direct", "no-flush"}``, ``read-only``) then ``device_add`` (``driver:
"virtio-blk-pci"``, ``drive``, ``id``, ``write-cache``). :func:`add_disk` does both. Guest ops
(one handle per byte range, which stands for one file on the disk's filesystem): ``blk_read``,
``blk_write``. Which file page a guest page holds is its position in the handle (pages re-read
after reclaim are put back in front, where reclaim took them from): exact for whole-range reads
and writes, approximate after partial reclaim.

>>> import os, tempfile, labkit
>>> d = tempfile.TemporaryDirectory()
>>> path = os.path.join(d.name, "disk.img")
>>> with open(path, "wb") as f:
...     _ = f.truncate(1 << 30)
>>> vm = labkit.open(memory="1G", seed=0)
>>> add_disk(vm, path, cache="writeback")
'blk0'
>>> r = vm.guest("blk_read", device="blk0", size="64M")
>>> r["disk_reads"], vm.sample()["host_page_cache"] == 64 << 20
(16384, True)
>>> vm.close(); d.cleanup()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from labkit.errors import QMPError
from labkit.model.host import Host
from labkit.model.kernel import Handle, Kernel
from labkit.model.pagecache import CachedFile, host_page_cache
from labkit.model.pages import PageState
from labkit.model.workloads import new_handle
from labkit.units import PAGE_SIZE, parse_size

# -drive cache=<mode> as (cache.direct, cache.no-flush, device write-cache) (qemu-options.hx)
CACHE_MODES = {
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


@dataclass
class BlockNode:
    """A ``blockdev-add`` node of driver ``file``."""

    node_name: str
    file: CachedFile
    direct: bool = False
    no_flush: bool = False
    read_only: bool = False


@dataclass
class VirtioBlkDevice:
    """A virtio-blk-pci device on a node, and the guest page cache it fills (one handle a range)."""

    id: str
    node: BlockNode
    write_cache: bool = True
    ranges: dict[tuple[int, int], int] = field(default_factory=dict)  # (first page, n) -> handle id
    first_page: dict[int, int] = field(default_factory=dict)  # handle id -> first file page


class VirtioBlk:
    """The virtio-blk disks of one VM (``vm.virtio_pmem.blk``): block nodes, devices, and the guest
    page cache over them. ``ops`` frees a disk's page cache when the disk is unplugged."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, host: Host, writeback, ops):
        self.env = env
        self.kernel = kernel
        self.ops = ops
        self.cache = host_page_cache(host)
        self.writeback = writeback
        self.nodes: dict[str, BlockNode] = {}
        self.devices: dict[str, VirtioBlkDevice] = {}
        self.on_host_dirty = None  # called when a writeback dirties the host page cache
        writeback.sync_hooks.append(self.flush_all)

    # --- QMP (the monitor checks the arguments' names and types) --------------------------------
    def blockdev_add(self, args: dict) -> dict:
        """``blockdev-add`` of a ``file`` node (a raw image)."""
        if args["driver"] != "file":
            raise QMPError("GenericError", f"the model's blockdev-add takes driver 'file' (a raw "
                                           f"image), got '{args['driver']}'")
        name = args["node-name"]
        if name in self.nodes:
            raise QMPError("GenericError", f"Duplicate nodes with node-name='{name}'")
        if "filename" not in args:
            raise QMPError("GenericError", "Parameter 'filename' is missing")
        cache = args.get("cache", {})
        if not isinstance(cache, dict) or sorted(set(cache) - {"direct", "no-flush"}) or not all(
                isinstance(v, bool) for v in cache.values()):
            raise QMPError("GenericError", f"Parameter 'cache' takes booleans 'direct' and "
                                           f"'no-flush', got {cache!r}")
        try:
            f = self.cache.open(args["filename"])
        except OSError as e:
            raise QMPError("GenericError", f"Could not open '{args['filename']}': {e.strerror}") from None
        self.nodes[name] = BlockNode(name, f, cache.get("direct", False), cache.get("no-flush", False),
                                     args.get("read-only", False))
        return {}

    def device_add(self, args: dict) -> dict:
        """``device_add driver=virtio-blk-pci,drive=<node>,id=<id>[,write-cache=on|off|auto]``."""
        node = self.nodes.get(args["drive"])
        if node is None:
            raise QMPError("GenericError", f"Property 'virtio-blk-device.drive' can't find value "
                                           f"'{args['drive']}'")
        if any(d.node is node for d in self.devices.values()):
            raise QMPError("GenericError", f"Conflicts with use by {self._user(node)} as 'root', "
                                           f"which does not allow 'write' on {node.node_name}")
        wc = args.get("write-cache", "auto")
        if wc not in ("on", "off", "auto"):
            raise QMPError("GenericError", f"Parameter 'write-cache' does not accept value '{wc}'")
        self.devices[args["id"]] = VirtioBlkDevice(args["id"], node, wc != "off")
        return {}

    def _user(self, node: BlockNode) -> str:
        return next(d.id for d in self.devices.values() if d.node is node)

    def device_del(self, device_id: str) -> None:
        """Unplug: the guest writes back and drops the disk's page cache, then it is gone."""
        dev = self.devices.pop(device_id)
        for handle_id in list(dev.ranges.values()):
            h = self.kernel.handles.get(handle_id)
            if h is not None:
                self.writeback.write_back(h, "sync")
                self.ops.free(handle_id)
            self.writeback.targets.pop(handle_id, None)

    # --- guest side -----------------------------------------------------------------------------
    def _device(self, device: str) -> VirtioBlkDevice:
        dev = self.devices.get(device)
        if dev is None:
            raise ValueError(f"no virtio-blk disk {device!r} in this guest; disks: {sorted(self.devices)}")
        return dev

    def _range(self, dev: VirtioBlkDevice, offset: int | str, size: int | str | None) -> tuple[int, int]:
        offset = parse_size(offset, name="offset")
        total = dev.node.file.size
        size = total - offset if size is None else parse_size(size, name="size")
        if offset < 0 or size <= 0 or offset + size > total:
            raise ValueError(f"offset {offset} + size {size} is outside disk {dev.id!r} "
                             f"({total} bytes)")
        first = offset // PAGE_SIZE
        return first, -(-(offset + size) // PAGE_SIZE) - first

    def _handle(self, dev: VirtioBlkDevice, first: int, n: int) -> Handle:
        hid = dev.ranges.get((first, n))
        h = self.kernel.handles.get(hid) if hid is not None else None
        if h is None:
            h = new_handle(self.kernel, "file", np.zeros(0, np.int64), n * PAGE_SIZE,
                           name=f"{dev.id}:{first * PAGE_SIZE}+{n * PAGE_SIZE}")
            dev.ranges[(first, n)] = h.id
            dev.first_page[h.id] = first
            self.writeback.targets[h.id] = lambda h, idx, dev=dev: self._written_back(dev, h, idx)
        return h

    def _fill(self, dev: VirtioBlkDevice, h: Handle, first: int, n: int, state: PageState) -> int:
        """Fault in the pages of ``h`` reclaim took (from its front): returns how many."""
        missing = n - len(h.pages)
        if missing > 0:
            pfns = self.kernel.alloc_pages(missing, state)
            self.kernel.touch(pfns)  # QEMU DMAs the data into them: the host backs them
            h.pages = np.concatenate([pfns, h.pages])
        return max(missing, 0)

    def read(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        """The guest reads a range (a file) of the disk: guest page cache first, then QEMU."""
        dev = self._device(device)
        first, n = self._range(dev, offset, size)
        h = self._handle(dev, first, n)
        missing = self._fill(dev, h, first, n, PageState.FILE_CLEAN)
        self.kernel.vmstat.pgmajfault += missing
        host_hits = disk = 0
        if missing:
            start = first  # the refaulted pages sit at the front of the range
            if dev.node.direct:
                disk = missing
            else:
                host_hits, disk = self.cache.read(dev.node.file, start, missing, self.env.now)
        return {"pages": n, "guest_hits": n - missing, "host_hits": host_hits, "disk_reads": disk,
                "elapsed_ms": self.cache.read_cost_ms(host_hits, disk)}

    def write(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        """The guest writes a range (whole pages) through its page cache: dirty guest pages."""
        dev = self._device(device)
        if dev.node.read_only:
            raise ValueError(f"disk {device!r} is read-only: Read-only file system")
        first, n = self._range(dev, offset, size)
        h = self._handle(dev, first, n)
        self._fill(dev, h, first, n, PageState.FILE_DIRTY)
        self.kernel.mem.set_state(h.pages, PageState.FILE_DIRTY)
        self.kernel.touch(h.pages)
        self.writeback.mark_dirty(h)
        return {"pages": n, "dirty_pages": self.kernel.mem.count(PageState.FILE_DIRTY)}

    def _written_back(self, dev: VirtioBlkDevice, h: Handle, idx: np.ndarray) -> None:
        """The guest's writeback of ``h.pages[idx]`` arrives at QEMU."""
        first = dev.first_page[h.id]
        pages = first + idx[idx < h.size // PAGE_SIZE]
        f, now = dev.node.file, self.env.now
        if dev.node.direct:
            for a, b in _runs(pages):
                self.cache.direct_write(f, a, b - a, now)
        else:
            for a, b in _runs(pages):
                self.cache.write(f, a, b - a, now)
            if self.on_host_dirty is not None:
                self.on_host_dirty()
        if not dev.write_cache:  # writethrough: QEMU flushes after every write
            self.flush(dev)

    def flush(self, dev: VirtioBlkDevice) -> int:
        """VIRTIO_BLK_T_FLUSH: QEMU fdatasync()s the image (not with cache.no-flush)."""
        if dev.node.no_flush:
            return 0
        return self.cache.fsync(dev.node.file)

    def flush_all(self) -> None:
        for dev in self.devices.values():
            self.flush(dev)

    def on_host_crash(self) -> None:
        """The host died with this guest: its dirty pages never reached QEMU."""
        state = self.kernel.mem.state
        for dev in self.devices.values():
            for hid, first in dev.first_page.items():
                h = self.kernel.handles.get(hid)
                if h is None or not len(h.pages):
                    continue
                idx = np.flatnonzero(state[h.pages] == PageState.FILE_DIRTY)
                dev.node.file.lost[first + idx[idx < h.size // PAGE_SIZE]] = True

    def guest_cached_pages(self) -> int:
        """Guest page cache pages holding this VM's disk data."""
        return sum(len(self.kernel.handles[hid].pages) for dev in self.devices.values()
                   for hid in dev.ranges.values() if hid in self.kernel.handles)


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Sorted page numbers as [start, end) runs (a loop over runs, not pages)."""
    if len(pages) == 0:
        return []
    pages = np.sort(pages)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(pages)]])
    return [(int(pages[a]), int(pages[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


def add_disk(vm, path: str, cache: str = "writeback", device_id: str = "blk0") -> str:
    """Attach ``path`` as a virtio-blk disk with a ``-drive cache=`` mode, over QMP
    (``blockdev-add`` + ``device_add``); returns the device id."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache {cache!r} is not one of {list(CACHE_MODES)}")
    direct, no_flush, write_cache = CACHE_MODES[cache]
    node = f"drive-{device_id}"
    vm.qmp("blockdev-add", driver="file", filename=str(path), **{
        "node-name": node, "cache": {"direct": direct, "no-flush": no_flush}})
    vm.qmp("device_add", driver="virtio-blk-pci", drive=node, id=device_id,
           **{"write-cache": "on" if write_cache else "off"})
    return device_id

