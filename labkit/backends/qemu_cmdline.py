"""QEMU's command-line syntax, read as QEMU reads it: options, QemuOpts strings, sizes, booleans, ids.

``labkit.open(qemu_args=...)`` and ``labkit run -- ...`` take a QEMU command line. This module only
splits it into what each option says (:func:`parse_command_line`); :mod:`labkit.backends.options`
decides what the machine is. The value syntax is QEMU's own, with its error texts:

* QemuOpts / keyval strings (util/qemu-option.c ``opts_do_parse``, util/keyval.c): ``key=value``
  pairs separated by commas, ``,,`` for a comma inside a value, the first item without ``=`` is the
  option's implied key (``-m 4G`` is ``size=4G``, ``-device virtio-mem-pci`` is ``driver=...``); a
  bare ``key`` means ``key=on`` and ``nokey`` means ``key=off`` (QEMU warns that this is deprecated).
  ``-device`` and ``-object`` also take JSON (``-device '{"driver": "virtio-balloon-pci"}'``).
* sizes (util/cutils.c ``qemu_strtosz``): a number, hexadecimal or with a fraction, and one suffix
  letter of B K M G T P E (either case); ``-m`` counts in MiB when no suffix is given.
* booleans (qapi/qapi-util.c ``qapi_bool_parse``): on/yes/true/y and off/no/false/n, nothing else.
* ids (util/id.c ``id_wellformed``): a letter, then letters, digits, ``-``, ``.``, ``_``: so an id
  can never smuggle another property in with a comma.

Options are data (:data:`OPTIONS`): a later mechanism adds its option, object or device type there
and in :mod:`labkit.backends.options` without touching the parser.

>>> line = parse_command_line("-m 4G,maxmem=20G -object memory-backend-ram,id=mem0,size=16G "
...                           "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0")
>>> line.memory, [o.props["qom-type"] for o in line.objects], line.devices[0].props["driver"]
({'size': '4G', 'maxmem': '20G'}, ['memory-backend-ram'], 'virtio-mem-pci')
>>> qemu_strtosz("16G"), qemu_strtosz("1.5M"), qemu_strtosz("4096", default_suffix="M")
(17179869184, 1572864, 4294967296)
>>> parse_bool("deflate-on-oom", "maybe")
Traceback (most recent call last):
...
ValueError: Parameter 'deflate-on-oom' expects 'on' or 'off'
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

QEMU_SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                  "and exabytes, respectively.")
_SIZE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)(\.\d+)?\s*([bBkKmMgGtTpPeE])?$")
_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
TRUE_WORDS = ("on", "yes", "true", "y")
FALSE_WORDS = ("off", "no", "false", "n")


class QemuOptionError(ValueError):
    """A command-line value QEMU would refuse; ``str()`` is QEMU's text, with the option in front
    the way QEMU prints it (``-device virtio-mem-pci,...: 'node' property has value ...``)."""


# --- values -------------------------------------------------------------------------------------
def qemu_strtosz(text: str, default_suffix: str = "B") -> int:
    """Bytes from a QEMU size string (``do_strtosz``); ``ValueError`` if QEMU would refuse it.

    A fraction needs a unit other than bytes, hexadecimal takes no fraction and the result must be
    below 2^64, as in QEMU."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a size")
    whole, fraction, suffix = match.groups()
    shift = _SUFFIX_SHIFT[(suffix or default_suffix).upper()]
    if fraction and (whole.lower().startswith("0x") or shift == 0):
        raise ValueError(f"{text!r} is not a size")
    value = int(whole, 0) << shift
    if fraction:
        value += int(float("0" + fraction) * (1 << shift))
    if value >= 1 << 64:
        raise ValueError(f"{text!r} is too large")
    return value


def parse_size_value(name: str, text: str, context: str = "device") -> int:
    """A size property with the text QEMU gives for its context: ``-device`` properties (qdev's
    visitor), ``-object`` properties (``a size value``) or ``-m`` and HMP (the long hint)."""
    try:
        return qemu_strtosz(text, "M" if context == "-m" else "B")
    except ValueError:
        pass
    if context == "object":
        raise ValueError(f"Parameter '{name}' expects a size value") from None
    if context == "device":
        raise ValueError(f"Parameter '{name}' expects size") from None
    raise ValueError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                     f"{QEMU_SIZE_HINT}") from None


