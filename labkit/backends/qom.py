"""The QOM tree as QMP's qom-get / qom-set / qom-list and HMP's qom-get / qom-set see it
(qom/qom-qmp-cmds.c, qom/qom-hmp-cmds.c), built from what the devices declare.

Each device module declares its properties as data (``QOM_PROPERTIES``, a tuple of
:class:`labkit.devices.properties.QomProperty`) and its QEMU type names; the monitor adds one
:class:`QomObject` per device and memory backend. Errors carry QEMU's texts: ``Device 'x' not found``
(DeviceNotFound), ``Property 'type.name' not found``, ``... is not writable``, ``Attempt to set
property 'node' on anonymous device (type 'virtio-mem') after it was realized``, ``Invalid parameter
type for 'name', expected: integer``. HMP's ``qom-set`` gives the value as text, read by the string
input visitor (``4G`` is a size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from labkit.backends.qemu_cmdline import QEMU_SIZE_HINT, parse_bool, qemu_strtosz
from labkit.devices.properties import QomProperty
from labkit.errors import QMPError

_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "integer"),
    # QEMU's input visitor: a negative number is no uint64/size (qobject_input_type_size)
    "uint32": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32, "uint32"),
    "uint64": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64, "uint64"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64, "size"),
    "bool": (lambda v: isinstance(v, bool), "boolean"),
    "str": (lambda v: isinstance(v, str), "string"),
}


def parse_text(kind: str, name: str, text: str) -> Any:
    """A property value from HMP text, as ``object_property_parse``'s string visitor reads it."""
    if kind == "size":
        try:
            return qemu_strtosz(text)
        except ValueError:
            raise ValueError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                             f"{QEMU_SIZE_HINT}") from None
    if kind in ("int", "uint32", "uint64"):
        try:
            return int(text, 0)
        except ValueError:
            raise ValueError(f"Parameter '{name}' expects {'int64' if kind == 'int' else kind}") from None
    if kind == "bool":
        return parse_bool(name, text)
    return text


@dataclass
class QomObject:
    """One object in the QOM tree: its canonical path, aliases QMP resolves (its id), its type, the
    device it shows and that device's declared properties. ``virtio_type`` is the type of the
    virtio device behind a PCI proxy (QEMU names it when a fixed property is set)."""

    path: str
    typename: str
    aliases: tuple[str, ...] = ()
    device: Any = None
    properties: dict[str, QomProperty] = field(default_factory=dict)
    virtio_type: str = ""

    def _prop(self, name: str) -> QomProperty:
        prop = self.properties.get(name)
        if prop is None:
            raise QMPError("GenericError", f"Property '{self.typename}.{name}' not found")
        return prop

    def get(self, name: str) -> Any:
        return self._prop(name).get(self.device)

    def _writable(self, prop: QomProperty) -> Callable[[Any, Any], None]:
        if prop.static:
            kind = self.virtio_type or self.typename
            if prop.type.startswith("link<"):
                raise QMPError("GenericError", f"Attempt to set link property '{prop.name}' on device "
                                               f"'(null)' (type '{kind}') after it was realized")
            raise QMPError("GenericError", f"Attempt to set property '{prop.name}' on anonymous device "
                                           f"(type '{kind}') after it was realized")
        if prop.set is None:
            raise QMPError("GenericError", f"Property '{self.typename}.{prop.name}' is not writable")
        return prop.set

    def _apply(self, setter: Callable[[Any, Any], None], value: Any) -> None:
        try:
            setter(self.device, value)
        except ValueError as e:
            raise QMPError("GenericError", str(e)) from None

    def set(self, name: str, value: Any) -> None:
        """QMP ``qom-set``: a JSON value, checked by the property's type."""
        prop = self._prop(name)
        setter = self._writable(prop)
        check, expected = _CHECKS.get(prop.type, (lambda v: True, "any"))
        if not check(value):
            raise QMPError("GenericError", f"Invalid parameter type for '{name}', expected: {expected}")
        self._apply(setter, value)

    def set_text(self, name: str, text: str) -> None:
        """HMP ``qom-set`` (without -j): the value as text, parsed for the property's type."""
        prop = self._prop(name)
        setter = self._writable(prop)
        try:
            value = parse_text(prop.type, name, text)
        except ValueError as e:
            raise QMPError("GenericError", str(e)) from None
        self._apply(setter, value)

    def list(self) -> list[dict]:
        return [{"name": p.name, "type": p.type} for p in self.properties.values()]


class QomTree:
    """All QOM objects of one VM; resolves full paths and unambiguous partial paths (ids)."""

    def __init__(self) -> None:
        self.objects: list[QomObject] = []

    def add(self, obj: QomObject) -> QomObject:
        self.objects.append(obj)
        return obj

    def add_device(self, path: str, typename: str, device: Any, properties: Iterable[QomProperty],
                   aliases: tuple[str, ...] = (), virtio_type: str = "") -> QomObject:
        return self.add(QomObject(path, typename, aliases, device, {p.name: p for p in properties},
                                  virtio_type))

    def resolve(self, path: str) -> QomObject:
        for obj in self.objects:
            if path == obj.path or path in obj.aliases:
                return obj
        raise QMPError("DeviceNotFound", f"Device '{path}' not found")


def _size_fixed(backend: Any, value: Any) -> None:
    raise ValueError(f"cannot change property size of {backend.qom_type} ")


def _share_fixed(backend: Any, value: Any) -> None:
    raise ValueError("cannot change property value")


# backends/hostmem.c: a memory backend's properties can't change once it is in use (completed)
MEMORY_BACKEND_PROPERTIES = (
    QomProperty("size", "int", lambda b: b.size, _size_fixed),
    QomProperty("share", "bool", lambda b: b.share, _share_fixed),
    QomProperty("prealloc", "bool", lambda b: b.prealloc),
    QomProperty("merge", "bool", lambda b: b.merge),
    QomProperty("dump", "bool", lambda b: b.dump),
    QomProperty("reserve", "bool", lambda b: b.reserve),
    QomProperty("policy", "HostMemPolicy", lambda b: b.policy),
)
MEMORY_BACKEND_FILE_PROPERTIES = MEMORY_BACKEND_PROPERTIES + (
    QomProperty("mem-path", "str", lambda b: b.mem_path),
)
