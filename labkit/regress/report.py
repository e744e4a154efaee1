"""The HTML report of a ``labkit regress`` run: for every notebook, every check at every grid point
(a Bokeh plot per check: the value at each point, green where the fact holds and red where it does
not, the accepted band shaded, the previous run's value as a hollow circle), then a table with the
fact, its source, the tolerance and why, each value, and its drift against the last stored run."""

from __future__ import annotations

import html
import math
from pathlib import Path

from labkit.grading.report import insert_html
from labkit.regress.facts import Check, NotebookFacts


def _plot(check: Check, rows: list[dict]):
    from bokeh.models import BoxAnnotation, ColumnDataSource, Span
    from bokeh.plotting import figure

    points = [r["point"] for r in rows]
    values = [r["value"] if r["value"] is not None else math.nan for r in rows]
    previous = [r["previous"] if r.get("previous") is not None else math.nan for r in rows]
    lo, hi = check.bounds
    finite = [v for v in values + previous + [lo, hi] if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (high - low) * 0.15 or abs(high) * 0.1 or 1.0
    fig = figure(x_range=points, height=230, width=360, title=check.id.split(".", 1)[-1],
                 toolbar_location=None, y_range=(low - pad, high + pad))
    fig.title.text_font_size = "8pt"
    fig.xaxis.major_label_orientation = 0.7 if len(points) > 1 else 0.0
    fig.xaxis.major_label_text_font_size = "7pt"
    fig.add_layout(BoxAnnotation(bottom=lo if math.isfinite(lo) else None,
                                 top=hi if math.isfinite(hi) else None,
                                 fill_color="#009E73", fill_alpha=0.15))
    if lo == hi:  # an exact fact: the band is a line
        fig.add_layout(Span(location=lo, dimension="width", line_color="#009E73", line_width=2,
                            line_alpha=0.5))
    src = ColumnDataSource({"point": points, "value": values, "previous": previous,
                            "color": ["#009E73" if r["ok"] else "#D55E00" for r in rows]})
    fig.scatter("point", "previous", source=src, size=13, fill_color=None, line_color="#555555",
                line_width=1.5)
    fig.scatter("point", "value", source=src, size=8, color="color")
    return fig


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.6g}"


def render(run: dict, registry: dict[str, NotebookFacts]) -> str:
    from bokeh.embed import file_html
    from bokeh.layouts import column, gridplot
    from bokeh.models import Div
    from bokeh.resources import INLINE

    rows = run["checks"]
    failed = [r for r in rows if not r["ok"]]
    drifted = [r for r in rows if r.get("drift") is not None and abs(r["drift"]) > 1e-9]
    summary = (f"<h1>labkit regress {html.escape(run['run'])}</h1><p>grid: "
               f"{html.escape(str(run['grid']))}; {len(run['results'])} notebook runs, {len(rows)} "
               f"checks: <b>{len(rows) - len(failed)} hold, {len(failed)} fail</b>; compared with "
               f"{html.escape(run['previous'] or 'no earlier run')}: {len(drifted)} values moved.</p>")
    summary += ("<p>In each plot: a filled dot is this run's value at a grid point (green: the fact "
                "holds, red: it fails), a hollow circle the previous run's, the green band (or line, "
                "for an exact fact) what the fact accepts. The table below gives each fact, its "
                "source and why its tolerance is what it is.</p>")
    if run["notes"]:
        summary += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in run["notes"]) + "</ul>"
    errors = [r for r in run["results"] if r["error"]]
    if errors:
        summary += "<h2>Notebooks that failed</h2><ul>" + "".join(
            f"<li>{html.escape(r['notebook'])} {html.escape(str(r['params']))}: "
            f"{html.escape(r['error'])}</li>" for r in errors) + "</ul>"
    parts = [Div(text=summary, width=1100)]
    for name, facts in registry.items():
        mine = [r for r in rows if r["notebook"] == name]
        if not mine:
            continue
        parts.append(Div(text=f"<h2>{html.escape(name)}</h2>", width=1100))
        figs = [_plot(c, [r for r in mine if r["check"] == c.id]) for c in facts.checks]
        parts.append(gridplot(figs, ncols=3, toolbar_location=None))
        table = ["<table><tr><th>check</th><th>fact</th><th>source</th><th>accepted (why)</th>"
                 "<th>point</th><th>value</th><th>verdict</th><th>previous</th><th>drift</th></tr>"]
        for c in facts.checks:
            here = [r for r in mine if r["check"] == c.id]
            for i, r in enumerate(here):
                head = (f"<td rowspan={len(here)}>{html.escape(c.id)}<br><small>{c.kind}</small></td>"
                        f"<td rowspan={len(here)}>{html.escape(c.fact)}</td>"
                        f"<td rowspan={len(here)}>{html.escape(c.source)}</td>"
                        f"<td rowspan={len(here)}>{html.escape(c.expected_text)}<br>"
                        f"<small>{html.escape(c.tolerance)}</small></td>") if i == 0 else ""
                verdict = "holds" if r["ok"] else "FAILS " + html.escape(r["note"])
                moved = "" if r.get("drift") is None else (
                    "none" if r["drift"] == 0 else f"{100 * r['drift']:+.3g} %")
                flip = " (was failing)" if r.get("previous_ok") is False and r["ok"] else \
                    (" (was holding)" if r.get("previous_ok") and not r["ok"] else "")
                table.append(f"<tr class='{'ok' if r['ok'] else 'fail'}'>{head}"
                             f"<td>{html.escape(r['point'])}</td><td>{_fmt(r['value'])}</td>"
                             f"<td>{verdict}{flip}</td><td>{_fmt(r.get('previous'))}</td>"
                             f"<td>{moved}</td></tr>")
        table.append("</table>")
        parts.append(Div(text="".join(table), width=1100))
    style = ("<style>body{font-family:sans-serif;margin:1em 2em} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;vertical-align:top;"
             "text-align:left} tr.fail td{background:#fde0dc}</style>")
    page = file_html(column(parts), INLINE, f"labkit regress {run['run']}")
    return insert_html(page, head=style)


def write(path: str | Path, run: dict, registry: dict[str, NotebookFacts]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run, registry), encoding="utf-8")
