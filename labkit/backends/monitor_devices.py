"""Hot-plug commands of the model's monitor: ``object-add``, ``device_add``, ``device_del``,
``blockdev-add``, with QEMU's checks and texts (qom/object_interfaces.c, softmmu/qdev-monitor.c,
hw/virtio/virtio-md-pci.c, block.c).

The model hot-adds ``memory-backend-file`` objects, ``virtio-pmem-pci`` devices on them (their
memory backend must be free and the guest able to hold their struct pages) and ``virtio-blk-pci``
disks on ``blockdev-add`` nodes; ``device_del`` takes a disk away and refuses virtio-pmem, as QEMU
8.2+ does. The devices do the work (:class:`labkit.devices.virtio_pmem_vm.VirtioPmem`,
:class:`labkit.devices.virtio_blk.VirtioBlk`); the monitor keeps the objects and the QOM tree.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0)
>>> vm.qmp("device_add", driver="virtio-net-pci", id="net0")
Traceback (most recent call last):
...
labkit.errors.QMPError: the model hot-adds virtio-pmem-pci and virtio-blk-pci only, got 'virtio-net-pci'
"""

from __future__ import annotations

from typing import Any

from labkit.backends.base import check_arguments
from labkit.backends.options import MemoryBackend
from labkit.devices import virtio_pmem
from labkit.devices.virtio_pmem import MEMMAP_MAX_SHARE, check_backing_file, memmap_bytes
from labkit.errors import QMPError
from labkit.units import PAGE_SIZE, parse_size

HOTPLUG_DRIVERS = ("virtio-pmem-pci", "virtio-blk-pci")


def _device_ids(monitor: Any) -> set[str]:
    vm = monitor.vm
    ids = {d.id for d in monitor.memory_devices()} | set(vm.virtio_pmem.blk.devices)
    if vm.balloon_device is not None:
        ids.add(vm.balloon_device.id)
    return ids - {None}


def device_add(monitor: Any, args: dict) -> dict:
    driver = args["driver"]
    if driver not in HOTPLUG_DRIVERS:
        raise QMPError("GenericError", f"the model hot-adds virtio-pmem-pci and virtio-blk-pci only, "
                                       f"got '{driver}'")
    if args.get("id") in _device_ids(monitor):
        raise QMPError("GenericError", f"Duplicate device ID '{args['id']}'")
    vm = monitor.vm
    if driver == "virtio-blk-pci":
        check_arguments(args, {"driver": str, "drive": str, "id": str},
                        {"write-cache": str, "bus": str, "addr": str})
        return vm.virtio_pmem.blk.device_add(args)
    check_arguments(args, {"driver": str, "memdev": str, "id": str}, {"bus": str, "addr": str})
    memdev = args["memdev"]
    backend = monitor.backends.get(memdev)
    if backend is None:
        raise QMPError("DeviceNotFound", f"Device '{memdev}' not found")  # the memdev link
    if memdev in monitor.busy:
        raise QMPError("GenericError", f"can't use already busy memdev: {memdev}")
    if backend.mem_path is None:
        raise QMPError("GenericError", f"labkit's virtio-pmem maps a file: its memdev must be a "
                                       f"memory-backend-file, got {backend.qom_type} '{memdev}'")
    # the struct-page rule of labkit.open, for the regions after this one is added
    pmem = vm.virtio_pmem
    need = sum(memmap_bytes(d.config.size) for d in pmem.devices) + memmap_bytes(backend.size)
    if need > vm.memory // MEMMAP_MAX_SHARE:
        raise QMPError("GenericError", f"the guest's {vm.memory >> 20} MiB cannot hold {need >> 20} MiB "
                                       f"of struct pages for its virtio-pmem regions")
    device = pmem.plug({"id": args["id"], "path": backend.mem_path, "size": backend.size,
                        "share": backend.share}, memdev)
    monitor.add_memory_device(device, virtio_pmem)
    return {}


def device_del(monitor: Any, args: dict) -> dict:
    device_id = args["id"]
    vm = monitor.vm
    if any(device_id in (d.id, d.qom_path) for d in vm.virtio_pmem.devices):
        # hw/virtio/virtio-md-pci.c (QEMU 8.2+): no unplug_request_check for virtio-pmem
        raise QMPError("GenericError", "this virtio based memory devices cannot be unplugged")
    blk = vm.virtio_pmem.blk
    if device_id in blk.devices:
        blk.device_del(device_id)
        vm.event_queue.emit("DEVICE_DELETED",
                            {"device": device_id, "path": f"/machine/peripheral/{device_id}"})
        return {}
    raise QMPError("DeviceNotFound", f"Device '{device_id}' not found")


def object_add(monitor: Any, args: dict) -> dict:
    check_arguments(args, {"qom-type": str, "id": str},
                    {"mem-path": str, "size": object, "share": bool, "prealloc": bool})
    if args["qom-type"] != "memory-backend-file":
        raise QMPError("GenericError", f"the model's object-add creates memory-backend-file objects "
                                       f"only, got '{args['qom-type']}'")
    object_id = args["id"]
    if object_id in monitor.backends:
        raise QMPError("GenericError", f"attempt to add duplicate property '{object_id}' to object "
                                       f"(type 'container')")
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
    monitor.add_backend(MemoryBackend(object_id, "memory-backend-file", size, share=args.get("share", False),
                                      mem_path=args["mem-path"], prealloc=args.get("prealloc", False)))
    return {}


def blockdev_add(monitor: Any, args: dict) -> dict:
    return monitor.vm.virtio_pmem.blk.blockdev_add(args)


__all__ = ["HOTPLUG_DRIVERS", "blockdev_add", "device_add", "device_del", "object_add"]
