"""The migration QMP commands of the model, with QEMU's argument shapes, checks and error texts.

``migrate`` (``uri`` in any QEMU syntax, or one ``channels`` entry), ``migrate_cancel``,
``migrate-set-parameters`` / ``query-migrate-parameters``, ``migrate-set-capabilities`` /
``query-migrate-capabilities``, ``query-migrate``, and ``query-status`` (which knows the
``finish-migrate`` and ``postmigrate`` runstates). Texts come from QEMU 8.x/9.x: migration/options.c
(``migrate_params_check``, ``migrate_caps_check``), migration/migration.c (``qmp_migrate``,
``migrate_uri_parse``, ``migrate_prepare``), util/qemu-sockets.c (``socket_parse``, ``inet_parse``)
and the QAPI input visitor (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c).

QAPI detail worth knowing: ``max-bandwidth``, ``avail-switchover-bandwidth`` and ``downtime-limit``
are unsigned, and QEMU's input visitor accepts a negative JSON integer "for backward compatibility"
by wrapping it to 2^64 + value. So ``max-bandwidth=-1`` is accepted (an unlimited rate) while
``downtime-limit=-1`` fails the range check. The model does the same.

Parameters modelled: those in :data:`PARAMETER_TYPES`; other QEMU parameters are refused as
unexpected. Capabilities: all of QEMU 9.1's names are listed by ``query-migrate-capabilities``;
those in :data:`MODELLED_CAPABILITIES` can be enabled (``xbzrle`` and the others besides
``auto-converge``, ``events`` and ``postcopy-ram`` change nothing in the model); enabling another
one is refused with a labkit message, not silently ignored.

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
from typing import Any

from labkit.backends.base import check_arguments
from labkit.errors import QMPError

SIZE_MAX = (1 << 64) - 1
MAX_MIGRATE_DOWNTIME = 2000 * 1000  # migration/options.c, ms
MAX_THROTTLE = 128 << 20  # migration/options.c, bytes/s

# name: (QAPI type, default) -- migration/options.c migration_properties
PARAMETER_TYPES = {
    "throttle-trigger-threshold": ("uint8", 50),
    "cpu-throttle-initial": ("uint8", 20),
    "cpu-throttle-increment": ("uint8", 10),
    "cpu-throttle-tailslow": ("bool", False),
    "max-bandwidth": ("size", MAX_THROTTLE),
    "avail-switchover-bandwidth": ("size", 0),
    "downtime-limit": ("uint64", 300),
    "max-cpu-throttle": ("uint8", 99),
    "xbzrle-cache-size": ("size", 64 << 20),
}

# qapi/migration.json MigrationCapability, QEMU 9.1 (zero-blocks, compress, block removed)
CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo", "release-ram",
    "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
)
MODELLED_CAPABILITIES = ("auto-converge", "events", "postcopy-ram", "xbzrle", "return-path",
                         "late-block-activate", "validate-uuid", "postcopy-blocktime")
MIGRATION_ACTIVE = "There's a migration process in progress"  # QERR_MIGRATION_ACTIVE


def default_parameters() -> dict[str, Any]:
    return {name: default for name, (_, default) in PARAMETER_TYPES.items()}


def default_capabilities() -> dict[str, bool]:
    return dict.fromkeys(CAPABILITIES, False)


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


def _range_error(field: str, accepted: str) -> QMPError:
    return QMPError("GenericError", f"Parameter '{field}' expects {accepted}")  # QERR_INVALID_PARAMETER_VALUE


def check_parameters(p: dict[str, Any]) -> None:
    """migrate_params_check, in QEMU's order, on the merged parameters."""
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _range_error("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise _range_error("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise _range_error("cpu_throttle_increment", "an integer in the range of 1 to 99")
    for name in ("max-bandwidth", "avail-switchover-bandwidth"):
        if p[name] > SIZE_MAX:  # never on a 64-bit host, as in QEMU
            raise _range_error(name.replace("-", "_"),
                               f"an integer in the range of 0 to {SIZE_MAX} bytes/second")
    if p["downtime-limit"] > MAX_MIGRATE_DOWNTIME:
        # stringify(MAX_MIGRATE_DOWNTIME) expands the macro's text: "(2000 * 1000)"
        raise _range_error("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    size = p["xbzrle-cache-size"]
    if size < 4096 or size & (size - 1):
        raise _range_error("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _range_error("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")


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


# --- the commands -------------------------------------------------------------------------------
def register(backend, migration) -> None:
    """Register the migration commands (and a runstate-aware query-status) on ``backend``."""

    def migrate(**args: Any) -> dict:
        check_arguments(args, {}, {"uri": str, "channels": object, "detach": bool, "resume": bool})
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
            raise QMPError("GenericError",
                           "Can't migrate the vm that was paused due to previous migration")
        if transport == "fd":  # the model has no file descriptors passed with getfd
            desc = f"File descriptor named '{uri[3:]}' has not been found"
            migration.fail(desc)
            raise QMPError("GenericError", desc)
        migration.start(uri)
        return {}

    def migrate_cancel(**args: Any) -> dict:
        check_arguments(args, {}, {})
        migration.cancel()
        return {}

    def migrate_set_parameters(**args: Any) -> dict:
        check_arguments(args, {}, dict.fromkeys(PARAMETER_TYPES, object))
        merged = dict(migration.parameters)
        for name, value in args.items():
            merged[name] = _visit(name, value, PARAMETER_TYPES[name][0])
        check_parameters(merged)
        migration.parameters = merged
        return {}

    def query_migrate_parameters(**args: Any) -> dict:
        check_arguments(args, {}, {})
        return dict(migration.parameters)

    def migrate_set_capabilities(**args: Any) -> dict:
        check_arguments(args, {"capabilities": object}, {})
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

    def query_migrate_capabilities(**args: Any) -> list:
        check_arguments(args, {}, {})
        return [{"capability": n, "state": s} for n, s in migration.capabilities.items()]

    def query_migrate(**args: Any) -> dict:
        check_arguments(args, {}, {})
        return migration_info(migration)

    def query_status(**args: Any) -> dict:
        check_arguments(args, {}, {})
        return {"status": migration.runstate, "singlestep": False,
                "running": migration.runstate == "running"}

    for name, handler in (("migrate", migrate), ("migrate_cancel", migrate_cancel),
                          ("migrate-set-parameters", migrate_set_parameters),
                          ("query-migrate-parameters", query_migrate_parameters),
                          ("migrate-set-capabilities", migrate_set_capabilities),
                          ("query-migrate-capabilities", query_migrate_capabilities),
                          ("query-migrate", query_migrate), ("query-status", query_status)):
        backend.register_qmp(name, handler)


def migration_info(m) -> dict:
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
        "total": m.ram_total,
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
    if m.capabilities["xbzrle"]:  # populate_ram_info: present whenever the capability is on
        # labkit sends every page whole (no XBZRLE encoding is modelled): the counters stay 0
        info["xbzrle-cache"] = {"cache-size": m.parameters["xbzrle-cache-size"], "bytes": 0, "pages": 0,
                                "cache-miss": 0, "cache-miss-rate": 0.0, "encoding-rate": 0.0,
                                "overflow": 0}
    if m.throttle_pct:
        info["cpu-throttle-percentage"] = m.throttle_pct
    return info