def parse_bool(name: str, value: object) -> bool:
    """A boolean property as ``qapi_bool_parse`` reads it; Python bools are taken as they are."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in TRUE_WORDS:
        return True
    if isinstance(value, str) and value in FALSE_WORDS:
        return False
    raise ValueError(f"Parameter '{name}' expects 'on' or 'off'")


def id_wellformed(value: object) -> bool:
    """util/id.c: a letter first, then letters, digits, '-', '.' and '_'."""
    return isinstance(value, str) and bool(_ID.match(value))


def check_id(value: object, name: str = "id") -> str:
    """``value`` if it is a well-formed id, else QEMU's error (with its hint line)."""
    if not id_wellformed(value):
        raise ValueError(f"Parameter '{name}' expects an identifier\nIdentifiers consist of letters, "
                         f"digits, '-', '.', '_', starting with a letter.")
    return value


def parse_uint(name: str, value: object, bits: int = 32) -> int:
    """An unsigned qdev property (``uint32``/``uint64``), with QEMU's two texts."""
    if isinstance(value, bool):
        raise ValueError(f"Parameter '{name}' expects integer")
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ValueError(f"Parameter '{name}' expects integer") from None
    if not isinstance(value, int):
        raise ValueError(f"Parameter '{name}' expects integer")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"Parameter '{name}' expects uint{bits}_t")
    return value


# --- QemuOpts strings ---------------------------------------------------------------------------
def parse_opts(text: str, implied: str | None) -> dict[str, str]:
    """``key=value,...`` as QemuOpts parses it; the last of a repeated key wins. JSON (``{...}``)
    is taken as it is (its values keep their JSON types)."""
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"JSON parse error, {e.msg}") from None
        if not isinstance(value, dict):
            raise ValueError("JSON parse error: an object is expected")
        return value
    props: dict[str, str] = {}
    pos, first = 0, True
    while pos < len(text):
        comma, equal = _unescaped_comma(text, pos), text.find("=", pos)
        if equal == -1 or equal > comma:  # no '=' in this item
            item = text[pos:comma].replace(",,", ",")
            if first and implied is not None:
                props[implied] = item
            elif item.startswith("no"):
                props[item[2:]] = "off"
            else:
                props[item] = "on"
        else:
            props[text[pos:equal]] = text[equal + 1:comma].replace(",,", ",")
        pos, first = comma + 1, False
    return props


def _unescaped_comma(text: str, pos: int) -> int:
    """Index of the next comma that is not doubled, or len(text)."""
    while True:
        comma = text.find(",", pos)
        if comma == -1:
            return len(text)
        if text[comma + 1:comma + 2] == ",":
            pos = comma + 2
            continue
        return comma


# --- properties on the command line -------------------------------------------------------------
def fail(where: str, text: str) -> QemuOptionError:
    return QemuOptionError(f"{where}: {text}" if where else text)


def property_value(where: str, name: str, kind: str, raw: Any, context: str) -> Any:
    """One property value by kind, with QEMU's text on failure."""
    try:
        if kind == "bool":
            return parse_bool(name, raw)
        if kind == "size":
            return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else \
                parse_size_value(name, str(raw), context)
        if kind in ("uint32", "uint64"):
            return parse_uint(name, raw, int(kind[4:]))
        if kind == "id":
            return check_id(raw)
        if kind == "OnOffAuto":
            if raw not in ("on", "off", "auto"):
                raise ValueError(f"Parameter '{name}' does not accept value '{raw}'")
            return raw
        return str(raw)
    except ValueError as e:
        raise fail(where, str(e)) from None


# --- the command line ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One QEMU option that takes an argument: where it is kept and its implied key."""

    kept_as: str  # CommandLine field: "memory", "smp", "machine", "objects", "devices", "numa"
    implied: str | None


