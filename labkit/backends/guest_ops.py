"""The arguments of every guest op, as data, checked before an op runs (on the model and on the
live backend): a missing or unknown argument, or a value of the wrong kind, is an error that names
the op, the argument, the value and what the op takes, in labkit's words rather than Python's
("missing 1 required positional argument"). Values come out normalised: numpy's integers are
ints, numpy's bools are bools.

The ops themselves check what depends on the VM (a handle that exists, a size that fits, a device
that is there).

>>> check("alloc", {"size": "64M", "kind": "anon"})
{'size': '64M', 'kind': 'anon'}
>>> check("free", {})
Traceback (most recent call last):
...
TypeError: guest op 'free' needs argument 'handle'; it takes handle (a handle number from alloc)
>>> check("touch", {"handle": 3, "pages": 5})
Traceback (most recent call last):
...
TypeError: guest op 'touch' takes no argument 'pages'; it takes handle (a handle number from alloc)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labkit.backends.qemu_cmdline import id_wellformed
from labkit.errors import shown
from labkit.model.writeback import SYSCTL_RANGES

MAX_FLUSH_REQUESTS = 100_000  # labkit.devices.virtio_pmem_vm's bound on concurrent fsyncs
KINDS = ("anon", "file", "shmem", "slab")


@dataclass(frozen=True)
class Arg:
    """One argument: what it accepts (``text``) and how a value is checked and normalised."""

    text: str
    convert: Callable[[Any], Any]  # returns the value to pass on; raises _Refused if not accepted


class _Refused(Exception):
    """The value is not accepted: of the wrong type (TypeError) or out of range (ValueError)."""

    def __init__(self, out_of_range: bool = False):
        super().__init__()
        self.out_of_range = out_of_range


def _integer(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_):
        return int(value)
    raise _Refused


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = _integer(value)
        if not low <= number <= high:
            raise _Refused(out_of_range=True)
        return number
    return convert


def _size(value: Any) -> int | str:
    if isinstance(value, str):
        return str(value)  # parsed (suffixes, range) by the op
    number = _integer(value)
    if number >= 1 << 64:  # sizes are uint64, as in QEMU; alignment and fit are the op's checks
        raise _Refused(out_of_range=True)
    return number


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise _Refused


def _str(value: Any) -> str:
    if isinstance(value, str):
        return str(value)
    raise _Refused


def _device(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused
    if not id_wellformed(value):
        raise _Refused(out_of_range=True)
    return str(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return str(value)
        raise _Refused(out_of_range=isinstance(value, str))
    return convert


def _block(value: Any) -> int | str:
    return "all" if isinstance(value, str) and value == "all" else _int_range(0, 1 << 40)(value)


HANDLE = Arg("a handle number from alloc", _int_range(-(1 << 63), (1 << 63) - 1))
SIZE = Arg("bytes or a size string like '64M'", _size)
DEVICE = Arg("a device id (letters, digits, '-', '.', '_', starting with a letter)", _device)
OFFSET = Arg("bytes or a size string like '64M' (default 0)", _size)
RANGE_SIZE = Arg("bytes, a size string like '64M', or None for the rest", _optional(_size))


@dataclass(frozen=True)
class OpSpec:
    """What one guest op takes."""

    required: Mapping[str, Arg] = field(default_factory=dict)
    optional: Mapping[str, Arg] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{name} ({arg.text})" for name, arg in (*self.required.items(), *self.optional.items())]
        return ", ".join(parts) if parts else "no arguments"


_RANGE = OpSpec({"device": DEVICE}, {"offset": OFFSET, "size": RANGE_SIZE})
SPECS: dict[str, OpSpec] = {
    "alloc": OpSpec({"size": SIZE}, {
        "kind": Arg(f"one of {list(KINDS)}, default 'anon'", _choice(*KINDS)),
        "node": Arg("a NUMA node number, or None for any", _optional(_int_range(0, 1 << 10))),
        "dirty": Arg("True or False (kind='file': written, not read)", _bool)}),
    "touch": OpSpec({"handle": HANDLE}),
    "read": OpSpec({"handle": HANDLE}),
    "free": OpSpec({"handle": HANDLE}),
    "drop_caches": OpSpec(),
    "sync": OpSpec(),
    "handles": OpSpec(),
    "sysctl": OpSpec({"name": Arg(f"one of {sorted(SYSCTL_RANGES)}", _choice(*sorted(SYSCTL_RANGES)))},
                     {"value": Arg("an int to write, or None to read", _optional(_integer))}),
    "blk_read": _RANGE,
    "blk_write": _RANGE,
    "pmem_read": _RANGE,
    "pmem_write": _RANGE,
    "pmem_flush": OpSpec({"device": DEVICE}, {
        "requests": Arg(f"an int from 1 to {MAX_FLUSH_REQUESTS}: fsyncs at once",
                        _int_range(1, MAX_FLUSH_REQUESTS))}),
    "pmem_mmap": OpSpec({"device": DEVICE}, {"map_sync": Arg("True or False", _bool)}),
    "pmem_devices": OpSpec(),
    "writer": OpSpec({"handle": HANDLE, "rate": Arg("bytes per second, or a size string like '64M'", _size)},
                     {"wss": Arg("bytes or a size string like '64M', or None for all the handle",
                                 _optional(_size))}),
    "writer_stop": OpSpec({"handle": HANDLE}),
    "kernel_build": OpSpec({}, {"jobs": Arg("an int from 1 to 64", _int_range(1, 64)),
                                "tree": Arg("bytes or a size string, or None", _optional(_size))}),
    "kernel_build_stop": OpSpec({"build": Arg("a build number from kernel_build",
                                              _int_range(-(1 << 63), (1 << 63) - 1))}),
    "memory_blocks": OpSpec(),
    "online_memory": OpSpec({}, {"block": Arg("a memory block number or 'all'", _block),
                                 "zone": Arg("'movable' or 'kernel'", _choice("movable", "kernel"))}),
}


def check(op: str, arguments: Mapping[str, Any]) -> dict:
    """``arguments`` of guest op ``op`` checked against :data:`SPECS` and normalised; ``TypeError``
    (missing, unknown or mistyped) or ``ValueError`` (out of range) naming the value otherwise."""
    spec = SPECS.get(op)
    if spec is None:
        return dict(arguments)
    for name in arguments:
        if name not in spec.required and name not in spec.optional:
            raise TypeError(f"guest op {op!r} takes no argument {name!r}; it takes {spec.describe()}")
    for name in spec.required:
        if name not in arguments:
            raise TypeError(f"guest op {op!r} needs argument {name!r}; it takes {spec.describe()}")
    out = {}
    for name, value in arguments.items():
        arg = spec.required.get(name) or spec.optional[name]
        try:
            out[name] = arg.convert(value)
        except _Refused as refused:
            error = ValueError if refused.out_of_range else TypeError
            raise error(f"guest op {op!r}: {name} must be {arg.text}, got {shown(value)} "
                        f"({type(value).__name__})") from None
    return out


__all__ = ["KINDS", "MAX_FLUSH_REQUESTS", "SPECS", "Arg", "OpSpec", "check"]
