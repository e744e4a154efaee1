"""QEMU's migration parameters and capabilities: names, types, defaults and the checks on them
(migration/options.c ``migration_properties``, ``migrate_params_check``; qapi/migration.json).

These are facts of the migration state (:mod:`labkit.model.migration`); the QMP commands that read
and set them live with the monitor (:mod:`labkit.backends.monitor_migration`).

QAPI detail worth knowing: ``max-bandwidth``, ``avail-switchover-bandwidth`` and ``downtime-limit``
are unsigned, and QEMU's input visitor accepts a negative JSON integer "for backward compatibility"
by wrapping it to 2^64 + value. So ``max-bandwidth=-1`` is accepted (an unlimited rate) while
``downtime-limit=-1`` fails the range check.

>>> p = default_parameters(); p["downtime-limit"] = 3_000_000
>>> check_parameters(p)
Traceback (most recent call last):
...
ValueError: Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms
"""

from __future__ import annotations

from typing import Any

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
# what the model simulates: auto-converge, events and postcopy-ram change what happens; the others
# here are accepted and change nothing (pages are sent whole)
MODELLED_CAPABILITIES = ("auto-converge", "events", "postcopy-ram", "xbzrle", "return-path",
                         "late-block-activate", "validate-uuid", "postcopy-blocktime")


def default_parameters() -> dict[str, Any]:
    return {name: default for name, (_, default) in PARAMETER_TYPES.items()}


def default_capabilities() -> dict[str, bool]:
    return dict.fromkeys(CAPABILITIES, False)


def _range_error(field: str, accepted: str) -> ValueError:
    return ValueError(f"Parameter '{field}' expects {accepted}")  # QERR_INVALID_PARAMETER_VALUE


def check_parameters(p: dict[str, Any]) -> None:
    """migrate_params_check, in QEMU's order, on the merged parameters (QEMU's texts)."""
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
