"""Overcommit views: policies side by side, one host over time, why MoM did (or didn't) act, and
free page reporting's host RSS staircase.

* :func:`policy_bars`: one small bar chart per metric (host swap out and in, guest stall, peak host
  RSS, memory returned...), one bar per policy, from :func:`labkit.scenarios.overcommit.
  compare_policies` runs.
* :class:`OvercommitView`: an ipywidgets layout over those runs: buttons to switch the policy and
  the VM, a time slider, and three figures sharing the time axis: the host (RSS, swap, free share
  against MoM's 20 % and 5 % lines), the chosen VM (RSS, host swap, balloon ``actual``, working set),
  and the MoM-like controller's decisions for it, one marker per evaluation, by reason. Under them,
  in words, the decision in force at the slider's time (:meth:`Decision.reason
  <labkit.scenarios.mom.Decision.reason>`). Switching changes ``ColumnDataSource`` data only.

Free page reporting's views (the RSS staircase, :class:`ReportingExplorer`) live in
:mod:`labkit.viz.reporting`; they are imported here too.

>>> from labkit.scenarios.overcommit import OvercommitParams, compare_policies
>>> runs = compare_policies(OvercommitParams(n_vms=2, vm_memory="512M", host_ram="640M",
...                                          workload="burst-idle", duration_s=30), ("none", "mom"))
>>> view = OvercommitView(runs)
>>> view.policy_buttons.value = "mom"      # what a click does
>>> len(view.decision_source.data["t"]) == len([d for d in runs["mom"].decisions if d.vm == "vm0"])
True
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, FactorRange, HoverTool, Span
from bokeh.plotting import figure

from labkit.units import MiB, format_size
from labkit.viz.reporting import ReportingExplorer, Staircase, staircase
from labkit.viz.shown import Shown

BAR_METRICS = (  # (summary key, title, scale, colour)
    ("swap_out_bytes", "host swap-out (MiB)", MiB, "#CC79A7"),
    ("swap_in_bytes", "host swap-in (MiB)", MiB, "#882255"),
    ("stall_s", "guest stall on swap-in (s)", 1.0, "#D55E00"),
    ("peak_host_rss", "peak host RSS (MiB)", MiB, "#0072B2"),
    ("returned_bytes", "memory returned (MiB)", MiB, "#009E73"),
)
REASON_COLORS = {
    "shrink": "#D55E00", "grow": "#009E73", "guest-min-free": "#E69F00", "guaranteed-min": "#CC79A7",
    "change-too-small": "#999999", "not-ballooned": "#56B4E9", "no-stats": "#000000",
}
VM_LINES = (("rss", "host RSS", "#0072B2", "solid"), ("swap", "in host swap", "#CC79A7", "solid"),
            ("balloon_actual", "balloon actual", "#E69F00", "dashed"),
            ("working_set", "working set", "#009E73", "dotted"))


class PolicyBars(Shown):
    """The bars of :func:`policy_bars`; ``source`` holds the plotted numbers (scaled)."""

    def __init__(self, runs: Mapping[str, Any], metrics: Sequence[tuple], width: int, height: int):
        if not runs:
            raise ValueError("policy_bars() needs at least one run")
        names = list(runs)
        data: dict[str, list] = {"policy": names}
        for key, _, scale, _ in metrics:
            data[key] = [float(runs[n].summary[key]) / scale for n in names]
        self.source = ColumnDataSource(data)
        self.figures = []
        for key, title, _, color in metrics:
            fig = figure(width=width, height=height, x_range=FactorRange(factors=names), title=title,
                         toolbar_location=None)
            fig.vbar(x="policy", top=key, source=self.source, width=0.7, color=color)
            fig.add_tools(HoverTool(tooltips=[("policy", "@policy"), (title, f"@{key}{{0.00}}")]))
            fig.y_range.start = 0
            fig.xaxis.major_label_orientation = 0.7
            fig.title.text_font_size = "9pt"
            self.figures.append(fig)
        # at most 4 bars a row (4 x 215 px fit a 900 px output area; five would not): at 190 px the
        # 9pt titles, "memory returned (MiB)" the longest, were cut
        self.layout = column(*[row(*self.figures[i:i + 4]) for i in range(0, len(self.figures), 4)])

    def __repr__(self) -> str:
        return f"<PolicyBars of {list(self.source.data['policy'])}>"


def policy_bars(runs: Mapping[str, Any], metrics: Sequence[tuple] = BAR_METRICS, width: int = 215,
                height: int = 230) -> PolicyBars:
    """Bars per policy for each ``(summary key, title, scale, colour)`` of ``metrics``."""
    return PolicyBars(runs, metrics, width, height)


class OvercommitView(widgets.VBox):
    """Overcommit runs of one host under several policies, switchable; see the module docstring.

    Controls: ``policy_buttons``, ``vm_buttons``, ``time_slider`` (seconds). Sources: ``host_source``
    (``t``, ``host_rss``, ``host_swap`` in MiB, ``free_percent``), ``vm_source`` (the chosen VM's
    ``rss``, ``swap``, ``balloon_actual``, ``working_set`` in MiB), ``decision_source`` (its MoM
    decisions). ``why_html`` explains the decision in force at the slider's time.
    """

    def __init__(self, runs: Mapping[str, Any], policy: str | None = None, vm: str = "vm0",
                 width: int = 620):
        if not runs:
            raise ValueError("OvercommitView needs at least one run")
        self.runs = dict(runs)
        policy = policy if policy is not None else next(iter(self.runs))
        if policy not in self.runs:
            raise ValueError(f"policy {policy!r} is not one of {list(self.runs)}")
        run = self.runs[policy]
        if vm not in run.vm_names:
            raise ValueError(f"vm {vm!r} is not one of {run.vm_names}")
        self.host_source = ColumnDataSource(self._host(run))
        self.vm_source = ColumnDataSource(self._vm(run, vm))
        self.decision_source = ColumnDataSource(self._decisions(run, vm))
        self.cursors = [Span(location=0, dimension="height", line_color="#444444", line_dash="dashed")
                        for _ in range(3)]
        self.figures = self._figures(run, width)
        t = run.series["t_s"]
        self.policy_buttons = widgets.ToggleButtons(options=list(self.runs), value=policy,
                                                    description="policy")
        self.vm_buttons = widgets.ToggleButtons(options=list(run.vm_names), value=vm, description="VM",
                                                style={"button_width": "60px"})
        self.time_slider = widgets.FloatSlider(value=float(t[0]), min=float(t[0]), max=float(t[-1]),
                                               step=float(t[1] - t[0]) if len(t) > 1 else 1.0,
                                               description="t (s)", continuous_update=False,
                                               layout=widgets.Layout(width="520px"))
        self.why_html = widgets.HTML()
        from labkit.viz.shown import LiveBokeh
        self.bokeh = LiveBokeh(column(*self.figures))
        super().__init__(children=[self.policy_buttons, self.vm_buttons, self.time_slider, self.bokeh,
                                   self.why_html])
        for control in (self.policy_buttons, self.vm_buttons):
            control.observe(lambda _change: self.refresh(), names="value")
        self.time_slider.observe(lambda _change: self._show_time(), names="value")
        self._show_time()

    @property
    def run(self):
        return self.runs[self.policy_buttons.value]

    # --- data ---------------------------------------------------------------------------------
    @staticmethod
    def _host(run) -> dict[str, Any]:
        s = run.series
        return {"t": s["t_s"], "host_rss": s["host_rss"] / MiB, "host_swap": s["host_swap"] / MiB,
                "free_percent": s["host_free_percent"],
                "ram": np.full(len(s["t_s"]), run.params.host_ram / MiB)}

    @staticmethod
    def _vm(run, vm: str) -> dict[str, Any]:
        s = run.series
        return {"t": s["t_s"], **{key: s[f"{vm}.{key}"] / MiB for key, *_ in VM_LINES}}

    @staticmethod
    def _decisions(run, vm: str) -> dict[str, list]:
        mine = [d for d in run.decisions if d.vm == vm]
        return {"t": [d.t_s for d in mine], "reason": [d.reason_code for d in mine],
                "color": [REASON_COLORS.get(d.reason_code, "#000000") for d in mine],
                "text": [d.reason for d in mine],
                "host_free": [100 * d.host_free_percent for d in mine]}

    def _figures(self, run, width: int):
        host = figure(width=width, height=200, title="host", y_axis_label="MiB",
                      tools="pan,xwheel_zoom,box_zoom,reset,save", toolbar_location="above")
        for key, label, color, dash in (("host_rss", "host RSS", "#0072B2", "solid"),
                                        ("host_swap", "host swap used", "#CC79A7", "solid"),
                                        ("ram", "host RAM", "#000000", "dashed")):
            host.line("t", key, source=self.host_source, color=color, line_dash=dash, line_width=2,
                      legend_label=label)
        free = figure(width=width, height=140, x_range=host.x_range, y_range=(0, 100),
                      title="host free memory (%): MoM acts below 20 %, critical at 5 %",
                      toolbar_location=None)
        free.line("t", "free_percent", source=self.host_source, color="#009E73", line_width=2)
        for level, color in ((20, "#E69F00"), (5, "#D55E00")):
            free.add_layout(Span(location=level, dimension="width", line_color=color, line_dash="dashed"))
        guest = figure(width=width, height=200, x_range=host.x_range, y_axis_label="MiB",
                       title="the VM", toolbar_location=None)
        for key, label, color, dash in VM_LINES:
            guest.line("t", key, source=self.vm_source, color=color, line_dash=dash, line_width=2,
                       legend_label=label)
        reasons = list(REASON_COLORS)
        decisions = figure(width=width, height=170, x_range=host.x_range, y_range=FactorRange(
            factors=reasons), title="MoM-like controller: each evaluation of the VM, by reason",
            x_axis_label="time (s)", toolbar_location=None)
        marks = decisions.scatter("t", "reason", source=self.decision_source, color="color", size=7)
        decisions.add_tools(HoverTool(renderers=[marks], tooltips=[("t", "@t s"), ("", "@text")]))
        figs = [host, free, guest, decisions]
        for fig in (host, guest):
            fig.y_range.start = 0
            fig.legend.label_text_font_size = "8pt"
            fig.legend.spacing = 0
            fig.legend.click_policy = "hide"
            fig.add_layout(fig.legend[0], "right")  # outside the plotted area: it covers no data
        for fig, cursor in zip((host, guest, decisions), self.cursors, strict=True):
            fig.add_layout(cursor)
        return figs

    # --- changes ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Show the chosen policy and VM (new source data; the figures stay)."""
        run = self.run
        if self.vm_buttons.value not in run.vm_names:
            self.vm_buttons.value = run.vm_names[0]
            return  # the observer calls refresh again
        self.host_source.data = self._host(run)
        self.vm_source.data = self._vm(run, self.vm_buttons.value)
        self.decision_source.data = self._decisions(run, self.vm_buttons.value)
        self._show_time()

    def decision_at(self, t_s: float):
        """The chosen VM's latest MoM decision at or before ``t_s`` (None if none yet)."""
        mine = [d for d in self.run.decisions if d.vm == self.vm_buttons.value and d.t_s <= t_s]
        return mine[-1] if mine else None

    def _show_time(self) -> None:
        t = float(self.time_slider.value)
        for cursor in self.cursors:
            cursor.location = t
        run, vm = self.run, self.vm_buttons.value
        s = run.series
        i = int(np.clip(np.searchsorted(s["t_s"], t), 0, len(s["t_s"]) - 1))
        facts = (f"t = {s['t_s'][i]:g} s &middot; host free {s['host_free_percent'][i]:.1f}% &middot; "
                 f"{vm}: RSS {format_size(int(s[f'{vm}.rss'][i]))}, balloon actual "
                 f"{format_size(int(s[f'{vm}.balloon_actual'][i]))}, working set "
                 f"{format_size(int(s[f'{vm}.working_set'][i]))}")
        if run.controller is None:
            why = f"policy <b>{html.escape(self.policy_buttons.value)}</b> runs no MoM-like controller"
        else:
            d = self.decision_at(t)
            why = ("not evaluated yet (every 10 s)" if d is None else
                   f"MoM at t = {d.t_s:g} s: <b>{html.escape(d.reason_code)}</b>: {html.escape(d.reason)}")
        self.why_html.value = f"{facts}<br>{why}"

    def __repr__(self) -> str:
        return f"<OvercommitView of {list(self.runs)}, showing {self.policy_buttons.value}>"


__all__ = ["OvercommitView", "PolicyBars", "ReportingExplorer", "Staircase", "policy_bars", "staircase"]
