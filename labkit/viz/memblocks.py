"""virtio-mem, drawn: memory blocks and subblocks as a grid, and requested vs plugged size over time.

**The grid** (:class:`MemoryBlockGrid`): one row per 128 MiB Linux memory block of each device's
region, one cell per 2 MiB subblock (64 a row, Sub Block Mode; §5.3), or one cell
spanning the row per big block (Big Block Mode). A cell's colour says what the driver and the guest
kernel hold there: unplugged (inside or outside the usable region, §5.2); plugged but the block not
added yet; plugged in an added but offline block; online in ZONE_MOVABLE or ZONE_NORMAL; and
**busy**: an online subblock holding unmovable pages (slab, page tables, the memmap of later blocks:
``PageState.KERNEL``), where ``alloc_contig_range`` fails and unplug returns -EBUSY (§5.5). It is
computed with numpy from ``vm.inspect("virtio-mem")``: the driver's subblock bitmap, the blocks
added and online, and the units holding unmovable pages (a loop over devices and over online
blocks, never over pages).

:meth:`MemoryBlockGrid.update` outlines the cells whose category changed since the last update
(magenta rectangles around them, as on the page map) and names the moves in ``last_moves``, in
cells: "3 cells plugged, online ZONE_MOVABLE → unplugged" is three 2 MiB subblocks unplugged.

**The timeline** (:class:`ResizeTimeline`, in :mod:`labkit.viz.memtimeline`): requested and plugged
size (and MemTotal) from ``vm.sample()`` rows, with a marker for every driver work run that failed
(-EBUSY, -ETXTBSY, -ENOMEM, -ENOSPC) and the retry timer each failure armed: 50 s, then 100 s,
200 s, 300 s (§5.6).

:func:`explore_virtio_mem` puts both in a widget with a requested-size slider, Step (until the next
driver event), Play / Pause and Reset; it lives in :mod:`labkit.viz.memblocks_explorer`.

>>> import labkit
>>> vm = labkit.open(memory="1G", memhp_default_state="online_movable",
...                  virtio_mem=[{"id": "vm0", "size": "1G"}])
>>> _ = vm.qmp("qom-set", path="vm0", property="requested-size", value=200 << 20)
>>> vm.advance(100)
>>> grid = MemoryBlockGrid(vm)
>>> grid.image.shape                       # 8 memory blocks of 64 subblocks
(8, 64)
>>> int((grid.image == MOVABLE).sum())     # 100 subblocks of 2 MiB plugged and online
100
>>> vm.close()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from bokeh.models import ColumnDataSource, CustomJSHover, HoverTool, LinearColorMapper, Range1d
from bokeh.plotting import figure

from labkit.model.pages import PAGES_PER_MEMORY_BLOCK
from labkit.units import MiB, PAGE_SIZE, format_size
from labkit.viz.changes import add_outline, box_cover, outline_data, transitions
from labkit.viz.memtimeline import RETRY_ERRORS, ResizeTimeline, retry_schedule
from labkit.viz.palette import Category
from labkit.viz.shown import Shown

UNPLUGGED, NOT_USABLE, NOT_ADDED, OFFLINE, MOVABLE, NORMAL, BUSY = range(7)
BLOCK_CATEGORIES: tuple[Category, ...] = (  # Okabe-Ito colours; greys for "no memory here"
    Category("unplugged", "#D4D4D4", 1),
    Category("unplugged, outside the usable region", "#F4F4F4", 1),
    Category("plugged, block not added yet", "#F0E442", 1),
    Category("plugged, block added but offline", "#E69F00", 1),
    Category("plugged, online ZONE_MOVABLE", "#56B4E9", 1),
    Category("plugged, online ZONE_NORMAL", "#0072B2", 1),
    Category("busy: unmovable pages inside (unplug -EBUSY)", "#D55E00", 1),
)
DEFAULT_MAX_BLOCKS = 256  # rows drawn per device: 32 GiB of a region
NO_DEVICE = ("this VM has no virtio-mem device: open it with virtio_mem=[{'id': 'vm0', 'size': '4G'}] "
             "(and a memhp_default_state)")


def virtio_mem_view(vm: Any) -> Any:
    """``vm.inspect("virtio-mem")`` (:class:`labkit.backends.inspect.VirtioMemView`), or a
    ``ValueError`` saying how to open a VM with the device."""
    try:
        view = vm.inspect("virtio-mem")
    except ValueError:
        view = None
    if view is None or not view.devices:
        raise ValueError(NO_DEVICE)
    return view


@dataclass
class BlockGrid:
    """The grid's data: ``image`` (uint8 categories, rows x ``cols``) and, per row, its device
    index, memory block number, guest address and units (subblocks, or 1 big block) per row."""

    image: np.ndarray
    device: np.ndarray
    block: np.ndarray
    addr: np.ndarray
    units: np.ndarray
    devices: list[str]

    @property
    def counts(self) -> np.ndarray:
        """Cells per category, each cell weighted by its share of a row (bytes = x 128 MiB)."""
        width = self.image.shape[1]
        return np.bincount(self.image.ravel(), minlength=len(BLOCK_CATEGORIES)) / width


def block_grid(vm: Any, max_blocks: int = DEFAULT_MAX_BLOCKS, view: Any = None) -> BlockGrid:
    """Compute the grid of every virtio-mem device of ``vm`` (the first ``max_blocks`` memory
    blocks of each region). See the module docstring for the categories. ``view``: a
    ``vm.inspect("virtio-mem")`` taken now (a caller redrawing several views takes one)."""
    if not isinstance(max_blocks, int) or isinstance(max_blocks, bool) or max_blocks < 1:
        raise ValueError(f"max_blocks must be an int >= 1, got {max_blocks!r}")
    view = virtio_mem_view(vm) if view is None else view
    if any(d.plugged_units is None for d in view.devices):
        raise ValueError("the block grid draws the driver's subblock bitmap, which this backend does not "
                         "report (a live guest shows requested and plugged size: vm.qmp('qom-get', ...))")
    cols = max(1 if d.big_block_mode else d.units_per_block for d in view.devices)
    added_blocks = np.asarray(view.added_blocks, dtype=np.int64)
    parts, rows = [], {"device": [], "block": [], "addr": [], "units": []}
    for i, dev in enumerate(view.devices):
        n_mb = min(dev.blocks, max_blocks)
        upm = 1 if dev.big_block_mode else dev.units_per_block
        if dev.big_block_mode:  # a big block may span several memory blocks, unplugged whole
            plugged = np.repeat(dev.plugged_units, dev.blocks_per_unit)[:n_mb, None]
            busy = np.repeat(dev.unmovable_units, dev.blocks_per_unit)[:n_mb, None]
        else:
            plugged = dev.plugged_units[:n_mb * upm].reshape(n_mb, upm)
            busy = dev.unmovable_units[:n_mb * upm].reshape(n_mb, upm)
        unit_bytes = PAGES_PER_MEMORY_BLOCK * PAGE_SIZE // upm
        usable = (np.arange(n_mb * upm) < dev.usable_region_size // unit_bytes)
        blocks = dev.first_block + np.arange(n_mb)
        zone = np.full(n_mb, OFFLINE, dtype=np.uint8)
        for block, name in view.online_blocks.items():  # a loop over online blocks
            if dev.first_block <= block < dev.first_block + n_mb:
                zone[block - dev.first_block] = MOVABLE if name == "Movable" else NORMAL
        added = np.isin(blocks, added_blocks)
        plugged_code = np.where(added, zone, NOT_ADDED)[:, None]
        codes = np.where(usable.reshape(n_mb, upm), UNPLUGGED, NOT_USABLE).astype(np.uint8)
        codes = np.where(plugged, plugged_code, codes).astype(np.uint8)
        # unmovable pages count only in online blocks (the view's units are False elsewhere)
        codes = np.where(busy & plugged & (zone != OFFLINE)[:, None], BUSY, codes).astype(np.uint8)
        parts.append(np.repeat(codes, cols // upm, axis=1))
        rows["device"].append(np.full(n_mb, i))
        rows["block"].append(blocks)
        rows["addr"].append(dev.memaddr + np.arange(n_mb) * PAGES_PER_MEMORY_BLOCK * PAGE_SIZE)
        rows["units"].append(np.full(n_mb, upm))
    return BlockGrid(np.concatenate(parts), *(np.concatenate(v) for v in rows.values()),
                     devices=[d.id for d in view.devices])


def _patch_image(source: ColumnDataSource, image: np.ndarray) -> None:
    """Send a new image: nothing if unchanged, a patch of the changed rows if few, else all."""
    old = source.data["image"][0]
    if old.shape != image.shape:
        source.data = dict(source.data, image=[image])
        return
    rows = np.flatnonzero((old != image).any(axis=1))
    if len(rows) == 0:
        return
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    if (r1 - r0) * 4 > len(image):
        source.data = dict(source.data, image=[image])
        return
    source.patch({"image": [((0, slice(r0, r1), slice(0, image.shape[1])), image[r0:r1].ravel())]})


class MemoryBlockGrid(Shown):
    """A Bokeh grid of the memory blocks of ``vm``'s virtio-mem devices; :meth:`update` redraws it
    from the VM by patching the image source (see the module docstring).

    Attributes: ``figure``, ``source`` (the image), ``legend_source`` (sizes per category),
    ``rows_source`` (per-row labels for the hover), ``grid`` (the last :class:`BlockGrid`).
    """

    def __init__(self, vm: Any, max_blocks: int = DEFAULT_MAX_BLOCKS, cell_px: int = 8,
                 title: str | None = None, legend: str = "right"):
        if legend not in ("right", "below"):
            raise ValueError(f"legend must be 'right' or 'below', got {legend!r}")
        self.max_blocks = max_blocks
        self._title = title
        self.grid = block_grid(vm, max_blocks)
        self.last_moves: list[tuple[str, str, int]] = []
        self.changed_cells = 0
        n_rows, cols = self.grid.image.shape
        self.source = ColumnDataSource({"image": [self.grid.image], "x": [0], "y": [0],
                                        "dw": [cols], "dh": [n_rows]})
        self.outline_source = ColumnDataSource(outline_data(np.zeros((0, 4))))
        self.rows_source = ColumnDataSource(self._rows_data())
        self.legend_source = ColumnDataSource(self._legend_data())
        k = len(BLOCK_CATEGORIES)
        mapper = LinearColorMapper(palette=[c.color for c in BLOCK_CATEGORIES], low=-0.5,
                                   high=k - 0.5)
        self._frame = (max(256, cols * cell_px), int(np.clip(n_rows * cell_px, 96, 512)))
        fig = figure(frame_width=self._frame[0], title=self._title_text(), frame_height=self._frame[1],
                     x_range=Range1d(0, cols, bounds=(0, cols)),
                     y_range=Range1d(n_rows, 0, bounds=(0, n_rows)),
                     tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above",
                     x_axis_label="subblock (2 MiB each)" if cols > 1 else "big block",
                     y_axis_label="memory block (128 MiB)")
        fig.grid.visible = False
        image = fig.image(image="image", x="x", y="y", dw="dw", dh="dh", source=self.source,
                          color_mapper=mapper)
        self._add_lines(fig, n_rows, cols)
        add_outline(fig, self.outline_source)
        fig.scatter(x="x", y="y", color="color", marker="square", size=12, legend_field="label",
                    source=self.legend_source)
        fig.legend[0].label_text_font_size = "9pt"
        fig.legend[0].spacing = 0
        if legend == "below":  # one column, no wider than the grid: two grids fit side by side
            fig.legend[0].label_text_font_size = "8pt"
        fig.add_layout(fig.legend[0], legend)
        row_js = ("const r = Math.min(Math.max(Math.floor(special_vars.y), 0), "
                  "rows.data.label.length - 1); const d = rows.data;")
        where = CustomJSHover(args={"rows": self.rows_source}, code=row_js + (
            f"const u = d.units[r], s = Math.floor(special_vars.x / ({cols} / u));"
            "return u > 1 ? `${d.label[r]}, subblock ${s}` : d.label[r];"))
        shows = CustomJSHover(args={"legend": self.legend_source},
                              code="return legend.data.name[value] ?? String(value);")
        fig.add_tools(HoverTool(renderers=[image], tooltips=[("block", "$x{where}"),
                                                             ("shows", "@image{shows}")],
                                formatters={"$x": where, "@image": shows}))
        self.figure = self.layout = fig

    def _add_lines(self, fig, n_rows: int, cols: int) -> None:
        """Thin lines between rows and every 8 subblocks; a dark one between devices."""
        ys = [float(y) for y in range(1, n_rows)] if n_rows <= 128 else []
        xs = [float(x) for x in range(8, cols, 8)]
        fig.segment(x0=[0.0] * len(ys) + xs, x1=[float(cols)] * len(ys) + xs,
                    y0=ys + [0.0] * len(xs), y1=ys + [float(n_rows)] * len(xs),
                    line_color="#FFFFFF", line_width=1, line_alpha=0.8)
        starts = np.flatnonzero(np.diff(self.grid.device)) + 1.0
        fig.segment(x0=0.0, x1=float(cols), y0=starts, y1=starts, line_color="#000000", line_width=2)

    def _rows_data(self) -> dict[str, list]:
        g = self.grid
        label = [f"{g.devices[d]} block {b} (0x{a:x})" for d, b, a in zip(g.device, g.block, g.addr,
                                                                             strict=True)]
        return {"label": label, "units": [int(u) for u in g.units]}

    def _legend_data(self) -> dict[str, list]:
        counts = self.grid.counts
        labels = [f"{c.name}: {format_size(int(round(n * 128)) * MiB)}"
                  for c, n in zip(BLOCK_CATEGORIES, counts, strict=True)]
        k = len(BLOCK_CATEGORIES)
        return {"x": [np.nan] * k, "y": [np.nan] * k, "color": [c.color for c in BLOCK_CATEGORIES],
                "label": labels, "name": [c.name for c in BLOCK_CATEGORIES]}

    def _title_text(self) -> str:
        if self._title:
            return self._title
        g = self.grid
        plugged = (g.counts[[NOT_ADDED, OFFLINE, MOVABLE, NORMAL, BUSY]].sum()) * 128 * MiB
        return f"virtio-mem {', '.join(g.devices)}: {format_size(int(round(plugged)))} plugged"

    @property
    def image(self) -> np.ndarray:
        """The uint8 category image currently in the source."""
        return self.source.data["image"][0]

    def update(self, vm: Any, view: Any = None) -> None:
        """Recompute from ``vm`` (or its ``view``, see :func:`block_grid`) and send only what
        changed (a patch of the changed rows); outline the cells whose category changed and name
        their moves in ``last_moves`` (in cells)."""
        old = self.grid.image
        self.grid = block_grid(vm, self.max_blocks, view)
        new = self.grid.image
        changed = (old != new) if old.shape == new.shape else np.zeros(new.shape, dtype=bool)
        self.changed_cells = int(changed.sum())
        self.last_moves = transitions(old[changed], new[changed], [c.name for c in BLOCK_CATEGORIES]) \
            if old.shape == new.shape else []
        rows, cols = new.shape
        boxes = box_cover(changed)
        outline = outline_data(boxes, pad_x=1.5 * cols / self._frame[0], pad_y=1.5 * rows / self._frame[1])
        if outline != self.outline_source.data:
            self.outline_source.data = outline
        _patch_image(self.source, new)
        legend = self._legend_data()
        if legend["label"] != self.legend_source.data["label"]:
            self.legend_source.data = legend
        rows = self._rows_data()
        if rows != self.rows_source.data:
            self.rows_source.data = rows
        self.figure.title.text = self._title_text()

    @property
    def outline_boxes(self) -> np.ndarray:
        """``(n, 4)`` rectangles ``(x0, x1, y0, y1)`` the outline draws now (cells, rows)."""
        d = self.outline_source.data
        return np.array([d["left"], d["right"], d["top"], d["bottom"]], dtype=float).T.reshape(-1, 4)

    def __repr__(self) -> str:
        return f"<MemoryBlockGrid {self.image.shape[0]} blocks x {self.image.shape[1]} cells>"


__all__ = ["BLOCK_CATEGORIES", "BlockGrid", "MemoryBlockGrid", "RETRY_ERRORS", "ResizeTimeline", "block_grid",
           "retry_schedule"]


