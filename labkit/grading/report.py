"""The instructor's HTML summary of a grading run: how each part went (right / wrong / unanswered,
a Bokeh bar chart), the distribution of totals, the most common wrong answers per mechanism
(grouped by the hint the exercise gives, which names the misconception), and the marks table with
every flag and note. One self-contained file (BokehJS inlined: it opens offline)."""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

import numpy as np

from labkit import exercises


def part_counts(results: list[dict], columns: list[str]) -> dict[str, list[int]]:
    """``{"part": [...], "right": [...], "wrong": [...], "unanswered": [...]}`` over submissions."""
    counts = {col: Counter() for col in columns}
    for result in results:
        for name, verdicts in result.get("parts", {}).items():
            for part, v in verdicts.items():
                key = {True: "right", False: "wrong", None: "unanswered"}[v["verdict"]]
                counts[f"{name}.{part}"][key] += 1
    return {"part": list(columns), **{k: [counts[c][k] for c in columns]
                                      for k in ("right", "wrong", "unanswered")}}


def common_mistakes(results: list[dict], top: int = 3) -> dict[str, list[dict]]:
    """Per exercise, its wrong parts grouped by hint, most frequent first: ``part``, ``hint``,
    ``count``, ``examples`` (up to three ``student: given (expected ...)``)."""
    groups: dict[str, dict[tuple[str, str], list[str]]] = {}
    for result in results:
        for name, verdicts in result.get("parts", {}).items():
            for part, v in verdicts.items():
                if v["verdict"] is False:
                    key = (part, v["hint"] or "")
                    groups.setdefault(name, {}).setdefault(key, []).append(
                        f"{result['student']}: {v['given']!r} (expected {v['expected']!r})")
    out = {}
    for name, by_hint in groups.items():
        ranked = sorted(by_hint.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
        out[name] = [{"part": part, "hint": hint, "count": len(ex), "examples": ex[:3]}
                     for (part, hint), ex in ranked]
    return out


def _figures(results: list[dict], columns: list[str], rows: list[dict]):
    from bokeh.layouts import row
    from bokeh.models import ColumnDataSource, Legend
    from bokeh.plotting import figure

    counts = part_counts(results, columns)
    parts = counts["part"] or ["(no part)"]
    bars = figure(y_range=list(reversed(parts)), height=max(160, 28 * len(parts) + 80), width=640,
                  title="each part: right / wrong / unanswered (submissions)", toolbar_location=None,
                  x_axis_label="submissions")
    if counts["part"]:
        bars.hbar_stack(["right", "wrong", "unanswered"], y="part", height=0.7,
                        color=["#009E73", "#D55E00", "#BBBBBB"], source=ColumnDataSource(counts),
                        legend_label=["right", "wrong", "unanswered"])
        legend = bars.legend[0]
        bars.center = [c for c in bars.center if not isinstance(c, Legend)]
        bars.add_layout(legend, "right")  # beside the bars, never over them
    totals = np.array([r["total"] for r in rows if r["status"] != "no submission"], dtype=float)
    n_parts = max(len(columns), 1)
    hist, edges = np.histogram(totals, bins=np.arange(-0.5, n_parts + 1.5, 1.0))
    dist = figure(height=300, width=420, title="total marks (students)", toolbar_location=None,
                  x_axis_label=f"marks out of {len(columns)}", y_axis_label="students")
    dist.quad(top=hist, bottom=0, left=edges[:-1] + 0.05, right=edges[1:] - 0.05, color="#0072B2")
    dist.xaxis.ticker = list(range(n_parts + 1))
    return row(bars, dist)


def render(results: list[dict], columns: list[str], rows: list[dict], title: str = "labkit grade") -> str:
    """The whole report as one HTML string."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    part_cols = [c for c in columns if "." in c]
    status = Counter(r["status"] for r in rows)
    extra = [f"<h2>Summary</h2><p>{len(rows)} students: "
             + ", ".join(f"{n} {html.escape(s)}" for s, n in sorted(status.items())) + "</p>"]
    extra.append("<h2>Most common wrong answers, per mechanism</h2>")
    mistakes = common_mistakes(results)
    if not mistakes:
        extra.append("<p>No wrong answers.</p>")
    for name, items in mistakes.items():
        spec = exercises.spec(name)
        extra.append(f"<h3>{html.escape(spec.title)} <small>({html.escape(name)}; "
                     f"{html.escape(', '.join(spec.sections))})</small></h3><table>"
                     "<tr><th>part</th><th>students</th><th>hint (the misconception)</th>"
                     "<th>examples</th></tr>")
        for item in items:
            extra.append(f"<tr><td>{html.escape(item['part'])}</td><td>{item['count']}</td>"
                         f"<td>{html.escape(item['hint'])}</td>"
                         f"<td>{'<br>'.join(html.escape(e) for e in item['examples'])}</td></tr>")
        extra.append("</table>")
    extra.append("<h2>Marks</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                 + "</tr>")
    for r in rows:
        extra.append("<tr class='" + html.escape(r["status"].replace(" ", "-")) + "'>"
                     + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>")
    extra.append("</table>")
    page = file_html(_figures(results, part_cols, rows), INLINE, title)
    style = ("<style>body{font-family:sans-serif;margin:1em 2em} table{border-collapse:collapse;"
             "margin-bottom:1em} td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;"
             "text-align:left;vertical-align:top} tr.flagged{background:#fff3d6} "
             "tr.error,tr.timeout,tr.crashed,tr.not-a-notebook{background:#fde0dc} "
             "tr.no-submission{color:#888}</style>")
    return insert_html(page, head=style, top=f"<h1>{html.escape(title)}</h1>", bottom="".join(extra))


def insert_html(page: str, head: str = "", top: str = "", bottom: str = "") -> str:
    """``page`` (Bokeh's file_html) with ``head`` before its ``</head>``, ``top`` right after its
    ``<body>`` and ``bottom`` before its ``</body>``. The inlined BokehJS holds those strings too,
    so the real tags are found from the end of the head on, not by the first match."""
    end_head = page.rfind("</head>")
    body = page.find(">", page.find("<body", end_head)) + 1
    end_body = page.rfind("</body>")
    if end_head < 0 or body <= 0 or end_body < body:
        raise ValueError("not an HTML page with a head and a body")
    return (page[:end_head] + head + page[end_head:body] + top + page[body:end_body] + bottom
            + page[end_body:])


def write(path: str, results: list[dict], columns: list[str], rows: list[dict], **kw: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(results, columns, rows, **kw))
