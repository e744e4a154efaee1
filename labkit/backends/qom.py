"""QOM objects and properties as QMP's qom-get / qom-set / qom-list see them (qom/qom-qmp-cmds.c).

Devices of the model register their properties here, with QEMU's type names and texts for errors:
``Device 'x' not found`` (DeviceNotFound), ``Property 'type.name' not found``, ``... is not writable``,
``Invalid parameter type for 'name', expected: integer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.errors import QMPError

_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integer"),
    # QEMU's input visitor: a negative number is no uint64/size (qobject_input_type_size)
    "uint32": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
               "uint32"),
    "uint64": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64,
               "uint64"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64, "size"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "str": (lambda v: isinstance(v, str), "string"),
    "any": (lambda v: True, "any"),
}


@dataclass
class Property:
    name: str
    type: str
    get: Callable[[], Any]
    set: Callable[[Any], None] | None = None


@dataclass
class QomObject:
    """One object in the QOM tree: its canonical path, aliases QMP resolves, its properties."""

    path: str
    typename: str
    aliases: tuple[str, ...] = ()
    properties: dict[str, Property] = field(default_factory=dict)

    def add(self, name: str, type_: str, get: Callable[[], Any],
            set_: Callable[[Any], None] | None = None) -> None:
        self.properties[name] = Property(name, type_, get, set_)

    def _prop(self, name: str) -> Property:
        prop = self.properties.get(name)
        if prop is None:
            raise QMPError("GenericError", f"Property '{self.typename}.{name}' not found")
        return prop

    def get(self, name: str) -> Any:
        return self._prop(name).get()

    def set(self, name: str, value: Any) -> None:
        prop = self._prop(name)
        if prop.set is None:
            raise QMPError("GenericError", f"Property '{self.typename}.{name}' is not writable")
        check, expected = _CHECKS[prop.type]
        if not check(value):
            raise QMPError("GenericError", f"Invalid parameter type for '{name}', expected: {expected}")
        try:
            prop.set(value)
        except ValueError as e:
            raise QMPError("GenericError", str(e)) from None

    def list(self) -> list[dict]:
        return [{"name": p.name, "type": p.type} for p in self.properties.values()]


class QomTree:
    """All QOM objects of one VM; resolves full paths and unambiguous partial paths (ids)."""

    def __init__(self) -> None:
        self.objects: list[QomObject] = []

    def add(self, obj: QomObject) -> QomObject:
        self.objects.append(obj)
        return obj

    def resolve(self, path: str) -> QomObject:
        for obj in self.objects:
            if path == obj.path or path in obj.aliases:
                return obj
        raise QMPError("DeviceNotFound", f"Device '{path}' not found")
