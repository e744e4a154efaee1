"""The page map: every guest page as one coloured cell, millions of them, live, in a Bokeh figure.

The picture itself (grid layout, classification, downsampling, what changed) is a
:class:`labkit.viz.pagegrid.PageGrid`; this module draws it. The figure is a Bokeh ``image`` of
uint8 categories under a ``LinearColorMapper`` (one colour per integer); :meth:`PageMap.update` and
zooming only change ``ColumnDataSource`` data (a patch of the changed rectangle when it is small),
never the figure. ``max_rows`` x ``max_cols`` defaults to the plot's own size in screen pixels (at
most 1024²): what is sent stays small, and the browser never has to shrink the image (its
nearest-neighbour resampling would drop exactly the rare pixels the downsampling keeps).

What changed is marked: :meth:`PageMap.update` compares the new snapshot with the one shown, and a
layer of magenta rectangle *outlines* (a quad glyph with no fill, a 2-pixel stroke drawn just
outside the cells) surrounds every drawn cell in which at least one page changed (a cell standing
for many pages is "changed" if any of its pages is), so a 1 MiB step is visible on a 16 GiB map and
the new colours inside stay visible. ``last_moves`` says what moved
(:func:`labkit.viz.changes.transitions`), and :meth:`PageMap.zoom_to_change` zooms to it.

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
>>> len(pm.outline_source.data["left"])   # one rectangle outlines the 256 changed pages
1
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

from labkit.model.pages import PAGES_PER_MEMORY_BLOCK
from labkit.units import PAGE_SIZE, format_size
from labkit.viz import palette
from labkit.viz.changes import add_outline, outline_data
from labkit.viz.pagegrid import ABSENT, MAX_CELLS, PageGrid, grid_width, inside, zone_key, zone_lines
from labkit.viz.shown import Shown

MAX_GRIDLINES = 64
OUTLINE_PAD_PX = 1.5  # the outline's stroke runs this far outside the changed cells

# page index -> physical frame: P is the flat list of the snapshot's "phys" runs (first index, end
# index, first frame), an index past the last run of its row counts from the run that ends there
_PHYS_JS = """
function phys(i) {
  for (let k = 0; k + 2 < P.length; k += 3) if (i >= P[k] && i < P[k + 1]) return P[k + 2] + i - P[k];
  for (let k = 0; k + 2 < P.length; k += 3) if (i === P[k + 1]) return P[k + 2] + i - P[k];
  return i;
}
"""
_SIZE_JS = """
function fmt(b) {
  const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [u, s] of units) {
    if (Math.abs(b) >= s) { const v = b / s; return (Number.isInteger(v) ? v : v.toFixed(1)) + " " + u; }
  }
  return b + " B";
}
"""

__all__ = ["MAX_CELLS", "PageMap", "grid_width", "page_map"]


def _flat_runs(snapshot: dict) -> list[int]:
    """The snapshot's ``phys`` runs as one flat list for the JavaScript (none: index = frame)."""
    return [int(x) for run in snapshot.get("phys", ()) for x in run]


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
        for name, value in (("width", width), ("height", height), ("max_cells", max_cells)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 16 <= value <= 4096):
                raise ValueError(f"{name} must be an int from 16 to 4096 (pixels), got {value!r}")
        self._legend_place = legend
        self._width, self._height = width, height
        self._title = title
        self._bokeh_model = None
        self.grid = PageGrid(snapshot, view=view,
                             max_cols=min(MAX_CELLS, width) if max_cells is None else max_cells,
                             max_rows=min(MAX_CELLS, height) if max_cells is None else max_cells)
        self._visible = self._full_range()
        self._snapshot_zones = snapshot.get("zones", ())
        self._phys = _flat_runs(snapshot)
        k = len(palette.categories(view))
        self.color_mapper = LinearColorMapper(palette=palette.colors(view), low=-0.5, high=k - 0.5)
        data = self.grid.render()
        self.cell = data["cell"][0]
        self.source = ColumnDataSource(data)
        self.outline_source = ColumnDataSource(self._outline_data(data))
        self.legend_source = ColumnDataSource(self._legend_data())
        self.figure = self._build_figure(width, height)
        self.figure.on_event(RangesUpdate, self._on_ranges_update)

    # --- what the grid knows --------------------------------------------------------------------
    view = property(lambda self: self.grid.view)
    n_pages = property(lambda self: self.grid.n_pages)
    row_pages = property(lambda self: self.grid.row_pages)
    rows = property(lambda self: self.grid.rows)
    overview_cell = property(lambda self: self.grid.overview_cell)
    counts = property(lambda self: self.grid.counts)
    last_moves = property(lambda self: self.grid.last_moves)
    changed_pages = property(lambda self: self.grid.changed_pages)
    max_cols = property(lambda self: self.grid.max_cols)
    max_rows = property(lambda self: self.grid.max_rows)
    t_ms = property(lambda self: self.grid.t_ms)

    @property
    def max_cells(self) -> int:
        """The larger of the caps on columns and rows sent."""
        return max(self.max_cols, self.max_rows)

    @property
    def window(self) -> tuple[int, int, int, int]:
        """``(col0, col1, row0, row1)`` of what is drawn."""
        return self.grid.window or (0, self.row_pages, 0, self.rows)

    @property
    def image(self) -> np.ndarray:
        """The uint8 category image currently in the source."""
        return self.source.data["image"][0]

    @property
    def outline_boxes(self) -> np.ndarray:
        """``(n, 4)`` rectangles ``(x0, x1, y0, y1)`` the outline draws now (pages of a row, rows)."""
        d = self.outline_source.data
        return np.array([d["left"], d["right"], d["top"], d["bottom"]], dtype=float).T.reshape(-1, 4)

    def changed_region(self) -> tuple[int, int, int, int] | None:
        """``(col0, col1, row0, row1)`` of the pages changed by the last update, or None."""
        return self.grid.changed_region()

    def _full_range(self) -> tuple[float, float, float, float]:
        return 0.0, float(self.row_pages), 0.0, float(self.rows)

    def _outline_data(self, data: dict) -> dict[str, list]:
        """Rectangles around the changed cells of ``data``, grown by OUTLINE_PAD_PX screen pixels
        (at the visible range's scale) so that the stroke surrounds the cells."""
        x0, x1, y0, y1 = self._visible
        pad_x = OUTLINE_PAD_PX * (x1 - x0) / self._width
        pad_y = OUTLINE_PAD_PX * (y1 - y0) / self._height
        return outline_data(self.grid.changed_boxes(data), pad_x, pad_y)

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

    def _legend_data(self) -> dict[str, list]:
        cats = palette.categories(self.view)
        total = max(1, int(self.counts.sum()))
        labels = [f"{c.name}: {format_size(int(n) * PAGE_SIZE)} ({100 * n / total:.1f}%)"
                  for c, n in zip(cats, self.counts, strict=True)]
        k = len(cats)
        return {"x": [np.nan] * k, "y": [np.nan] * k, "color": [c.color for c in cats],
                "label": labels, "name": [c.name for c in cats],
                "pages": [int(n) for n in self.counts]}

    # --- the figure ---------------------------------------------------------------------------
    def _build_figure(self, width: int, height: int):
        fig = figure(frame_width=width, frame_height=height, title=self._title_text(),
                     x_range=Range1d(0, self.row_pages, bounds=(0, self.row_pages)),
                     y_range=Range1d(self.rows, 0, bounds=(0, self.rows)),
                     tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
                     toolbar_location="above", x_axis_label="offset in row",
                     y_axis_label=self._y_label())
        fig.grid.visible = False
        fig.background_fill_color = palette.categories(self.view)[ABSENT[self.view]].color
        image = fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source,
                          color_mapper=self.color_mapper)
        self._blocks = ColumnDataSource(self._block_lines())
        fig.segment(x0="x0", y0="y0", x1="x1", y1="y1", source=self._blocks, line_color="#444444",
                    line_alpha=0.35, line_width=1)
        self._zones_drawn = zone_key(self._snapshot_zones)
        lines, labels = zone_lines(self._snapshot_zones, self.row_pages)
        self.zone_source, self.zone_label_source = ColumnDataSource(lines), ColumnDataSource(labels)
        fig.segment(x0="x0", y0="y0", x1="x1", y1="y1", source=self.zone_source, line_color="#000000",
                    line_width=1.5, line_dash="dashed", legend_label="zone boundary (DMA | DMA32 | ...)")
        fig.text(x="x", y="y", text="text", source=self.zone_label_source, text_font_size="8pt",
                 text_baseline="top", text_color="#000000", x_offset=2, y_offset=1)
        add_outline(fig, self.outline_source)  # above the block lines: nothing hides it
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

    def _y_label(self) -> str:
        """"guest physical address", saying so when the map leaves a hole out (q35's PCI hole
        below 4 GiB, the gap before a device region): the labels jump there."""
        p = self._phys
        gaps = any(p[k + 3] - p[k] != p[k + 5] - p[k + 2] for k in range(0, len(p) - 3, 3))
        return "guest physical address (holes left out)" if gaps else "guest physical address"

    def _add_axes(self, fig) -> None:
        for axis, scale in ((fig.yaxis[0], "source.data.row_pages[0]"), (fig.xaxis[0], "1")):
            axis.ticker = AdaptiveTicker(base=2, mantissas=[1], min_interval=1, num_minor_ticks=0,
                                         desired_num_ticks=max(3, self._width // 110))
            code = (f'return "+" + fmt(tick * {PAGE_SIZE});' if scale == "1" else
                    f"return fmt(phys(tick * {scale}) * {PAGE_SIZE});")
            axis.formatter = CustomJSTickFormatter(args={"source": self.source, "P": self._phys},
                                                   code=_SIZE_JS + _PHYS_JS + code)
        self._y_formatter = fig.yaxis[0].formatter

    def _add_hover(self, fig, image_renderer) -> None:
        pfn = ("const d = source.data, R = d.row_pages[0], c = d.cell[0];"
               "const first = Math.floor(special_vars.y) * R + Math.floor(special_vars.x / c) * c;")
        pfn_hover = CustomJSHover(args={"source": self.source}, code=pfn + (
            "return c > 1 ? `${first}-${first + c - 1} (${c} pages)` : `${first}`;"))
        addr_hover = CustomJSHover(args={"source": self.source, "P": self._phys}, code=_PHYS_JS + pfn + (
            f"return '0x' + (phys(first) * {PAGE_SIZE}).toString(16);"))
        self._addr_hover = addr_hover
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
        again, so a step of a 16 GiB guest costs milliseconds, not a full redraw. Nothing is
        sent when no page changed (the outline of the last change stays)."""
        old_shape = (self.rows, self.row_pages)
        phys = _flat_runs(snapshot)
        if phys != self._phys:  # another guest
            self._phys = phys
            for model in (self._y_formatter, self._addr_hover):
                model.args = dict(model.args, P=phys)
            self.figure.yaxis[0].axis_label = self._y_label()
        zones = snapshot.get("zones", ())
        if zone_key(zones) != self._zones_drawn or (self.rows, self.row_pages) != old_shape:
            self._snapshot_zones = zones
        if not self.grid.update(snapshot):
            self._draw_zones()
            return
        if (self.rows, self.row_pages) != old_shape:  # another guest: a new grid
            self.figure.x_range.update(start=0, end=self.row_pages, bounds=(0, self.row_pages))
            self.figure.y_range.update(start=self.rows, end=0, bounds=(0, self.rows))
            self._blocks.data = self._block_lines()
            self._visible = self._full_range()
            self._zones_drawn = None
        self._draw_zones()
        self._refresh()

    def _draw_zones(self) -> None:
        """Redraw the zone boundaries when the zones moved (memory onlined into ZONE_MOVABLE)."""
        key = zone_key(self._snapshot_zones)
        if key != self._zones_drawn:
            self._zones_drawn = key
            lines, labels = zone_lines(self._snapshot_zones, self.row_pages)
            self.zone_source.data, self.zone_label_source.data = lines, labels

    def set_view(self, view: str) -> None:
        """Switch between the "guest" and the "host" view (palette, legend and image)."""
        palette._check_view(view)
        if view == self.view:
            return
        self.grid.set_view(view)
        k = len(palette.categories(view))
        self.color_mapper.update(palette=palette.colors(view), high=k - 0.5)
        self.figure.background_fill_color = palette.categories(view)[ABSENT[view]].color
        self._refresh()
        if self._legend_place == "below":
            self.figure.legend[0].ncols = self._below_columns()

    def zoom(self, x0: float, x1: float, y0: float, y1: float) -> None:
        """Re-render the window x in [x0, x1) pages of a row, y in [y0, y1) rows at the finest
        cell that keeps it within ``max_cols`` columns (one page per cell when close enough).
        This is what the figure's RangesUpdate (zoom, pan, reset) calls."""
        window, visible = self.grid.window_for(x0, x1, y0, y1)
        self._visible = tuple(sorted((float(x0), float(x1)))) + tuple(sorted((float(y0), float(y1))))
        current = self.grid.window
        if window is not None and current is not None and self.grid.cell_of(window) == self.cell \
                and inside(visible, current):
            self._send_outline()  # a small pan within what was sent: the image is there already
            return
        if window != current:
            self.grid.window = window
            self._refresh()
        else:
            self._send_outline()

    def reset_zoom(self) -> None:
        self.grid.window = None
        self._visible = self._full_range()
        self._refresh()

    def _on_ranges_update(self, event: RangesUpdate) -> None:
        if None in (event.x0, event.x1, event.y0, event.y1):
            return
        self.zoom(event.x0, event.x1, event.y0, event.y1)

    def _send_outline(self) -> None:
        new = self._outline_data(self.source.data)
        if new != self.outline_source.data:
            self.outline_source.data = new

    def _refresh(self) -> None:
        """Send what changed: the image (nothing if unchanged, a patch of the changed rectangle if
        it is small, else the whole data), the outline, the legend and the title."""
        new = self.grid.render()
        self.cell = new["cell"][0]
        legend = self._legend_data()
        if legend["label"] != self.legend_source.data["label"] or (
                legend["color"] != self.legend_source.data["color"]):
            self.legend_source.data = legend
        title = self._title_text()
        if title != self.figure.title.text:
            self.figure.title.text = title
        send_image(self.source, new)
        self._send_outline()

    # --- display ------------------------------------------------------------------------------
    def _root(self):
        return self.figure

    def __repr__(self) -> str:
        return (f"<PageMap {self.view} view, {self.n_pages} pages, {self.rows}x{self.row_pages} "
                f"grid, cell {self.cell}>")


def send_image(source: ColumnDataSource, new: dict) -> None:
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
