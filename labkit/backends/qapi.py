"""How QEMU reads a QMP argument: the JSON a client sends, then QAPI's input visitor, with QEMU's
texts (qobject/json-parser.c, qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c; checked
against qemu-system-x86_64 7.2).

A Python caller hands the model Python values; a Python QMP client (qemu.qmp) would ``json.dumps``
them and QEMU would parse the text. :func:`from_python` gives what QEMU ends up with: numpy's
numbers are plain numbers, a tuple is an array, an integer outside [-2^63, 2^64) is a double (QEMU's
parser makes it one), and NaN or an infinity is no JSON at all (QEMU: ``JSON parse error, stray
'N'``). :func:`visit` then converts one value for a QAPI type, as the input visitor does:

* ``int`` (int64): an integer in range, else ``Invalid parameter type for 'x', expected: integer``;
* ``uint64`` / ``size``: an integer; a negative one is taken modulo 2^64 ("for backward
  compatibility"), anything else is ``Parameter 'x' expects uint64``; ``uint32``/``uint16``/``uint8``
  then check the range (``Parameter 'x' expects uint32_t``);
* ``bool``, ``str``, ``number``, ``object``, ``array``: ``Invalid parameter type for 'x', expected:
  boolean`` (``string``, ``number``, ``object``, ``array``);
* an enum (a tuple of names): a string (``expected: string``) that is one of them (``Parameter 'x'
  does not accept value 'y'``).

A struct's members are visited in the schema's order, so a missing or mistyped member is reported
before a member that should not be there (``Parameter 'y' is unexpected``).

>>> visit("value", -1, "uint64")
18446744073709551615
>>> visit("value", 1.5, "int")
Traceback (most recent call last):
...
labkit.errors.QMPError: Invalid parameter type for 'value', expected: integer
>>> from_python({"value": float("nan")})
Traceback (most recent call last):
...
labkit.errors.QMPError: JSON parse error, stray 'N'
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from labkit.errors import QMPError, shown

INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_UINT_BITS = {"uint8": 8, "uint16": 16, "uint32": 32}
_TYPE_TEXT = {"int": "integer", "bool": "boolean", "str": "string", "number": "number",
              "object": "object", "array": "array"}


def error(desc: str) -> QMPError:
    return QMPError("GenericError", desc)


def from_python(value: Any, name: str = "arguments", *, parsed: bool = False) -> Any:
    """``value`` as QEMU receives it from a Python QMP client (see the module docstring).

    Raises :class:`QMPError` for NaN and infinities (QEMU's parse error) and ``TypeError`` for a
    value JSON cannot carry (a set, bytes, an object: the client could not send it)."""
    if value is None or isinstance(value, str):
        return str(value) if isinstance(value, np.str_) else value
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        number = int(value)
        if INT64_MIN <= number <= UINT64_MAX:
            return number
        try:  # QEMU's parser: an integer it cannot hold is a double
            return float(number)
        except OverflowError:
            return math.inf if number > 0 else -math.inf
    if isinstance(value, numbers.Real):
        number = float(value)
        if parsed:  # from JSON text: 1e400 is a number (QEMU's strtod gives it HUGE_VAL)
            return number
        if math.isnan(number):  # json.dumps writes NaN, Infinity, -Infinity: not JSON
            raise error("JSON parse error, stray 'N'")
        if math.isinf(number):
            raise error("JSON parse error, stray 'I'" if number > 0 else "JSON parse error, stray '-I'")
        return number
    if isinstance(value, list | tuple):
        return [from_python(v, f"{name}[{i}]", parsed=parsed) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"QMP arguments travel as JSON objects, whose keys are strings: "
                                f"{name} has the key {shown(key)} ({type(key).__name__})")
            out[key] = from_python(v, key if name == "arguments" else f"{name}.{key}", parsed=parsed)
        return out
    raise TypeError(f"QMP arguments travel as JSON: {name}={shown(value)} ({type(value).__name__}) has "
                    f"no JSON form; give a number, a string, a bool, None, a list or a dict")


_KEYWORD = re.compile(r"[a-z]+")


def parse_json(text: str) -> Any:
    """``text`` as QEMU's JSON parser reads one value, with its texts for what it refuses
    (qobject/json-lexer.c, json-parser.c): ``premature EOI``, ``invalid keyword 'nul'``, ``stray
    'N'``, ``missing : in object pair``, ``Expecting at most one JSON value``."""
    try:
        return from_python(json.loads(text, parse_constant=_no_constant), parsed=True)
    except json.JSONDecodeError as e:
        raise error(_json_error(text, e)) from None


def _no_constant(name: str) -> Any:
    raise error(f"JSON parse error, stray '{name[0] if name[0] != '-' else name[:2]}'")


def _json_error(text: str, e: json.JSONDecodeError) -> str:
    rest = text[e.pos:]
    if e.msg == "Extra data":
        return "Expecting at most one JSON value"
    if not rest.strip():
        return "JSON parse error, premature EOI"
    if e.msg.startswith("Unterminated string"):
        return f"JSON parse error, stray '{rest}'"
    if e.msg == "Expecting ':' delimiter":
        return "JSON parse error, missing : in object pair"
    if e.msg.startswith("Expecting property name"):
        return ("JSON parse error, expecting value" if rest.lstrip().startswith("}")
                else "JSON parse error, key is not a string in object")
    if e.msg == "Invalid \\escape":
        return "JSON parse error, invalid escape sequence in string"
    if e.msg == "Expecting ',' delimiter":
        inner = text[:e.pos].rstrip()
        opened = inner.rfind("[") > inner.rfind("{")
        return f"JSON parse error, expected separator in {'list' if opened else 'dict'}"
    keyword = _KEYWORD.match(rest)
    if keyword:
        return f"JSON parse error, invalid keyword '{keyword.group()}'"
    if e.msg == "Expecting value" and rest[0] not in "]}":
        return f"JSON parse error, stray '{rest[:2] if rest[0] == '-' and rest[1:2].isalpha() else rest[0]}'"
    return "JSON parse error, expecting value"


def visit(name: str, value: Any, kind: Any) -> Any:
    """``value`` (already :func:`from_python`) visited as QAPI type ``kind``; QMPError if QEMU
    would refuse it. ``kind`` is a type name, an enum (a tuple of its names) or ``"any"``."""
    if kind == "any":
        return value
    if isinstance(kind, tuple):  # an enum
        if not isinstance(value, str):
            raise error(f"Invalid parameter type for '{name}', expected: string")
        if value not in kind:
            raise error(f"Parameter '{name}' does not accept value '{value}'")
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "int":
        if is_int and INT64_MIN <= value <= INT64_MAX:
            return value
        raise error(f"Invalid parameter type for '{name}', expected: integer")
    if kind in ("uint64", "size") or kind in _UINT_BITS:
        if not (is_int and INT64_MIN <= value <= UINT64_MAX):
            raise error(f"Parameter '{name}' expects uint64")
        value %= 1 << 64  # qobject_input_type_uint64: negative values for backward compatibility
        bits = _UINT_BITS.get(kind)
        if bits is not None and value >= 1 << bits:
            raise error(f"Parameter '{name}' expects {kind}_t")
        return value
    if kind == "number":
        if (is_int or isinstance(value, float)) and not isinstance(value, bool):
            return value
    elif kind == "bool" and isinstance(value, bool):
        return value
    elif kind == "str" and isinstance(value, str):
        return value
    elif kind == "object" and isinstance(value, dict):
        return value
    elif kind == "array" and isinstance(value, list):
        return value
    raise error(f"Invalid parameter type for '{name}', expected: {_TYPE_TEXT[kind]}")


def visit_struct(prefix: str, value: Any, members: Mapping[str, Any], required: tuple[str, ...] = ()) -> dict:
    """A struct (a JSON object) with ``members`` (name: kind) in the schema's order: the first
    missing or mistyped member, then an unexpected one, are QEMU's errors. ``prefix`` names the
    struct itself (``cache`` gives ``cache.direct``)."""
    if not isinstance(value, dict):
        raise error(f"Invalid parameter type for '{prefix}', expected: object")
    out = {}
    for member, kind in members.items():
        full = f"{prefix}.{member}" if prefix else member
        if member not in value:
            if member in required:
                raise error(f"Parameter '{full}' is missing")
            continue
        out[member] = visit(full, value[member], kind)
    for member in value:
        if member not in members:
            raise error(f"Parameter '{f'{prefix}.{member}' if prefix else member}' is unexpected")
    return out


__all__ = ["INT64_MAX", "INT64_MIN", "UINT64_MAX", "error", "from_python", "parse_json", "visit",
           "visit_struct"]
