"""virtio-mem over time: requested vs plugged size (and MemTotal), with every failed driver work run
and the retry timer it armed (§5.6): 50 s, then 100 s, 200 s, 300 s.

:func:`retry_schedule` replays virtio_mem_run_wq's timer rules over a driver's history;
:class:`ResizeTimeline` draws the sizes from ``vm.sample()`` rows and the failures as crosses
labelled with the delay armed. The memory-block grid is :mod:`labkit.viz.memblocks`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from labkit.devices.virtio_mem_driver import VIRTIO_MEM_RETRY_TIMER_MAX_MS, VIRTIO_MEM_RETRY_TIMER_MIN_MS
from labkit.units import GiB, MiB
from labkit.viz.shown import Shown
from labkit.viz.timeseries import _rows_of, time_axis

RETRY_ERRORS = (-errno.EBUSY, -errno.ETXTBSY, -errno.ENOMEM)  # virtio_mem_run_wq arms the timer


# --- the retry backoff ------------------------------------------------------------------------------
def retry_schedule(history: list[tuple[float, str, int]]) -> list[dict]:
    """The driver's failed work runs and the retry timer each one armed, replayed from its
    ``history`` [(t_ms, "plug"/"unplug"/"idle", rc)] with virtio_mem_run_wq's rules (§5.6): -EBUSY,
    -ETXTBSY and -ENOMEM arm the timer unless it is already running; each expiry doubles the delay
    (50 s up to 300 s); a success resets it to 50 s. Returns one dict per failure: ``t_ms``,
    ``what``, ``rc``, ``error`` (e.g. "EBUSY"), ``retry_ms`` (the delay armed, or None) and
    ``retry_at_ms``.

    >>> [(f["error"], f["retry_ms"]) for f in retry_schedule(
    ...     [(0, "unplug", -16), (50_000, "unplug", -16), (150_000, "unplug", -16)])]
    [('EBUSY', 50000), ('EBUSY', 100000), ('EBUSY', 200000)]
    """
    delay, timer_end, out = VIRTIO_MEM_RETRY_TIMER_MIN_MS, None, []
    for t, what, rc in history:
        if timer_end is not None and timer_end <= t:  # the timer fired: doubled, then the work ran
            delay, timer_end = min(delay * 2, VIRTIO_MEM_RETRY_TIMER_MAX_MS), None
        if rc == 0:
            delay = VIRTIO_MEM_RETRY_TIMER_MIN_MS
            continue
        armed = rc in RETRY_ERRORS and timer_end is None
        if armed:
            timer_end = t + delay
        out.append({"t_ms": float(t), "what": what, "rc": int(rc),
                    "error": errno.errorcode.get(-rc, str(rc)), "retry_ms": delay if armed else None,
                    "retry_at_ms": float(t + delay) if armed else None})
    return out


TIMELINE_LINES = (  # (sample key, legend label, colour, dash)
    ("virtio_mem_requested", "requested-size", "#E69F00", "dashed"),
    ("virtio_mem_plugged", "size (plugged)", "#0072B2", "solid"),
    ("memtotal", "guest MemTotal", "#000000", "dotted"),
)


class ResizeTimeline(Shown):
    """Requested vs plugged size (and MemTotal) over time, with the driver's failures and retry
    timers; ``append(row)`` streams a ``vm.sample()`` row, ``update_history(vm)`` redraws the
    markers from the drivers' histories. ``unit`` is "GiB" or "MiB" (default by size).

    >>> tl = ResizeTimeline([{"t_ms": 0, "virtio_mem_requested": 0, "virtio_mem_plugged": 0,
    ...                       "memtotal": 1 << 30}])
    >>> tl.set_history([(0.0, "unplug", -16), (50_000.0, "unplug", -16)])
    >>> tl.failures.data["label"]
    ['EBUSY, retry in 50 s', 'EBUSY, retry in 100 s']
    """

    def __init__(self, data: Any, unit: str | None = None, width: int = 720, height: int = 280):
        rows = _rows_of(data)
        if unit is None:
            biggest = max((float(r.get(k, 0) or 0) for r in rows for k, *_ in TIMELINE_LINES), default=0)
            unit = "GiB" if biggest >= 2 * GiB else "MiB"
        if unit not in ("GiB", "MiB"):
            raise ValueError(f"unit {unit!r} is not one of ['GiB', 'MiB']")
        self.unit, self._scale = unit, GiB if unit == "GiB" else MiB
        self.source = ColumnDataSource(self._columns(rows))
        self.failures = ColumnDataSource({"t": [], "y": [], "label": [], "short": [], "dy": []})
        self.retries = ColumnDataSource({"t": [], "y": [], "label": []})
        fig = figure(width=width, height=height, x_axis_label="time", y_axis_label=unit,
                     title="virtio-mem: requested vs plugged", toolbar_location="above",
                     tools="pan,wheel_zoom,box_zoom,reset,save")
        for key, label, color, dash in TIMELINE_LINES:
            fig.line("t", key, source=self.source, color=color, line_dash=dash, line_width=2,
                     legend_label=label)
        fig.scatter("t", "y", source=self.failures, marker="x", size=12, line_width=3,
                    color="#D55E00", legend_label="work run failed (rc != 0)")
        # the delay armed, short, at two heights above the crosses: neighbours do not overlap
        fig.text("t", "y", text="short", source=self.failures, text_font_size="8pt",
                 text_align="center", y_offset="dy", text_color="#D55E00")
        fig.scatter("t", "y", source=self.retries, marker="inverted_triangle", size=10,
                    fill_alpha=0, line_width=2, color="#D55E00", legend_label="retry timer fires")
        fig.y_range.start = 0
        time_axis(fig.xaxis[0])
        fig.legend.label_text_font_size = "8pt"
        fig.legend.spacing = 0
        fig.add_layout(fig.legend[0], "right")  # outside the plotted area: it covers no data
        fig.add_tools(HoverTool(tooltips=[("t", "@t{0.000} s"), ("", "@label")],
                                renderers=fig.renderers[3:4]))
        self.figure = fig
        self.layout = column(fig)

    def _columns(self, rows: list[Mapping]) -> dict[str, list[float]]:
        out = {"t": [float(r["t_ms"]) / 1000.0 for r in rows]}
        for key, *_ in TIMELINE_LINES:
            out[key] = [float(r.get(key, np.nan)) / self._scale for r in rows]
        return out

    def append(self, row: Mapping) -> None:
        """Stream one ``vm.sample()`` row."""
        self.source.stream(self._columns([row]))

    def extend(self, rows: Any) -> None:
        """Stream several rows (a list of rows, a Run, or a dict of columns)."""
        rows = _rows_of(rows)
        if rows:
            self.source.stream(self._columns(rows))

    def reset(self, data: Any) -> None:
        """Replace all rows and markers (e.g. after re-opening the VM)."""
        self.source.data = self._columns(_rows_of(data))
        self.set_history([])

    def update_history(self, vm: Any, view: Any = None) -> None:
        """Redraw the failure and retry markers from every virtio-mem driver of ``vm`` (or of
        ``view``, a ``vm.inspect("virtio-mem")`` taken now)."""
        try:
            devices = (vm.inspect("virtio-mem") if view is None else view).devices
        except ValueError:  # no virtio-mem device: no markers
            devices = ()
        self.set_history(sorted(e for d in devices for e in d.history))

    def set_history(self, history: list[tuple[float, str, int]]) -> None:
        """Markers for a driver history [(t_ms, what, rc)]: failures at the plugged size of that
        moment, labelled with the error and the retry delay armed, and the retry firings."""
        fails = retry_schedule(history)
        t = np.array(self.source.data["t"], dtype=float)
        plugged = np.array(self.source.data["virtio_mem_plugged"], dtype=float)

        def level(times: list[float]) -> list[float]:
            if len(t) == 0:
                return [0.0] * len(times)
            return [float(v) for v in np.interp(np.array(times) / 1000.0, t, np.nan_to_num(plugged))]

        labels = [f"{f['error']}" + (f", retry in {f['retry_ms'] / 1000:.0f} s" if f["retry_ms"]
                                     else "") for f in fails]
        times = [f["t_ms"] for f in fails]
        short = [f"{f['retry_ms'] / 1000:.0f} s" if f["retry_ms"] else f["error"] for f in fails]
        new = {"t": [x / 1000.0 for x in times], "y": level(times), "label": labels, "short": short,
               "dy": [-10.0 if i % 2 == 0 else -24.0 for i in range(len(fails))]}
        if new != dict(self.failures.data):
            self.failures.data = new
        armed = [f for f in fails if f["retry_at_ms"] is not None]
        at = [f["retry_at_ms"] for f in armed]
        new = {"t": [x / 1000.0 for x in at], "y": level(at),
               "label": [f"retry after {f['retry_ms'] / 1000:.0f} s" for f in armed]}
        if new != dict(self.retries.data):
            self.retries.data = new

    def __len__(self) -> int:
        return len(self.source.data["t"])

    def __repr__(self) -> str:
        return f"<ResizeTimeline {len(self)} rows in {self.unit}>"

__all__ = ["RETRY_ERRORS", "ResizeTimeline", "retry_schedule"]
