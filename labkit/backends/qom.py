"""The QOM tree as QMP's qom-get / qom-set / qom-list and HMP's qom-get / qom-set / qom-list see it
(qom/qom-qmp-cmds.c, qom/qom-hmp-cmds.c, qom/object.c), built from what the devices declare.

Each device module declares its properties as data (``QOM_PROPERTIES``, a tuple of
:class:`labkit.devices.properties.QomProperty`) and its QEMU type names; the monitor adds one
:class:`QomObject` per device (and its ``virtio-backend`` child) and memory backend. The containers
above them (``/``, ``/machine``, ``/machine/peripheral``, ``/machine/peripheral-anon``,
``/objects``) exist as in QEMU, and every object has QOM's ``type`` property and a ``child<...>``
property per child.

Paths resolve as ``object_resolve_path`` does: an absolute path from the root (empty components
ignored: ``//machine``, ``/machine/peripheral/vm0/``), a partial path (``vm0``,
``peripheral/vm0``) by the unique object whose path ends with it. Values are read as QEMU reads
them: QMP's ``qom-set`` takes JSON visited by the property's type (:mod:`labkit.backends.qapi`:
``Parameter 'requested-size' expects uint64``, a negative size taken modulo 2^64), HMP's ``qom-set``
takes text read by the string input visitor (``4G`` is a size; ``Value '16E' is out of range for
parameter 'requested-size'``). Errors carry QEMU's texts: ``Device 'x' not found``
(DeviceNotFound), ``Property 'type.name' not found``, ``Property 'virtio-mem.size' is not
writable`` (the property of the virtio device behind the PCI proxy, as QEMU's alias), ``Attempt to
set property 'node' on anonymous device (type 'virtio-mem') after it was realized``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit.backends.qapi import INT64_MAX, INT64_MIN, UINT64_MAX, error, visit
from labkit.backends.qemu_cmdline import QEMU_SIZE_HINT, SizeOutOfRange, parse_bool, parse_int, qemu_strtosz
from labkit.devices.properties import QomProperty
from labkit.errors import QMPError

MACHINE_TYPE = "pc-q35-7.2-machine"
CONTAINERS = {"/": "container", "/machine": MACHINE_TYPE, "/machine/peripheral": "container",
              "/machine/peripheral-anon": "container", "/objects": "container"}
ENUMS = {"HostMemPolicy": ("default", "preferred", "bind", "interleave"), "OnOffAuto": ("on", "off", "auto")}
_VISIT = {"size": "size", "uint32": "uint32", "uint64": "uint64", "int": "int", "bool": "bool", "str": "str",
          "any": "any"}


def _kind(prop_type: str) -> Any:
    if prop_type.startswith("link<"):
        return "str"
    return ENUMS.get(prop_type) or _VISIT.get(prop_type, "any")


def parse_text(kind: str, name: str, text: str) -> Any:
    """A property value from HMP text, as ``object_property_parse``'s string visitor reads it."""
    if kind == "size":
        try:
            return qemu_strtosz(text)
        except SizeOutOfRange:
            raise ValueError(f"Value '{text}' is out of range for parameter '{name}'") from None
        except ValueError:
            raise ValueError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                             f"{QEMU_SIZE_HINT}") from None
    if kind in ("int", "uint32", "uint64"):
        value = parse_int(text)
        if kind == "int":
            if value is None or not INT64_MIN <= value <= INT64_MAX:
                raise ValueError(f"Parameter '{name}' expects int64")
            return value
        if value is None or not INT64_MIN <= value <= UINT64_MAX:  # strtoull takes "-1" too
            raise ValueError(f"Parameter '{name}' expects uint64")
        value %= 1 << 64
        if kind == "uint32" and value > 0xFFFFFFFF:
            raise ValueError(f"Parameter '{name}' expects uint32_t")
        return value
    if kind == "bool":
        return parse_bool(name, text)
    if kind in ENUMS:
        if text not in ENUMS[kind]:
            raise ValueError(f"Parameter '{name}' does not accept value '{text}'")
        return text
    return text


@dataclass
class QomObject:
    """One object in the QOM tree: its canonical path, its type, the device it shows and that
    device's declared properties. ``virtio_type`` is the type of the virtio device behind a PCI
    proxy: the proxy's properties are aliases of its, so QEMU names it when it refuses one."""

    path: str
    typename: str
    device: Any = None
    properties: dict[str, QomProperty] = field(default_factory=dict)
    virtio_type: str = ""
    tree: QomTree | None = None

    def children(self) -> list[QomObject]:
        return self.tree.children(self.path) if self.tree is not None else []

    def _child(self, name: str) -> QomObject | None:
        return next((c for c in self.children() if c.path.rsplit("/", 1)[1] == name), None)

    def _prop(self, name: str) -> QomProperty:
        prop = self.properties.get(name)
        if prop is None:
            raise error(f"Property '{self.typename}.{name}' not found")
        return prop

    def get(self, name: str) -> Any:
        if name == "type":
            return self.typename
        child = self._child(name)
        if child is not None:
            return child.path
        return self._prop(name).get(self.device)

    def _setter(self, name: str) -> tuple[QomProperty, Callable[[Any, Any], None]]:
        if name == "type" or self._child(name) is not None:
            raise error(f"Property '{self.typename}.{name}' is not writable")
        prop = self._prop(name)
        kind = self.virtio_type or self.typename
        if prop.static:  # qdev: a property is fixed once the device is realized, checked first
            if prop.type.startswith("link<"):
                raise error(f"Attempt to set link property '{prop.name}' on device '(null)' (type "
                            f"'{kind}') after it was realized")
            raise error(f"Attempt to set property '{prop.name}' on anonymous device (type '{kind}') "
                        f"after it was realized")
        if prop.set is None:
            raise error(f"Property '{kind}.{prop.name}' is not writable")
        return prop, prop.set

    def _apply(self, setter: Callable[[Any, Any], None], value: Any) -> None:
        try:
            setter(self.device, value)
        except ValueError as e:
            raise error(str(e)) from None

    def set(self, name: str, value: Any) -> None:
        """QMP ``qom-set``: a JSON value, visited by the property's type (a setter that refuses
        any value once realized refuses before it visits, as QEMU's do)."""
        prop, setter = self._setter(name)
        if prop.visit_first:
            value = visit(name, value, _kind(prop.type))
        self._apply(setter, value)

    def set_text(self, name: str, text: str) -> None:
        """HMP ``qom-set`` (without -j): the value as text, parsed for the property's type."""
        prop, setter = self._setter(name)
        try:
            value = parse_text(prop.type, name, text)
        except ValueError as e:
            raise error(str(e)) from None
        self._apply(setter, value)

    def list(self) -> list[dict]:
        return ([{"name": "type", "type": "string"}]
                + [{"name": p.name, "type": p.type} for p in self.properties.values()]
                + [{"name": c.path.rsplit("/", 1)[1], "type": f"child<{c.typename}>"}
                   for c in self.children()])


