"""The HMP commands of the model's monitor: each calls QMP commands, as QEMU's hmp-cmds.c does, and
prints what QEMU 7.2 prints (the parsing and the table are in :mod:`labkit.backends.hmp`).
"""

from __future__ import annotations

import json
from typing import Any

from labkit.backends.qemu_cmdline import QEMU_SIZE_HINT, parse_bool, qemu_strtosz
from labkit.errors import QMPError
from labkit.model.migration_params import PARAMETER_TYPES


def _qmp(monitor: Any, name: str, **args: Any) -> Any:
    return monitor.execute(name, args)


# --- the commands (hmp-cmds.c) ------------------------------------------------------------------
def hmp_info_balloon(m: Any, args: dict) -> str:
    return f"balloon: actual={_qmp(m, 'query-balloon')['actual'] >> 20}\n"


def hmp_balloon(m: Any, args: dict) -> str:
    _qmp(m, "balloon", value=args["value"])
    return ""


def hmp_info_memory_devices(m: Any, args: dict) -> str:
    out = []
    for info in _qmp(m, "query-memory-devices"):
        d = info["data"]
        out.append(f"Memory device [{info['type']}]: \"{d.get('id', '')}\"\n  memaddr: 0x{d['memaddr']:x}\n")
        if info["type"] == "virtio-mem":
            out.append(f"  node: {d['node']}\n  requested-size: {d['requested-size']}\n  size: {d['size']}\n"
                       f"  max-size: {d['max-size']}\n  block-size: {d['block-size']}\n")
        else:
            out.append(f"  size: {d['size']}\n")
        out.append(f"  memdev: {d['memdev']}\n")
    return "".join(out)


def hmp_info_memdev(m: Any, args: dict) -> str:
    out = []
    for b in _qmp(m, "query-memdev"):
        yes = {True: "true", False: "false"}
        out.append(f"memory backend: {b['id']}\n  size:  {b['size']}\n  merge: {yes[b['merge']]}\n"
                   f"  dump: {yes[b['dump']]}\n  prealloc: {yes[b['prealloc']]}\n  share: {yes[b['share']]}\n"
                   f"  reserve: {yes[b['reserve']]}\n  policy: {b['policy']}\n  host nodes: \n")
    return "".join(out) + "\n"


def hmp_info_status(m: Any, args: dict) -> str:
    info = _qmp(m, "query-status")
    text = f"VM status: {'running' if info['running'] else 'paused'}"
    if not info["running"] and info["status"] != "paused":
        text += f" ({info['status']})"
    return text + "\n"


def hmp_qom_get(m: Any, args: dict) -> str:
    value = _qmp(m, "qom-get", path=args["path"], property=args["property"])
    return json.dumps(value, indent=4) + "\n"


def hmp_qom_set(m: Any, args: dict) -> str:
    if args["json"]:
        try:
            value = json.loads(args["value"])
        except json.JSONDecodeError as e:
            raise QMPError("GenericError", f"JSON parse error, {e.msg}") from None
        _qmp(m, "qom-set", path=args["path"], property=args["property"], value=value)
        return ""
    m.qom.resolve(args["path"]).set_text(args["property"], args["value"])
    return ""


MIGRATION_GLOBALS = ("globals:\nstore-global-state: on\nonly-migratable: off\nsend-configuration: on\n"
                     "send-section-footer: on\ndecompress-error-check: on\nclear-bitmap-shift: 18\n")


def hmp_info_migrate(m: Any, args: dict) -> str:
    """hmp_info_migrate of QEMU 7.2 (the globals, then the status and RAM lines)."""
    info = _qmp(m, "query-migrate")
    out = [MIGRATION_GLOBALS]
    if "status" in info:
        failed = info["status"] == "failed" and info.get("error-desc")
        out.append(f"Migration status: {info['status']}" + (f" ({info['error-desc']})\n" if failed else "\n"))
        out.append(f"total time: {info.get('total-time', 0)} ms\n")
        for key, label in (("expected-downtime", "expected downtime"), ("downtime", "downtime"),
                           ("setup-time", "setup")):
            if key in info:
                out.append(f"{label}: {info[key]} ms\n")
    ram = info.get("ram")
    if ram:
        out.append(f"transferred ram: {ram['transferred'] >> 10} kbytes\nthroughput: {ram['mbps']:.2f} mbps\n"
                   f"remaining ram: {ram['remaining'] >> 10} kbytes\ntotal ram: {ram['total'] >> 10} kbytes\n"
                   f"duplicate: {ram['duplicate']} pages\nskipped: 0 pages\nnormal: {ram['normal']} pages\n"
                   f"normal bytes: {ram['normal-bytes'] >> 10} kbytes\n"
                   f"dirty sync count: {ram['dirty-sync-count']}\n"
                   f"page size: {ram['page-size'] >> 10} kbytes\n"
                   f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes\n"
                   f"pages-per-second: {ram['pages-per-second']}\n")
        for key, text in (("dirty-pages-rate", "dirty pages rate: {} pages"),
                          ("postcopy-requests", "postcopy request count: {}"),
                          ("precopy-bytes", "precopy ram: {} kbytes"),
                          ("downtime-bytes", "downtime ram: {} kbytes"),
                          ("postcopy-bytes", "postcopy ram: {} kbytes")):
            if ram.get(key):
                out.append(text.format(ram[key] >> 10 if key.endswith("bytes") else ram[key]) + "\n")
    if "cpu-throttle-percentage" in info:
        out.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}\n")
    return "".join(out)


