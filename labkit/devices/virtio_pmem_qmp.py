"""virtio-pmem on a model backend: devices and drivers from the options, their QMP surface and guest
ops; and, because they are the other half of the same story, the guest's writeback and virtio-blk.

``vm.virtio_pmem`` (always present; ``devices`` may be empty):

* QMP: ``query-memory-devices`` entries of type ``virtio-pmem`` (``memaddr``, ``size``, ``memdev``,
  ``id``) after virtio-mem's; ``info memory-devices`` (``human-monitor-command``); ``object-add``
  of a ``memory-backend-file`` and ``device_add`` of ``virtio-pmem-pci`` (hot-plug works, §4.3) or
  ``virtio-blk-pci``; ``device_del`` refuses virtio-pmem with QEMU 8.2's text; ``migrate`` is refused
  while a virtio-pmem device exists (a labkit blocker: QEMU has no vmstate for it); ``blockdev-add``.
* Guest ops: ``pmem_read``, ``pmem_write`` (DAX loads and stores: host page cache pages, no guest
  page cache), ``pmem_flush`` (``requests`` concurrent fsync/msync calls: each one FLUSH request;
  runs simulated time until every one is answered), ``pmem_mmap`` (``map_sync=True`` ->
  EOPNOTSUPP), ``pmem_devices``; ``blk_read``, ``blk_write``; ``sync`` (all dirty page cache, then
  every disk and every pmem region flushed; the latter runs the clock) and ``sysctl``
  (``vm.dirty_*``).
* Knobs: :meth:`VirtioPmem.inject_fsync_error` (the host's disk fails the next fsyncs: the guest
  gets EIO); ``vm.host.page_cache`` for the host's cache and its sysctls.
* ``vm.sample()`` gains ``host_page_cache``, ``host_page_cache_dirty`` (host-wide), ``guest_dirty``,
  ``pmem_size`` and ``pmem_memmap`` (guest RAM holding the regions' struct pages).
"""

from __future__ import annotations

import errno

import numpy as np
import simpy

from labkit.backends.base import check_arguments
from labkit.backends.qom import QomObject
from labkit.devices.virtio_blk import VirtioBlk
from labkit.devices.virtio_pmem import (
    MEMMAP_MAX_SHARE,
    PMEM_REGION_ALIGN,
    VirtioPmemDevice,
    VirtioPmemDriver,
    check_backing_file,
    memmap_bytes,
)
from labkit.errors import QMPError
from labkit.model.hotplug import q35_device_memory_base
from labkit.model.pagecache import FilePage, host_page_cache
from labkit.model.pages import PageState
from labkit.model.writeback import GuestWriteback
from labkit.units import PAGE_SIZE, parse_size

MAX_FLUSH_REQUESTS = 100_000


