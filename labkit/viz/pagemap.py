"""The page map: every guest page as one coloured cell, millions of them, live.

Layout: pages run row-major over a grid ``row_pages`` wide, a power of two (at least a pageblock,
512 pages), so every row starts on a buddy-block boundary and blocks of up to ``row_pages`` pages
never wrap. Rows are chosen so the grid is about square and never more than ``max_rows``.
Each drawn cell covers ``cell`` consecutive, aligned pages (a power of two): the overview uses the
smallest cell that fits ``max_cols`` columns; zooming re-slices only the visible window at a finer
cell, down to one page per cell. ``max_rows`` x ``max_cols`` defaults to the plot's own size in
screen pixels (at most 1024²): what is sent stays small, and the browser never has to shrink the
image (its nearest-neighbour resampling would drop exactly the rare pixels we keep).

Downsampling keeps rare states visible: a cell shows the category with the largest
``pages x importance`` (:func:`labkit.viz.palette.downsample`), so one balloon page among hundreds
of free ones still colours its pixel.

The figure is a Bokeh ``image`` of uint8 categories under a ``LinearColorMapper`` (one colour per
integer); :meth:`PageMap.update` and zooming only change ``ColumnDataSource`` data (a patch of the
changed rectangle when it is small), never the figure.

What changed is marked: :meth:`PageMap.update` compares the new snapshot with the one shown, and a
second image draws a magenta outline around every cell in which at least one page changed (a cell
standing for many pages is "changed" if any of its pages is), so a 1 MiB step is visible on a
16 GiB map. ``last_moves`` says what moved (:func:`labkit.viz.changes.transitions`), and
:meth:`PageMap.zoom_to_change` zooms to the changed region.

>>> import numpy as np
>>> from labkit.model.pages import PageState
>>> snap = {"state": np.zeros(1 << 18, dtype=np.uint8), "flags": np.zeros(1 << 18, dtype=np.uint8)}
>>> snap["state"][1000] = PageState.BALLOON
>>> pm = page_map(snap, max_cells=128)     # 128 rows of 2048 pages, 16 pages per cell
>>> pm.row_pages, pm.cell, pm.image.shape
(2048, 16, (128, 128))
>>> int(pm.image[0, 1000 // 16]) == palette.G_BALLOON   # the one balloon page shows
True
>>> pm.zoom(0, 64, 0, 4)       # what a box-zoom on the first 64 pages of 4 rows does
>>> pm.cell, pm.image.shape    # one page per cell, the window plus a margin for panning
(1, (6, 96))
>>> pm.reset_zoom()
>>> snap["state"][5000:5256] = PageState.BALLOON; pm.update(snap)
>>> pm.last_moves, pm.changed_pages
([('free', 'balloon', 256)], 256)
>>> int(pm.halo.sum()) > 0     # the outline around the changed cells
True
"""

from __future__ import annotations

import numpy as np
from bokeh.events import RangesUpdate
from bokeh.models import (
    AdaptiveTicker,
    ColumnDataSource,
    CustomJSHover,
    CustomJSTickFormatter,
    HoverTool,
    LinearColorMapper,
    Range1d,
)
from bokeh.plotting import figure

from labkit.model.pages import PAGEBLOCK_ORDER, PAGES_PER_MEMORY_BLOCK
from labkit.units import PAGE_SIZE, format_size
from labkit.viz import palette
from labkit.viz.changes import outline, transitions
from labkit.viz.palette import downsample
from labkit.viz.shown import Shown

MAX_CELLS = 1024  # per axis: browser repaint of 1024² uint8 cells is ~0.35 s on 2 cores
MIN_ROW_PAGES = 1 << PAGEBLOCK_ORDER
MAX_GRIDLINES = 64
_ABSENT = {"guest": palette.G_ABSENT, "host": palette.H_ABSENT}

_SIZE_JS = """
function fmt(b) {
  const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [u, s] of units) {
    if (Math.abs(b) >= s) { const v = b / s; return (Number.isInteger(v) ? v : v.toFixed(1)) + " " + u; }
  }
  return b + " B";
}
"""


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(x, 1.0)))))


