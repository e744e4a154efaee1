"""The migration QMP commands of the model's monitor, with QEMU's argument shapes, checks and texts.

``migrate`` (``uri`` in any QEMU syntax, or one ``channels`` entry), ``migrate_cancel``,
``migrate-set-parameters`` / ``query-migrate-parameters``, ``migrate-set-capabilities`` /
``query-migrate-capabilities`` and ``query-migrate``. Texts come from QEMU 8.x/9.x:
migration/migration.c (``qmp_migrate``, ``migrate_uri_parse``, ``migrate_prepare``),
util/qemu-sockets.c (``socket_parse``, ``inet_parse``) and the QAPI input visitor
(qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c). The parameters and capabilities themselves,
their defaults and range checks, are facts of the migration state
(:mod:`labkit.model.migration_params`); ``query-status`` reads the VM's run state, which the
migration sets (``finish-migrate``, ``postmigrate``).

Capabilities: all of QEMU 9.1's names are listed by ``query-migrate-capabilities``; those in
:data:`~labkit.model.migration_params.MODELLED_CAPABILITIES` can be enabled; enabling another one is
refused with a labkit message, not silently ignored. ``migrate`` is also refused while a virtio-pmem
device exists (a labkit blocker: QEMU registers no vmstate for it).

>>> import labkit
>>> vm = labkit.open(memory="256M", seed=0)
>>> vm.qmp("migrate-set-parameters", **{"downtime-limit": 3_000_000})
Traceback (most recent call last):
...
labkit.errors.QMPError: Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms
>>> vm.qmp("migrate", uri="carrier-pigeon:home")
Traceback (most recent call last):
...
labkit.errors.QMPError: unknown migration protocol: carrier-pigeon:home
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from labkit.errors import QMPError
from labkit.model.migration_params import (
    CAPABILITIES,
    MODELLED_CAPABILITIES,
    PARAMETER_TYPES,
    SIZE_MAX,
    check_parameters,
)

if TYPE_CHECKING:
    from labkit.model.migration import MigrationState

MIGRATION_ACTIVE = "There's a migration process in progress"  # QERR_MIGRATION_ACTIVE


# --- the QAPI input visitor ---------------------------------------------------------------------
def _visit(name: str, value: Any, kind: str) -> Any:
    """Convert one JSON value as QEMU's qobject input visitor does for ``kind``."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise QMPError("GenericError", f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value <= SIZE_MAX:
        raise QMPError("GenericError", f"Parameter '{name}' expects uint64")
    if value < 0:  # qobject_input_type_uint64: "accept negative values for backward compatibility"
        value += 1 << 64
    if kind == "uint8" and value > 0xFF:
        raise QMPError("GenericError", f"Parameter '{name}' expects uint8_t")
    return value


# --- URIs ---------------------------------------------------------------------------------------
_INET = re.compile(r"^([^:]{1,64}):([^,]{1,32})")
_INET6 = re.compile(r"^\[([^\]]{1,64})\]:([^,]{1,32})")
_PORT_ONLY = re.compile(r"^:([^,]{1,32})")


def _inet_parse(address: str) -> None:
    """util/qemu-sockets.c inet_parse: host:port, [v6]:port or :port (the options are not read)."""
    if address.startswith(":"):
        if not _PORT_ONLY.match(address):
            raise QMPError("GenericError", f"error parsing port in address '{address}'")
    elif address.startswith("["):
        if not _INET6.match(address):
            raise QMPError("GenericError", f"error parsing IPv6 address '{address}'")
    elif not _INET.match(address):
        raise QMPError("GenericError", f"error parsing address '{address}'")


