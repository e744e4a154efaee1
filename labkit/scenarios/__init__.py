"""Scenarios: functions of a small frozen dataclass of parameters (seeded) that return a :class:`Run`.

Each runs a timeline of actions on any backend through its public calls only, so the same scenario
runs on the model and on a live QEMU guest.

>>> from labkit.scenarios import SizingParams, balloon_sizing, sizing_table
>>> rows = sizing_table(balloon_sizing(SizingParams(memory="1G", targets=(0.8,))))
>>> bool(rows["reached"][0])
True
"""

from labkit.scenarios.balloon_sizing import (
    SizingParams,
    balloon_sizing,
    format_table,
    guest_demand,
    idle_backed_bytes,
    run_target,
    sizing_table,
)
from labkit.scenarios.base import Run, record, table

__all__ = [
    "Run",
    "SizingParams",
    "balloon_sizing",
    "format_table",
    "guest_demand",
    "idle_backed_bytes",
    "record",
    "run_target",
    "sizing_table",
    "table",
]
