"""A QEMU command line (``labkit.open(qemu_args=...)``) read into the same :class:`VmOptions`.

What labkit reads, with QEMU's checks and texts (checked against qemu-system-x86_64 7.2):
``-m SIZE[,slots=N,maxmem=SIZE]``, ``-smp``, ``-machine [q35][,memory-backend=ID]``, ``-object
memory-backend-ram|memory-backend-file|iothread,...``, ``-numa node[,nodeid=N][,memdev=ID]``,
``-device virtio-balloon-pci|virtio-mem-pci|virtio-pmem-pci,...``, and ``-append`` for the guest
kernel parameters the model honours (``memhp_default_state=online_movable``). Objects are created before
devices, whatever their order on the line, as in QEMU. A line without ``-m`` gets labkit's
``memory`` (4 GiB by default) with ``maxmem`` just large enough for its memory devices, so the
talk's virtio-pmem line works alone; a line with ``-m`` and memory devices needs ``maxmem``, as in
QEMU. On the live backend every argument is passed to QEMU as given, including options labkit does
not read; the model refuses those with a clear error.

The types and properties are data (:data:`OBJECT_PROPERTIES`, ``options_devices.DEVICE_PROPERTIES``): a new
object or device is a new entry there and a few lines in
:func:`labkit.backends.options_devices.devices`.

>>> from labkit.backends.options import parse_options
>>> o = parse_options("model", qemu_args="-m 4G,maxmem=20G -object memory-backend-ram,id=mem0,"
...                   "size=16G -device virtio-mem-pci,id=vm0,memdev=mem0,node=0")
>>> o.memory >> 30, o.maxmem >> 30, o.virtio_mem[0].memdev, o.virtio_mem[0].size >> 30, o.balloon
(4, 20, 'mem0', 16, None)
>>> parse_options("model", qemu_args="-m 4G -object memory-backend-ram,id=mem0,size=16G "
...               "-device virtio-mem-pci,id=vm0,memdev=mem0")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
labkit.backends.qemu_cmdline.QemuOptionError: -device virtio-mem-pci,...: memory devices (e.g. for ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from labkit.backends.options_data import CMDLINE_DEFAULTS, Limits, MemoryBackend, VmOptions
from labkit.backends.options_devices import devices
from labkit.backends.options_keywords import check_memory, cmdline_from_keywords
from labkit.backends.qemu_cmdline import (
    CommandLine,
    QemuOptionError,
    fail,
    parse_command_line,
    property_value,
)
from labkit.model.hotplug import ONLINE_TYPES
from labkit.units import MiB, parse_size

ACPI_MAX_RAM_SLOTS = 256  # hw/i386/pc.c: "unsupported amount of memory slots"
_MEMORY_BACKEND = {"id": "id", "size": "size", "share": "bool", "prealloc": "bool", "merge": "bool",
                   "dump": "bool", "reserve": "bool", "policy": "str", "host-nodes": "str",
                   "prealloc-threads": "uint32", "x-use-canonical-path-for-ramblock-id": "bool"}
OBJECT_PROPERTIES = {
    "memory-backend-ram": _MEMORY_BACKEND,
    "memory-backend-file": {**_MEMORY_BACKEND, "mem-path": "str", "align": "size", "pmem": "bool",
                            "discard-data": "bool", "readonly": "bool", "offset": "size"},
    "iothread": {"id": "id", "poll-max-ns": "uint64", "poll-grow": "uint64", "poll-shrink": "uint64",
                 "aio-max-batch": "uint64"},
}
# options the live backend sets itself (its guest kernel, consoles, QMP, accelerator)
LIVE_OWNED = ("-kernel", "-initrd", "-append", "-bios", "-accel", "-enable-kvm", "-no-kvm", "-serial",
              "-nodefaults", "-no-user-config", "-display", "-nographic", "-name", "-no-reboot",
              "-daemonize", "-S", "-pidfile")


def from_command_line(base: VmOptions, keywords: Mapping[str, Any], limits: Limits) -> VmOptions:
    """Read ``keywords["qemu_args"]`` into ``base`` (the keyword options already checked)."""
    backend = base.backend
    line = parse_command_line(keywords["qemu_args"])
    for keyword, option, on_line in (("memory", "-m", line.memory), ("numa_nodes", "-numa", line.numa),
                                     ("qemu", "-smp", line.smp)):
        given = keywords.get(keyword)
        if on_line and given is not None and (keyword != "qemu" or "smp" in given):
            raise ValueError(f"{keyword}= and {option} in qemu_args both say the same thing: give it once")
    passthrough = _passthrough(line, backend)
    objects = _objects(line, backend)
    from_line = set()
    memory, maxmem, slots = _memory(line, keywords, limits)
    if line.memory is not None:
        from_line.add("memory")
    ram_memdev = "pc.ram"
    if line.machine:
        ram_memdev = _machine(line.machine, objects, backend, memory, line.memory is not None) or ram_memdev
        if line.memory is None and ram_memdev != "pc.ram":
            memory = objects[ram_memdev].size
    check_memory(memory, line.memory["size"] if line.memory else keywords.get("memory", "4G"), limits)
    node_sizes, node_memdevs = _numa(line, objects, memory, ram_memdev, backend)
    smp = base.qemu.smp
    if line.smp is not None:
        smp = _smp(line.smp)
        from_line.add("smp")
    if line.numa:
        from_line.add("numa")
    opts = dataclasses.replace(
        base, memory=memory, maxmem=maxmem, smp=smp, node_sizes=node_sizes, node_memdevs=node_memdevs,
        ram_memdev=ram_memdev, iothreads=tuple(k for k, o in objects.items() if o is None),
        qemu_args=line.args, passthrough=tuple(passthrough))
    if line.append is not None:
        opts = _append(opts, line.append, keywords)
    return devices(opts, line, objects, keywords, slots, from_line)


def _append(opts: VmOptions, text: str, keywords: Mapping[str, Any]) -> VmOptions:
    """``-append "memhp_default_state=online_movable init_on_free=1"``: the guest kernel parameters
    the model honours (as the ``cmdline`` and ``memhp_default_state`` keywords); the live backend
    passes every parameter to its guest kernel."""
    if keywords.get("cmdline") is not None or keywords.get("memhp_default_state") is not None:
        raise ValueError("cmdline=/memhp_default_state= and -append in qemu_args both give kernel "
                         "parameters: give them once")
    params: dict[str, Any] = {}
    state = opts.memhp_default_state
    for word in text.split():
        key, _, value = word.partition("=")
        if key == "memhp_default_state":
            state = value
        elif key in CMDLINE_DEFAULTS:
            params[key] = int(value) if value.lstrip("-").isdigit() else value
        elif opts.backend == "model":
            raise QemuOptionError(f"-append {text}: labkit's model honours the kernel parameters "
                                  f"memhp_default_state, {', '.join(CMDLINE_DEFAULTS)}; got {word!r}")
    if state not in ONLINE_TYPES:
        raise QemuOptionError(f"-append {text}: memhp_default_state {state!r} is not one of "
                              f"{list(ONLINE_TYPES)}")
    cmdline, kernel_params = cmdline_from_keywords(params)
    if opts.backend == "qemu":  # every parameter goes to the real kernel, as given
        kernel_params = " ".join(w for w in text.split() if not w.startswith("memhp_default_state="))
    return dataclasses.replace(opts, cmdline=cmdline, kernel_params=kernel_params, memhp_default_state=state)


def _passthrough(line: CommandLine, backend: str) -> list[tuple[str, ...]]:
    for option in line.passthrough:
        if backend == "model":
            raise QemuOptionError(f"{' '.join(option)}: labkit's model does not take QEMU option "
                                  f"{option[0]} (it reads -m, -smp, -machine, -object, -numa, -device); "
                                  f"with backend='qemu' it is passed to QEMU as given")
        if option[0] in LIVE_OWNED:
            raise QemuOptionError(f"{' '.join(option)}: labkit's live backend sets {option[0]} itself "
                                  f"(its guest kernel, consoles and QMP socket); leave it out of qemu_args")
    return line.passthrough


def _objects(line: CommandLine, backend: str) -> dict[str, MemoryBackend | None]:
    """Memory backends by id (None for an iothread), in the line's order."""
    objects: dict[str, MemoryBackend | None] = {}
    for given in line.objects:
        props, where = given.props, given.where
        qom_type = props.get("qom-type")
        if qom_type is None:
            raise fail(where, "Parameter 'qom-type' is missing")
        known = OBJECT_PROPERTIES.get(qom_type)
        if known is None:
            if backend == "model":
                raise fail(where, f"labkit's model has no object type '{qom_type}' (it has "
                                   f"{', '.join(OBJECT_PROPERTIES)}); with backend='qemu' QEMU reads it")
            continue
        if "id" not in props:
            raise fail(where, "Parameter 'id' is missing")
        values = {}
        for name, raw in props.items():
            if name == "qom-type":
                continue
            if name not in known:
                raise fail(where, f"Invalid parameter '{name}'")
            values[name] = property_value(where, name, known[name], raw, "object")
        object_id = values["id"]
        if object_id in objects:
            raise fail(where, f"Duplicate ID '{object_id}' for object")
        if qom_type == "iothread":
            objects[object_id] = None
            continue
        for required in ("size",) + (("mem-path",) if qom_type == "memory-backend-file" else ()):
            if required not in values:
                raise fail(where, f"Parameter '{required}' is missing")
        if values["size"] == 0:
            raise fail("", f"property 'size' of {qom_type} doesn't take value '0'")
        objects[object_id] = MemoryBackend(
            object_id, qom_type, values["size"], share=values.get("share", False),
            mem_path=values.get("mem-path"), prealloc=values.get("prealloc", False),
            merge=values.get("merge", True), dump=values.get("dump", True),
            reserve=values.get("reserve", True), policy=values.get("policy", "default"))
    return objects


