"""Where file data lives: the page cache split between guests and host, and a file's pages.

* :func:`copies_figure`: one stacked bar per transport of :func:`labkit.scenarios.pmem.shared_image`
  (host page cache copy, guest page cache copies, pmem struct pages, the rest of guest RAM); the
  bars' ``ColumnDataSource`` is ``source_of(fig)``, so a widget can replace its data.
* :func:`file_map`: the host page cache state of an image file, one cell per run of pages (not
  cached, clean, dirty, writeback error, lost in a crash), the worst state of a cell winning.
* :class:`CopiesExplorer`: a slider for the number of VMs that re-runs the comparison.
* :class:`WritebackStepper`: buttons that advance a VM 5 s at a time (or until the file map changes)
  or crash its host, with bars of the dirty data at risk (guest page cache, host page cache), the
  file map with the cells the last action changed outlined, and a readout of what it did.

>>> from labkit.scenarios.pmem import SharedImageParams, shared_image, shared_image_table
>>> runs = [shared_image(SharedImageParams(n_vms=2, transport=t)) for t in ("blk-writeback", "pmem")]
>>> fig = copies_figure(shared_image_table(runs))
>>> list(source_of(fig).data["transport"])
['blk-writeback', 'pmem']
"""

from __future__ import annotations

from typing import Any

import numpy as np
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.plotting import figure

from labkit.model.pagecache import CachedFile, FilePage
from labkit.units import GiB, MiB, format_size
from labkit.viz.changes import add_outline, box_cover, outline_data, transitions

PARTS = (("host_copy", "image in the host page cache", "#0072B2"),
         ("guest_copies", "image in guest page caches", "#D55E00"),
         ("memmap", "pmem struct pages (guest RAM)", "#CC79A7"),
         ("other", "rest of guest RAM (host-backed)", "#BBBBBB"))
# file map categories: FilePage values, then "lost" (the disk is stale after a crash)
FILE_NAMES = ("not cached", "clean (cached)", "dirty (not on disk)", "writeback error", "lost in crash")
FILE_COLORS = ("#E6E6E6", "#44AA99", "#CC3311", "#882255", "#000000")
FILE_RANK = np.array([0, 1, 3, 4, 2])  # which state wins a cell: error > dirty > lost > clean > none
LOST = 4


def _split(table: dict, unit: int) -> dict[str, list]:
    other = [max(0.0, r - g - m) for r, g, m in zip(table["guests_rss"], table["guest_copies"],
                                                    table["memmap"], strict=True)]
    data = {"transport": list(table["transport"]), "other": [v / unit for v in other]}
    for key, *_ in PARTS[:3]:
        data[key] = [v / unit for v in table[key]]
    return data


def copies_figure(table: dict, unit: str = "MiB", width: int = 560, height: int = 300):
    """Stacked bars of host memory per transport (``shared_image_table`` rows)."""
    scale = {"MiB": MiB, "GiB": GiB}[unit]
    source = ColumnDataSource(_split(table, scale))
    fig = figure(y_range=list(source.data["transport"]), width=width, height=height,
                 title="host memory: who holds a copy of the image", x_axis_label=unit,
                 toolbar_location=None)
    keys = [k for k, *_ in PARTS]
    fig.hbar_stack(keys, y="transport", height=0.6, source=source, color=[c for *_, c in PARTS],
                   legend_label=[label for _, label, _ in PARTS])
    fig.add_tools(HoverTool(tooltips=[("transport", "@transport")] + [
        (label, f"@{key}{{0}} {unit}") for key, label, _ in PARTS]))
    fig.legend.label_text_font_size = "8pt"
    fig.legend.ncols = 2
    fig.legend.spacing = 0
    fig.add_layout(fig.legend[0], "below")  # outside the plotted area: it covers no bar
    fig.x_range.start = 0
    return fig


