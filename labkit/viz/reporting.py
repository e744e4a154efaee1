"""Free page reporting, drawn: host RSS falling like a staircase, and an explorer to step it.

* :func:`staircase`: host RSS, MemFree and free memory reported to the host over time, with the
  reporting passes as ticks: the staircase of §3.3 (about 1/16 of each free list per pass, one pass
  every 2 s).
* :class:`ReportingExplorer`: run a job that exits in a guest with free page reporting, then step
  2 s at a time (or Play): the page map (reported blocks light blue, what a step changed outlined)
  and the staircase follow, and a readout says what each step did: passes, reports, memory reported,
  host RSS.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0, balloon={"free_page_reporting": True})
>>> vm.advance(30_000)
>>> ex = ReportingExplorer(vm, job_mib=256)
>>> ex.run_job(256)                # 256 MiB free again in the guest, still backed on the host
>>> ex.step_to_change()            # the pass runs 2 s after the free: in the second 2 s step
2
>>> ex.last_readout.split(";")[0]
'2 s: 1 reporting pass, 2 reports'
>>> vm.close()
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from labkit.units import MiB, format_size
from labkit.viz.changes import describe, signed_size
from labkit.viz.controls import SteppingControls
from labkit.viz.shown import LiveBokeh, Shown, batched
from labkit.viz.timeseries import time_axis


class Staircase(Shown):
    """The figure of :func:`staircase`: ``figure``, ``source`` (``t`` in s, ``host_rss``,
    ``memfree``, ``reported`` in MiB) and ``pass_source`` (``x``: pass start times in s)."""

    def __init__(self, rows: Sequence[Mapping[str, float]], passes_ms: Sequence[float], width: int,
                 height: int, title: str):
        if not rows:
            raise ValueError("staircase() needs at least one vm.sample() row")
        self.t0 = float(rows[0]["t_ms"])
        self.source = ColumnDataSource(self._columns(rows))
        self.pass_source = ColumnDataSource(self._passes(passes_ms))
        fig = figure(width=width, height=height, title=title or "free page reporting: host RSS staircase",
                     x_axis_label="seconds", y_axis_label="MiB", tools="pan,wheel_zoom,box_zoom,reset,save",
                     toolbar_location="above")
        lines = []
        for key, label, color, dash in (("host_rss", "host RSS", "#0072B2", "solid"),
                                        ("memfree", "guest MemFree", "#56B4E9", "dashed"),
                                        ("reported", "free, reported to the host", "#88CCEE", "solid")):
            lines.append(fig.line("t", key, source=self.source, color=color, line_dash=dash, line_width=2,
                                  legend_label=label))
        fig.vspan(x="x", source=self.pass_source, line_color="#999999", line_alpha=0.6,
                  legend_label="reporting pass")
        fig.add_tools(HoverTool(renderers=lines[:1], mode="vline", tooltips=[
            ("t", "@t{0.0} s"), ("host RSS", "@host_rss{0} MiB"), ("reported", "@reported{0} MiB")]))
        fig.y_range.start = 0
        time_axis(fig.xaxis[0])
        fig.xaxis.axis_label = "time"
        fig.legend.label_text_font_size = "8pt"
        fig.legend.spacing = 0
        fig.legend.ncols = 2
        fig.add_layout(fig.legend[0], "below")  # outside the plotted area: it covers no data
        self.figure = self.layout = fig

    def _columns(self, rows: Sequence[Mapping[str, float]]) -> dict[str, list]:
        return {"t": [(float(r["t_ms"]) - self.t0) / 1000 for r in rows],
                "host_rss": [float(r["host_rss"]) / MiB for r in rows],
                "memfree": [float(r["memfree"]) / MiB for r in rows],
                "reported": [float(r.get("reported_bytes", np.nan)) / MiB for r in rows]}

    def _passes(self, passes_ms: Sequence[float]) -> dict[str, list]:
        # passes before the first row are not drawn: the axis spans the data, it never opens on
        # an empty stretch of earlier ticks
        return {"x": [(float(p) - self.t0) / 1000 for p in passes_ms if float(p) >= self.t0]}

    def append(self, rows: Sequence[Mapping[str, float]], passes_ms: Sequence[float] = ()) -> None:
        """Stream more ``vm.sample()`` rows (and set the pass times seen so far, if given)."""
        if rows:
            self.source.stream(self._columns(rows))
        if passes_ms:
            self.pass_source.data = self._passes(passes_ms)

    def reset(self, rows: Sequence[Mapping[str, float]], passes_ms: Sequence[float] = ()) -> None:
        """Start over from ``rows`` (a re-opened VM)."""
        self.t0 = float(rows[0]["t_ms"])
        self.source.data = self._columns(rows)
        self.pass_source.data = self._passes(passes_ms)

    def __repr__(self) -> str:
        return f"<Staircase {len(self.source.data['t'])} samples>"


def staircase(rows: Sequence[Mapping[str, float]], passes_ms: Sequence[float] = (), width: int = 620,
              height: int = 280, title: str = "") -> Staircase:
    """Host RSS, MemFree and memory reported to the host over time, with one tick per reporting
    pass (``passes_ms``: their start times, e.g.
    ``vm.inspect("reporting").pass_starts_ms``). ``rows`` are ``vm.sample()`` rows; time counts
    from the first.
    """
    return Staircase(rows, passes_ms, width, height, title)


REPORT_TICKS = (("500 ms", 500.0), ("2 s", 2000.0), ("10 s", 10_000.0))


def reporting_readout(what: str, before: dict, after: dict, moves: list | None = None) -> str:
    """What a tick of a reporting guest did, from two :meth:`ReportingExplorer.facts`: passes run
    (each walks the order-9 and order-10 free lists, §3.3), reports sent (a batch of up to 32
    blocks, PAGE_REPORTING_CAPACITY), free memory reported, host RSS, and the page map's moves.

    >>> b = {"state": "REQUESTED", "passes": 3, "reports": 10, "reported_bytes": 0, "host_rss": 3 << 30}
    >>> a = dict(b, state="REQUESTED", passes=4, reports=14, reported_bytes=512 << 20,
    ...          host_rss=(3 << 30) - (512 << 20))
    >>> reporting_readout("2 s", b, a)
    '2 s: 1 reporting pass, 4 reports; free and reported +512.0 MiB; host RSS −512.0 MiB; reporting REQUESTED'
    """
    passes, reports = after["passes"] - before["passes"], after["reports"] - before["reports"]
    text = (f"{what}: {passes} reporting pass{'es' if passes != 1 else ''}, {reports} report"
            f"{'s' if reports != 1 else ''}; free and reported "
            f"{signed_size(after['reported_bytes'] - before['reported_bytes'])}; host RSS "
            f"{signed_size(after['host_rss'] - before['host_rss'])}; reporting {after['state']}")
    if moves is not None:
        text += f" · map: {describe(moves)}"
    return text


class _Both:
    """``batch()`` over two live widgets at once."""

    def __init__(self, *views: LiveBokeh):
        self.views = views

    def batch(self):
        return batched(*self.views)


def _reporting_view(vm: Any) -> Any:
    """``vm.inspect("reporting")``, or a ``ValueError`` saying how to open a VM with it."""
    try:
        return vm.inspect("reporting")
    except ValueError:
        raise ValueError("this VM has no free page reporting: open it with "
                         "balloon={'free_page_reporting': True}") from None


class ReportingExplorer(SteppingControls, widgets.VBox):
    """Free memory in a guest with free page reporting and step time 2 s at a time.

    Controls: ``job_slider`` (MiB) and ``job_button`` (a job allocates and writes that much, then
    exits: its memory is free in the guest and still backed on the host), ``step_button`` and
    ``play`` (advance ``tick_ms``, sampling every ``sample_ms``), ``visible_button`` (Step to
    change), ``zoom_button``, ``view_buttons`` (page map view), ``reset_button`` (with
    ``factory``). Views: ``page_map`` (reported blocks light blue in the guest view),
    ``staircase``, ``status``; ``change_html`` says what the last step did.
    """

    def __init__(self, vm: Any = None, tick_ms: float = 2000.0, sample_ms: float = 500.0,
                 job_mib: int = 1024, *, factory: Any = None, play_interval_ms: int = 100):
        if (vm is None) == (factory is None):
            raise TypeError("ReportingExplorer needs a VM or a factory= (a function that opens one), "
                            "not both")
        self.factory, self.owns_vm = factory, vm is None
        vm = factory() if vm is None else vm
        _reporting_view(vm)  # a clear error when the VM has no free page reporting
        if not tick_ms > 0 or not sample_ms > 0:
            raise ValueError(f"tick_ms and sample_ms must be > 0, got {tick_ms!r}, {sample_ms!r}")
        from labkit.viz.pagemap import PageMap
        self.vm, self.sample_ms = vm, float(sample_ms)
        memory_mib = int(vm.sample()["balloon_target"]) // MiB
        self.job_slider = widgets.IntSlider(value=min(job_mib, memory_mib // 2), min=64,
                                            max=memory_mib * 3 // 4, step=64, description="job (MiB)",
                                            continuous_update=False)
        self.job_button = widgets.Button(description="run a job that exits", icon="play-circle",
                                         layout=widgets.Layout(width="190px"))
        self._build_controls(step_tooltip="advance time by the time per tick",
                             tick_choices=self.tick_options([(v, k) for k, v in REPORT_TICKS], tick_ms),
                             tick_ms=tick_ms, play_interval_ms=play_interval_ms)
        self.reset_button.layout.display = "" if factory is not None else "none"
        self.view_buttons = widgets.ToggleButtons(options=["guest", "host"], value="guest",
                                                  style={"button_width": "60px"})
        self.zoom_button = widgets.Button(description="Zoom to change", icon="search-plus",
                                          tooltip="zoom the page map to the pages the last step changed",
                                          layout=widgets.Layout(width="150px"))
        self.status_html = widgets.HTML()
        self.change_html = widgets.HTML("<i>Run a job, then Step: what each step did is said here, "
                                        "and the pages it changed are outlined in magenta on the page "
                                        "map.</i>")
        self.last_readout = ""
        self.page_map = PageMap(vm.snapshot(), width=360, height=300, legend="below")
        self.staircase = staircase([vm.sample()], self._passes(), width=440, height=300)
        # two widgets side by side (a Bokeh row would stretch the staircase to the map's height and
        # give the extra to its legend); each step sends one message set to each
        self.live = _Both(self.page_map.widget(), self.staircase.widget())
        super().__init__(children=[
            widgets.HBox([self.job_slider, self.job_button]),
            widgets.HBox([self.step_button, self.visible_button, self.play, self.speed, self.reset_button]),
            widgets.HBox([self.view_buttons, self.zoom_button]),
            self.status_html, self.change_html,
            widgets.HBox([self.page_map.widget(), self.staircase.widget()],
                         layout=widgets.Layout(flex_flow="row wrap"))])
        self.job_button.on_click(self._guarded(lambda _b: self.run_job(self.job_slider.value)))
        self.zoom_button.on_click(self._guarded(lambda _b: self.zoom_to_change()))
        self.view_buttons.observe(self._guarded(lambda c: self._set_view(c["new"])), names="value")
        self._wire_controls()
        self._show()

    def _set_view(self, view: str) -> None:
        with self.live.batch():
            self.page_map.set_view(view)

    def _passes(self) -> list[float]:
        return list(_reporting_view(self.vm).pass_starts_ms)

    def facts(self) -> dict:
        """The reporting counters and host RSS now (what :func:`reporting_readout` compares)."""
        r, s = _reporting_view(self.vm), self.vm.sample()
        return {"state": r.state, "passes": r.passes, "reports": r.reports,
                "reported_bytes": int(s["reported_bytes"]), "host_rss": int(s["host_rss"])}

    def run_job(self, mib: int) -> None:
        """A job allocates (and writes) ``mib`` MiB and exits."""
        before = self.facts()
        handle = self.vm.guest("alloc", size=int(mib) * MiB, kind="anon")
        self.vm.guest("free", handle=handle)
        with self.live.batch():
            self.staircase.append([self.vm.sample()])
            self.page_map.update(self.vm.snapshot())
        self._show()
        after = self.facts()
        self.last_readout = (f"a {int(mib)} MiB job ran and exited: free again in the guest, host RSS "
                             f"{signed_size(after['host_rss'] - before['host_rss'])} (its pages stay "
                             f"backed until reported) · map: {describe(self.page_map.last_moves)}")
        self.change_html.value = f"<b>{html.escape(self.last_readout)}</b>"

    def step(self) -> bool:
        """One tick (Step); returns whether something happened or is still to come (reporting
        moved, the page map changed, or reporting is not IDLE: a pass is requested or running)."""
        before = self.facts()
        self.tick()
        after = self.facts()
        return after != before or self.page_map.changed_pages > 0 or after["state"] != "IDLE"

    def tick(self) -> None:
        """Advance ``tick_ms``, one sample every ``sample_ms``; redraw and say what happened."""
        before = self.facts()
        rows, done = [], 0.0
        while done < self.tick_ms:
            step = min(self.sample_ms, self.tick_ms - done)
            self.vm.advance(step)
            done += step
            rows.append(self.vm.sample())
        self.refresh(rows)
        self.last_readout = reporting_readout(f"{self.tick_ms / 1000:g} s", before, self.facts(),
                                              self.page_map.last_moves)
        self.change_html.value = f"<b>{html.escape(self.last_readout)}</b>"

    def refresh(self, rows: list | None = None) -> None:
        with self.live.batch():
            self.staircase.append(rows if rows is not None else [self.vm.sample()], self._passes())
            self.page_map.update(self.vm.snapshot())
        self._show()

    def reset(self) -> None:
        """Re-open the VM with ``factory``; the plots start over."""
        self.reopen_vm()
        with self.live.batch():
            self.staircase.reset([self.vm.sample()], self._passes())
            self.page_map.update(self.vm.snapshot())
        self._show()
        self.change_html.value = "reset: a fresh VM"

    def _show(self) -> None:
        r, s = _reporting_view(self.vm), self.vm.sample()
        self.status = {"t_ms": float(s["t_ms"]), "state": r.state, "passes": r.passes,
                       "reports": r.reports, "reported_bytes": int(s["reported_bytes"]),
                       "host_rss": int(s["host_rss"]), "memfree": int(s["memfree"])}
        self.status_html.value = (
            f"t = {s['t_ms'] / 1000:.1f} s &middot; reporting <b>{r.state}</b>, {r.passes} passes, "
            f"{r.reports} reports &middot; free and reported <b>{format_size(int(s['reported_bytes']))}"
            f"</b> &middot; MemFree {format_size(int(s['memfree']))} &middot; host RSS "
            f"<b>{format_size(int(s['host_rss']))}</b>")

    def __repr__(self) -> str:
        return f"<ReportingExplorer of {self.vm!r}>"


__all__ = ["ReportingExplorer", "Staircase", "reporting_readout", "staircase"]
