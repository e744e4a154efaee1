"""Time series of a VM's memory: what the guest reports, what the balloon does, what the host pays.

Two Bokeh figures sharing the time axis (seconds of simulated or wall time):

* guest: MemTotal, MemFree, MemAvailable (``/proc/meminfo``), and the balloon's target and actual as
  QEMU reports them: *logical* VM sizes (``balloon`` takes and ``query-balloon`` returns the RAM size
  minus the balloon), so a target of 2 GiB on a 4 GiB guest means a 2 GiB balloon;
* host: QEMU's resident set (RSS) and what the host swapped out.

Rows are ``vm.sample()`` dicts (sizes in bytes, ``t_ms`` in milliseconds). :meth:`TimeSeries.append`
streams one row into the ``ColumnDataSource`` (a few hundred bytes over the widget comm); nothing
is rebuilt.

>>> import labkit
>>> with labkit.open(memory="1G", seed=0) as vm:
...     ts = TimeSeries(vm)
...     _ = vm.qmp("balloon", value=512 << 20)
...     vm.advance(1000)
...     ts.append(vm.sample())
>>> len(ts.source.data["t"]), ts.unit
(2, 'MiB')
>>> ts.source.data["balloon_actual"][-1]
512.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, CustomJSTickFormatter, HoverTool
from bokeh.plotting import figure

from labkit.units import GiB, MiB
from labkit.viz.shown import Shown

# (sample key, legend label, colour, dash): Okabe-Ito colours
GUEST_LINES = (
    ("memtotal", "MemTotal", "#000000", "solid"),
    ("memfree", "MemFree", "#56B4E9", "solid"),
    ("memavailable", "MemAvailable", "#009E73", "solid"),
    ("balloon_target", "balloon target", "#E69F00", "dashed"),  # the balloon is orange everywhere
    ("balloon_actual", "balloon actual", "#E69F00", "solid"),
)
HOST_LINES = (
    ("host_rss", "host RSS", "#0072B2", "solid"),
    ("host_swap", "host swap", "#CC79A7", "solid"),
)
SIZE_KEYS = tuple(key for key, *_ in GUEST_LINES + HOST_LINES)

# Tick labels of a time axis in seconds: "250 ms" / "1.5 s" / "2 min" (minutes only when the ticks
# fall on whole minutes), with as many decimals as the tick spacing needs (never "2.000e-4").
# Bokeh passes all ticks, so the spacing is known.
TIME_TICKS_JS = """
const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : Math.abs(tick) || 1;
const top = Math.max(...ticks.map(Math.abs));
let scale = 1, unit = " s";
if (top < 2) { scale = 1000; unit = " ms"; }
else if (top >= 600 && step % 60 === 0) { scale = 1 / 60; unit = " min"; }
const digits = Math.max(0, Math.min(6, Math.ceil(-Math.log10(step * scale) + 1e-9)));
return (tick * scale).toFixed(digits) + unit;
"""


def time_axis(axis) -> None:
    """Readable ticks on a Bokeh axis whose data are seconds (ms below 2 s, min from 10 min)."""
    axis.formatter = CustomJSTickFormatter(code=TIME_TICKS_JS)
UNITS = {"GiB": GiB, "MiB": MiB}


def _rows_of(data: Any) -> list[Mapping]:
    """Accept a backend (one sample now), a scenario Run (its ``series``), one row, a list of
    rows, or a dict of columns."""
    if hasattr(data, "sample") and callable(data.sample):
        return [data.sample()]
    if isinstance(getattr(data, "series", None), Mapping):
        data = data.series
    if isinstance(data, Mapping):
        values = list(data.values())
        if values and all(np.ndim(v) == 1 for v in values):
            n = len(values[0])
            return [{k: v[i] for k, v in data.items()} for i in range(n)]
        return [data]
    if isinstance(data, Iterable):
        return list(data)
    raise TypeError("TimeSeries takes a backend (labkit.open(...)), a scenario Run, a sample() "
                    f"row, a list of rows or a dict of columns, got {type(data).__name__}")


class TimeSeries(Shown):
    """Guest and host memory over time; ``append(row)`` streams a new ``vm.sample()`` row.

    ``unit`` is "GiB" or "MiB" (default: GiB for guests of 2 GiB and more). Attributes: ``source``
    (one ``ColumnDataSource`` for both figures, sizes in ``unit``, time ``t`` in seconds),
    ``guest_figure``, ``host_figure`` and ``layout`` (both, stacked).
    """

    def __init__(self, data: Any, unit: str | None = None, width: int = 460,
                 height: int = 240, rollover: int | None = None):
        rows = _rows_of(data)
        if unit is None:
            biggest = max((float(r.get(k, 0) or 0) for r in rows for k in SIZE_KEYS), default=0)
            unit = "GiB" if biggest >= 2 * GiB else "MiB"
        if unit not in UNITS:
            raise ValueError(f"unit {unit!r} is not one of {list(UNITS)}")
        self.unit = unit
        self.rollover = rollover
        self._bokeh_model = None
        self.source = ColumnDataSource(self._columns(rows))
        self.last = ColumnDataSource(self._last())  # the newest row, drawn as dots
        self.guest_figure = self._figure("guest (logical sizes, as QEMU reports them)",
                                         GUEST_LINES, width, height, None)
        self.host_figure = self._figure("host", HOST_LINES, width, int(height * 0.75),
                                        self.guest_figure.x_range)
        self.layout = column(self.guest_figure, self.host_figure)

    def _columns(self, rows: list[Mapping]) -> dict[str, list[float]]:
        scale = UNITS[self.unit]
        out: dict[str, list[float]] = {"t": [
            float(r["t_ms"]) / 1000.0 if "t_ms" in r else float(r.get("t_s", np.nan))
            for r in rows]}
        for key in SIZE_KEYS:
            out[key] = [float(r[key]) / scale if r.get(key) is not None else np.nan for r in rows]
        return out

    def _figure(self, title: str, lines: tuple, width: int, height: int, x_range):
        kwargs = {"x_range": x_range} if x_range is not None else {}
        fig = figure(width=width, height=height, title=title, x_axis_label="time",
                     y_axis_label=self.unit, tools="pan,wheel_zoom,box_zoom,reset,save",
                     toolbar_location="above", **kwargs)
        time_axis(fig.xaxis[0])
        renderers = []
        for key, label, color, dash in lines:
            line = fig.line("t", key, source=self.source, color=color, line_dash=dash,
                            line_width=2, legend_label=label)
            # a dot on the newest row: a series of one row (a VM just opened) shows, and the
            # eye finds where "now" is
            fig.scatter("t", key, source=self.last, color=color, size=6, legend_label=label)
            renderers.append(line)
        fig.y_range.start = 0
        legend = fig.legend[0]
        legend.click_policy = "hide"
        legend.label_text_font_size = "8pt"
        legend.spacing = 0
        legend.padding = 2
        legend.glyph_width = 16
        fig.add_layout(legend, "right")  # outside the plotted area: it never covers data
        fig.add_tools(HoverTool(
            renderers=renderers[:1], mode="vline",
            tooltips=[("t", "@t{0.000} s")] + [
                (label, f"@{key}{{0.00}} {self.unit}") for key, label, *_ in lines]))
        return fig

    def _last(self) -> dict[str, list]:
        return {k: list(v[-1:]) for k, v in self.source.data.items()}

    def append(self, row: Mapping) -> None:
        """Stream one ``vm.sample()`` row into the plots."""
        self.source.stream(self._columns([row]), rollover=self.rollover)
        self.last.data = self._last()

    def extend(self, rows: Iterable[Mapping]) -> None:
        """Stream several rows at once."""
        rows = list(rows)
        if rows:
            self.source.stream(self._columns(rows), rollover=self.rollover)
            self.last.data = self._last()

    def reset(self, data: Any) -> None:
        """Replace all rows (e.g. after re-opening the VM), keeping the figures."""
        self.source.data = self._columns(_rows_of(data))
        self.last.data = self._last()

    def __len__(self) -> int:
        return len(self.source.data["t"])

    # --- display ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<TimeSeries {len(self)} rows in {self.unit}>"


def side_by_side(live: Any, model: Any, unit: str = "MiB", width: int = 440,
                 titles: tuple[str, str] = ("real guest", "model")):
    """Two :class:`TimeSeries` (a real guest's rows and the model's) on SHARED axes: the same time
    and size ranges, so a difference in height or timing is a difference, not a rescaling. Returns
    a Bokeh row (two columns of ``width`` px: 2 x 440 fits a 900 px output area).

    >>> rows = [{"t_ms": 0, "memtotal": 1 << 30}, {"t_ms": 1000, "memtotal": 3 << 29}]
    >>> lay = side_by_side(rows, rows[:1])
    >>> a, b = lay.children
    >>> a.children[0].x_range is b.children[0].x_range and a.children[0].y_range is b.children[0].y_range
    True
    """
    from bokeh.layouts import row as bokeh_row

    left, right = TimeSeries(live, unit=unit, width=width), TimeSeries(model, unit=unit, width=width)
    for a, b in ((left.guest_figure, right.guest_figure), (left.host_figure, right.host_figure)):
        b.x_range = a.x_range
        b.y_range = a.y_range
    right.host_figure.x_range = left.guest_figure.x_range
    left.guest_figure.title.text = f"{titles[0]}: {left.guest_figure.title.text}"
    right.guest_figure.title.text = f"{titles[1]}: {right.guest_figure.title.text}"
    return bokeh_row(left.layout, right.layout)
