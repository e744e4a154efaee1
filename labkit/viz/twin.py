"""The model beside the real guest: one view per twin scenario (:mod:`labkit.twin`).

:func:`twin_view` overlays the real run (solid) and the model's run (dashed) on shared axes for each
quantity the scenario follows, and puts the checks under them as a table: real, model, their
difference, the tolerance, whether it holds, and the cause that allows the tolerance. Time is
seconds since each side's first sample (the model ran on the real run's clock); a migration is
drawn against QEMU's own ``total-time``. A zoneinfo scenario is drawn as bars: each zone's
watermarks and per-CPU list size, real beside model.

>>> from labkit.twin import run_twin
>>> view = twin_view(run_twin("reporting", mode="replay"))
>>> [type(c).__name__ for c in view.children]
['Div', 'Row', 'Div']
>>> "staircase, sample 0 from the first return" in view.children[2].text
True
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, FactorRange, HoverTool, Legend
from bokeh.plotting import figure

from labkit.viz.tables import STYLE, TD, TH

MiB = 1 << 20
REAL_COLOR = "#332288"  # indigo: the real guest
MODEL_COLOR = "#CC6677"  # rose, dashed: the model
LABELS = {"balloon_actual": "balloon actual", "memfree": "MemFree", "host_rss": "host RSS",
          "memtotal": "MemTotal", "anon": "AnonPages", "virtio_mem_plugged": "virtio-mem plugged",
          "transferred": "transferred", "remaining": "remaining"}
ZONE_FIELDS = ("min", "low", "high", "pcp high")
WIDTH = 920  # fits the notebook's output area (968 px at 1400 px wide)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(seconds, MiB) of ``key`` over ``rows``: sample rows by their ``t_ms`` since the first
    one, migration rows (``migrate``: a query-migrate answer) by its ``total-time``."""
    t, y = [], []
    t0 = rows[0]["t_ms"]
    for r in rows:
        info = r.get("migrate")
        if info is not None:
            if key in info.get("ram", {}):
                t.append(info.get("total-time", r["t_ms"]) / 1000)
                y.append(info["ram"][key] / MiB)
        elif key in r and key not in ("transferred", "remaining"):
            t.append((r["t_ms"] - t0) / 1000)
            y.append(r[key] / MiB)
    return t, y


def overlay(result: Any, key: str, width: int = 300, height: int = 260):
    """One figure: ``key`` over time, real solid, model dashed, on shared axes."""
    unit = "MiB"
    title = f"{LABELS.get(key, key)} ({unit})"
    migration = any("migrate" in r for r in result.real)
    p = figure(width=width, height=height, title=title, toolbar_location=None,
               x_axis_label="migration total-time (s)" if migration else "time (s)",
               y_axis_label=unit)
    items = []
    for side, rows, color, dash in (("real guest", result.real, REAL_COLOR, "solid"),
                                    ("model", result.model, MODEL_COLOR, "dashed")):
        t, y = series(rows, key)
        source = ColumnDataSource({"t": t, "y": y})
        line = p.line("t", "y", source=source, color=color, line_width=2, line_dash=dash)
        dots = p.scatter("t", "y", source=source, color=color, size=5)
        items.append((side, [line, dots]))
    p.add_layout(Legend(items=items, location="top_right"), "center")
    p.add_tools(HoverTool(tooltips=[("t", "@t{0.00} s"), (key, "@y{0.0} MiB")]))
    return p


def zone_bars(result: Any, width: int = 300, height: int = 260) -> list:
    """One figure per zone: its min/low/high watermark and per-CPU list high (pages), real
    beside model (each zone on its own scale: DMA's are a hundredth of DMA32's)."""
    def fields(rows: list[dict]) -> dict[str, list[float]]:
        return {z["zone"]: [z["min"], z["low"], z["high"], z["pcp"][0]["high"] if z["pcp"] else 0]
                for z in rows[0]["zoneinfo"]}

    real, model = fields(result.real), fields(result.model)
    plots = []
    for zone in (z for z in real if z in model):
        factors = [(f, side) for f in ZONE_FIELDS for side in ("real", "model")]
        source = ColumnDataSource({
            "x": factors, "pages": [(real if s == "real" else model)[zone][ZONE_FIELDS.index(f)]
                                    for f, s in factors],
            "color": [REAL_COLOR if s == "real" else MODEL_COLOR for _, s in factors]})
        p = figure(x_range=FactorRange(*factors), width=width, height=height, toolbar_location=None,
                   title=f"zone {zone} (pages)", y_axis_label="pages")
        p.vbar(x="x", top="pages", width=0.8, color="color", source=source)
        p.xaxis.major_label_orientation = 1.0
        p.y_range.start = 0
        p.add_tools(HoverTool(tooltips=[("", "@x"), ("pages", "@pages")]))
        plots.append(p)
    return plots


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:,.1f}".replace(",", " ")


def differences(result: Any) -> str:
    """The checks as an HTML table (real, model, difference, tolerance, holds, cause number), the
    numbered causes under it; checks of a zone neither side has are left out."""
    causes: list[str] = []
    body = []
    for r in result.results:
        if r["real"] != r["real"] and r["model"] != r["model"]:
            continue
        if r["cause"] not in causes:
            causes.append(r["cause"])
        if r["mode"] in ("factor", "atleast"):
            floor = ">= " if r["mode"] == "atleast" else ""
            diff, tol = f"x{r['diff']:.2f}", f"{floor}x{r['tolerance']:g}"
        elif r["mode"] == "both":
            diff, tol = "", "both"
        else:
            diff, tol = f"{r['diff']:+.1f}", f"±{r['tolerance']:g} {r['unit']}".rstrip()
        mark = "yes" if r["holds"] else "<b style='color:#CC3311'>NO</b>"
        cells = [html.escape(r["check"]), _fmt(r["real"]), _fmt(r["model"]), diff, tol, mark,
                 f"[{causes.index(r['cause']) + 1}]"]
        body.append("<tr>" + "".join(f"<td style='{TD}'>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th style='{TH}'>{h}</th>" for h in
                   ("check", "real", "model", "difference", "tolerance", "holds", "cause"))
    notes = "".join(f"<li>{html.escape(c)}</li>" for c in causes)
    return (f"<table style='{STYLE}'><tr>{head}</tr>{''.join(body)}</table>"
            f"<ol style='font-size:12px;margin:4px 0 0 0;padding-left:22px'>{notes}</ol>")


def twin_view(result: Any):
    """A title, the overlays (or the zone bars) side by side, and the table of checks."""
    held = sum(r["holds"] for r in result.results)
    facts = result.facts
    head = Div(text=f"<b>{result.scenario.title}</b> &mdash; {result.source}, guest kernel "
                    f"{facts.get('kernel', '?')} under QEMU ({facts.get('accel', '?')}): "
                    f"{held} of {len(result.results)} checks hold", width=WIDTH)
    if any("zoneinfo" in r for r in result.real[:1]):
        plots = row(*zone_bars(result))
    else:
        plots = row(*[overlay(result, key) for key in result.scenario.series])
    return column(head, plots, Div(text=differences(result), width=WIDTH))
