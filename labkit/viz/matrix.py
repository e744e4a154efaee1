"""The "which mechanism for which job" matrix: one Bokeh grid of measured outcomes, and the claims table.

Rows are the talk's four jobs, columns the mechanisms; each cell shows the job's headline number for
that mechanism (a job may run a mechanism in more than one variant, stacked in the cell) and is
coloured by its rank in its row: best (green) to worst (vermillion), grey where the mechanism does not
do the job. Hovering a cell shows every number behind it. :func:`claims_table` renders the talk's
pros and cons with their evidence and verdict as an HTML table.

>>> from labkit.scenarios.matrix import Cell, Claim
>>> cells = [Cell("resize", "balloon", "balloon", 3.0, "3", "higher"),
...          Cell("resize", "virtio-mem", "virtio_mem_movable", 1.0, "1", "higher")]
>>> view = MatrixView(cells, claims=[])
>>> colour = dict(zip(view.source.data["mechanism"], view.source.data["colour"]))
>>> colour["balloon"] == RANK_COLOURS[0], colour["virtio-mem"] == RANK_COLOURS[-1], colour["hinting"]
(True, True, '#DDDDDD')
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from labkit import docs
from labkit.scenarios.matrix import JOBS, MECHANISMS, Cell, Claim, MatrixResult, cell_ranks
from labkit.viz.shown import Shown

# best .. worst (Okabe-Ito bluish green, yellow, orange, vermillion), grey for "does not do this job"
RANK_COLOURS = ("#009E73", "#F0E442", "#E69F00", "#D55E00")
NOT_APPLICABLE = "#DDDDDD"
VERDICT_COLOURS = {"supported": "#009E73", "qualified": "#E69F00", "contradicted": "#D55E00"}


def _colour(rank: float) -> str:
    return RANK_COLOURS[int(round(float(rank) * (len(RANK_COLOURS) - 1)))]


def cell_grid_figure(source: ColumnDataSource, *, x: str, y: str, x_range: list, y_range: list,
                     width: int, height: int, title: str, tooltips: list, cell: tuple[float, float],
                     label_pt: str, y_label_pt: str):
    """A grid of coloured, labelled cells: ``source``'s ``colour`` and ``label`` columns drawn at
    the categorical (``x``, ``y``) of each row, ``cell`` (width, height) of a category each, a
    hover with ``tooltips``, no grid lines or outline. The mechanism matrix and the open-problems
    matrix are both this figure."""
    fig = figure(x_range=x_range, y_range=y_range, width=width, height=height, toolbar_location=None,
                 title=title)
    fig.rect(x=x, y=y, width=cell[0], height=cell[1], source=source, fill_color="colour",
             line_color="white")
    fig.text(x=x, y=y, text="label", source=source, text_align="center", text_baseline="middle",
             text_font_size=label_pt)
    fig.add_tools(HoverTool(tooltips=tooltips))
    fig.xaxis.major_label_text_font_size = "10pt"
    fig.yaxis.major_label_text_font_size = y_label_pt
    fig.grid.grid_line_color = None
    fig.outline_line_color = None
    return fig


class MatrixView(Shown):
    """The job x mechanism grid of ``cells`` (from :func:`labkit.scenarios.matrix.run_matrix`)."""

    def __init__(self, cells: Sequence[Cell], claims: Sequence[Claim] = (), *, width: int = 900):
        self.cells, self.claims = list(cells), list(claims)
        jobs = [j for j in JOBS if any(c.job == j for c in self.cells)]
        rows: dict[str, list] = {k: [] for k in ("job", "mechanism", "label", "colour", "details", "y")}
        for job in jobs:
            in_job = [c for c in self.cells if c.job == job]
            ranks = cell_ranks(in_job)
            for mechanism in MECHANISMS:
                picked = [(c, r) for c, r in zip(in_job, ranks, strict=True) if c.mechanism == mechanism]
                if not picked:
                    rows["job"].append(job)
                    rows["mechanism"].append(mechanism)
                    rows["label"].append("—")
                    rows["colour"].append(NOT_APPLICABLE)
                    rows["details"].append("not applicable")
                    rows["y"].append(job)
                    continue
                best = min(picked, key=lambda cr: cr[1])
                rows["job"].append(job)
                rows["mechanism"].append(mechanism)
                rows["label"].append("\n".join(f"{_short(c.variant)}: {c.text}" for c, _ in picked))
                rows["colour"].append(_colour(best[1]))
                rows["details"].append("; ".join(
                    f"{c.variant}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in c.details.items())
                    for c, _ in picked))
                rows["y"].append(job)
        self.source = ColumnDataSource(rows)
        self.figure = self.layout = cell_grid_figure(
            self.source, x="mechanism", y="y", x_range=list(MECHANISMS), y_range=list(reversed(jobs)),
            width=width, height=110 * max(1, len(jobs)) + 60,
            title="Which mechanism for which job (colour: rank within the job, green best)",
            tooltips=[("job", "@job"), ("mechanism", "@mechanism"), ("numbers", "@details")],
            cell=(0.96, 0.94), label_pt="8.5pt", y_label_pt="10pt")

    @classmethod
    def from_result(cls, result: MatrixResult, **kwargs) -> MatrixView:
        return cls(result.cells(), result.claims, **kwargs)

    def __repr__(self) -> str:
        applicable = int(np.count_nonzero(np.array(self.source.data["colour"]) != NOT_APPLICABLE))
        return f"MatrixView({len(self.cells)} outcomes in {applicable} cells)"


def _short(variant: str) -> str:
    """A variant's name short enough for its cell (``virtio_mem_movable`` -> ``movable``)."""
    return variant.replace("virtio_mem_", "").replace("balloon_doo", "deflate-on-oom")