def grid_width(n_pages: int, max_rows: int = MAX_CELLS) -> int:
    """Pages per row: a power of two, about sqrt(n_pages), at least 512, giving <= max_rows rows."""
    return max(MIN_ROW_PAGES, _pow2_at_least(np.sqrt(n_pages)), _pow2_at_least(n_pages / max_rows))


def _inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and (
        inner[3] <= outer[3])


class PageMap(Shown):
    """A Bokeh page map of one snapshot; see the module docstring. Build with :func:`page_map`.

    ``width`` and ``height`` are the plot area in screen pixels (axes, title and legend come on
    top); ``max_cells`` caps the cells sent per axis (default: the plot area, at most 1024).
    Attributes: ``figure`` (the Bokeh figure), ``source`` (its image ``ColumnDataSource``),
    ``legend_source`` (per-category counts), ``counts`` (pages per category), ``cell`` (pages per
    drawn cell), ``row_pages``, ``rows``, ``window`` (``(col0, col1, row0, row1)`` sent).
    """

    def __init__(self, snapshot: dict, view: str = "guest", width: int = 512, height: int = 512,
                 max_cells: int | None = None, title: str | None = None, legend: str = "right"):
        palette._check_view(view)
        if legend not in ("right", "below"):
            raise ValueError(f"legend must be 'right' or 'below', got {legend!r}")
        self._legend_place = legend
        self._width = width
        self._changed: np.ndarray | None = None
        self.last_moves: list[tuple[str, str, int]] = []
        self.changed_pages = 0
        for name, value in (("width", width), ("height", height), ("max_cells", max_cells)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 16 <= value <= 4096):
                raise ValueError(f"{name} must be an int from 16 to 4096 (pixels), got {value!r}")
        self.view = view
        self.max_cols = min(MAX_CELLS, width) if max_cells is None else max_cells
        self.max_rows = min(MAX_CELLS, height) if max_cells is None else max_cells
        self._title = title
        self._window: tuple[int, int, int, int] | None = None
        self._bokeh_model = None
        self._load(snapshot)
        k = len(palette.categories(view))
        self.color_mapper = LinearColorMapper(palette=palette.colors(view), low=-0.5, high=k - 0.5)
        data = self._render_data()
        self.source = ColumnDataSource(data)
        self.halo_source = ColumnDataSource(self._halo_data(data))
        self.legend_source = ColumnDataSource(self._legend_data())
        self.figure = self._build_figure(width, height)
        self.figure.on_event(RangesUpdate, self._on_ranges_update)

    # --- data ---------------------------------------------------------------------------------
    def _load(self, snapshot: dict) -> None:
        state, flags = snapshot.get("state"), snapshot.get("flags")
        if state is None or flags is None:
            raise ValueError("a snapshot needs 'state' and 'flags' arrays (from vm.snapshot()), "
                             f"got keys {sorted(snapshot)}")
        self._state, self._flags = np.array(state, copy=True), np.array(flags, copy=True)
        self.t_ms = snapshot.get("t_ms")
        n = len(self._state)
        if n == 0:
            raise ValueError("a snapshot with no pages cannot be drawn")
        if getattr(self, "n_pages", n) != n:
            self._window = None  # a different guest: start from the overview
        self.n_pages = n
        self.row_pages = grid_width(n, self.max_rows)
        self.rows = -(-n // self.row_pages)
        self.overview_cell = _pow2_at_least(self.row_pages / self.max_cols)
        self._classify()

    def _classify(self) -> None:
        cats = palette.classify(self._state, self._flags, self.view)
        self.counts = np.bincount(cats, minlength=len(palette.categories(self.view)))
        missing = self.rows * self.row_pages - self.n_pages  # the last row's tail: no memory
        if missing:
            cats = np.concatenate([cats, np.full(missing, _ABSENT[self.view], dtype=np.uint8)])
        self._cats = cats.reshape(self.rows, self.row_pages)
        self._weights = palette.importance(self.view)
        self._overview = downsample(self._cats, self.overview_cell, self._weights)

    def _render_data(self) -> dict[str, list]:
        if self._window is None:
            col0, col1, row0, row1, cell = 0, self.row_pages, 0, self.rows, self.overview_cell
            image = self._overview.copy()
        else:
            col0, col1, row0, row1 = self._window
            cell = self._window_cell()
            image = downsample(self._cats[row0:row1, col0:col1], cell, self._weights)
        self.cell = cell
        return {"image": [image], "x": [col0], "y": [row0], "dw": [col1 - col0],
                "dh": [row1 - row0], "cell": [cell], "row_pages": [self.row_pages]}

    def _halo_data(self, data: dict) -> dict[str, list]:
        """The outline image for ``data`` (the same placement): 1 around changed cells."""
        image = data["image"][0]
        mask = np.zeros(image.shape, dtype=bool)
        if self._changed is not None and len(self._changed):
            col0, row0, cell = data["x"][0], data["y"][0], data["cell"][0]
            rows, cols = np.divmod(self._changed, self.row_pages)
            inside = (rows >= row0) & (rows < row0 + data["dh"][0]) & (cols >= col0) & (
                cols < col0 + data["dw"][0])
            mask[rows[inside] - row0, (cols[inside] - col0) // cell] = True
        halo = outline(mask) if mask.any() else mask.astype(np.uint8)
        return {**{k: v for k, v in data.items() if k != "image"}, "image": [halo]}

    @property
    def halo(self) -> np.ndarray:
        """The uint8 outline image currently in the halo source (1 = around a changed cell)."""
        return self.halo_source.data["image"][0]

    def changed_region(self) -> tuple[int, int, int, int] | None:
        """``(col0, col1, row0, row1)`` of the pages changed by the last update, or None."""
        if self._changed is None or not len(self._changed):
            return None
        rows, cols = np.divmod(self._changed, self.row_pages)
        return int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1

    def zoom_to_change(self, margin: float = 1.0) -> bool:
        """Zoom the figure to the pages the last update changed, with ``margin`` x their extent
        around them (at least 64 pages by 8 rows); returns False when nothing changed."""
        region = self.changed_region()
        if region is None:
            return False
        col0, col1, row0, row1 = region
        dx = max((col1 - col0) * margin, 32.0)
        dy = max((row1 - row0) * margin, 4.0)
        x0, x1 = max(0.0, col0 - dx), min(float(self.row_pages), col1 + dx)
        y0, y1 = max(0.0, row0 - dy), min(float(self.rows), row1 + dy)
        self.figure.x_range.update(start=x0, end=x1)
        self.figure.y_range.update(start=y1, end=y0)
        self.zoom(x0, x1, y0, y1)
        return True

    def _window_cell(self) -> int:
        col0, col1, _, _ = self._window
        return min(self.overview_cell, _pow2_at_least((col1 - col0) / self.max_cols))

    def _legend_data(self) -> dict[str, list]:
        cats = palette.categories(self.view)
        total = max(1, int(self.counts.sum()))
        labels = [f"{c.name}: {format_size(int(n) * PAGE_SIZE)} ({100 * n / total:.1f}%)"
                  for c, n in zip(cats, self.counts, strict=True)]
        k = len(cats)
        return {"x": [np.nan] * k, "y": [np.nan] * k, "color": [c.color for c in cats],
                "label": labels, "name": [c.name for c in cats],
                "pages": [int(n) for n in self.counts]}

    @property
    def image(self) -> np.ndarray:
        """The uint8 category image currently in the source."""
        return self.source.data["image"][0]

    @property
    def max_cells(self) -> int:
        """The larger of the caps on columns and rows sent."""
        return max(self.max_cols, self.max_rows)

    @property
    def window(self) -> tuple[int, int, int, int]:
        return self._window or (0, self.row_pages, 0, self.rows)

    # --- the figure ---------------------------------------------------------------------------
    def _build_figure(self, width: int, height: int):
        fig = figure(frame_width=width, frame_height=height, title=self._title_text(),
                     x_range=Range1d(0, self.row_pages, bounds=(0, self.row_pages)),
                     y_range=Range1d(self.rows, 0, bounds=(0, self.rows)),
                     tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
                     toolbar_location="above", x_axis_label="offset in row",
                     y_axis_label="guest physical address")
        fig.grid.visible = False
        fig.background_fill_color = palette.categories(self.view)[_ABSENT[self.view]].color
        image = fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source,
                          color_mapper=self.color_mapper)
        fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.halo_source,
                  color_mapper=LinearColorMapper(palette=["rgba(0, 0, 0, 0)", palette.CHANGED_COLOR],
                                                 low=-0.5, high=1.5))
        self._blocks = ColumnDataSource(self._block_lines())
        fig.segment(x0="x0", y0="y0", x1="x1", y1="y1", source=self._blocks, line_color="#444444",
                    line_alpha=0.35, line_width=1)
        fig.scatter(x="x", y="y", color="color", marker="square", size=12,
                    legend_field="label", source=self.legend_source)
        fig.scatter(x=[np.nan], y=[np.nan], marker="square", size=11, fill_alpha=0, line_width=2,
                    line_color=palette.CHANGED_COLOR, legend_label="outline: changed by the last step")
        legend = fig.legend[0]
        legend.label_text_font_size = "9pt"
        legend.spacing = 0
        legend.padding = 4
        if self._legend_place == "below":  # no wider than the map: 2 columns of short labels
            legend.label_text_font_size = "8pt"
            legend.ncols = self._below_columns()
        fig.add_layout(legend, self._legend_place)
        self._add_axes(fig)
        self._add_hover(fig, image)
        return fig

    def _below_columns(self) -> int:
        """Legend columns under the map: 2 while the longest label fits half the map's width."""
        longest = max(len(label) for label in self.legend_source.data["label"])
        return 2 if longest * 6 + 24 <= self._width // 2 + 40 else 1

    def _add_axes(self, fig) -> None:
        for axis, scale in ((fig.yaxis[0], "source.data.row_pages[0]"), (fig.xaxis[0], "1")):
            axis.ticker = AdaptiveTicker(base=2, mantissas=[1], min_interval=1, num_minor_ticks=0,
                                         desired_num_ticks=max(3, self._width // 110))
            prefix = '"+" + ' if scale == "1" else ""
            axis.formatter = CustomJSTickFormatter(
                args={"source": self.source},
                code=_SIZE_JS + f"return {prefix}fmt(tick * {scale} * {PAGE_SIZE});")

    def _add_hover(self, fig, image_renderer) -> None:
        pfn = ("const d = source.data, R = d.row_pages[0], c = d.cell[0];"
               "const first = Math.floor(special_vars.y) * R + Math.floor(special_vars.x / c) * c;")
        pfn_hover = CustomJSHover(args={"source": self.source}, code=pfn + (
            "return c > 1 ? `${first}-${first + c - 1} (${c} pages)` : `${first}`;"))
        addr_hover = CustomJSHover(args={"source": self.source}, code=pfn + (
            f"return '0x' + (first * {PAGE_SIZE}).toString(16);"))
        cat_hover = CustomJSHover(args={"legend": self.legend_source},
                                  code="return legend.data.name[value] ?? String(value);")
        fig.add_tools(HoverTool(
            renderers=[image_renderer],
            tooltips=[("PFN", "$x{pfn}"), ("address", "$y{addr}"), ("shows", "@image{cat}")],
            formatters={"$x": pfn_hover, "$y": addr_hover, "@image": cat_hover}))

    def _block_lines(self) -> dict[str, list]:
        """Memory-block (128 MiB) boundaries, or multiples of them if there would be too many."""
        total = self.rows * self.row_pages
        step = PAGES_PER_MEMORY_BLOCK
        while total // step > MAX_GRIDLINES:
            step *= 2
        if step >= self.row_pages:  # boundaries fall between rows: horizontal lines
            ys = [float(y) for y in range(step // self.row_pages, self.rows,
                                          step // self.row_pages)]
            return {"x0": [0.0] * len(ys), "x1": [float(self.row_pages)] * len(ys), "y0": ys,
                    "y1": ys}
        xs = [float(x) for x in range(step, self.row_pages, step)]  # inside rows: vertical lines
        return {"x0": xs, "x1": xs, "y0": [0.0] * len(xs), "y1": [float(self.rows)] * len(xs)}

    def _title_text(self) -> str:
        if self._title:
            return self._title
        what = "guest page states" if self.view == "guest" else "host backing (RSS)"
        cell = getattr(self, "cell", self.overview_cell)
        if self._width < 480:  # a title no wider than the map
            return (f"{format_size(self.n_pages * PAGE_SIZE)} guest, {self.view} view; "
                    f"1 cell = {cell} page{'s' if cell > 1 else ''}")
        return (f"{format_size(self.n_pages * PAGE_SIZE)} guest, {what}; "
                f"1 cell = {cell} page{'s' if cell > 1 else ''} ({format_size(cell * PAGE_SIZE)})")

    # --- changes ------------------------------------------------------------------------------
    def update(self, snapshot: dict) -> None:
        """Show a new snapshot of the same (or another) guest, by changing the sources' data.

        Pages that changed are found in one pass; when they are few (at most 1/8 of the guest),
        only they are classified again and only the overview cells holding them are downsampled
        again, so a step of a 16 GiB guest costs milliseconds, not a full redraw."""
        state, flags = snapshot.get("state"), snapshot.get("flags")
        if state is None or flags is None:
            raise ValueError("a snapshot needs 'state' and 'flags' arrays (from vm.snapshot()), "
                             f"got keys {sorted(snapshot)}")
        state, flags = np.asarray(state), np.asarray(flags)
        if len(state) != self.n_pages:  # another guest: draw it from scratch, nothing "changed"
            old_rows, old_width = self.rows, self.row_pages
            self._load(snapshot)
            self._changed, self.last_moves, self.changed_pages = None, [], 0
            if (self.rows, self.row_pages) != (old_rows, old_width):
                self.figure.x_range.update(start=0, end=self.row_pages, bounds=(0, self.row_pages))
                self.figure.y_range.update(start=self.rows, end=0, bounds=(0, self.rows))
                self._blocks.data = self._block_lines()
            self._refresh()
            return
        self.t_ms = snapshot.get("t_ms")
        moved = np.flatnonzero((state != self._state) | (flags != self._flags))
        if len(moved) == 0:
            return  # no page changed: nothing to compute or send
        self.last_moves = transitions(self._state[moved], state[moved])
        self.changed_pages = len(moved)
        self._changed = moved
        if len(moved) * 8 > self.n_pages:
            self._load(snapshot)
        else:
            self._state[moved], self._flags[moved] = state[moved], flags[moved]
            self._reclassify(moved)
        self._refresh()

    def _reclassify(self, pages: np.ndarray) -> None:
        """Classify ``pages`` (flat indices) again and downsample the overview cells holding them."""
        cats = self._cats.reshape(-1)  # a view: assignments land in self._cats
        old = cats[pages]
        new = palette.classify(self._state[pages], self._flags[pages], self.view)
        k = len(self.counts)
        self.counts = self.counts + np.bincount(new, minlength=k) - np.bincount(old, minlength=k)
        cats[pages] = new
        cell = self.overview_cell
        ncols = self.row_pages // cell
        cells = np.unique(pages // cell)  # overview cells (rows of ncols cells) that changed
        r, c = np.divmod(cells, ncols)
        runs = self._cats.reshape(self.rows, ncols, cell)[r, c]
        self._overview[r, c] = downsample(runs, cell, self._weights)[:, 0]

    def set_view(self, view: str) -> None:
        """Switch between the "guest" and the "host" view (palette, legend and image)."""
        palette._check_view(view)
        if view == self.view:
            return
        self.view = view
        self._changed, self.changed_pages = None, 0  # a new view: no "changed since" outline
        k = len(palette.categories(view))
        self.color_mapper.update(palette=palette.colors(view), high=k - 0.5)
        self.figure.background_fill_color = palette.categories(view)[_ABSENT[view]].color
        self._classify()
        self._refresh()
        if self._legend_place == "below":
            self.figure.legend[0].ncols = self._below_columns()

    def zoom(self, x0: float, x1: float, y0: float, y1: float) -> None:
        """Re-render the window x in [x0, x1) pages of a row, y in [y0, y1) rows at the finest
        cell that keeps it within ``max_cols`` columns (one page per cell when close enough).
        This is what the figure's RangesUpdate (zoom, pan, reset) calls."""
        xa, xb = sorted((float(x0), float(x1)))
        ya, yb = sorted((float(y0), float(y1)))
        col0 = int(np.clip(np.floor(xa), 0, self.row_pages - 1))
        col1 = int(np.clip(np.ceil(xb), col0 + 1, self.row_pages))
        row0 = int(np.clip(np.floor(ya), 0, self.rows - 1))
        row1 = int(np.clip(np.ceil(yb), row0 + 1, self.rows))
        visible = (col0, col1, row0, row1)
        span, rspan = col1 - col0, row1 - row0  # send a margin of half a span each side, to pan
        col0, col1 = max(0, col0 - span // 2), min(self.row_pages, col1 + span // 2)
        row0, row1 = max(0, row0 - rspan // 2), min(self.rows, row1 + rspan // 2)
        cell = min(self.overview_cell, _pow2_at_least((col1 - col0) / self.max_cols))
        if cell >= self.overview_cell:
            window = None
        elif self._window is not None and cell == self.cell and _inside(visible, self._window):
            return  # a small pan within what was sent: the browser already has it
        else:
            window = (col0 // cell * cell, -(-col1 // cell) * cell, row0, row1)
        if window != self._window:
            self._window = window
            self._refresh()

    def reset_zoom(self) -> None:
        self._window = None
        self._refresh()

    def _on_ranges_update(self, event: RangesUpdate) -> None:
        if None in (event.x0, event.x1, event.y0, event.y1):
            return
        self.zoom(event.x0, event.x1, event.y0, event.y1)

    def _refresh(self) -> None:
        """Send the new image and outline: nothing if unchanged, a patch of the changed rectangle
        if it is small, else the whole data."""
        new = self._render_data()
        legend = self._legend_data()
        if legend["label"] != self.legend_source.data["label"] or (
                legend["color"] != self.legend_source.data["color"]):
            self.legend_source.data = legend
        self.figure.title.text = self._title_text()
        halo = self._halo_data(new)
        _send(self.source, new)
        _send(self.halo_source, halo)

    # --- display ------------------------------------------------------------------------------
    def _root(self):
        return self.figure

    def __repr__(self) -> str:
        return (f"<PageMap {self.view} view, {self.n_pages} pages, {self.rows}x{self.row_pages} "
                f"grid, cell {self.cell}>")


def _send(source: ColumnDataSource, new: dict) -> None:
    """Give ``source`` the image data ``new``: nothing if the same, a patch of the changed
    rectangle if it is small, else the whole data."""
    old = source.data
    placement = ("x", "y", "dw", "dh", "cell", "row_pages")
    same_place = all(list(old[key]) == new[key] for key in placement)
    old_image, image = old["image"][0], new["image"][0]
    if not same_place or old_image.shape != image.shape:
        source.data = new
        return
    changed = old_image != image
    if not changed.any():
        return
    rows = np.flatnonzero(changed.any(axis=1))
    cols = np.flatnonzero(changed.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (r1 - r0) * (c1 - c0) * 4 > image.size:
        source.data = new
        return
    source.patch({"image": [((0, slice(r0, r1), slice(c0, c1)), image[r0:r1, c0:c1].ravel())]})


def page_map(snapshot: dict, view: str = "guest", width: int = 512, height: int = 512,
             max_cells: int | None = None, title: str | None = None, legend: str = "right") -> PageMap:
    """A :class:`PageMap` of ``snapshot`` (``vm.snapshot()``: ``state`` and ``flags`` arrays).

    ``view`` is "guest" (page states) or "host" (what QEMU's RSS is made of).

    >>> import labkit
    >>> with labkit.open(memory="1G", seed=0) as vm:
    ...     pm = page_map(vm.snapshot(), view="host")
    >>> int(pm.counts.sum()) == 1 << 18
    True
    """
    return PageMap(snapshot, view=view, width=width, height=height, max_cells=max_cells,
                   title=title, legend=legend)