def parse_uri(uri: str) -> str:
    """migrate_uri_parse: the transport ("exec", "rdma", "socket", "file"), or QEMU's error."""
    if uri.startswith("exec:"):
        return "exec"
    if uri.startswith("rdma:"):
        _inet_parse(uri[len("rdma:"):])
        return "rdma"
    if uri.startswith(("tcp:", "unix:", "vsock:", "fd:")):
        scheme, rest = uri.split(":", 1)
        if scheme == "unix" and not rest:
            raise QMPError("GenericError", "invalid Unix socket address")
        if scheme == "fd" and not rest:
            raise QMPError("GenericError", "invalid file descriptor address")
        if scheme == "vsock" and not re.match(r"^[^:]{1,32}:[^,]{1,32}", rest):
            raise QMPError("GenericError", f"error parsing address '{rest}'")
        if scheme == "tcp":
            _inet_parse(rest)
        return "fd" if scheme == "fd" else "socket"
    if uri.startswith("file:"):
        return "file"
    raise QMPError("GenericError", f"unknown migration protocol: {uri}")


def _channel_uri(channels: Any) -> str:
    """The one ``main`` channel of the new ``channels`` syntax, as an equivalent URI."""
    if not isinstance(channels, list):
        raise QMPError("GenericError", "Invalid parameter type for 'channels', expected: array")
    if len(channels) != 1:
        raise QMPError("GenericError", "Channel list has more than one entries")
    channel = channels[0]
    addr = channel.get("addr") if isinstance(channel, dict) else None
    if not isinstance(addr, dict):
        raise QMPError("GenericError", "Parameter 'channels[0].addr' is missing")
    transport = addr.get("transport")
    if transport == "exec":
        return "exec:" + " ".join(map(str, addr.get("args", [])))
    if transport in ("socket", "rdma"):
        kind = addr.get("type", "inet")
        if kind == "unix":
            return "unix:" + str(addr.get("path", ""))
        return f"{'tcp' if transport == 'socket' else 'rdma'}:{addr.get('host', '')}:{addr.get('port', '')}"
    if transport == "file":
        return "file:" + str(addr.get("filename", ""))
    raise QMPError("GenericError", f"Parameter 'transport' does not accept value '{transport}'")


# --- the commands (handlers of the monitor's table: (monitor, checked arguments)) --------------
def migrate(monitor: Any, args: dict) -> dict:
    migration = monitor.vm.migration
    uri, channels = args.get("uri"), args.get("channels")
    if uri is not None and channels is not None:
        raise QMPError("GenericError", "'uri' and 'channels' arguments are mutually exclusive; "
                       "exactly one of the two should be present in 'migrate' qmp command ")
    if channels is not None:
        uri = _channel_uri(channels)
    elif uri is None:
        raise QMPError("GenericError", "neither 'uri' or 'channels' argument are specified in "
                       "'migrate' qmp command ")
    transport = parse_uri(uri)
    if args.get("resume"):
        raise QMPError("GenericError", "Cannot resume if there is no paused migration")
    if migration.status in ("setup", "active", "cancelling"):
        raise QMPError("GenericError", MIGRATION_ACTIVE)
    if migration.runstate == "postmigrate":
        raise QMPError("GenericError", "Can't migrate the vm that was paused due to previous migration")
    pmem = monitor.vm.virtio_pmem.devices
    if pmem:
        ids = ", ".join(repr(d.id) for d in pmem)
        raise QMPError("GenericError", f"virtio-pmem device {ids} cannot be migrated: QEMU registers "
                                       f"no vmstate for virtio-pmem (labkit blocks migrate; "
                                       f"docs/mechanisms.md §4.3)")
    if transport == "fd":  # the model has no file descriptors passed with getfd
        desc = f"File descriptor named '{uri[3:]}' has not been found"
        migration.fail(desc)
        raise QMPError("GenericError", desc)
    migration.start(uri)
    return {}


def migrate_cancel(monitor: Any, args: dict) -> dict:
    monitor.vm.migration.cancel()
    return {}