# QEMU 7.2's migration parameters the model does not simulate, at their defaults (shown by
# info migrate_parameters as QEMU shows them; migrate_set_parameter refuses them)
UNMODELLED_PARAMETERS = {"announce-initial": "50 ms", "announce-max": "550 ms", "announce-rounds": "5",
                         "announce-step": "100 ms", "compress-level": "1", "compress-threads": "8",
                         "compress-wait-thread": "on", "decompress-threads": "2",
                         "tls-creds": "''", "tls-hostname": "''", "x-checkpoint-delay": "20000 ms",
                         "block-incremental": "off", "multifd-channels": "2", "multifd-compression": "none",
                         "max-postcopy-bandwidth": "0", "tls-authz": "''"}
_PARAMETER_LINES = ("announce-initial", "announce-max", "announce-rounds", "announce-step", "compress-level",
                    "compress-threads", "compress-wait-thread", "decompress-threads",
                    "throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
                    "cpu-throttle-tailslow", "max-cpu-throttle", "tls-creds", "tls-hostname", "max-bandwidth",
                    "downtime-limit", "x-checkpoint-delay", "block-incremental", "multifd-channels",
                    "multifd-compression", "xbzrle-cache-size", "max-postcopy-bandwidth", "tls-authz")
_UNITS = {"max-bandwidth": " bytes/second", "downtime-limit": " ms", "xbzrle-cache-size": " bytes"}


def hmp_info_migrate_parameters(m: Any, args: dict) -> str:
    params = _qmp(m, "query-migrate-parameters")
    out = []
    for name in _PARAMETER_LINES:
        if name in UNMODELLED_PARAMETERS:
            value = UNMODELLED_PARAMETERS[name]
        elif isinstance(params[name], bool):
            value = "on" if params[name] else "off"
        else:
            value = f"{params[name]}{_UNITS.get(name, '')}"
        out.append(f"{name}: {value}\n")
    return "".join(out)


def hmp_info_migrate_capabilities(m: Any, args: dict) -> str:
    return "".join(f"{c['capability']}: {'on' if c['state'] else 'off'}\n"
                   for c in _qmp(m, "query-migrate-capabilities"))


def hmp_migrate_set_parameter(m: Any, args: dict) -> str:
    """hmp_migrate_set_parameter: each parameter's text read by its type."""
    name, text = args["parameter"], args["value"]
    if name in UNMODELLED_PARAMETERS:
        raise QMPError("GenericError", f"labkit's model does not simulate migration parameter '{name}'")
    if name not in PARAMETER_TYPES:
        raise QMPError("GenericError", f"invalid parameter value: {name}")
    kind = PARAMETER_TYPES[name][0]
    try:
        if name in ("max-bandwidth", "avail-switchover-bandwidth"):  # qemu_strtosz_MiB
            try:
                value = qemu_strtosz(text, "M")
            except ValueError:
                raise ValueError(f"Invalid size {text}") from None
        elif kind == "bool":
            value = parse_bool(name, text)
        elif kind == "size" or name == "downtime-limit":
            try:
                value = qemu_strtosz(text)
            except ValueError:
                raise ValueError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                                 f"{QEMU_SIZE_HINT}") from None
        else:  # uint8 through the string visitor: a uint64, then the range
            try:
                value = int(text, 0)
            except ValueError:
                raise ValueError(f"Parameter '{name}' expects uint64") from None
            if not 0 <= value <= 0xFF:
                raise ValueError(f"Parameter '{name}' expects uint8_t")
    except ValueError as e:
        raise QMPError("GenericError", str(e)) from None
    _qmp(m, "migrate-set-parameters", **{name: value})
    return ""


def hmp_migrate_set_capability(m: Any, args: dict) -> str:
    name = args["capability"]
    caps = {c["capability"] for c in _qmp(m, "query-migrate-capabilities")}
    if name not in caps:
        raise QMPError("GenericError", f"invalid parameter value: {name}")
    _qmp(m, "migrate-set-capabilities", capabilities=[{"capability": name, "state": args["state"]}])
    return ""
