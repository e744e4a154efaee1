"""The keyword options of ``labkit.open`` read into the parts of :class:`VmOptions`, and the checks
the keywords and a QEMU command line share (QEMU's texts where QEMU has one)."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

import numpy as np
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
from labkit.backends.options_switches import Realize, realize_discard, realize_virtio_mem
from labkit.backends.qemu_cmdline import check_id, parse_bool
from labkit.devices.balloon import PROPERTY_DEFAULTS as BALLOON_DEFAULTS
from labkit.devices.virtio_mem import PROPERTY_DEFAULTS as VIRTIO_MEM_DEFAULTS
from labkit.devices.virtio_mem import check_block_size
from labkit.devices.virtio_pmem import MEMMAP_MAX_SHARE, check_backing_file, memmap_bytes
from labkit.devices.virtio_pmem import PROPERTY_DEFAULTS as PMEM_DEFAULTS
from labkit.errors import shown
from labkit.model.bootparams import kernel_arguments, parse_bootparams
from labkit.model.host import Host
from labkit.units import MiB, PAGE_SIZE, format_size, parse_size

MAX_SWAPIN_US = 1e6  # a swap-in of one page taking a second is already a dead disk
MAX_REQUEST_MS = 60_000.0  # a balloon request answered after a minute: the device is gone
MAX_EPOCH = 2**53 / 1e6  # the wall clock's seconds stay exact to the microsecond in a float


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


def check_virtio_mem(d: VirtioMemOptions, numa_nodes: int, backend: str, machine: Realize | None = None,
                     block_given: bool = True,
                     page_size: int = PAGE_SIZE) -> tuple[VirtioMemOptions, list[str]]:
    """virtio_mem_device_realize's checks, in QEMU's order and words (plus the model's block rule):
    the device with QEMU's default block size when none was given (from its memory backend's
    ``page_size``), and the warnings QEMU prints."""
    if block_given:
        check_block_size(d.block_size)
    if numa_nodes and d.node >= numa_nodes:
        raise ValueError(f"'node' property has value '{d.node}', which exceedsthe number of numa "
                         f"nodes: {numa_nodes}")
    d, warnings = realize_virtio_mem(d, block_given, page_size, machine or Realize())
    if d.size % d.block_size:
        raise ValueError(f"'memdev' property memdev size has to be multiples of'block-size' "
                         f"(0x{d.block_size:x})")
    if d.requested_size % d.block_size:
        raise ValueError(f"'requested-size' property has to be multiples of 'block-size' "
                         f"(0x{d.block_size:x})")
    if d.memaddr is not None and d.memaddr % d.block_size:
        raise ValueError(f"address must be aligned to 0x{d.block_size:x} bytes")
    if backend == "model" and d.size % (128 * MiB):
        raise ValueError(f"virtio-mem device {d.id!r}: its memory backend size must be a multiple of "
                         f"128 MiB (a Linux memory block) in this model, got {format_size(d.size)}")
    realize_discard(machine or Realize())
    return d, warnings


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


def _number(where: str, value: Any, low: float, *, above: bool = False, high: float = math.inf,
            unit: str = "") -> float:
    """A real number (numpy's too; not a bool), finite, in range; else a ValueError naming it."""
    accepted = f"a finite number {'>' if above else '>='} {low:g}" + (
        f" and <= {high:g}" if high < math.inf else "") + (f" ({unit})" if unit else "")
    number = math.nan
    if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = math.inf
    if not (math.isfinite(number) and (number > low if above else number >= low) and number <= high):
        raise ValueError(f"{where} must be {accepted}, got {shown(value)}")
    return number


def integer(where: str, value: Any, low: int, high: int, what: str = "") -> int:
    """An int (numpy's integers too; not a bool) from ``low`` to ``high``; else a ValueError naming it."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_) and \
            low <= int(value) <= high:
        return int(value)
    raise ValueError(f"{where} must be an int from {low} to {high}{what}, got {shown(value)}")


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
    if ram is not None and ram <= 0:
        raise ValueError(f"host ram must be a size > 0 (bytes or a string like '8G'), got {shown(h['ram'])}")
    if swap < 0:
        raise ValueError(f"host swap must be a size >= 0 (bytes or a string like '8G'), got "
                         f"{shown(h['swap'])}")
    result = HostOptions(ram, swap, _bool("host", "discard", h["discard"]),
                         _number("host swapin_us", h["swapin_us"], 0, high=MAX_SWAPIN_US,
                                 unit="microseconds a swapped-out page takes to come back"),
                         _bool("host", "thp", h["thp"]))
    if backend == "qemu" and result != HostOptions():
        warnings.warn("host options describe the model's host; the live backend runs on this "
                      "machine's real host, so they are ignored", stacklevel=4)
    return result


def model_from_keywords(model: Any) -> ModelKnobs:
    knobs = merge("model", model, asdict(ModelKnobs()))
    if knobs["boot"] not in ("default", "minimal"):
        raise ValueError(f"model boot {knobs['boot']!r} is not one of ['default', 'minimal']")
    initrd = knobs["initrd_bytes"]
    if initrd is not None:
        if isinstance(initrd, np.integer):
            initrd = int(initrd)
        if not isinstance(initrd, int) or isinstance(initrd, bool) or not 0 <= initrd <= 1 << 30:
            raise ValueError(f"model initrd_bytes must be an int from 0 to 1 GiB (the initramfs's "
                             f"size in bytes) or None, got {shown(knobs['initrd_bytes'])}")
    return ModelKnobs(
        _number("model balloon_request_ms", knobs["balloon_request_ms"], 0, above=True,
                high=MAX_REQUEST_MS, unit="milliseconds one balloon request takes"),
        knobs["boot"],
        _number("model epoch", knobs["epoch"], 0, high=MAX_EPOCH,
                unit="seconds since 1970 at t=0, exact to the microsecond"),
        _number("model migration_link_bandwidth", knobs["migration_link_bandwidth"], 0, above=True,
                unit="bytes per second"),
        initrd)


def qemu_from_keywords(qemu: Any) -> QemuKnobs:
    knobs = merge("qemu", qemu, asdict(QemuKnobs()))
    if knobs["accel"] not in ("auto", "kvm", "tcg"):
        raise ValueError(f"qemu accel {knobs['accel']!r} is not one of ['auto', 'kvm', 'tcg']")
    knobs["smp"] = integer("qemu smp", knobs["smp"], 1, 64)
    for key in ("boot_timeout_s", "kvm_boot_timeout_s", "poll_ms"):
        knobs[key] = _number(f"qemu {key}", knobs[key], 0, above=True)
    for key in ("thp", "scratch_disk", "pvh"):
        knobs[key] = _bool("qemu", key, knobs[key])
    for key in ("kernel", "bios"):
        if knobs[key] is not None and not isinstance(knobs[key], str | os.PathLike):
            raise ValueError(f"qemu {key} must be a path (a string), got {shown(knobs[key])}")
    extra = knobs["extra_args"]
    if isinstance(extra, str) or not isinstance(extra, list | tuple) or not all(
            isinstance(a, str) for a in extra):
        raise ValueError(f"qemu extra_args must be a list of strings (QEMU arguments), got {shown(extra)}")
    knobs["extra_args"] = tuple(extra)
    return QemuKnobs(**knobs)


def cmdline_from_keywords(cmdline: Any) -> tuple[Mapping[str, Any], str]:
    """The guest kernel's parameters and sysctls (:mod:`labkit.model.bootparams`): every knob with
    its distro default, and the ones given as the live guest's kernel command line."""
    merged = merge("cmdline", cmdline, CMDLINE_DEFAULTS)
    for key, (check, accepted) in CMDLINE_CHECKS.items():
        value = merged[key]
        if isinstance(value, np.integer):  # numpy's integers are ints
            merged[key] = value = int(value)
        if not check(value):
            raise ValueError(f"cmdline {key}={shown(value)}: {accepted}")
    given = {key: merged[key] for key in cmdline or {}}
    return MappingProxyType(parse_bootparams(given).cmdline_keys()), " ".join(kernel_arguments(given))


def virtio_mem_from_keywords(specs: Any, numa_nodes: int, backend: str,
                             machine: Realize | None = None) -> tuple[tuple[VirtioMemOptions, ...],
                                                                      list[str]]:
    """``virtio_mem=[{"id", "size", "node", "requested_size", "block_size", ...}]``: each device on
    its own ``memory-backend-ram`` of ``size``, called ``mem-<id>``; with the warnings QEMU prints
    while it realizes them."""
    machine = machine or Realize()
    if specs is None:
        return (), []
    if not isinstance(specs, list | tuple):
        raise TypeError(f"virtio_mem must be a list of dicts, got {specs!r}")
    out, ids, warnings = [], set(), []
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
        block_given = opts["block_size"] is not None
        sizes = {key: parse_size(opts[key], name=key.replace("_", "-"))
                 for key in ("size", "requested_size", "block_size") if opts[key] is not None}
        if sizes["size"] <= 0 or sizes["requested_size"] < 0:
            raise ValueError(f"{where}: size must be > 0 and requested-size >= 0, got "
                             f"{spec.get('size')!r}, {spec.get('requested_size')!r}")
        node = opts["node"]
        if isinstance(node, np.integer):
            node = int(node)
        if not isinstance(node, int) or isinstance(node, bool) or node < 0:
            raise ValueError(f"{where} node must be a NUMA node number from 0 to {numa_nodes - 1}, "
                             f"got {shown(node)}")
        if opts["unplugged_inaccessible"] not in ("on", "off", "auto"):
            raise ValueError(f"Parameter 'unplugged-inaccessible' does not accept value "
                             f"'{opts['unplugged_inaccessible']}'")
        memaddr = opts["memaddr"]
        if memaddr is not None:
            memaddr = parse_size(memaddr, name="memaddr")
            if memaddr < 0:
                raise ValueError(f"{where} memaddr must be a guest physical address >= 0, got "
                                 f"{shown(opts['memaddr'])}")
        device = VirtioMemOptions(
            id=opts["id"], memdev=f"mem-{opts['id']}", node=node, memaddr=memaddr,
            prealloc=_bool(where, "prealloc", opts["prealloc"]),
            dynamic_memslots=_bool(where, "dynamic_memslots", opts["dynamic_memslots"]),
            unplugged_inaccessible=opts["unplugged_inaccessible"], **sizes)
        device, said = check_virtio_mem(device, numa_nodes, backend, machine, block_given,
                                        machine.host_page_size)
        warnings += said
        out.append(device)
    return tuple(out), warnings


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
