"""The open problems' mechanism x switch matrix: one Bokeh grid of computed outcomes.

Rows are the switches (the backing of guest RAM, device assignment, confidential guests, locked
memory, page sizes), columns the mechanisms; each cell shows the outcome
(:data:`labkit.scenarios.open_problems.OUTCOMES`) with its number, coloured by outcome: works
(bluish green), partial (yellow), frees nothing (vermillion), refused (grey, with QEMU's text).
Hovering a cell shows the text in full. :func:`outcome_table` is the same matrix as an HTML table.

>>> from labkit.scenarios.open_problems import OutcomeCell
>>> view = OutcomeMatrixView([OutcomeCell("baseline", "balloon", "works", 5e8, "477 MiB freed"),
...                           OutcomeCell("SEV", "balloon", "frees nothing", 0.0, "0 MiB freed")])
>>> colour = dict(zip(view.source.data["switch"], view.source.data["colour"]))
>>> colour["SEV"] == OUTCOME_COLOURS["frees nothing"]
True
"""

from __future__ import annotations

from collections.abc import Sequence

from bokeh.models import ColumnDataSource

from labkit.scenarios.open_problems import MECHANISMS, SWITCHES, OpenProblemsResult, OutcomeCell
from labkit.viz.matrix import cell_grid_figure
from labkit.viz.shown import Shown
from labkit.viz.tables import Table

# Okabe-Ito: bluish green, yellow, vermillion; grey for a refusal
OUTCOME_COLOURS = {"works": "#009E73", "partial": "#F0E442", "frees nothing": "#D55E00", "refused": "#BBBBBB"}
NOT_MODELLED = "#F4F4F4"
LABELS = {s.key: s.label for s in SWITCHES}


def _short(cell: OutcomeCell) -> str:
    if cell.outcome == "refused":
        text = cell.text if len(cell.text) <= 30 else cell.text[:28] + "…"
        return f"refused\n{text}"
    return f"{cell.outcome}\n{cell.value / (1 << 20):.0f} MiB"


class OutcomeMatrixView(Shown):
    """The switch x mechanism grid of ``cells`` (from :func:`run_open_problems`)."""

    def __init__(self, cells: Sequence[OutcomeCell], *, width: int = 900):
        self.cells = list(cells)
        switches = list(dict.fromkeys(c.switch for c in self.cells))
        mechanisms = [m for m in MECHANISMS if any(c.mechanism == m for c in self.cells)]
        rows: dict[str, list] = {k: [] for k in ("switch", "mechanism", "label", "colour", "text", "outcome")}
        for c in self.cells:
            rows["switch"].append(c.switch)
            rows["mechanism"].append(c.mechanism)
            rows["label"].append(_short(c))
            rows["colour"].append(OUTCOME_COLOURS[c.outcome])
            rows["text"].append(c.text)
            rows["outcome"].append(c.outcome)
        present = {(c.switch, c.mechanism) for c in self.cells}
        for switch in switches:  # a combination the model does not model: a grey cell saying so
            for m in mechanisms:
                if (switch, m) not in present:
                    for k, v in (("switch", switch), ("mechanism", m), ("label", "not modelled"),
                                 ("colour", NOT_MODELLED), ("text", "not modelled"),
                                 ("outcome", "not modelled")):
                        rows[k].append(v)
        self.source = ColumnDataSource(rows)
        self.figure = self.layout = cell_grid_figure(
            self.source, x="mechanism", y="switch", x_range=mechanisms, y_range=list(reversed(switches)),
            width=width, height=46 * len(switches) + 70,
            title="Each mechanism with each switch flipped (computed on the model)",
            tooltips=[("switch", "@switch"), ("mechanism", "@mechanism"), ("outcome", "@outcome"),
                      ("measured", "@text")],
            cell=(0.97, 0.92), label_pt="8pt", y_label_pt="9pt")

    @classmethod
    def from_result(cls, result: OpenProblemsResult, **kwargs) -> OutcomeMatrixView:
        return cls(result.cells, **kwargs)

    def __repr__(self) -> str:
        counts = {o: sum(c.outcome == o for c in self.cells) for o in OUTCOME_COLOURS}
        return f"OutcomeMatrixView({counts})"


def outcome_table(result: OpenProblemsResult) -> Table:
    """The matrix as a table (labkit.viz.table's style): a row per switch, the outcome and its
    number (MiB freed, or not sent for hinting) or QEMU's refusal, per mechanism."""
    mechanisms = [m for m in MECHANISMS if m in result.params.mechanisms]
    rows = []
    for key in result.params.switches:
        row = [LABELS.get(key, key)]
        for m in mechanisms:
            try:
                c = result.cell(key, m)
            except KeyError:
                row.append("not modelled")
                continue
            row.append(f"refused: {c.text}" if c.outcome == "refused" else
                       f"{c.outcome}: {c.value / (1 << 20):.0f} MiB")
        rows.append(row)
    return Table(["switch", *mechanisms], rows, {})


__all__ = ["OUTCOME_COLOURS", "OutcomeMatrixView", "outcome_table"]