def _memory(line: CommandLine, keywords: Mapping[str, Any], limits: Limits) -> tuple[int, int | None, int]:
    """-m: (boot RAM, maxmem or None when not given, slots)."""
    if line.memory is None:
        memory = keywords.get("memory", "4G")
        return parse_size(memory, name="memory"), None, 0
    where, props = line.memory_where, line.memory
    for name in props:
        if name not in ("size", "slots", "maxmem"):
            raise fail(where, f"Invalid parameter '{name}'")
    if "size" not in props:
        raise fail(where, "Parameter 'size' is missing")
    memory = property_value(where, "size", "size", props["size"], "-m")
    maxmem = property_value(where, "maxmem", "size", props["maxmem"], "-m") if "maxmem" in props else None
    slots = property_value(where, "slots", "uint64", props.get("slots", "0"), "-m")
    if maxmem is not None and maxmem < memory:
        raise fail("", f"invalid value of maxmem: maximum memory size (0x{maxmem:x}) must be at least "
                        f"the initial memory size (0x{memory:x})")
    if slots > ACPI_MAX_RAM_SLOTS:
        raise fail("", f"unsupported amount of memory slots: {slots}")
    return memory, maxmem, slots


def _machine(props: dict, objects: dict, backend: str, memory: int, memory_given: bool) -> str | None:
    where = "-machine " + ",".join(f"{k}={v}" for k, v in props.items())
    machine_type = props.get("type", "q35")
    if machine_type != "q35" and not str(machine_type).startswith("pc-q35"):
        raise fail(where, f"labkit's machines are q35 (x86-64), got machine type '{machine_type}'")
    for name in props:
        if name == "accel" and backend == "qemu":
            raise fail(where, "labkit's live backend sets the accelerator itself; use qemu={'accel': ...}")
        if name not in ("type", "memory-backend") and backend == "model":
            raise fail(where, f"labkit's model does not model machine property '{name}'; with "
                               f"backend='qemu' QEMU reads it")
    ram = props.get("memory-backend")
    if ram is None:
        return None
    if objects.get(ram) is None:
        raise fail(where, f"Device '{ram}' not found")
    if memory_given and objects[ram].size != memory:
        raise fail("", "Machine memory size does not match the size of the memory backend")
    return ram