# QEMU's options labkit reads (qemu-options.hx); everything else is "passthrough" (see options.py)
OPTIONS = {
    "-m": Option("memory", "size"),
    "-smp": Option("smp", "cpus"),
    "-machine": Option("machine", "type"),
    "-M": Option("machine", "type"),
    "-object": Option("objects", "qom-type"),
    "-device": Option("devices", "driver"),
    "-numa": Option("numa", "type"),
    "-append": Option("append", None),  # the guest kernel's command line (a plain string)
}
# options that take no argument (the others take one), to split the passthrough correctly
FLAGS = frozenset({"-S", "-nodefaults", "-no-user-config", "-no-reboot", "-no-shutdown", "-nographic",
                   "-enable-kvm", "-daemonize", "-snapshot", "-s", "-no-hpet", "-no-acpi"})


@dataclass(frozen=True)
class Given:
    """One occurrence of an option: its text as given (``where``) and its properties."""

    where: str
    props: dict


@dataclass
class CommandLine:
    """A QEMU command line split by option; ``args`` is the line as given (a list)."""

    args: tuple[str, ...]
    memory: dict | None = None  # the last -m (QEMU: the last one wins)
    memory_where: str = ""
    smp: dict | None = None
    machine: dict = field(default_factory=dict)  # -machine/-M merged, later keys win
    objects: list[Given] = field(default_factory=list)
    devices: list[Given] = field(default_factory=list)
    numa: list[Given] = field(default_factory=list)
    append: str | None = None  # -append: kernel parameters (the last -append wins, as in QEMU)
    passthrough: list[tuple[str, ...]] = field(default_factory=list)  # (option[, argument])


def without_append(args: Sequence[str]) -> tuple[str, ...]:
    """The command line without its ``-append`` options (the live backend writes its own)."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("-append", "--append") and i + 1 < len(args):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return tuple(out)


def split_args(qemu_args: str | Sequence[str]) -> tuple[str, ...]:
    """A command line as a tuple of arguments: a string is split as a POSIX shell would (quotes
    keep a mem-path with spaces whole); a list or tuple is taken as it is."""
    if isinstance(qemu_args, str):
        try:
            return tuple(shlex.split(qemu_args))
        except ValueError as e:
            raise ValueError(f"qemu_args {qemu_args!r}: {e}") from None
    if isinstance(qemu_args, list | tuple) and all(isinstance(a, str) for a in qemu_args):
        return tuple(qemu_args)
    raise TypeError(f"qemu_args must be a string or a list of strings, got {qemu_args!r}")


def parse_command_line(qemu_args: str | Sequence[str]) -> CommandLine:
    """Split ``qemu_args`` by option and parse each known option's QemuOpts string.

    Raises :class:`QemuOptionError` with QEMU's text for an option without its argument or a
    string QEMU cannot parse."""
    args = split_args(qemu_args)
    line = CommandLine(args)
    i = 0
    while i < len(args):
        opt = args[i]
        if not opt.startswith("-") or opt == "-":
            raise QemuOptionError(f"{opt}: invalid option (options start with '-', e.g. -m 4G)")
        if opt.startswith("--"):  # QEMU takes --m as -m
            opt = opt[1:]
        known = OPTIONS.get(opt)
        if known is None:
            takes_value = opt not in FLAGS and i + 1 < len(args) and not _looks_like_option(args[i + 1])
            line.passthrough.append(tuple(args[i:i + 1 + takes_value]))
            i += 1 + takes_value
            continue
        if i + 1 >= len(args):
            raise QemuOptionError(f"{opt}: requires an argument")
        value, where = args[i + 1], f"{opt} {args[i + 1]}"
        if known.kept_as == "append":
            line.append = value
            i += 2
            continue
        try:
            props = parse_opts(value, known.implied)
        except ValueError as e:
            raise QemuOptionError(f"{where}: {e}") from None
        if known.kept_as == "memory":
            line.memory, line.memory_where = props, where
        elif known.kept_as == "smp":
            line.smp = props
        elif known.kept_as == "machine":
            line.machine.update(props)
        else:
            getattr(line, known.kept_as).append(Given(where, props))
        i += 2
    return line


def _looks_like_option(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1 and not arg[1:2].isdigit()


__all__ = ["OPTIONS", "CommandLine", "Given", "QemuOptionError", "check_id", "id_wellformed",
           "parse_bool", "parse_command_line", "parse_opts", "parse_size_value", "parse_uint",
           "qemu_strtosz", "split_args"]
