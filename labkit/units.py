"""Sizes and units at labkit's edges.

Every interface inside labkit takes sizes as ``int`` bytes. Strings such as ``"4G"``, ``"512M"``,
``"2MiB"`` or ``"4096"`` are parsed only at the edges (``labkit.open``, widgets, the CLI), with QEMU's
suffix convention: K, M, G, T are powers of 1024 (QEMU's ``-m 4G`` is 4 GiB), and the IEC spellings
KiB, MiB, GiB, TiB mean the same. ``B`` or no suffix means bytes.

>>> parse_size("4G")
4294967296
>>> format_size(3 << 20)
'3 MiB'
"""

from __future__ import annotations

import numbers
import re
from fractions import Fraction

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # x86-64 base page; the balloon's PFN unit (VIRTIO_BALLOON_PFN_SHIFT 12)
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIX = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


SIZE_LIMIT = 1 << 64  # QEMU's sizes are uint64 (qemu_strtosz: "a non-negative number below 2^64")


def _shown(value: str) -> str:
    """``value`` for an error message, shortened if it is very long."""
    return repr(value) if len(value) <= 40 else repr(value[:24] + "..." + value[-8:]) + (
        f" ({len(value)} characters)")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` in bytes; accept an int (bytes; numpy integers too) or a string like
    ``"512M"``, ``"1.5G"`` or ``"2MiB"``.

    Raises ``TypeError`` for other types and ``ValueError`` naming the value for malformed strings,
    fractions of a byte and sizes of 2^64 bytes or more (QEMU's sizes are uint64). The result may
    be zero, negative (an int given as such) or unaligned: callers check the range they accept.

    >>> parse_size("1.5K"), parse_size("9007199254740993")  # exact: no float rounding
    (1536, 9007199254740993)
    """
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an int (bytes) or a size string like '512M', got {value!r}")
    if isinstance(value, numbers.Integral):  # int, and numpy's integers
        size = int(value)
        if size >= SIZE_LIMIT:
            raise ValueError(f"{name} {size} is too large: sizes are below 2^64 bytes (16 EiB), "
                             f"as in QEMU")
        return size
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match or match.group(2).lower() not in _SUFFIX:
            raise ValueError(
                f"{name} {_shown(value)} is not a size: use bytes or a number with K, M, G, T "
                "(or KiB, MiB, GiB, TiB), e.g. '512M' or '4G'"
            )
        number, suffix = match.groups()
        whole, _, fraction = number.partition(".")
        if len(whole.lstrip("0")) > 20:  # 2^64 has 20 digits: no need to parse thousands
            raise ValueError(f"{name} {_shown(value)} is too large: sizes are below 2^64 bytes "
                             f"(16 EiB), as in QEMU")
        if len(fraction.rstrip("0")) > 40:  # x 2^40 at most: 40 decimals can still be whole bytes
            raise ValueError(f"{name} {_shown(value)} is not a whole number of bytes")
        exact = Fraction(f"{whole.lstrip('0') or '0'}.{fraction.rstrip('0') or '0'}")
        scaled = exact * _SUFFIX[suffix.lower()]  # exact, unlike a float
        if scaled.denominator != 1:
            raise ValueError(f"{name} {_shown(value)} is not a whole number of bytes")
        if scaled >= SIZE_LIMIT:
            raise ValueError(f"{name} {_shown(value)} is too large: sizes are below 2^64 bytes "
                             f"(16 EiB), as in QEMU")
        return int(scaled)
    raise TypeError(f"{name} must be an int (bytes) or a size string like '512M', got {value!r}")


def parse_page_aligned(value: int | str, *, name: str, minimum: int = PAGE_SIZE,
                       maximum: int | None = None) -> int:
    """Parse a size that must be a positive multiple of 4 KiB within ``[minimum, maximum]``."""
    size = parse_size(value, name=name)
    if size < minimum:
        raise ValueError(f"{name} must be at least {format_size(minimum)}, got {value!r}")
    if size % PAGE_SIZE:
        raise ValueError(f"{name} must be a multiple of 4 KiB, got {value!r} ({size} bytes)")
    if maximum is not None and size > maximum:
        raise ValueError(f"{name} must be at most {format_size(maximum)}, got {value!r}")
    return size


def format_size(size: int) -> str:
    """Format bytes with the largest binary unit that divides them, else one decimal.

    >>> format_size(2 << 20), format_size(1536 << 20), format_size(100)
    ('2 MiB', '1.5 GiB', '100 B')
    """
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(size) >= scale:
            if size % scale == 0:
                return f"{size // scale} {unit}"
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def pages(size: int) -> int:
    """Bytes to 4 KiB pages (exact; callers have checked the alignment)."""
    return size >> PAGE_SHIFT
