"""The ``-device`` options of a QEMU command line read into VmOptions' devices, with QEMU's
realize-time checks and texts (memory-device space, busy memdevs, ids; hw/mem/memory-device.c,
hw/virtio/virtio-mem.c, hw/virtio/virtio-balloon.c), and the keyword devices joined to them.

The device types and their properties are data (:data:`DEVICE_PROPERTIES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from labkit.backends.options_data import (
    BalloonOptions,
    MemoryBackend,
    VirtioMemOptions,
    VirtioPmemOptions,
    VmOptions,
)
from labkit.backends.options_keywords import (
    balloon_from_keywords,
    check_balloon,
    check_pmem_memmap,
    check_virtio_mem,
    virtio_mem_from_keywords,
    virtio_pmem_from_keywords,
)
from labkit.backends.qemu_cmdline import CommandLine, Given, QemuOptionError, fail, property_value
from labkit.devices.virtio_pmem import check_backing_file
from labkit.units import PAGE_SIZE

_PCI = {"id": "id", "bus": "str", "addr": "str", "multifunction": "bool", "rombar": "uint32"}
DEVICE_PROPERTIES = {
    "virtio-balloon-pci": {**_PCI, "deflate-on-oom": "bool", "free-page-hint": "bool",
                           "free-page-reporting": "bool", "page-poison": "bool",
                           "iothread": "link<iothread>"},
    "virtio-mem-pci": {**_PCI, "memdev": "link<memory-backend>", "node": "uint32",
                       "requested-size": "size", "block-size": "size", "prealloc": "bool",
                       "unplugged-inaccessible": "OnOffAuto", "dynamic-memslots": "bool",
                       "memaddr": "uint64"},
    "virtio-pmem-pci": {**_PCI, "memdev": "link<memory-backend>", "memaddr": "uint64"},
}
DEVICE_ALIASES = {"virtio-balloon": "virtio-balloon-pci", "virtio-mem": "virtio-mem-pci",
                  "virtio-pmem": "virtio-pmem-pci"}  # qdev aliases on x86 (qdev-monitor.c)

def devices(opts: VmOptions, line: CommandLine, objects: dict, keywords: Mapping[str, Any], slots: int,
             from_line: set) -> VmOptions:
    """The line's devices in order, with QEMU's realize-time checks."""
    backend, numa = opts.backend, len(opts.node_sizes) if line.numa else 1
    ids: set[str] = set()
    busy: set[str] = set()
    balloon, vmem, pmem = None, [], []
    space_used, maxmem = 0, opts.maxmem if line.memory is not None else None
    for given in line.devices:
        driver, props = _driver(given, backend)
        if driver is None:
            continue
        where = given.where
        device_id = props.get("id")
        if device_id is not None:
            if device_id in ids:
                raise fail(where, f"Duplicate ID '{device_id}' for device")
            ids.add(device_id)
        if driver == "virtio-balloon-pci":
            if balloon is not None:
                raise fail(where, "Only one balloon device is supported")
            balloon = _balloon(given, props, objects)
            continue
        memdev = props.get("memdev")
        if memdev is None:
            raise fail(where, "'memdev' property must be set")
        backing = objects.get(memdev)
        if backing is None:
            raise fail(where, f"Device '{memdev}' not found")
        if maxmem is None and line.memory is not None:
            raise fail(where, "memory devices (e.g. for memory hotplug) are not enabled, please specify "
                               "the maxmem option")
        total = (maxmem or 0) - opts.memory
        if maxmem is not None and space_used + backing.size > total:
            raise fail(where, f"not enough space, currently 0x{space_used:x} in use of total space for "
                               f"memory devices 0x{total:x}")
        if memdev in busy or memdev in opts.node_memdevs or memdev == opts.ram_memdev:
            raise fail(where, f"can't use already busy memdev: {memdev}")
        space_used += backing.size
        busy.add(memdev)
        try:
            if driver == "virtio-mem-pci":
                vmem.append(_virtio_mem(props, backing, numa, backend))
            else:
                pmem.append(_virtio_pmem(props, backing, backend))
        except ValueError as e:
            raise fail("" if "backing store" in str(e) else where, str(e)) from None
    if balloon is not None:
        from_line.add("balloon")
    if vmem:
        from_line.add("virtio_mem")
    if pmem:
        from_line.add("virtio_pmem")
    return _with_keyword_devices(opts, balloon, tuple(vmem), tuple(pmem), objects, keywords, maxmem,
                                 space_used, frozenset(from_line))


def _driver(given: Given, backend: str) -> tuple[str | None, dict]:
    props = dict(given.props)
    driver = props.pop("driver", None)
    if driver is None:
        raise fail(given.where, "Parameter 'driver' is missing")
    driver = DEVICE_ALIASES.get(driver, driver)
    known = DEVICE_PROPERTIES.get(driver)
    if known is None:
        if backend == "model":
            raise fail(given.where, f"labkit's model has no device '{driver}' (it models "
                                     f"{', '.join(DEVICE_PROPERTIES)}); with backend='qemu' QEMU reads it")
        return None, {}
    values = {}
    for name, raw in props.items():
        kind = known.get(name)
        if kind is None:
            if backend == "qemu":
                continue  # a QEMU property labkit does not read: QEMU judges it
            raise fail(given.where, f"Property '{driver}.{name}' not found")
        values[name] = property_value(given.where, name, kind, raw, "device")
    return driver, values


def _balloon(given: Given, props: dict, objects: dict) -> BalloonOptions:
    iothread = props.get("iothread")
    if iothread is not None and (iothread not in objects or objects[iothread] is not None):
        raise fail(given.where, f"Device '{iothread}' not found")
    balloon = BalloonOptions(id=props.get("id"), iothread=iothread, **{
        key.replace("-", "_"): props[key] for key in
        ("deflate-on-oom", "free-page-hint", "free-page-reporting", "page-poison") if key in props})
    try:
        check_balloon(balloon)
    except ValueError as e:
        raise fail(given.where, str(e)) from None
    return balloon


def _virtio_mem(props: dict, backing: MemoryBackend, numa: int, backend: str) -> VirtioMemOptions:
    if backend == "model" and backing.qom_type != "memory-backend-ram":
        raise ValueError(f"labkit's model backs virtio-mem with memory-backend-ram only, got "
                         f"{backing.qom_type} '{backing.id}'")
    device = VirtioMemOptions(
        id=props.get("id"), size=backing.size, memdev=backing.id, node=props.get("node", 0),
        requested_size=props.get("requested-size", 0),
        block_size=props.get("block-size", VirtioMemOptions.block_size),
        prealloc=props.get("prealloc", False),
        unplugged_inaccessible=props.get("unplugged-inaccessible", "on"),
        dynamic_memslots=props.get("dynamic-memslots", False), memaddr=props.get("memaddr"))
    check_virtio_mem(device, numa, backend)
    return device


def _virtio_pmem(props: dict, backing: MemoryBackend, backend: str) -> VirtioPmemOptions:
    if backing.mem_path is None:
        raise ValueError(f"labkit's virtio-pmem maps a file: its memdev must be a memory-backend-file, "
                         f"got {backing.qom_type} '{backing.id}'")
    if backing.size % PAGE_SIZE:
        raise ValueError(f"the memory backend '{backing.id}' size must be a multiple of 4 KiB")
    check_backing_file(backing.mem_path, backing.size, backing.id)
    return VirtioPmemOptions(props.get("id"), backing.mem_path, backing.size, backing.id, backing.share)


def _with_keyword_devices(opts: VmOptions, balloon, vmem, pmem, objects: dict, keywords: Mapping[str, Any],
                          maxmem: int | None, space_used: int, from_line: frozenset) -> VmOptions:
    """Devices given as keywords join the line's (one source per kind); a line without ``-m`` gets
    labkit's memory with ``maxmem`` covering every memory device."""
    for kind, on_line in (("balloon", balloon is not None), ("virtio_mem", bool(vmem)),
                          ("virtio_pmem", bool(pmem))):
        if on_line and keywords.get(kind) is not None:
            raise ValueError(f"{kind}= and a -device in qemu_args both give the {kind.replace('_', '-')} "
                             f"device(s): give them once")
    if "balloon" not in from_line and keywords.get("balloon") is not None:
        balloon = balloon_from_keywords(keywords["balloon"])
    if not vmem:
        vmem = virtio_mem_from_keywords(keywords.get("virtio_mem"), len(opts.node_sizes), opts.backend)
    if not pmem:
        taken = {d.id for d in vmem}
        pmem = virtio_pmem_from_keywords(keywords.get("virtio_pmem"), taken)
    check_pmem_memmap(pmem, opts.memory)
    labkit_backends = tuple(MemoryBackend(d.memdev, "memory-backend-ram", d.size, prealloc=d.prealloc)
                            for d in vmem if d.memdev not in objects) + tuple(
        MemoryBackend(d.memdev, "memory-backend-file", d.size, share=d.share, mem_path=d.path)
        for d in pmem if d.memdev not in objects)
    device_memory = sum(d.size for d in vmem) + sum(d.size for d in pmem)
    if maxmem is None and "memory" in from_line and device_memory:
        raise QemuOptionError("memory devices (e.g. for memory hotplug) are not enabled, please specify "
                              "the maxmem option")
    if maxmem is None:
        maxmem = opts.memory + device_memory
    elif device_memory > space_used and device_memory > maxmem - opts.memory:
        raise QemuOptionError(f"not enough space, currently 0x{space_used:x} in use of total space for "
                              f"memory devices 0x{maxmem - opts.memory:x}")
    line_backends = tuple(o for o in objects.values() if o is not None)
    if balloon is not None and balloon.iothread and balloon.iothread not in opts.iothreads:
        iothreads = opts.iothreads + (balloon.iothread,)
    else:
        iothreads = opts.iothreads
    return dataclasses.replace(opts, maxmem=maxmem, balloon=balloon, virtio_mem=tuple(vmem),
                               virtio_pmem=tuple(pmem), memory_backends=line_backends + labkit_backends,
                               iothreads=iothreads, from_line=from_line)


__all__ = ["DEVICE_ALIASES", "DEVICE_PROPERTIES", "devices"]
