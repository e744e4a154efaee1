"""The migration view: what QEMU's pre-copy sends, round by round, and when it switches over.

QEMU (§6) sends the dirty bitmap's pages in address order; it re-reads the
guest's dirty log (a *bitmap sync*) only when the backlog (``ram.remaining``) falls to the
threshold, ``bandwidth x downtime-limit``; if the backlog is then still under it, the VM stops and
the rest goes during the downtime. Free page hinting runs between syncs (section 2.3). The view:

* **backlog**: remaining dirty bytes over time against the threshold (measured bandwidth x
  ``downtime-limit``, and the configured ``max-bandwidth x downtime-limit`` dashed), the syncs as
  dots, the switchover as a red line, hinting rounds as yellow strips and the memory the guest holds
  as hinted blocks;
* **rounds**: pages sent between consecutive syncs, normal (4 KiB of data) vs zero pages (a header),
  the last bar being the stop-and-copy.

Data comes from a :class:`~labkit.viz.migration_data.MigrationRecorder` (``query-migrate`` and
``vm.sample()`` over time, plus one exact row per bitmap sync on the model), or from a scenario's
:class:`~labkit.scenarios.migration.MigrationRun` (its history: pages per round when it carries
``normal``/``zero`` per sync, else MiB per round); see :mod:`labkit.viz.migration_data`.
:func:`comparison` draws several runs side by side (time, bytes sent, downtime).

>>> import labkit
>>> vm = labkit.open(memory="512M", seed=0, balloon={"free_page_hint": True, "iothread": "io0"})
>>> rec = MigrationRecorder(vm)
>>> vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
{}
>>> rec.run()["status"]
'completed'
>>> view = MigrationView(rec)
>>> view.round_source.data["round"]
['pass 1', 'pass 2', 'stop-and-copy']
>>> sum(view.round_source.data["normal"]) == rec.info["ram"]["normal"]   # every page, once a round
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, FactorRange, HoverTool
from bokeh.plotting import figure

from labkit.units import MiB
from labkit.viz.migration_data import (
    MigrationData,
    MigrationRecorder,
    from_run,
    hinting_status,
    migration_data,
)
from labkit.viz.shown import Shown

NORMAL_COLOR, ZERO_COLOR = "#0072B2", "#56B4E9"
BACKLOG_COLOR, THRESHOLD_COLOR, HINT_COLOR, HELD_COLOR = "#000000", "#D55E00", "#F0E442", "#997700"


class MigrationView(Shown):
    """The backlog and rounds figures of one migration; :meth:`update` shows new data.

    Sources (sizes in MiB, times in ms since ``migrate``): ``source`` (samples: ``t``, ``remaining``,
    ``threshold``, ``reference``, ``hinted``), ``sync_source``, ``round_source`` (``round``,
    ``normal``, ``zero`` pages, ``mib``), ``hint_source`` (strips ``x0``..``x1``), ``switch_source``.
    """

    def __init__(self, source: Any, width: int = 560, height: int = 260, title: str = ""):
        data = migration_data(source)
        self.source = ColumnDataSource(self._samples(data))
        self.sync_source = ColumnDataSource(self._syncs(data))
        self.round_source = ColumnDataSource(self._rounds(data))
        self.hint_source = ColumnDataSource(data.hint_rounds())
        self.switch_source = ColumnDataSource(self._switch(data))
        self.has_pages = data.has_pages
        self.backlog_figure = self._backlog(width, height, title)
        self.rounds_figure = self._rounds_figure(width, int(height * 0.8))
        self.layout = column(self.backlog_figure, self.rounds_figure)

    @staticmethod
    def _samples(d: MigrationData) -> dict[str, Any]:
        n = len(d.samples["t_ms"])
        return {"t": d.samples["t_ms"], "remaining": d.samples["remaining"] / MiB,
                "threshold": d.samples["threshold"] / MiB, "reference": np.full(n, d.reference / MiB),
                "hinted": d.samples["hinted"] / MiB, "transferred": d.samples["transferred"] / MiB}

    @staticmethod
    def _syncs(d: MigrationData) -> dict[str, Any]:
        s = d.syncs
        return {"t": s["t_ms"], "remaining": s["remaining"] / MiB, "count": s["count"],
                "what": ["switchover (VM stopped)" if last else "bitmap sync" for last in s["last_stage"]]}

    @staticmethod
    def _rounds(d: MigrationData) -> dict[str, list]:
        r = d.rounds()
        return {"round": r["round"], "normal": r["normal"], "zero": r["zero"], "mib": r["mib"],
                "pages": r["pages"], "start": r["start_ms"], "end": r["end_ms"]}

    @staticmethod
    def _switch(d: MigrationData) -> dict[str, list]:
        t = d.switchover_ms
        return {"x": [] if np.isnan(t) else [t],
                "label": [] if np.isnan(t) else [f"downtime {d.end.get('downtime_ms', np.nan):.0f} ms"]}

    def _backlog(self, width: int, height: int, title: str):
        fig = figure(width=width, height=height, title=title or "backlog vs threshold",
                     x_axis_label="ms since migrate", y_axis_label="MiB",
                     tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above")
        fig.vstrip(x0="x0", x1="x1", source=self.hint_source, fill_color=HINT_COLOR, fill_alpha=0.35,
                   line_alpha=0, legend_label="hinting round")
        lines = [fig.line("t", "remaining", source=self.source, color=BACKLOG_COLOR, line_width=2,
                          legend_label="backlog (ram.remaining)")]
        lines.append(fig.line("t", "threshold", source=self.source, color=THRESHOLD_COLOR, line_width=2,
                              legend_label="threshold = bandwidth x downtime-limit"))
        fig.line("t", "reference", source=self.source, color=THRESHOLD_COLOR, line_dash="dashed",
                 legend_label="max-bandwidth x downtime-limit")
        fig.line("t", "hinted", source=self.source, color=HELD_COLOR, line_width=2, line_dash="dotted",
                 legend_label="held as hinted blocks")
        fig.scatter("t", "remaining", source=self.sync_source, size=8, color=BACKLOG_COLOR,
                    legend_label="bitmap sync")
        fig.vspan(x="x", source=self.switch_source, line_color="#CC0000", line_width=2,
                  legend_label="switchover")
        fig.add_tools(HoverTool(renderers=lines[:1], mode="vline", tooltips=[
            ("t", "@t{0.0} ms"), ("backlog", "@remaining{0.0} MiB"), ("threshold", "@threshold{0.0} MiB"),
            ("sent", "@transferred{0.0} MiB")]))
        fig.y_range.start = 0
        fig.legend.label_text_font_size = "8pt"
        fig.legend.click_policy = "hide"
        fig.legend.spacing = 0
        fig.legend.ncols = 2
        fig.add_layout(fig.legend[0], "below")  # outside the plotted area: it covers no data
        return fig

    def _rounds_figure(self, width: int, height: int):
        labels = list(self.round_source.data["round"])
        fig = figure(width=width, height=height, x_range=FactorRange(factors=labels),
                     title="pages sent per round (between bitmap syncs)" if self.has_pages
                     else "MiB sent per round (between bitmap syncs)",
                     y_axis_label="pages" if self.has_pages else "MiB", toolbar_location=None)
        if self.has_pages:
            fig.vbar_stack(["normal", "zero"], x="round", source=self.round_source, width=0.8,
                           color=[NORMAL_COLOR, ZERO_COLOR],
                           legend_label=["normal pages (4 KiB each)", "zero pages (a header each)"])
        else:
            fig.vbar(x="round", top="mib", source=self.round_source, width=0.8, color=NORMAL_COLOR,
                     legend_label="MiB sent")
        fig.add_tools(HoverTool(tooltips=[("round", "@round"), ("normal", "@normal{0}"),
                                          ("zero", "@zero{0}"), ("sent", "@mib{0.0} MiB"),
                                          ("from", "@start{0.0} ms"), ("to", "@end{0.0} ms")]))
        fig.y_range.start = 0
        fig.xaxis.major_label_orientation = 0.8 if len(labels) > 8 else 0
        fig.legend.label_text_font_size = "8pt"
        fig.legend.orientation = "horizontal"
        fig.add_layout(fig.legend[0], "below")  # outside the plotted area: it covers no bar
        return fig

    def update(self, source: Any) -> None:
        """Show new data (a recorder that went on, or another run) by replacing source data."""
        data = migration_data(source)
        self.source.data = self._samples(data)
        self.sync_source.data = self._syncs(data)
        rounds = self._rounds(data)
        self.rounds_figure.x_range.factors = list(rounds["round"])
        self.round_source.data = rounds
        self.hint_source.data = data.hint_rounds()
        self.switch_source.data = self._switch(data)

    def __repr__(self) -> str:
        return f"<MigrationView {len(self.round_source.data['round'])} rounds>"


def comparison(runs: dict[str, Any], width: int = 250, height: int = 240) -> Comparison:
    """Several migrations side by side: total time, bytes sent and downtime, one bar per run.

    ``runs`` maps a name (a policy) to a scenario Run (``summary``: ``total_time_ms``,
    ``transferred``, ``downtime_ms``, ``completed``). A run that never converged has no time bar.
    """
    return Comparison(runs, width, height)


class Comparison(Shown):
    """The side-by-side bars of :func:`comparison`; ``source`` holds the numbers."""

    METRICS = (("total_time_ms", "total time (ms)", "#0072B2"), ("sent_mib", "sent (MiB)", "#009E73"),
               ("downtime_ms", "downtime (ms)", "#D55E00"))

    def __init__(self, runs: dict[str, Any], width: int, height: int):
        if not runs:
            raise ValueError("comparison() needs at least one run")
        names = list(runs)
        summary = [runs[n].summary for n in names]
        completed = [bool(s.get("completed", 0)) for s in summary]
        self.source = ColumnDataSource({
            "policy": names, "completed": completed,
            "total_time_ms": [s["total_time_ms"] if c else np.nan for s, c in zip(summary, completed,
                                                                                strict=True)],
            "downtime_ms": [s["downtime_ms"] if c else np.nan for s, c in zip(summary, completed,
                                                                            strict=True)],
            "sent_mib": [s["transferred"] / MiB for s in summary],
            "note": ["" if c else "did not converge" for c in completed]})
        figures = []
        for key, label, color in self.METRICS:
            fig = figure(width=width, height=height, x_range=FactorRange(factors=names), title=label,
                         toolbar_location=None)
            fig.vbar(x="policy", top=key, source=self.source, width=0.7, color=color)
            fig.add_tools(HoverTool(tooltips=[("policy", "@policy"), (label, f"@{key}{{0.0}}"),
                                              ("", "@note")]))
            fig.text(x="policy", y=0, text="note", source=self.source, text_font_size="8pt", angle=1.57)
            fig.y_range.start = 0
            fig.xaxis.major_label_orientation = 0.6
            figures.append(fig)
        self.figures = figures
        self.layout = row(*figures)

    def __repr__(self) -> str:
        return f"<Comparison of {list(self.source.data['policy'])}>"


__all__ = ["Comparison", "MigrationData", "MigrationRecorder", "MigrationView", "Shown", "comparison",
           "from_run", "hinting_status", "migration_data"]