class QomTree:
    """All QOM objects of one VM, under QEMU's containers."""

    def __init__(self) -> None:
        self.objects: list[QomObject] = []
        for path, typename in CONTAINERS.items():
            self.add(QomObject(path, typename))

    def add(self, obj: QomObject) -> QomObject:
        obj.tree = self
        self.objects.append(obj)
        return obj

    def add_device(self, path: str, typename: str, device: Any, properties: Iterable[QomProperty],
                   virtio_type: str = "") -> QomObject:
        return self.add(QomObject(path, typename, device, {p.name: p for p in properties}, virtio_type))

    def children(self, path: str) -> list[QomObject]:
        prefix = path.rstrip("/") + "/"
        return [o for o in self.objects if o.path != "/" and o.path.rsplit("/", 1)[0] + "/" == prefix]

    def lookup(self, path: str) -> tuple[QomObject | None, bool]:
        """object_resolve_path: ``(object, ambiguous)``."""
        parts = [p for p in path.split("/") if p]
        if path.startswith("/"):
            full = "/" + "/".join(parts)
            return next((o for o in self.objects if o.path == full), None), False
        if not parts:
            return None, True
        found = [o for o in self.objects if o.path.split("/")[-len(parts):] == parts]
        return (found[0], False) if len(found) == 1 else (None, len(found) > 1)

    def resolve(self, path: str, *, ambiguous_error: bool = False) -> QomObject:
        """The object at ``path``; qom-get and qom-set say DeviceNotFound for an ambiguous path too,
        qom-list (``ambiguous_error``) says ``Path '...' is ambiguous``."""
        obj, ambiguous = self.lookup(path)
        if obj is None:
            if ambiguous and ambiguous_error:
                raise error(f"Path '{path}' is ambiguous")
            raise QMPError("DeviceNotFound", f"Device '{path}' not found")
        return obj


# --- memory backends (backends/hostmem.c, hostmem-file.c) --------------------------------------
class BackendObject:
    """A memory backend object: the options it was created with, and what qom-set may change once
    it is in use (``merge``, ``dump``, ``policy``: hints the model records; ``prealloc``)."""

    def __init__(self, options: Any):
        self.__dict__.update(asdict(options))

    def __repr__(self) -> str:
        return f"<{self.qom_type} {self.id}>"


def _size_fixed(backend: BackendObject, value: Any) -> None:
    raise ValueError(f"cannot change property size of {backend.qom_type} ")


def _fixed(backend: BackendObject, value: Any) -> None:
    raise ValueError("cannot change property value")


def _mem_path_fixed(backend: BackendObject, value: Any) -> None:
    raise ValueError(f"cannot change property 'mem-path' of {backend.qom_type}")


def _recorded(name: str) -> Callable[[BackendObject, Any], None]:
    """A madvise hint or a NUMA policy: QEMU applies it to the mapping; the model records it."""
    def set_value(backend: BackendObject, value: Any) -> None:
        setattr(backend, name, value)
    return set_value


def _set_prealloc(backend: BackendObject, value: bool) -> None:
    if value and not backend.reserve:
        raise ValueError("'prealloc=on' and 'reserve=off' are incompatible")
    if value and not backend.prealloc:
        raise ValueError(f"labkit's model does not simulate preallocating memory backend '{backend.id}' "
                         f"once it exists (QEMU would populate all of its 0x{backend.size:x} bytes now); "
                         f"give prealloc=on when you create it")


MEMORY_BACKEND_PROPERTIES = (
    QomProperty("size", "int", lambda b: b.size, _size_fixed, visit_first=False),
    QomProperty("share", "bool", lambda b: b.share, _fixed),
    QomProperty("prealloc", "bool", lambda b: b.prealloc, _set_prealloc),
    QomProperty("merge", "bool", lambda b: b.merge, _recorded("merge")),
    QomProperty("dump", "bool", lambda b: b.dump, _recorded("dump")),
    QomProperty("reserve", "bool", lambda b: b.reserve, _fixed),
    QomProperty("policy", "HostMemPolicy", lambda b: b.policy, _recorded("policy")),
    QomProperty("host-nodes", "int", lambda b: []),
)
MEMORY_BACKEND_FILE_PROPERTIES = MEMORY_BACKEND_PROPERTIES + (
    QomProperty("mem-path", "str", lambda b: b.mem_path, _mem_path_fixed, visit_first=False),
)