def _numa(line: CommandLine, objects: dict, memory: int, ram_memdev: str,
          backend: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if not line.numa:
        return (memory,), (ram_memdev if ram_memdev != "pc.ram" else "",)
    nodes: dict[int, str] = {}
    for given in line.numa:
        props, where = given.props, given.where
        kind = props.get("type", "node")
        if kind != "node":
            if backend == "model":
                raise fail(where, f"labkit's model reads -numa node only, not -numa {kind}")
            continue
        for name in props:
            if name == "mem":
                raise fail(where, "Parameter -numa node,mem is not supported by this machine type\n"
                                   "Use -numa node,memdev instead")
            if name not in ("type", "nodeid", "memdev", "cpus", "initiator"):
                raise fail(where, f"Invalid parameter '{name}'")
        node = property_value(where, "nodeid", "uint32", props.get("nodeid", str(len(nodes))), "device")
        if node in nodes:
            raise fail(where, f"Duplicate NUMA nodeid: {node}")
        memdev = props.get("memdev", "")
        if memdev and objects.get(memdev) is None:
            raise fail(where, f"Device '{memdev}' not found")
        nodes[node] = memdev
    for node in range(max(nodes), -1, -1):  # "Report large node IDs first" (hw/core/numa.c)
        if node not in nodes:
            raise fail("numa", f"Node ID missing: {node}")
    sizes = tuple(objects[nodes[n]].size if nodes[n] else 0 for n in range(len(nodes)))
    if sum(sizes) != memory:
        raise fail("", f"total memory for NUMA nodes (0x{sum(sizes):x}) should equal RAM size "
                        f"(0x{memory:x})")
    if backend == "model" and any(s % (128 * MiB) for s in sizes[:-1]):
        raise fail("", f"labkit's model needs NUMA nodes of whole 128 MiB memory blocks (the last may "
                        f"hold the rest), got {[s // MiB for s in sizes]} MiB")
    return sizes, tuple(nodes[n] for n in range(len(nodes)))


def _smp(props: dict) -> int:
    try:
        counts = {k: int(v) for k, v in props.items() if k in ("cpus", "sockets", "cores", "threads")}
    except ValueError:
        raise QemuOptionError("Parameter 'smp.cpus' expects integer") from None
    cpus = counts.get("cpus") or (
        counts.get("sockets", 1) * counts.get("cores", 1) * counts.get("threads", 1))
    if cpus < 1:
        raise QemuOptionError("Invalid SMP CPUs 0. The min CPUs supported by machine 'pc-q35' is 1")
    return cpus


__all__ = ["LIVE_OWNED", "OBJECT_PROPERTIES", "from_command_line"]
