"""The keyword options of ``labkit.open`` read into the parts of :class:`VmOptions`, and the checks
the keywords and a QEMU command line share (QEMU's texts where QEMU has one)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

import psutil

from labkit.backends.options_data import (
    BYTES_PER_PAGE_NEEDED,
    CMDLINE_CHECKS,
    CMDLINE_DEFAULTS,
    BalloonOptions,
    HostOptions,
    Limits,
    ModelKnobs,
    QemuKnobs,
    VirtioMemOptions,
    VirtioPmemOptions,
)
from labkit.backends.qemu_cmdline import check_id, parse_bool
from labkit.devices.balloon import PROPERTY_DEFAULTS as BALLOON_DEFAULTS
from labkit.devices.virtio_mem import PROPERTY_DEFAULTS as VIRTIO_MEM_DEFAULTS
from labkit.devices.virtio_mem import check_block_size
from labkit.devices.virtio_pmem import MEMMAP_MAX_SHARE, check_backing_file, memmap_bytes
from labkit.devices.virtio_pmem import PROPERTY_DEFAULTS as PMEM_DEFAULTS
from labkit.model.host import Host
from labkit.units import MiB, PAGE_SIZE, format_size, parse_size


# --- checks shared by keywords and the command line ---------------------------------------------
def check_memory(size: int, given: Any, limits: Limits) -> None:
    span = f"a whole number of MiB from {format_size(limits.min_memory)} to " \
           f"{format_size(limits.max_memory)} on the {limits.name} backend"
    if size < limits.min_memory:
        raise ValueError(f"memory must be {span}: at least {format_size(limits.min_memory)}, got {given!r}")
    if size % MiB:
        raise ValueError(f"memory must be {span}, got {given!r}")
    if size > limits.max_memory:
        raise ValueError(f"memory must be {span}: at most {format_size(limits.max_memory)}, got {given!r}")


def check_fits(pages: int) -> None:
    """The model's page arrays must fit in this machine's RAM."""
    need = pages * BYTES_PER_PAGE_NEEDED
    available = psutil.virtual_memory().available
    if need > available:
        raise ValueError(f"memory {format_size(pages * PAGE_SIZE)} needs about {format_size(need)} of "
                         f"this machine's RAM for its page arrays, but only {format_size(available)} is "
                         f"available")


def equal_node_sizes(memory: int, numa_nodes: int) -> tuple[int, ...]:
    """Per-node RAM: equal shares in whole 128 MiB blocks, the rest on the last node."""
    per_node = memory // numa_nodes // (128 * MiB) * (128 * MiB)
    return (per_node,) * (numa_nodes - 1) + (memory - per_node * (numa_nodes - 1),)


def check_virtio_mem(d: VirtioMemOptions, numa_nodes: int, backend: str) -> None:
    """virtio_mem_device_realize's checks, in QEMU's order and words (plus the model's block rule)."""
    check_block_size(d.block_size)
    if numa_nodes and d.node >= numa_nodes:
        raise ValueError(f"'node' property has value '{d.node}', which exceedsthe number of numa "
                         f"nodes: {numa_nodes}")
    if d.size % d.block_size:
        raise ValueError(f"'memdev' property memdev size has to be multiples of'block-size' "
                         f"(0x{d.block_size:x})")
    if d.requested_size % d.block_size:
        raise ValueError(f"'requested-size' property has to be multiples of 'block-size' "
                         f"(0x{d.block_size:x})")
    if d.requested_size > d.size:
        raise ValueError(f"'requested-size' cannot exceed the memory backend size(0x{d.size:x})")
    if d.memaddr is not None and d.memaddr % d.block_size:
        raise ValueError(f"address must be aligned to 0x{d.block_size:x} bytes")
    if backend == "model" and d.size % (128 * MiB):
        raise ValueError(f"virtio-mem device {d.id!r}: its memory backend size must be a multiple of "
                         f"128 MiB (a Linux memory block) in this model, got {format_size(d.size)}")


def check_pmem_memmap(devices: tuple[VirtioPmemOptions, ...], memory: int) -> None:
    need = sum(memmap_bytes(d.size) for d in devices)
    if need > memory // MEMMAP_MAX_SHARE:
        raise ValueError(f"virtio_pmem regions of {format_size(sum(d.size for d in devices))} need "
                         f"{format_size(need)} of struct pages in guest RAM (64 B per 4 KiB page), "
                         f"more than 1/{MEMMAP_MAX_SHARE} of the guest's {format_size(memory)}: the "
                         f"driver's devm_memremap_pages would starve the guest. Give it more memory "
                         f"or a smaller region.")


# --- keywords -----------------------------------------------------------------------------------
def merge(name: str, given: Mapping | None, defaults: Mapping) -> dict:
    """``given`` over ``defaults``; unknown keys are an error listing what is accepted."""
    if given is not None and not isinstance(given, Mapping):
        raise TypeError(f"{name} must be a dict of options, got {given!r}")
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; accepted: {sorted(defaults)}")
    return {**defaults, **given}


def _bool(where: str, key: str, value: Any) -> bool:
    try:
        return parse_bool(key.replace("_", "-"), value)
    except ValueError as e:
        raise ValueError(f"{where} {key}={value!r}: {e}") from None


def _id(where: str, value: Any) -> str:
    try:
        return check_id(value)
    except ValueError as e:
        raise ValueError(f"{where} id={value!r}: {e}") from None


def _number(where: str, value: Any, low: float, *, above: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if above else value >= low)
    if not ok:
        raise ValueError(f"{where} must be a finite number {'>' if above else '>='} {low:g}, got {value!r}")
    return float(value)


def balloon_from_keywords(balloon: Any) -> BalloonOptions | None:
    if balloon is False:
        return None
    if balloon is True or balloon is None:
        balloon = {}
    opts = merge("balloon", balloon, BALLOON_DEFAULTS)
    values = {key: _bool("balloon", key, opts[key]) for key in
              ("deflate_on_oom", "free_page_hint", "free_page_reporting", "page_poison")}
    iothread = opts["iothread"]
    if iothread is not None:
        iothread = _id("balloon iothread", iothread)
    result = BalloonOptions(id=_id("balloon", opts["id"]), iothread=iothread, **values)
    check_balloon(result)
    return result


def check_balloon(b: BalloonOptions) -> None:
    if b.free_page_hint and not b.iothread:
        raise ValueError("'free-page-hint' requires 'iothread' to be set")


def host_from_keywords(host: Any, backend: str) -> HostOptions | Host:
    if isinstance(host, Host):
        return host
    h = merge("host", host, asdict(HostOptions()))
    ram = parse_size(h["ram"], name="host ram") if h["ram"] is not None else None
    swap = parse_size(h["swap"], name="host swap")
    if (ram is not None and ram <= 0) or swap < 0:
        raise ValueError(f"host ram must be > 0 and swap >= 0, got {h['ram']!r}, {h['swap']!r}")
    result = HostOptions(ram, swap, _bool("host", "discard", h["discard"]),
                         _number("host swapin_us", h["swapin_us"], 0))
    if backend == "qemu" and result != HostOptions():
        warnings.warn("host options describe the model's host; the live backend runs on this "
                      "machine's real host, so they are ignored", stacklevel=4)
    return result


def model_from_keywords(model: Any) -> ModelKnobs:
    knobs = merge("model", model, asdict(ModelKnobs()))
    if knobs["boot"] not in ("default", "minimal"):
        raise ValueError(f"model boot {knobs['boot']!r} is not one of ['default', 'minimal']")
    return ModelKnobs(_number("model balloon_request_ms", knobs["balloon_request_ms"], 0, above=True),
                      knobs["boot"], _number("model epoch", knobs["epoch"], 0),
                      _number("model migration_link_bandwidth", knobs["migration_link_bandwidth"], 0,
                              above=True))


def qemu_from_keywords(qemu: Any) -> QemuKnobs:
    knobs = merge("qemu", qemu, asdict(QemuKnobs()))
    if knobs["accel"] not in ("auto", "kvm", "tcg"):
        raise ValueError(f"qemu accel {knobs['accel']!r} is not one of ['auto', 'kvm', 'tcg']")
    smp = knobs["smp"]
    if not isinstance(smp, int) or isinstance(smp, bool) or not 1 <= smp <= 64:
        raise ValueError(f"qemu smp must be an int from 1 to 64, got {smp!r}")
    for key in ("boot_timeout_s", "kvm_boot_timeout_s", "poll_ms"):
        _number(f"qemu {key}", knobs[key], 0, above=True)
    knobs["extra_args"] = tuple(knobs["extra_args"])
    return QemuKnobs(**knobs)


def cmdline_from_keywords(cmdline: Any) -> tuple[Mapping[str, Any], str]:
    merged = merge("cmdline", cmdline, CMDLINE_DEFAULTS)
    for key, (check, accepted) in CMDLINE_CHECKS.items():
        if not check(merged[key]):
            raise ValueError(f"cmdline {key}={merged[key]!r}: {accepted}")
    params = " ".join(f"{k}={v}" for k, v in (cmdline or {}).items())
    return MappingProxyType(merged), params


def virtio_mem_from_keywords(specs: Any, numa_nodes: int, backend: str) -> tuple[VirtioMemOptions, ...]:
    """``virtio_mem=[{"id", "size", "node", "requested_size", "block_size", ...}]``: each device on
    its own ``memory-backend-ram`` of ``size``, called ``mem-<id>``."""
    if specs is None:
        return ()
    if not isinstance(specs, list | tuple):
        raise TypeError(f"virtio_mem must be a list of dicts, got {specs!r}")
    out, ids = [], set()
    for i, spec in enumerate(specs):
        where = f"virtio_mem[{i}]"
        if not isinstance(spec, dict):
            raise TypeError(f"{where} must be a dict of device properties, got {spec!r}")
        opts = merge(where, spec, VIRTIO_MEM_DEFAULTS)
        if not opts["id"] or opts["id"] in ids:
            raise ValueError(f"{where} needs a unique 'id', got {opts['id']!r}")
        ids.add(_id(where, opts["id"]))
        if opts["size"] is None:
            raise ValueError(f"{where} needs 'size' (the memory backend's size)")
        sizes = {key: parse_size(opts[key], name=key.replace("_", "-"))
                 for key in ("size", "requested_size", "block_size")}
        if sizes["size"] <= 0 or sizes["requested_size"] < 0:
            raise ValueError(f"{where}: size must be > 0 and requested-size >= 0, got "
                             f"{spec.get('size')!r}, {spec.get('requested_size')!r}")
        node = opts["node"]
        if not isinstance(node, int) or isinstance(node, bool) or node < 0:
            raise ValueError(f"'node' property has value '{node}', which exceedsthe number of numa "
                             f"nodes: {numa_nodes}")
        if opts["unplugged_inaccessible"] not in ("on", "off", "auto"):
            raise ValueError(f"Parameter 'unplugged-inaccessible' does not accept value "
                             f"'{opts['unplugged_inaccessible']}'")
        memaddr = opts["memaddr"]
        if memaddr is not None:
            memaddr = parse_size(memaddr, name="memaddr")
        device = VirtioMemOptions(
            id=opts["id"], memdev=f"mem-{opts['id']}", node=node, memaddr=memaddr,
            prealloc=_bool(where, "prealloc", opts["prealloc"]),
            dynamic_memslots=_bool(where, "dynamic_memslots", opts["dynamic_memslots"]),
            unplugged_inaccessible=opts["unplugged_inaccessible"], **sizes)
        check_virtio_mem(device, numa_nodes, backend)
        out.append(device)
    return tuple(out)


def virtio_pmem_from_keywords(specs: Any, taken: set) -> tuple[VirtioPmemOptions, ...]:
    """``virtio_pmem=[{"id", "path", "size", "share"}]``: a ``memory-backend-file`` called
    ``mem-<id>`` on an existing raw file, and the device on it."""
    if specs is None:
        return ()
    if not isinstance(specs, list | tuple):
        raise TypeError(f"virtio_pmem must be a list of dicts, got {specs!r}")
    out, taken = [], set(taken)
    for i, spec in enumerate(specs):
        where = f"virtio_pmem[{i}]"
        if not isinstance(spec, dict):
            raise TypeError(f"{where} must be a dict of device properties, got {spec!r}")
        opts = merge(where, spec, PMEM_DEFAULTS)
        if not isinstance(opts["id"], str) or not opts["id"] or opts["id"] in taken:
            raise ValueError(f"{where} needs a unique 'id' (a device id), got {opts['id']!r}")
        taken.add(_id(where, opts["id"]))
        if not isinstance(opts["path"], str | os.PathLike) or not str(opts["path"]):
            raise ValueError(f"{where} needs 'path' (memory-backend-file mem-path), got {opts['path']!r}")
        if opts["size"] is None:
            raise ValueError(f"{where} needs 'size' (memory-backend-file size)")
        size = parse_size(opts["size"], name="size")
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"{where} size must be a positive multiple of 4 KiB, got {spec['size']!r}")
        device = VirtioPmemOptions(opts["id"], os.fspath(opts["path"]), size, f"mem-{opts['id']}",
                                   _bool(where, "share", opts["share"]))
        check_backing_file(device.path, device.size, device.memdev)
        out.append(device)
    return tuple(out)
