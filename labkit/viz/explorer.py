"""The balloon explorer: a target slider, Step / Play / Reset, a status line, the page map and the
time series, all live in one ipywidgets layout.

The page map and the time series are one Bokeh row in one :class:`~labkit.viz.shown.LiveBokeh`
widget; every control's ``.observe`` callback calls the backend's public API (``qmp("balloon")``,
``step()``, ``advance(ms)``), then streams a new ``sample()`` row into the time series and gives the
page map the new ``snapshot()`` (a patch of the changed cells, new outline rectangles), all sent to
the browser as one message set. Nothing is rebuilt, and the views never touch model state directly.

The readout says what a step did, in the balloon's own numbers: the request that was acknowledged
(``actual`` moved by at most 256 pages, VIRTIO_BALLOON_ARRAY_PFNS_MAX, §1.2), and the next request
the driver has already sent (``fill_balloon`` runs again at once while the target is unmet, so its
256 pages are out of the free lists before the first ack is read: ``balloon_size`` minus the
acknowledged balloon), then what changed on the page map and in host RSS.

Headless kernels (papermill, nbmake, pytest) have no frontend to tick the Play widget, so
:meth:`Explorer.tick` does one Play tick by hand; setting ``explorer.slider.value`` in a cell fires
the same callback a drag does.

>>> import labkit
>>> ex = explore(labkit.open(memory="1G", seed=0))
>>> ex.slider.value = 768                 # MiB: what dragging the slider does
>>> ex.vm.qmp("query-balloon")["actual"] == 1 << 30   # no time has passed yet
True
>>> ex.tick(); ex.tick()                 # two Play ticks of 100 simulated ms each
>>> ex.vm.qmp("query-balloon")["actual"] == 768 << 20
True
>>> len(ex.timeseries)                   # initial row, slider change, two ticks
4
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from bokeh.layouts import row as bokeh_row

from labkit.units import MiB, PAGE_SIZE, format_size
from labkit.viz.changes import describe, signed_size
from labkit.viz.controls import SteppingControls
from labkit.viz.pagemap import PageMap
from labkit.viz.shown import LiveBokeh
from labkit.viz.timeseries import TimeSeries

TICK_MS_CHOICES = (("1 ms", 1.0), ("10 ms", 10.0), ("100 ms", 100.0), ("1 s", 1000.0))


def reopen_options(vm: Any) -> dict:
    """The ``labkit.open`` arguments that re-create ``vm`` in its initial state (``vm.open_options``,
    which both backends keep). A VM opened on a :class:`~labkit.model.host.Host` object it shares
    with other VMs cannot be re-created alone: pass ``factory=`` to the explorer.
    """
    from labkit.model.host import Host

    options = getattr(vm, "open_options", None)
    if options is None:
        raise TypeError(f"cannot tell how {vm!r} was opened; pass factory=lambda: labkit.open(...)")
    if isinstance(options.get("host"), Host):
        raise ValueError("this VM was opened on a shared host (host=Host(...)), so Reset cannot "
                         "re-create it alone; pass factory= that re-opens the whole setup")
    return dict(options)


class Explorer(SteppingControls, widgets.VBox):
    """The explorer widget; build it with :func:`explore`.

    Controls: ``slider`` (target logical VM size in MiB, like QMP ``balloon``), ``step_button``
    (one balloon request: ``vm.step()``), ``play`` (an ``ipywidgets.Play``; each tick advances
    ``tick_ms`` simulated ms), ``speed`` (ms per tick), ``reset_button`` (re-open the VM with the
    same arguments), ``view_buttons`` (guest / host page map). Views: ``page_map`` (a
    :class:`PageMap`, or None for a backend without ``snapshot()``), ``timeseries`` (a
    :class:`TimeSeries`), ``status_html``. ``vm`` is the current VM (a new one after Reset).
    """

    def __init__(self, vm: Any = None, *, factory: Callable[[], Any] | None = None,
                 tick_ms: float = 100.0, view: str = "guest", play_interval_ms: int = 100,
                 **options: Any):
        if vm is None and factory is None:
            if not options:
                raise TypeError("explore() needs a VM, a factory= or labkit.open() options")
            import labkit
            factory = _factory(labkit.open, dict(options))
        elif options:
            raise TypeError(f"pass either a VM or open() options, not both (got {sorted(options)})")
        owns = vm is None
        if vm is None:
            vm = factory()
        if factory is None:
            import labkit
            factory = _factory(labkit.open, reopen_options(vm))
        first = vm.sample()
        memory_mib = _mib(_memory_of(vm, first))
        target_mib = min(memory_mib, _mib(first["balloon_target"]))
        slider = widgets.IntSlider(
            value=target_mib, min=_used_mib(first, memory_mib), max=memory_mib, step=1,
            description="target (MiB)", continuous_update=False,
            style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
        self._build_controls(step_tooltip="one balloon request (vm.step())",
                             tick_choices=_tick_choices(tick_ms), tick_ms=tick_ms,
                             play_interval_ms=play_interval_ms)
        view_buttons = widgets.ToggleButtons(options=["guest", "host"], value=view,
                                             tooltips=["page states the guest sees",
                                                       "what QEMU's RSS is made of"],
                                             style={"button_width": "60px"})
        status_html = widgets.HTML()
        change_html = widgets.HTML("<i>Step, or Play: what each step changes is said here and "
                                   "outlined in magenta on the page map.</i>")
        zoom_button = widgets.Button(description="Zoom to change", icon="search-plus",
                                     tooltip="zoom the page map to the pages the last step changed",
                                     layout=widgets.Layout(width="150px"))
        has_pages = callable(getattr(vm, "snapshot", None))  # a live guest may have no page map
        page_map = PageMap(vm.snapshot(), view=view, width=400, height=320,
                           legend="below") if has_pages else None
        timeseries = TimeSeries([first], width=440, height=230)
        # side by side in ONE widget (one message set per step): 470 + 440 px fit a 900 px
        # output area; the map's legend sits below it
        live = LiveBokeh(bokeh_row(page_map.figure, timeseries.layout)) if has_pages else (
            timeseries.widget())
        plots = widgets.HBox([live])
        super().__init__(children=[
            widgets.HBox([slider, self.step_button, self.visible_button, self.reset_button]),
            widgets.HBox([self.play, self.speed] + [view_buttons, zoom_button] * has_pages),
            status_html, change_html, plots])
        self.vm = vm
        self.factory = factory
        self.owns_vm = owns
        self.slider, self.view_buttons, self.status_html = slider, view_buttons, status_html
        self.change_html, self.zoom_button = change_html, zoom_button
        self.page_map, self.timeseries, self.plots, self.live = page_map, timeseries, plots, live
        self.last_step: bool | None = None
        self.requests = 0  # balloon requests completed through this explorer's Step
        self.last_readout = ""
        self._last_row = first
        self._syncing = False
        slider.observe(self._guarded(self._on_target), names="value")
        view_buttons.observe(self._guarded(self._on_view), names="value")
        zoom_button.on_click(self._guarded(lambda _button: self.zoom_to_change()))
        self._wire_controls()
        self._show_status(first)

    # --- actions (what the controls do; callable from a cell too) --------------------------------
    def set_target(self, mib: int) -> None:
        """Ask for a logical VM size of ``mib`` MiB (QMP ``balloon``), then redraw."""
        self.vm.qmp("balloon", value=int(mib) * MiB)
        self.refresh(f"balloon target {int(mib)} MiB")

    def step(self) -> bool:
        """One balloon request (``vm.step()``; ``advance(tick_ms)`` on a backend without it).

        Returns whether a request completed (without ``step()``: whether ``actual`` moved). When
        the balloon has nothing to do (actual already at the target), no time passes and only the
        status line changes."""
        row = self.vm.sample()
        if row["balloon_actual"] == row["balloon_target"]:
            self.last_step = False  # nothing to do (and a fresh VM's step() would wait max_ms)
        elif hasattr(self.vm, "step"):
            self.last_step = bool(self.vm.step())
        else:
            self.vm.advance(self.tick_ms)
            self.last_step = self.vm.sample()["balloon_actual"] != row["balloon_actual"]
        now = self.vm.sample()
        if self.last_step:
            self.requests += 1
        if now["t_ms"] != row["t_ms"]:
            self.refresh(f"request {self.requests}" if self.last_step else "step")
        else:
            self._show_status(now)
            self.change_html.value = ("step: nothing to do, the balloon is at its target "
                                      f"({format_size(int(now['balloon_target']))}); move the slider")
        return self.last_step

    def tick(self) -> None:
        """One Play tick: advance ``tick_ms`` simulated milliseconds, then redraw."""
        self.vm.advance(self.tick_ms)
        self.refresh(f"{self.tick_ms:g} ms")

    def reset(self) -> None:
        """Re-open the VM with the same arguments (``factory()``); the plots start over."""
        self.reopen_vm()
        first = self.vm.sample()
        memory_mib = _mib(_memory_of(self.vm, first))
        self._syncing = True
        try:
            self.slider.max = max(memory_mib, self.slider.max)  # widen first: min <= max always
            self.slider.min = _used_mib(first, memory_mib)
            self.slider.max = memory_mib
            self.slider.value = min(memory_mib, _mib(first["balloon_target"]))
        finally:
            self._syncing = False
        self.last_step = None
        self.requests = 0
        self._last_row = first
        self.timeseries.reset([first])
        self._update_page_map()
        self._show_status(first)
        self.change_html.value = "reset: a fresh VM"

    def refresh(self, what: str = "now") -> dict:
        """Sample the VM and push the new row and snapshot to the plots (one message set); say what
        changed (``what``: "request 17", "100 ms"...) in the readout; returns the row."""
        row = self.vm.sample()
        with self.live.batch():
            self.timeseries.append(row)
            self._update_page_map()
        self._show_status(row)
        moves = self.page_map.last_moves if self.page_map is not None else None
        self.last_readout = balloon_readout(what, self._last_row, row, _memory_of(self.vm, row), moves)
        self.change_html.value = f"<b>{self.last_readout}</b> (at {row['t_ms']:.1f} ms)"
        self._last_row = row
        return row

    # --- callbacks ----------------------------------------------------------------------------
    def _on_target(self, change: dict) -> None:
        if not self._syncing:
            self.set_target(change["new"])

    def _on_view(self, change: dict) -> None:
        if self.page_map is not None:
            self.page_map.set_view(change["new"])

    def _update_page_map(self) -> None:
        if self.page_map is not None:
            with self.live.batch():
                self.page_map.update(self.vm.snapshot())

    def _show_status(self, row: dict) -> None:
        try:
            puff = self.vm.inspect("balloon").out_of_puff  # None where the driver can't be seen
        except ValueError:  # no balloon
            puff = None
        idle = " (balloon idle)" if self.last_step is False else ""
        parts = [
            f"t = {row['t_ms'] / 1000:.3f} s",
            f"target <b>{format_size(int(row['balloon_target']))}</b>",
            f"actual <b>{format_size(int(row['balloon_actual']))}</b>{idle}",
            f"MemTotal {format_size(int(row['memtotal']))}",
            f"host RSS <b>{format_size(int(row['host_rss']))}</b>",
            f"Out of puff: {puff if puff is not None else 'n/a'}",
            f"OOM kills: {int(row['oom_kills'])}",
        ]
        self.status_html.value = " &middot; ".join(parts)

    def __repr__(self) -> str:
        return f"<Explorer of {self.vm!r}>"


def balloon_readout(what: str, before: dict, after: dict, memory: int,
                    moves: list[tuple[str, str, int]] | None) -> str:
    """What a step or tick did, from two ``vm.sample()`` rows: the pages the host acknowledged
    (``actual`` is the logical size, so a growing balloon lowers it), the pages of a request the
    driver has sent but QEMU has not acknowledged yet (``balloon_size`` minus the acknowledged
    balloon), then the page map's moves and host RSS.

    >>> G, M = 1 << 30, 1 << 20
    >>> before = {"balloon_actual": G, "balloon_size": 0, "host_rss": 100 * M}
    >>> after = {"balloon_actual": G - M, "balloon_size": 2 * M, "host_rss": 98 * M}
    >>> text = balloon_readout("request 1", before, after, G, [("free", "balloon", 512)])
    >>> for part in text.split(" · "):
    ...     print(part)
    request 1: 256 pages into the balloon, acknowledged (actual −1.0 MiB); 256 more already sent
    map: 512 pages free → balloon
    host RSS −2.0 MiB
    """
    held = lambda r: (memory - int(r["balloon_actual"])) // PAGE_SIZE  # noqa: E731
    acked = held(after) - held(before)
    pending = int(after.get("balloon_size", 0)) // PAGE_SIZE - held(after)
    parts = []
    if acked:
        where = "into" if acked > 0 else "out of"
        parts.append(f"{abs(acked)} pages {where} the balloon, acknowledged (actual "
                     f"{signed_size(-acked * PAGE_SIZE)})")
    else:
        parts.append("no request acknowledged")
    if pending > 0:
        parts[-1] += f"; {pending} more already sent"
    elif pending < 0:
        parts[-1] += f"; {-pending} more on their way out"
    text = f"{what}: {parts[0]}"
    if moves is not None:
        text += f" · map: {describe(moves)}"
    return text + f" · host RSS {signed_size(after['host_rss'] - before['host_rss'])}"


def _factory(open_function: Callable[..., Any], options: dict) -> Callable[[], Any]:
    def reopen() -> Any:
        return open_function(**options)
    reopen.options = options  # type: ignore[attr-defined]
    return reopen


def _mib(size: float) -> int:
    return int(size) // MiB


def _memory_of(vm: Any, row: dict) -> int:
    return int(getattr(vm, "memory", 0) or row["balloon_target"])


def _used_mib(row: dict, memory_mib: int) -> int:
    """About what the guest uses now: the smallest target worth offering on the slider."""
    used = int(row["memtotal"] - row["memavailable"])
    return max(1, min(memory_mib - 1, -(-used // MiB)))


def _tick_choices(ms: float) -> list[tuple[str, float]]:
    if not isinstance(ms, int | float) or isinstance(ms, bool) or ms <= 0:
        raise ValueError(f"tick_ms must be a number of milliseconds > 0, got {ms!r}")
    choices = dict((value, label) for label, value in TICK_MS_CHOICES)
    choices.setdefault(float(ms), f"{ms:g} ms")
    return [(label, value) for value, label in sorted(choices.items())]


def explore(vm: Any = None, *, factory: Callable[[], Any] | None = None, tick_ms: float = 100.0,
            view: str = "guest", **options: Any) -> Explorer:
    """An :class:`Explorer` widget for ``vm`` (or for a VM opened with ``labkit.open(**options)``).

    Reset re-opens the VM: with ``factory()`` if given, else with the arguments ``vm`` was opened
    with. Call :func:`labkit.viz.setup_notebook` once before displaying it.

    >>> import labkit
    >>> ex = explore(memory="1G", seed=0)      # the explorer opens (and owns) the VM
    >>> ex.step()                              # nothing to do yet: the target is the full size
    False
    """
    return Explorer(vm, factory=factory, tick_ms=tick_ms, view=view, **options)