def set_parameters(monitor: Any, args: dict) -> dict:
    migration = monitor.vm.migration
    merged = dict(migration.parameters)
    for name, value in args.items():
        merged[name] = _visit(name, value, PARAMETER_TYPES[name][0])
    try:
        check_parameters(merged)
    except ValueError as e:
        raise QMPError("GenericError", str(e)) from None
    migration.parameters = merged
    return {}


def query_parameters(monitor: Any, args: dict) -> dict:
    return dict(monitor.vm.migration.parameters)


def set_capabilities(monitor: Any, args: dict) -> dict:
    migration = monitor.vm.migration
    caps = args["capabilities"]
    if not isinstance(caps, list):
        raise QMPError("GenericError", "Invalid parameter type for 'capabilities', expected: array")
    new = dict(migration.capabilities)
    for i, item in enumerate(caps):
        where = f"capabilities[{i}]"
        if not isinstance(item, dict):
            raise QMPError("GenericError", f"Invalid parameter type for '{where}', expected: object")
        for key in item:
            if key not in ("capability", "state"):
                raise QMPError("GenericError", f"Parameter '{where}.{key}' is unexpected")
        for key in ("capability", "state"):
            if key not in item:
                raise QMPError("GenericError", f"Parameter '{where}.{key}' is missing")
        name, state = item["capability"], item["state"]
        if not isinstance(name, str):
            raise QMPError("GenericError",
                           f"Invalid parameter type for '{where}.capability', expected: string")
        if name not in CAPABILITIES:
            raise QMPError("GenericError", f"Parameter 'capability' does not accept value '{name}'")
        if not isinstance(state, bool):
            raise QMPError("GenericError",
                           f"Invalid parameter type for '{where}.state', expected: boolean")
        new[name] = state
    if migration.status in ("setup", "active", "cancelling"):
        raise QMPError("GenericError", MIGRATION_ACTIVE)
    unmodelled = [n for n, on in new.items() if on and n not in MODELLED_CAPABILITIES]
    if unmodelled:
        raise QMPError("GenericError", f"labkit's model does not simulate the migration "
                       f"capability '{unmodelled[0]}'; it models {list(MODELLED_CAPABILITIES)}")
    migration.capabilities = new
    return {}


def query_capabilities(monitor: Any, args: dict) -> list:
    return [{"capability": n, "state": s} for n, s in monitor.vm.migration.capabilities.items()]


def query_migrate(monitor: Any, args: dict) -> dict:
    return migration_info(monitor.vm.migration)


def migration_info(m: MigrationState) -> dict:
    """fill_source_migration_info: what query-migrate returns in each status."""
    if m.status == "none":
        return {}
    info: dict[str, Any] = {"status": m.status}
    if m.status == "failed" and m.error_desc:
        info["error-desc"] = m.error_desc
    if m.status not in ("active", "cancelling", "completed"):
        return info
    completed = m.status == "completed"
    info["setup-time"] = m.setup_time
    info["total-time"] = m.total_time if completed else round(m.env.now - m.start_time)
    if completed:
        info["downtime"] = m.downtime
    else:
        info["expected-downtime"] = m.expected_downtime
    info["ram"] = {
        "transferred": m.transferred,
        "remaining": 0 if completed else m.dirty_pages * 4096,
        "total": m.mem.n_pages * 4096,
        "duplicate": m.zero_pages,
        "normal": m.normal_pages,
        "normal-bytes": m.normal_pages * 4096,
        "dirty-pages-rate": 0 if completed else m.dirty_pages_rate,
        "mbps": m.mbps,
        "dirty-sync-count": m.dirty_sync_count,
        "postcopy-requests": 0,
        "page-size": 4096,
        "multifd-bytes": 0,
        "pages-per-second": round(m.pages_per_second),
        "precopy-bytes": m.precopy_bytes,
        "downtime-bytes": m.downtime_bytes,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    }
    if m.throttle_pct:
        info["cpu-throttle-percentage"] = m.throttle_pct
    return info