class VirtioPmem:
    """The virtio-pmem devices of one VM, with the guest's writeback and its virtio-blk disks."""

    def __init__(self, backend):
        self.backend = backend
        self.env: simpy.Environment = backend.env
        self.cache = host_page_cache(backend.host)
        self.writeback = GuestWriteback(backend.env, backend.kernel, backend.ops)
        self.blk = VirtioBlk(backend, self.writeback)
        self.blk.on_host_dirty = self._arm_host_flusher
        # sync(2) -> ->sync_fs of the DAX filesystem -> REQ_PREFLUSH -> async_pmem_flush
        self.writeback.sync_hooks.append(self._sync_pmem)
        self.devices: list[VirtioPmemDevice] = []
        self.drivers: list[VirtioPmemDriver] = []
        self.objects: dict[str, dict] = {}  # memory-backend-file objects by id
        self._host_flusher_armed = False
        for spec in getattr(backend, "virtio_pmem_specs", None) or []:
            self._add_backend_object(f"mem-{spec['id']}", spec)
            self._plug(spec, f"mem-{spec['id']}")
        for name, fn in (("pmem_read", self.read), ("pmem_write", self.write),
                         ("pmem_flush", self.flush), ("pmem_mmap", self.mmap),
                         ("pmem_devices", self.guest_devices), ("sync", self.writeback.sync),
                         ("sysctl", self.writeback.set_sysctl)):
            backend.register_guest_op(name, fn)
        self._chain("query-memory-devices", self._query_memory_devices)
        self._chain("human-monitor-command", self._hmp)
        self._chain("device_add", self._device_add)
        self._chain("device_del", self._device_del)
        self._chain("object-add", self._object_add)
        if "migrate" in backend._qmp_handlers:
            self._chain("migrate", self._migrate)
        backend.sample_hooks.append(self._sample)

    def _chain(self, command: str, handler) -> None:
        """Register ``handler`` for ``command``, keeping what was registered before (virtio-mem's
        query-memory-devices, the migration engine's migrate) as ``handler``'s fallback."""
        previous = self.backend._qmp_handlers.get(command)
        self.backend.register_qmp(command, lambda **args: handler(previous, **args))

    # --- devices ----------------------------------------------------------------------------------
    def _next_memaddr(self) -> int:
        """First free address after the device-memory base, virtio-mem regions and earlier pmem."""
        end = q35_device_memory_base(self.backend.memory)
        for r in getattr(self.backend, "regions", []):
            end = max(end, r.memaddr + r.pages * PAGE_SIZE)
        for d in self.devices:
            end = max(end, d.config.start + d.config.size)
        return -(-end // PMEM_REGION_ALIGN) * PMEM_REGION_ALIGN

    def _plug(self, spec: dict, memdev: str) -> VirtioPmemDevice:
        name = self.backend.kernel.host_vm.name
        device = VirtioPmemDevice(self.env, self.cache, spec, self._next_memaddr(), name, memdev)
        driver = VirtioPmemDriver(self.env, self.backend.kernel, device, len(self.drivers))
        self.devices.append(device)
        self.drivers.append(driver)
        self.objects[memdev]["used_by"] = device.id
        obj = self.backend.qom.add(QomObject(device.qom_path, "virtio-pmem-pci", (device.id,)))
        obj.add("memaddr", "uint64", lambda: device.config.start)
        obj.add("memdev", "link<memory-backend>", lambda: f"/objects/{memdev}")
        return device

    def _add_backend_object(self, object_id: str, spec: dict) -> None:
        self.objects[object_id] = {"path": spec["path"], "size": spec["size"], "share": spec["share"],
                                   "used_by": None}
        obj = self.backend.qom.add(QomObject(f"/objects/{object_id}", "memory-backend-file",
                                             (object_id,)))
        obj.add("size", "size", lambda: spec["size"])
        obj.add("mem-path", "str", lambda: spec["path"])
        obj.add("share", "bool", lambda: spec["share"])

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
                if self.cache.dirty_pages == 0 or self.backend.closed:
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
            if new > self.backend.host.free_pages:
                self.backend.host._make_room(new)
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

    # --- QMP --------------------------------------------------------------------------------------
    def _query_memory_devices(self, previous, **args) -> list:
        check_arguments(args, {}, {})
        earlier = previous(**args) if previous is not None else []
        return earlier + [d.device_info() for d in self.devices]

    def _hmp(self, previous, **args) -> str:
        check_arguments(args, {"command-line": str}, {"cpu-index": int})
        if args["command-line"].strip() != "info memory-devices":
            if previous is not None:
                return previous(**args)
            raise QMPError("GenericError", f"the model's monitor answers only 'info memory-devices', "
                                           f"got {args['command-line']!r}")
        text = previous(**args) if previous is not None else ""
        for d in self.devices:
            text += (f"Memory device [virtio-pmem]: \"{d.id}\"\n  memaddr: 0x{d.config.start:x}\n"
                     f"  size: {d.config.size}\n  memdev: /objects/{d.memdev}\n")
        return text

    def _ids(self) -> set[str]:
        vmem = getattr(self.backend, "virtio_mem_specs", None) or []
        return {d.id for d in self.devices} | set(self.blk.devices) | {s["id"] for s in vmem}

    def _device_add(self, previous, **args) -> dict:
        driver = args.get("driver")
        if driver not in ("virtio-pmem-pci", "virtio-blk-pci"):
            if previous is not None:
                return previous(**args)
            if driver is None:
                raise QMPError("GenericError", "Parameter 'driver' is missing")
            raise QMPError("GenericError", f"the model hot-adds virtio-pmem-pci and virtio-blk-pci "
                                           f"only, got '{driver}'")
        if args.get("id") in self._ids():
            raise QMPError("GenericError", f"Duplicate device ID '{args['id']}'")
        if driver == "virtio-blk-pci":
            return self.blk.device_add(args)
        check_arguments(args, {"driver": str, "memdev": str, "id": str}, {"bus": str, "addr": str})
        obj = self.objects.get(args["memdev"])
        if obj is None:
            raise QMPError("DeviceNotFound", f"Device '{args['memdev']}' not found")  # the link
        if obj["used_by"] is not None:
            raise QMPError("GenericError", f"can't use already busy memdev: {args['memdev']}")
        try:
            # the struct-page rule of validate_specs, for the regions after this one is added
            need = sum(memmap_bytes(d.config.size) for d in self.devices) + memmap_bytes(obj["size"])
            if need > self.backend.memory // MEMMAP_MAX_SHARE:
                raise ValueError(f"the guest's {self.backend.memory >> 20} MiB cannot hold "
                                 f"{need >> 20} MiB of struct pages for its virtio-pmem regions")
        except ValueError as e:
            raise QMPError("GenericError", str(e)) from None
        self._plug({"id": args["id"], "path": obj["path"], "size": obj["size"], "share": obj["share"]},
                   args["memdev"])
        return {}

    def _device_del(self, previous, **args) -> dict:
        check_arguments(args, {"id": str}, {})
        device_id = args["id"]
        if any(device_id in (d.id, d.qom_path) for d in self.devices):
            # hw/virtio/virtio-md-pci.c (QEMU 8.2+): no unplug_request_check for virtio-pmem
            raise QMPError("GenericError", "this virtio based memory devices cannot be unplugged")
        if device_id in self.blk.devices:
            self.blk.device_del(device_id)
            self.backend._events.emit("DEVICE_DELETED", {"device": device_id,
                                                         "path": f"/machine/peripheral/{device_id}"})
            return {}
        if previous is not None:
            return previous(**args)
        raise QMPError("DeviceNotFound", f"Device '{device_id}' not found")

    def _object_add(self, previous, **args) -> dict:
        if args.get("qom-type") != "memory-backend-file" and previous is not None:
            return previous(**args)
        check_arguments(args, {"qom-type": str, "id": str},
                        {"mem-path": str, "size": object, "share": bool, "prealloc": bool})
        if args["qom-type"] != "memory-backend-file":
            raise QMPError("GenericError", f"the model's object-add creates memory-backend-file "
                                           f"objects only, got '{args['qom-type']}'")
        object_id = args["id"]
        if object_id in self.objects:
            raise QMPError("GenericError", f"attempt to add duplicate property '{object_id}' to "
                                           f"object (type 'container')")
        for key in ("mem-path", "size"):
            if key not in args:
                raise QMPError("GenericError", f"Parameter '{key}' is missing")
        try:
            size = parse_size(args["size"], name="size")
            if size <= 0 or size % PAGE_SIZE:
                raise ValueError(f"size must be a positive multiple of 4 KiB, got {args['size']!r}")
            check_backing_file(args["mem-path"], size, object_id)
        except (TypeError, ValueError) as e:
            raise QMPError("GenericError", str(e)) from None
        self._add_backend_object(object_id, {"path": args["mem-path"], "size": size,
                                             "share": args.get("share", False)})
        return {}

    def _migrate(self, previous, **args) -> dict:
        if self.devices:
            ids = ", ".join(repr(d.id) for d in self.devices)
            raise QMPError("GenericError", f"virtio-pmem device {ids} cannot be migrated: QEMU "
                                           f"registers no vmstate for virtio-pmem (labkit blocks "
                                           f"migrate; docs/mechanisms.md §4.3)")
        return previous(**args)

    # --- observation -------------------------------------------------------------------------------
    def _sample(self) -> dict:
        return {"host_page_cache": self.cache.cached_pages * PAGE_SIZE,
                "host_page_cache_dirty": self.cache.dirty_pages * PAGE_SIZE,
                "guest_dirty": self.backend.mem.count(PageState.FILE_DIRTY) * PAGE_SIZE,
                "pmem_size": sum(d.config.size for d in self.devices),
                "pmem_memmap": sum(drv.memmap_bytes for drv in self.drivers)}
