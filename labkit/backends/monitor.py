"""The model's QEMU monitor: every QMP command it answers, in one table that reads like QEMU's
qapi schema (:data:`COMMANDS`; ``query-commands`` lists its keys), the QOM tree built from the
devices' declared properties, and HMP through ``human-monitor-command`` (:mod:`labkit.backends.hmp`).

Handlers take the monitor and the checked arguments and call the machine's devices; nothing
registers itself. The arguments are checked first, with QEMU's texts (``Parameter 'x' is
unexpected``, ``Parameter 'value' is missing``, ``Invalid parameter type for 'value', expected:
integer``), so bad input never reaches a device. The migration commands are in
:mod:`labkit.backends.monitor_migration`, the hot-plug ones in :mod:`labkit.backends.monitor_devices`;
the same monitor serves ``labkit serve`` over a QMP socket (:mod:`labkit.backends.qmp_server`).

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0)
>>> [c["name"] for c in vm.qmp("query-commands")][:4]
['balloon', 'blockdev-add', 'device_add', 'device_del']
>>> print(vm.qmp("human-monitor-command", **{"command-line": "info balloon"}), end="")
balloon: actual=1024
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from labkit.backends import hmp, monitor_devices, monitor_migration
from labkit.backends.base import check_arguments
from labkit.backends.options import MemoryBackend, VmOptions
from labkit.backends.qom import MEMORY_BACKEND_FILE_PROPERTIES, MEMORY_BACKEND_PROPERTIES, QomObject, QomTree
from labkit.devices import balloon as balloon_device
from labkit.devices import virtio_mem, virtio_pmem
from labkit.errors import QMPError

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}  # the QEMU whose texts the HMP output follows
PACKAGE = "labkit model"


@dataclass(frozen=True)
class Command:
    """One QMP command: its required and optional arguments (name: JSON type; ``object`` for
    any) and the function that runs it. ``extra``: it takes further arguments too ('gen': false in
    the schema, as ``device_add``)."""

    run: Callable[[Monitor, dict], Any]
    args: Mapping[str, type] = field(default_factory=dict)
    optional: Mapping[str, type] = field(default_factory=dict)
    extra: bool = False
    doc: str = ""


class Monitor:
    """The monitor of one model VM: the command table over its machine, its QOM tree and the
    memory backends (``/objects/<id>``) with the devices that use them."""

    def __init__(self, vm: Any, options: VmOptions):
        self.vm = vm
        self.backends: dict[str, MemoryBackend] = {}
        # boot RAM: the nodes' backends (labkit's ram<N>, or the line's), or QEMU's default pc.ram
        self.busy: set[str] = set()
        if all(options.node_memdevs):
            boot_ram = list(zip(options.node_memdevs, options.node_sizes, strict=True))
        else:
            boot_ram = [(options.ram_memdev, options.memory)]
        for name, size in boot_ram:
            self.backends[name] = MemoryBackend(name, "memory-backend-ram", size)
            self.busy.add(name)
        for backend in options.memory_backends:
            self.backends[backend.id] = backend
        self.qom = QomTree()
        self.anonymous = 0  # devices without an id: /machine/peripheral-anon/device[N]
        if vm.balloon_device is not None:
            self._add_balloon(vm.balloon_device)
        for device in vm.virtio_mem.devices if vm.virtio_mem is not None else ():
            self.add_memory_device(device, virtio_mem)
        for device in vm.virtio_pmem.devices:
            self.add_memory_device(device, virtio_pmem)
        for backend in self.backends.values():
            self.add_backend(backend)

    # --- the QOM tree, from the devices' declarations -----------------------------------------
    def _path(self, device_id: str | None) -> str:
        if device_id is not None:
            return f"/machine/peripheral/{device_id}"
        path = f"/machine/peripheral-anon/device[{self.anonymous}]"
        self.anonymous += 1
        return path

    def _add_balloon(self, dev) -> None:
        """virtio-balloon-pci and its virtio-backend child show the same properties."""
        base = self._path(dev.id)
        aliases = (dev.id,) if dev.id is not None else ()
        self.qom.add_device(base, balloon_device.QOM_TYPE, dev, balloon_device.QOM_PROPERTIES, aliases,
                            balloon_device.QOM_VIRTIO_TYPE)
        self.qom.add_device(f"{base}/virtio-backend", balloon_device.QOM_VIRTIO_TYPE, dev,
                            balloon_device.QOM_PROPERTIES, (), balloon_device.QOM_VIRTIO_TYPE)

    def add_memory_device(self, device, module) -> QomObject:
        """A virtio-mem-pci or virtio-pmem-pci device (``module`` declares its QOM); its memdev
        becomes busy."""
        device.qom_path = self._path(device.id)
        self.busy.add(device.memdev)
        return self.qom.add_device(device.qom_path, module.QOM_TYPE, device, module.QOM_PROPERTIES,
                                   (device.id,) if device.id is not None else (), module.QOM_VIRTIO_TYPE)

    def add_backend(self, backend: MemoryBackend) -> QomObject:
        self.backends[backend.id] = backend
        properties = (MEMORY_BACKEND_FILE_PROPERTIES if backend.qom_type == "memory-backend-file"
                      else MEMORY_BACKEND_PROPERTIES)
        return self.qom.add_device(f"/objects/{backend.id}", backend.qom_type, backend, properties,
                                   (backend.id,))

    # --- running commands ---------------------------------------------------------------------
    def execute(self, name: str, arguments: dict) -> Any:
        """Run one QMP command; raise QMPError with QEMU's class and text."""
        command = COMMANDS.get(name)
        if command is None:
            raise QMPError("CommandNotFound", f"The command {name} has not been found")
        if command.extra:
            for key in command.args:
                if key not in arguments:
                    raise QMPError("GenericError", f"Parameter '{key}' is missing")
        else:
            check_arguments(arguments, dict(command.args), dict(command.optional))
        return command.run(self, dict(arguments))

    def memory_devices(self) -> list:
        """Every memory device, in address order (qmp_memory_device_list's one loop)."""
        vm = self.vm
        devices = list(vm.virtio_mem.devices) if vm.virtio_mem is not None else []
        devices += vm.virtio_pmem.devices
        return sorted(devices, key=lambda d: d.device_info()["data"]["memaddr"])


