"""QOM properties as data: what a device shows to ``qom-get``/``qom-set``/``qom-list``.

A device module declares its properties in a tuple of :class:`QomProperty` (QEMU's name and type,
how to read it from the device, how to set it); the monitor (:mod:`labkit.backends.monitor`) builds
the QOM tree from these declarations, so a device never registers itself anywhere. ``set`` raises
``ValueError`` with QEMU's text when QEMU refuses the value; a property with no ``set`` is read-only
(``Property 'type.name' is not writable``) and a ``static`` one is a qdev property that is fixed
once the device is realized.

>>> prop = QomProperty("size", "size", lambda device: device["plugged"])
>>> prop.get({"plugged": 2 << 20})
2097152
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QomProperty:
    """One property: QEMU's ``name`` and ``type`` (as ``qom-list`` shows it), a getter and an
    optional setter taking the device."""

    name: str
    type: str
    get: Callable[[Any], Any]
    set: Callable[[Any, Any], None] | None = None
    static: bool = False  # a qdev property: settable only before realize


__all__ = ["QomProperty"]
