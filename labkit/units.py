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

import re

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


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Return ``value`` in bytes; accept an int (bytes) or a string like ``"512M"`` or ``"2MiB"``.

    Raises ``TypeError`` for other types and ``ValueError`` naming the value for malformed strings.
    The result may be zero or unaligned: callers check the range they accept.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int (bytes) or a size string like '512M', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match or match.group(2).lower() not in _SUFFIX:
            raise ValueError(
                f"{name} {value!r} is not a size: use bytes or a number with K, M, G, T "
                "(or KiB, MiB, GiB, TiB), e.g. '512M' or '4G'"
            )
        number, suffix = match.groups()
        scaled = float(number) * _SUFFIX[suffix.lower()]
        if scaled != int(scaled):
            raise ValueError(f"{name} {value!r} is not a whole number of bytes")
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