# --- the commands -------------------------------------------------------------------------------
def _need_balloon(m: Monitor):
    if m.vm.balloon_device is None:
        raise QMPError("DeviceNotActive", "No balloon device has been activated")
    return m.vm.balloon_device


def qmp_balloon(m: Monitor, args: dict) -> dict:
    """virtio_balloon_to_target via qmp_balloon: the target logical VM size, in bytes."""
    device = _need_balloon(m)
    if args["value"] <= 0:
        raise QMPError("GenericError", "Parameter 'target' expects a size")
    device.to_target(args["value"])
    return {}


def query_balloon(m: Monitor, args: dict) -> dict:
    return {"actual": _need_balloon(m).logical_actual()}


def qom_get(m: Monitor, args: dict) -> Any:
    return m.qom.resolve(args["path"]).get(args["property"])


def qom_set(m: Monitor, args: dict) -> dict:
    m.qom.resolve(args["path"]).set(args["property"], args["value"])
    return {}


def qom_list(m: Monitor, args: dict) -> list:
    return m.qom.resolve(args["path"]).list()


def query_status(m: Monitor, args: dict) -> dict:
    state = m.vm.run_state.state
    return {"status": state, "singlestep": False, "running": state == "running"}


def query_commands(m: Monitor, args: dict) -> list:
    return [{"name": name} for name in sorted(COMMANDS)]


def query_version(m: Monitor, args: dict) -> dict:
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


def qmp_capabilities(m: Monitor, args: dict) -> dict:
    """Outside negotiation (the QMP server handles it in its capabilities mode)."""
    raise QMPError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")


def qmp_quit(m: Monitor, args: dict) -> dict:
    """qmp_quit: the VM ends (SHUTDOWN, reason host-qmp-quit); nothing answers after this."""
    m.vm.event_queue.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    m.vm.close()
    return {}


def query_memory_devices(m: Monitor, args: dict) -> list:
    return [device.device_info() for device in m.memory_devices()]


def query_memdev(m: Monitor, args: dict) -> list:
    """qmp_query_memdev: every memory backend object (in creation order; QEMU's order is its hash
    table's)."""
    return [{"id": b.id, "size": b.size, "merge": b.merge, "dump": b.dump, "prealloc": b.prealloc,
             "share": b.share, "reserve": b.reserve, "host-nodes": [], "policy": b.policy}
            for b in m.backends.values()]


def human_monitor_command(m: Monitor, args: dict) -> str:
    return hmp.run_line(m, args["command-line"])


# The model's qapi schema: name -> Command. query-commands lists exactly these.
COMMANDS: dict[str, Command] = {
    "qmp_capabilities": Command(qmp_capabilities, optional={"enable": object},
                                doc="enter command mode (the QMP server's negotiation)"),
    "query-commands": Command(query_commands, doc="the commands this monitor answers"),
    "query-version": Command(query_version, doc="QEMU's version the texts follow"),
    "query-status": Command(query_status, doc="the VM's run state"),
    "quit": Command(qmp_quit, doc="end the VM"),
    "balloon": Command(qmp_balloon, {"value": int}, doc="set the balloon target (bytes)"),
    "query-balloon": Command(query_balloon, doc="the logical VM size (bytes)"),
    "qom-get": Command(qom_get, {"path": str, "property": str}),
    "qom-set": Command(qom_set, {"path": str, "property": str, "value": object}),
    "qom-list": Command(qom_list, {"path": str}),
    "query-memory-devices": Command(query_memory_devices, doc="virtio-mem and virtio-pmem devices"),
    "query-memdev": Command(query_memdev, doc="memory backend objects"),
    "human-monitor-command": Command(human_monitor_command, {"command-line": str}, {"cpu-index": int}),
    "migrate": Command(monitor_migration.migrate, {}, {"uri": str, "channels": object, "detach": bool,
                                                       "resume": bool}),
    "migrate_cancel": Command(monitor_migration.migrate_cancel),
    "migrate-set-parameters": Command(monitor_migration.set_parameters, {},
                                      dict.fromkeys(monitor_migration.PARAMETER_TYPES, object)),
    "query-migrate-parameters": Command(monitor_migration.query_parameters),
    "migrate-set-capabilities": Command(monitor_migration.set_capabilities, {"capabilities": object}),
    "query-migrate-capabilities": Command(monitor_migration.query_capabilities),
    "query-migrate": Command(monitor_migration.query_migrate),
    "device_add": Command(monitor_devices.device_add, {"driver": str}, extra=True),
    "device_del": Command(monitor_devices.device_del, {"id": str}),
    "object-add": Command(monitor_devices.object_add, {"qom-type": str, "id": str}, extra=True),
    "blockdev-add": Command(monitor_devices.blockdev_add, {"driver": str, "node-name": str},
                            {"filename": str, "cache": dict, "read-only": bool, "discard": str,
                             "aio": str, "auto-read-only": bool}),
}

__all__ = ["COMMANDS", "QEMU_VERSION", "Command", "Monitor"]