def _fmt(v: float) -> str:
    v = float(v)
    if not np.isfinite(v):
        return "-"
    if abs(v) >= 1 << 20:
        return f"{v / (1 << 20):.0f} MiB"
    return f"{v:.3g}"


def linked(text: str, docs_from: str = "notebooks") -> str:
    """``text`` as HTML, its "§N.N" citations turned into links into docs/ (relative to the folder
    ``docs_from`` the HTML is shown in).

    >>> linked("slab makes it fail (§5.5)")
    'slab makes it fail (<a href="../docs/mechanisms.md#s5.5">§5.5</a>)'
    """
    def anchor(m: re.Match) -> str:
        number = m.group(1)
        if number not in docs.SECTIONS:
            return m.group(0)
        target = docs.link(number, docs_from).split("](", 1)[1][:-1]
        return f'<a href="{target}">§{number}</a>'

    return docs.CITATION.sub(anchor, html.escape(text))


def claims_table(claims: Sequence[Claim], docs_from: str = "notebooks") -> str:
    """The claims as an HTML table: claim, mechanism, job, evidence, verdict (coloured), source;
    the § citations of the evidence and the cause link into docs/."""
    head = ("<tr><th>the talk says</th><th>mechanism</th><th>job</th><th>measured</th>"
            "<th>verdict</th><th>from</th><th>why</th></tr>")
    body = []
    for c in claims:
        colour = VERDICT_COLOURS.get(c.verdict, "#999999")
        body.append(
            f"<tr><td>{html.escape(c.claim)}</td><td>{html.escape(c.mechanism)}</td>"
            f"<td>{html.escape(c.job)}</td><td>{linked(c.evidence, docs_from)}</td>"
            f"<td style='background:{colour};color:#000'><b>{html.escape(c.verdict)}</b></td>"
            f"<td>{html.escape(c.label)}</td><td>{linked(c.cause, docs_from)}</td></tr>")
    return ("<table style='border-collapse:collapse;font-size:90%' border='1' cellpadding='4'>"
            f"{head}{''.join(body)}</table>")


class ClaimsTable:
    """Displays :func:`claims_table` in a notebook (``_repr_html_``)."""

    def __init__(self, claims: Sequence[Claim]):
        self.claims = list(claims)

    def _repr_html_(self) -> str:
        return claims_table(self.claims)

    def __repr__(self) -> str:
        counts = {v: sum(c.verdict == v for c in self.claims) for v in VERDICT_COLOURS}
        return f"ClaimsTable({counts})"


__all__ = ["ClaimsTable", "MatrixView", "claims_table"]