def file_cells(f: CachedFile, cells: int = 512, pages: int | None = None) -> np.ndarray:
    """Category per cell (``FILE_NAMES`` index) of the first ``pages`` pages of ``f``."""
    n = f.n_pages if pages is None else min(pages, f.n_pages)
    cat = f.state[:n].astype(np.uint8)
    cat = np.where(f.lost[:n] & (cat == FilePage.NOT_CACHED), np.uint8(LOST), cat)
    per = -(-n // cells)
    padded = np.zeros(per * cells, np.uint8)
    padded[:n] = cat
    rank = FILE_RANK[padded.reshape(cells, per)].max(axis=1)
    return np.argsort(FILE_RANK)[rank].astype(np.uint8)


def file_map(f: CachedFile, cells: int = 512, pages: int | None = None, width: int = 560,
             height: int = 90, title: str | None = None):
    """One strip of ``cells`` cells over the file's first ``pages`` pages (default: all)."""
    row = file_cells(f, cells, pages)
    source = ColumnDataSource({"image": [row.reshape(1, -1)]})
    mapper = LinearColorMapper(palette=list(FILE_COLORS), low=-0.5, high=len(FILE_COLORS) - 0.5)
    fig = figure(width=width, height=height, x_range=(0, cells), y_range=(0, 1), toolbar_location=None,
                 title=title or f"host page cache of {f.path.rsplit('/', 1)[-1]}")
    fig.image(image="image", x=0, y=0, dw=cells, dh=1, source=source, color_mapper=mapper)
    for name, color in zip(FILE_NAMES, FILE_COLORS, strict=True):
        fig.scatter([], [], marker="square", size=8, color=color, legend_label=name)
    fig.legend.orientation = "horizontal"
    fig.legend.label_text_font_size = "7pt"
    fig.add_layout(fig.legend[0], "below")
    fig.yaxis.visible = False
    per_cell = -(-(f.n_pages if pages is None else min(pages, f.n_pages)) // cells)
    fig.xaxis.axis_label = f"file offset (one cell = {per_cell * 4} KiB)"
    return fig


def source_of(fig) -> ColumnDataSource:
    """The data source of a figure made here (its first renderer's), to replace its data."""
    return fig.renderers[0].data_source


def guarded(owner: Any, callback: Any) -> Any:
    """A widget callback that shows its error in ``owner.status_html`` (inside the widget, not
    only in JupyterLab's Log Console) and keeps it in ``owner.error``."""
    import html

    def run(argument: Any) -> None:
        try:
            callback(argument)
        except Exception as e:  # shown to the user in the widget and kept
            owner.error = e
            owner.status_html.value = (f'<span style="color:#CC3311"><b>{type(e).__name__}</b>: '
                                       f"{html.escape(str(e))}</span>")
    return run


class CopiesExplorer:
    """A slider for the number of VMs over :func:`copies_figure`: ``compare(n)`` must return a
    ``shared_image_table`` for ``n`` VMs; moving ``slider`` recomputes it and replaces the bars'
    data (the figure is not rebuilt)."""

    def __init__(self, compare: Any, n: int = 4, max_n: int = 8, unit: str = "MiB"):
        self.compare, self.unit = compare, unit
        self.table = compare(n)
        self.figure = copies_figure(self.table, unit=unit)
        self._widget = None
        import ipywidgets as widgets

        self.slider = widgets.IntSlider(value=n, min=1, max=max_n, description="VMs",
                                        continuous_update=False)
        self.status_html = widgets.HTML(self._status())
        self.error: BaseException | None = None
        self.slider.observe(guarded(self, self._on_n), names="value")

    def _status(self) -> str:
        return f"{self.slider.value if hasattr(self, 'slider') else '?'} VMs booting from one image"

    def _on_n(self, change: dict) -> None:
        self.table = self.compare(change["new"])
        source_of(self.figure).data = _split(self.table, {"MiB": MiB, "GiB": GiB}[self.unit])
        self.figure.title.text = f"host memory of {change['new']} VMs: who holds a copy of the image"
        self.status_html.value = self._status()

    def widget(self):
        if self._widget is None:
            import ipywidgets as widgets

            from labkit.viz.shown import LiveBokeh

            self._widget = widgets.VBox([widgets.HBox([self.slider, self.status_html]),
                                         LiveBokeh(self.figure)])
        return self._widget

    def _repr_mimebundle_(self, **kwargs: Any):
        from labkit.viz.shown import refresh_stale

        refresh_stale(self.widget())
        return self.widget()._repr_mimebundle_(**kwargs)


class WritebackStepper:
    """Step a VM through writeback and crash its host: ``step()`` advances ``step_ms``;
    ``crash()`` crashes the host (labkit.model.pagecache.host_crash); ``step_to_change()`` steps
    until the file map changes. ``widget()`` shows the buttons, a readout of what the last action
    did (the dirty data at risk before and after, and the file map's moves), the at-risk bars and
    the file map, whose changed cells are outlined; ``history`` holds one row per step."""

    MAX_STEPS_TO_CHANGE = 60  # five simulated minutes of 5 s steps

    def __init__(self, vm: Any, f: CachedFile, pages: int | None = None, step_ms: float = 5000.0):
        self.vm, self.file, self.pages, self.step_ms = vm, f, pages, step_ms
        self.history: list[dict] = []
        self.crashed = False
        self.error: BaseException | None = None
        self.last_readout = ""
        self.last_moves: list[tuple[str, str, int]] = []
        self.bars = ColumnDataSource(self._bar_data())
        fig = figure(x_range=["guest page cache", "host page cache"], width=300, height=220,
                     title="dirty data at risk (MiB)", toolbar_location=None)
        fig.vbar(x="where", top="mib", width=0.6, source=self.bars, color="#CC3311")
        fig.y_range.start = 0
        self.bar_figure = fig
        self.map_figure = file_map(f, pages=pages, width=560)
        self._cells = file_cells(f, pages=pages)
        self.outline_source = ColumnDataSource(outline_data(np.zeros((0, 4))))
        add_outline(self.map_figure, self.outline_source)
        self._widget = None
        self._live = None

    def _bar_data(self) -> dict:
        if self.crashed:
            return {"where": ["guest page cache", "host page cache"], "mib": [0.0, 0.0]}
        s = self.vm.sample()
        row = {"t_ms": s["t_ms"], "guest_dirty": s["guest_dirty"], "host_dirty": s["host_page_cache_dirty"]}
        self.history.append(row)
        return {"where": ["guest page cache", "host page cache"],
                "mib": [row["guest_dirty"] / MiB, row["host_dirty"] / MiB]}

    def _at_risk(self) -> tuple[float, float]:
        mib = self.bars.data["mib"]
        return float(mib[0]), float(mib[1])

    def refresh(self, what: str | None = None) -> None:
        """Redraw the bars and the file map (one message set), outlining the cells that changed
        since the last redraw; with ``what`` ("a 16 MiB write"), the readout says it."""
        before = self._at_risk()
        cells = file_cells(self.file, pages=self.pages)
        changed = cells != self._cells
        self.last_moves = transitions(self._cells[changed], cells[changed], FILE_NAMES)
        boxes = box_cover(changed.reshape(1, -1))
        width = self.map_figure.width or 560
        # a strip one cell high: the outline runs just inside it (outside, above and below, it
        # would fall off the plot), and no further out than the strip's ends
        inset = 1.5 * len(cells) / width
        outline = outline_data(boxes, pad_x=-inset / 2, pad_y=-0.1)
        outline["left"] = [max(x, inset) for x in outline["left"]]
        outline["right"] = [min(x, len(cells) - inset) for x in outline["right"]]
        self._cells = cells
        with self._batch():
            self.bars.data = self._bar_data()
            source_of(self.map_figure).data = {"image": [cells.reshape(1, -1)]}
            if outline != self.outline_source.data:
                self.outline_source.data = outline
        if self._widget is not None:
            self._status.value = self.status()
        if what is not None:
            self._say(what, before)

    def _batch(self):
        from contextlib import nullcontext
        return self._live.batch() if self._live is not None else nullcontext()

    def status(self) -> str:
        if self.crashed:
            lost = int(self.file.lost[: self.pages].sum()) if self.pages else int(self.file.lost.sum())
            return f"<b>host crashed</b>: {lost * 4 // 1024} MiB of written data lost"
        return f"t = {self.vm.now_ms / 1000:.1f} s"

    def _say(self, what: str, before: tuple[float, float]) -> None:
        guest, host = self._at_risk()
        n = self.file.n_pages if self.pages is None else min(self.pages, self.file.n_pages)
        cell = -(-n // len(self._cells)) * 4096
        moves = ", ".join(f"{k} cells ({format_size(k * cell)}) {a} → {b}" for a, b, k in self.last_moves[:3])
        self.last_readout = (f"{what}: dirty at risk in the guest page cache {before[0]:.0f} → "
                             f"{guest:.0f} MiB, in the host page cache {before[1]:.0f} → {host:.0f} MiB"
                             f" · file map: {moves or 'no cell changed'}")
        if self._widget is not None:
            import html
            self._readout.value = f"<b>{html.escape(self.last_readout)}</b>"

    def step(self) -> bool:
        """Advance ``step_ms`` (nothing after a crash); returns whether time moved."""
        if self.crashed:
            return False
        before = self._at_risk()
        self.vm.advance(self.step_ms)
        self.refresh()
        self._say(f"{self.step_ms / 1000:g} s (now t = {self.vm.now_ms / 1000:.0f} s)", before)
        return True

    def step_to_change(self, max_steps: int = MAX_STEPS_TO_CHANGE) -> int:
        """Step until the file map changes (the host flusher writes back, or a write lands), or
        ``max_steps``; returns the steps taken."""
        for n in range(1, max_steps + 1):
            if not self.step() or self.last_moves:
                return n
        return max_steps

    def crash(self) -> dict:
        from labkit.model.pagecache import host_crash

        if self.crashed:
            return {}
        before = self._at_risk()
        lost = host_crash(self.vm.host, [self.vm])
        self.crashed = True
        self.refresh()
        self._say(f"host crash at t = {self.vm.now_ms / 1000:.0f} s: {before[0] + before[1]:.0f} MiB that "
                  "was dirty in a page cache never reaches the disk, the host page cache is gone", before)
        return lost

    def widget(self):
        """Buttons "advance 5 s", "Step to change" and "crash the host", the status line, the
        readout and both figures."""
        if self._widget is None:
            import ipywidgets as widgets

            from labkit.viz.shown import LiveBokeh

            step = widgets.Button(description=f"advance {self.step_ms / 1000:g} s", icon="step-forward")
            visible = widgets.Button(description="Step to change", icon="fast-forward",
                                     tooltip="advance until the file map changes (at most "
                                             f"{self.MAX_STEPS_TO_CHANGE} steps)")
            crash = widgets.Button(description="crash the host", button_style="danger")
            self._status = widgets.HTML(self.status())
            self._readout = widgets.HTML("<i>Advance, then crash: what each action did is said here, "
                                         "and the file map's changed cells are outlined in magenta.</i>")
            self.status_html = self._status
            step.on_click(guarded(self, lambda _: self.step()))
            visible.on_click(guarded(self, lambda _: self.step_to_change()))
            crash.on_click(guarded(self, lambda _: self.crash()))
            self.step_button, self.visible_button, self.crash_button = step, visible, crash
            self._live = LiveBokeh(column(self.bar_figure, self.map_figure))
            self._widget = widgets.VBox([widgets.HBox([step, visible, crash, self._status]),
                                         self._readout, self._live])
        return self._widget

    def _repr_mimebundle_(self, **kwargs: Any):
        from labkit.viz.shown import refresh_stale

        refresh_stale(self.widget())
        return self.widget()._repr_mimebundle_(**kwargs)
