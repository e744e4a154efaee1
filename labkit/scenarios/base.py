"""What every scenario returns: a :class:`Run` (time series, summary metrics, events, parameters).

A scenario is a plain function of a small frozen dataclass of parameters (with a ``seed``) that opens
a backend, runs a timeline of actions through the public backend calls only (``qmp``, ``guest``,
``advance``, ``step``, ``sample``, ``meminfo``, ``events``), and returns a :class:`Run`. The same
parameters give the same Run on the model backend; on a live guest the numbers are measurements.

>>> import numpy as np
>>> rows = [{"t_ms": 0.0, "memfree": 10.0}, {"t_ms": 100.0, "memfree": 8.0}]
>>> run = Run.from_rows(rows, summary={"lowest_free": 8.0})
>>> run.series["memfree"].tolist()
[10.0, 8.0]
>>> run.last("memfree")
8.0
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import numpy as np

from labkit.backends.base import Backend


@dataclass
class Run:
    """The outcome of one scenario run.

    ``series``: one numpy array per sample key (all rows of ``vm.sample()``, in time order, plus any
    extra columns the scenario added); ``summary``: named scalar metrics; ``events``: the QMP events;
    ``params``: the frozen parameter dataclass the run came from (or None).
    """

    series: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    params: Any = None

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, float]], *, summary: Mapping[str, float] | None = None,
                  events: Iterable[dict] = (), params: Any = None) -> Run:
        """Build a Run from ``vm.sample()`` rows; every key of every row becomes a column.

        A key missing from some rows is filled with NaN there, so columns always line up with ``t_ms``.
        """
        keys: list[str] = []
        for row in rows:
            for key in row:
                if key not in keys:
                    keys.append(key)
        series = {key: np.array([float(row.get(key, np.nan)) for row in rows], dtype=np.float64)
                  for key in keys}
        return cls(series=series, summary=dict(summary or {}), events=list(events), params=params)

    def __len__(self) -> int:
        """Number of samples."""
        return len(next(iter(self.series.values()))) if self.series else 0

    def last(self, key: str) -> float:
        """The newest value of one series."""
        if key not in self.series:
            raise KeyError(f"series {key!r} not in this run; it has {sorted(self.series)}")
        return float(self.series[key][-1])

    def events_named(self, name: str) -> list[dict]:
        """The QMP events with this name, e.g. ``"BALLOON_CHANGE"``."""
        return [e for e in self.events if e.get("event") == name]

    def to_dict(self) -> dict:
        """A JSON-friendly copy (series as lists, params as a dict)."""
        params = asdict(self.params) if is_dataclass(self.params) else self.params
        return {"series": {k: v.tolist() for k, v in self.series.items()},
                "summary": {k: float(v) for k, v in self.summary.items()},
                "events": self.events, "params": params}

    def to_json(self, path: str | None = None) -> str:
        """Serialise with :meth:`to_dict`; also write to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


def record(vm: Backend, ms: float, every_ms: float, rows: list[dict],
           extra: Callable[[Backend], Mapping[str, float]] | None = None) -> None:
    """Advance ``vm`` by ``ms`` in steps of ``every_ms``, appending one ``vm.sample()`` row per step.

    ``extra(vm)`` may add columns to each row (for example a quantity computed from a snapshot).
    """
    if every_ms <= 0:
        raise ValueError(f"every_ms must be > 0, got {every_ms!r}")
    if ms < 0:
        raise ValueError(f"ms must be >= 0, got {ms!r}")
    steps = int(np.ceil(ms / every_ms))
    for i in range(steps):
        vm.advance(min(every_ms, ms - i * every_ms))
        row = dict(vm.sample())
        if extra is not None:
            row.update(extra(vm))
        rows.append(row)


def table(runs: Sequence[Run], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """One row per run: a dict of arrays built from each run's ``summary``."""
    if not runs:
        raise ValueError("table() needs at least one Run")
    keys = list(keys) if keys is not None else list(runs[0].summary)
    return {k: np.array([float(r.summary.get(k, np.nan)) for r in runs]) for k in keys}
