"""The Backend protocol every notebook, scenario and test talks to, and what both backends share.

A backend speaks QMP (``qmp(command, **arguments)`` returns what QEMU returns and raises
:class:`~labkit.errors.QMPError` with QEMU's class and text), runs workload steps in the guest
(``guest(op, ...)``), reads ``/proc/meminfo`` (``meminfo()``), moves time (``advance(ms)``, or
``advance_until(event)`` to the next event), returns one row of metrics (``sample()``) and a frozen
snapshot of one mechanism (``inspect(mechanism)``, :mod:`labkit.backends.inspect`). ``events()``
lists the QMP events so far. The model, the live QEMU and a replayed recording all provide it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import simpy

from labkit.errors import QMPError

SAMPLE_KEYS = (
    "t_ms", "memtotal", "memfree", "memavailable", "cached", "anon", "balloon_actual",
    "balloon_target", "balloon_size", "host_rss", "host_swap", "host_free", "oom_kills",
)

# the columns each mechanism adds to sample() (the model adds migration's and virtio-pmem's always,
# the others when the VM has the mechanism); the live backend adds LIVE_SAMPLE_KEYS
MECHANISM_SAMPLE_KEYS = {
    "reporting": ("reported_bytes", "reporting_passes", "reporting_reports", "reporting_discarded_bytes",
                  "reporting_refaulted_bytes"),
    "hinting": ("hinted",),
    "migration": ("migration_active", "migration_transferred", "migration_remaining",
                  "migration_threshold", "migration_syncs", "migration_throttle"),
    "virtio-mem": ("virtio_mem_plugged", "virtio_mem_requested"),
    "virtio-pmem": ("host_page_cache", "host_page_cache_dirty", "guest_dirty", "pmem_size", "pmem_memmap"),
}
LIVE_SAMPLE_KEYS = ("qemu_rss", "qemu_rss_anon", "qemu_rss_file")

# monitor/monitor.c monitor_qapi_event_conf: events QEMU rate-limits, and the key of each limit
THROTTLED_EVENTS_MS = {"BALLOON_CHANGE": 1000, "MEMORY_DEVICE_SIZE_CHANGE": 1000}


@runtime_checkable
class Backend(Protocol):
    """What notebooks and scenarios use; the model and the live QEMU backend both provide it."""

    def qmp(self, command: str, **arguments: Any) -> Any: ...
    def guest(self, op: str, **arguments: Any) -> Any: ...
    def meminfo(self) -> dict[str, int]: ...
    def advance(self, ms: float) -> None: ...
    def sample(self) -> dict[str, float]: ...
    def events(self) -> list[dict]: ...
    def inspect(self, mechanism: str) -> Any: ...
    def advance_until(self, event: str, max_ms: float = ..., **data: Any) -> dict | None: ...
    def close(self) -> None: ...


class EventQueue:
    """QMP events with QEMU's monitor throttle: a rate-limited event is sent at once, later ones
    within the period are held and only the newest is sent when the period ends
    (monitor_qapi_event_queue_no_reenter, per event name and, for memory devices, per qom-path)."""

    def __init__(self, env: simpy.Environment, wallclock: Callable[[], float]):
        self.env = env
        self.wallclock = wallclock
        self.delivered: list[dict] = []
        self._pending: dict[tuple, dict | None] = {}

    def emit(self, name: str, data: dict) -> None:
        seconds = self.wallclock()
        event = {"event": name, "data": dict(data),
                 "timestamp": {"seconds": int(seconds),
                               "microseconds": int(round((seconds % 1) * 1e6)) % 1_000_000}}
        period = THROTTLED_EVENTS_MS.get(name)
        if period is None:
            self.delivered.append(event)
            return
        key = (name, data.get("qom-path"))
        if key in self._pending:
            self._pending[key] = event  # held; the newest replaces an older held one
            return
        self.delivered.append(event)
        self._pending[key] = None
        self.env.process(self._period(key, period))

    def _period(self, key: tuple, period: float):
        while True:
            yield self.env.timeout(period)
            held = self._pending.get(key)
            if held is None:
                del self._pending[key]
                return
            self.delivered.append(held)
            self._pending[key] = None


# --- QMP argument checking, with QEMU's error texts (qapi/qobject-input-visitor.c) -------------
_TYPE_NAMES = {int: "integer", str: "string", bool: "boolean"}


def check_arguments(arguments: dict, required: dict[str, type], optional: dict[str, type]) -> None:
    for name in arguments:
        if name not in required and name not in optional:
            raise QMPError("GenericError", f"Parameter '{name}' is unexpected")
    for name in required:
        if name not in arguments:
            raise QMPError("GenericError", f"Parameter '{name}' is missing")
    for name, value in arguments.items():
        expected = required.get(name) or optional.get(name)
        if expected is object:
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise QMPError("GenericError",
                           f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[expected]}")
