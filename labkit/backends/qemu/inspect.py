"""``inspect`` and ``advance_until`` on the live backend: what QMP and the guest's sysfs show.

A real guest is seen from outside: the balloon's target and ``actual`` (query-balloon), the
migration (query-migrate, query-status), the virtio-mem devices (query-memory-devices) and the
memory blocks the guest added (sysfs, through the serial shell). The model's inner counters (the
driver's pages in flight, the bitmap, the reporting passes) are ``None`` here; ``reporting``,
``hinting``, ``virtio-pmem`` and ``memory`` can't be seen at all and say so.
``advance_until`` waits for QMP events only; the model's trace points have no live counterpart.
"""

from __future__ import annotations

import time
from typing import Any

from labkit.backends.inspect import (
    SNAPSHOTS,
    TRACE_POINTS,
    BalloonView,
    MigrationView,
    VirtioMemDeviceView,
    VirtioMemView,
    check_wait,
    unknown_mechanism,
)


class LiveInspection:
    """Mixed into :class:`labkit.backends.qemu.backend.QemuBackend`."""

    def inspect(self, mechanism: str) -> Any:
        """A snapshot of ``mechanism`` from QMP and the guest (see the module docstring)."""
        self._check_open()
        if mechanism not in SNAPSHOTS:
            raise unknown_mechanism(mechanism)
        if mechanism == "balloon":
            if self.balloon_options is None:
                raise ValueError("this VM has no balloon: open it with a balloon "
                                 "(balloon={} or -device virtio-balloon-pci)")
            actual = self.qmp("query-balloon")["actual"]
            return BalloonView(target=self.balloon_target, actual=actual,
                               num_pages=(self.memory - self.balloon_target) >> 12,
                               actual_pages=(self.memory - actual) >> 12,
                               properties=dict(self.balloon_options))
        if mechanism == "migration":
            info = self.qmp("query-migrate")
            return MigrationView(info.get("status", "none"), self.qmp("query-status")["status"],
                                 info.get("ram", {}).get("dirty-sync-count", 0),
                                 transferred=info.get("ram", {}).get("transferred"),
                                 throttle_pct=info.get("cpu-throttle-percentage", 0))
        if mechanism == "virtio-mem":
            return self._inspect_virtio_mem()
        raise NotImplementedError(f"the live backend can't see {mechanism!r} from outside the guest; "
                                  f"it inspects 'balloon', 'migration' and 'virtio-mem' (use sample() "
                                  f"for totals, or the model for the inside)")

    def _inspect_virtio_mem(self) -> VirtioMemView:
        devices = [d["data"] for d in self.qmp("query-memory-devices") if d["type"] == "virtio-mem"]
        if not devices:
            raise ValueError("this VM has no virtio-mem device")
        blocks = self.ops.call("memory_blocks", {})
        views = tuple(VirtioMemDeviceView(d.get("id"), d["memaddr"], d["node"], d["block-size"],
                                          d["requested-size"], d["size"], d["max-size"]) for d in devices)
        return VirtioMemView(views, tuple(sorted(b["block"] for b in blocks)),
                             {b["block"]: b["zone"] for b in blocks if b["zone"] is not None})

    def advance_until(self, event: str, max_ms: float = 60_000.0, **data: Any) -> dict | None:
        """Wait (wall time) for the QMP event ``event`` with ``data`` matching, at most ``max_ms``."""
        self._check_open()
        max_ms = check_wait(max_ms)
        if event in TRACE_POINTS:
            raise ValueError(f"{event!r} is a trace point of the model; the live backend waits for QMP "
                             f"events such as 'BALLOON_CHANGE' or 'MEMORY_DEVICE_SIZE_CHANGE'")
        conn = self.qmp_conn
        seen = conn.event_count
        deadline = time.monotonic() + max_ms / 1000.0
        while (left := deadline - time.monotonic()) > 0:
            found = conn.wait_event(event, seen, min(left, self.knobs["poll_ms"] / 1000.0))
            self._poll()
            events = conn.events()
            for e in events[seen:]:
                if e["event"] == event and all(e["data"].get(k) == v for k, v in data.items()):
                    return e
            if found is not None:
                seen = len(events)
        return None
