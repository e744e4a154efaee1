"""The picture of a page map, in numpy: every guest page's category on a grid, downsampled to what is
drawn, and which drawn cells the last update changed. :class:`labkit.viz.pagemap.PageMap` puts it in
a Bokeh figure; this module knows nothing of Bokeh.

Layout: pages run row-major over a grid ``row_pages`` wide, a power of two (at least a pageblock,
512 pages), so every row starts on a buddy-block boundary and blocks of up to ``row_pages`` pages
never wrap. Rows are chosen so the grid is about square and never more than ``max_rows``.
Each drawn cell covers ``cell`` consecutive, aligned pages (a power of two): the overview uses the
smallest cell that fits ``max_cols`` columns; a zoom window is drawn at a finer cell, down to one
page per cell.

Downsampling keeps rare states visible: a cell shows the category with the largest
``pages x importance`` (:func:`labkit.viz.palette.downsample`), so one balloon page among hundreds
of free ones still colours its pixel. An update finds the pages that changed in one pass; when they
are few only they are classified again and only their overview cells downsampled again. A drawn
cell is "changed" when any of its pages changed, so a one-page change survives any downsampling.

>>> import numpy as np
>>> from labkit.model.pages import PageState
>>> snap = {"state": np.zeros(1 << 18, dtype=np.uint8), "flags": np.zeros(1 << 18, dtype=np.uint8)}
>>> grid = PageGrid(snap, max_cols=128, max_rows=128)   # 128 rows of 2048 pages
>>> grid.row_pages, grid.rows, grid.overview_cell
(2048, 128, 16)
>>> snap["state"][5000:5256] = PageState.BALLOON
>>> grid.update(snap)
True
>>> grid.last_moves, grid.changed_region()
([('free', 'balloon', 256)], (904, 1160, 2, 3))
>>> data = grid.render()
>>> boxes = grid.changed_boxes(data)            # (col0, col1, row0, row1) in pages and rows
>>> boxes.tolist()
[[896, 1168, 2, 3]]
"""

from __future__ import annotations

import numpy as np

from labkit.model.pages import PAGEBLOCK_ORDER
from labkit.viz import palette
from labkit.viz.changes import box_cover, transitions
from labkit.viz.palette import downsample

MAX_CELLS = 1024  # per axis: browser repaint of 1024² uint8 cells is ~0.35 s on 2 cores
MIN_ROW_PAGES = 1 << PAGEBLOCK_ORDER
ABSENT = {"guest": palette.G_ABSENT, "host": palette.H_ABSENT}


def pow2_at_least(x: float) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(x, 1.0)))))


def grid_width(n_pages: int, max_rows: int = MAX_CELLS) -> int:
    """Pages per row: a power of two, about sqrt(n_pages), at least 512, giving <= max_rows rows."""
    return max(MIN_ROW_PAGES, pow2_at_least(np.sqrt(n_pages)), pow2_at_least(n_pages / max_rows))


def inside(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and (
        inner[3] <= outer[3])


def _arrays(snapshot: dict) -> tuple[np.ndarray, np.ndarray]:
    state, flags = snapshot.get("state"), snapshot.get("flags")
    if state is None or flags is None:
        raise ValueError("a snapshot needs 'state' and 'flags' arrays (from vm.snapshot()), "
                         f"got keys {sorted(snapshot)}")
    return np.asarray(state), np.asarray(flags)


class PageGrid:
    """Categories of every page of one snapshot on the grid, and what the last update changed.

    Attributes: ``n_pages``, ``row_pages``, ``rows``, ``overview_cell``, ``view``, ``counts`` (pages
    per category), ``window`` (``(col0, col1, row0, row1)`` drawn, None for the overview),
    ``changed`` (flat indices of the pages whose category the last update changed, or None),
    ``last_moves`` (those moves, by category name) and ``changed_pages``.
    """

    def __init__(self, snapshot: dict, view: str = "guest", max_cols: int = MAX_CELLS,
                 max_rows: int = MAX_CELLS):
        palette._check_view(view)
        self.view, self.max_cols, self.max_rows = view, max_cols, max_rows
        self.window: tuple[int, int, int, int] | None = None
        self.changed: np.ndarray | None = None
        self.last_moves: list[tuple[str, str, int]] = []
        self.changed_pages = 0
        self.load(snapshot)

    # --- loading and classifying -------------------------------------------------------------
    def load(self, snapshot: dict) -> None:
        """Take ``snapshot`` whole (a new guest starts from the overview)."""
        state, flags = _arrays(snapshot)
        self._state, self._flags = np.array(state, copy=True), np.array(flags, copy=True)
        self.t_ms = snapshot.get("t_ms")
        n = len(self._state)
        if n == 0:
            raise ValueError("a snapshot with no pages cannot be drawn")
        if getattr(self, "n_pages", n) != n:
            self.window = None
        self.n_pages = n
        self.row_pages = grid_width(n, self.max_rows)
        self.rows = -(-n // self.row_pages)
        self.overview_cell = pow2_at_least(self.row_pages / self.max_cols)
        self.classify()

    def classify(self) -> None:
        """Classify every page for ``view`` and downsample the overview."""
        cats = palette.classify(self._state, self._flags, self.view)
        self.counts = np.bincount(cats, minlength=len(palette.categories(self.view)))
        missing = self.rows * self.row_pages - self.n_pages  # the last row's tail: no memory
        if missing:
            cats = np.concatenate([cats, np.full(missing, ABSENT[self.view], dtype=np.uint8)])
        self._cats = cats.reshape(self.rows, self.row_pages)
        self._weights = palette.importance(self.view)
        self._overview = downsample(self._cats, self.overview_cell, self._weights)

    def set_view(self, view: str) -> None:
        palette._check_view(view)
        self.view = view
        self.changed, self.changed_pages = None, 0  # a new view: no "changed since" outline
        self.classify()

    def update(self, snapshot: dict) -> bool:
        """Take a new snapshot of the same guest (or of another one: then nothing counts as
        changed); returns whether the picture changed (pages, or an outline to clear).

        A page counts as changed when its category in this view changed (what the picture shows:
        a free page that became reported in the guest view, a page the host stopped backing in the
        host view), and ``last_moves`` names those moves by category. Few changed pages (at most
        1/8 of the guest) are classified again alone, with only their overview cells downsampled
        again."""
        state, flags = _arrays(snapshot)
        if len(state) != self.n_pages:
            self.load(snapshot)
            self.changed, self.last_moves, self.changed_pages = None, [], 0
            return True
        self.t_ms = snapshot.get("t_ms")
        touched = np.flatnonzero((state != self._state) | (flags != self._flags))
        old = self._cats.reshape(-1)[touched]
        new = palette.classify(state[touched], flags[touched], self.view)
        shown = new != old
        had_outline = self.changed is not None
        self.changed = touched[shown] if shown.any() else None
        self.changed_pages = int(shown.sum())
        self.last_moves = transitions(old[shown], new[shown], palette.names(self.view))
        if len(touched) == 0:
            return had_outline
        if len(touched) * 8 > self.n_pages:
            self.load(snapshot)
        else:
            self._state[touched], self._flags[touched] = state[touched], flags[touched]
            self._reclassify(touched, new)
        return bool(shown.any()) or had_outline

    def _reclassify(self, pages: np.ndarray, new: np.ndarray) -> None:
        """Give ``pages`` (flat indices) their new categories ``new`` and downsample again the
        overview cells holding them."""
        cats = self._cats.reshape(-1)  # a view: assignments land in self._cats
        old = cats[pages]
        k = len(self.counts)
        self.counts = self.counts + np.bincount(new, minlength=k) - np.bincount(old, minlength=k)
        cats[pages] = new
        cell = self.overview_cell
        ncols = self.row_pages // cell
        cells = np.unique(pages // cell)  # overview cells (rows of ncols cells) that changed
        r, c = np.divmod(cells, ncols)
        runs = self._cats.reshape(self.rows, ncols, cell)[r, c]
        self._overview[r, c] = downsample(runs, cell, self._weights)[:, 0]

    # --- what is drawn ------------------------------------------------------------------------
    def window_for(self, x0: float, x1: float, y0: float, y1: float
                   ) -> tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int]]:
        """The window to draw for a visible range x in [x0, x1) pages of a row, y in [y0, y1) rows
        (half a span of margin each side, for panning; None: the overview), and the visible
        cells ``(col0, col1, row0, row1)``."""
        xa, xb = sorted((float(x0), float(x1)))
        ya, yb = sorted((float(y0), float(y1)))
        col0 = int(np.clip(np.floor(xa), 0, self.row_pages - 1))
        col1 = int(np.clip(np.ceil(xb), col0 + 1, self.row_pages))
        row0 = int(np.clip(np.floor(ya), 0, self.rows - 1))
        row1 = int(np.clip(np.ceil(yb), row0 + 1, self.rows))
        visible = (col0, col1, row0, row1)
        span, rspan = col1 - col0, row1 - row0
        col0, col1 = max(0, col0 - span // 2), min(self.row_pages, col1 + span // 2)
        row0, row1 = max(0, row0 - rspan // 2), min(self.rows, row1 + rspan // 2)
        cell = min(self.overview_cell, pow2_at_least((col1 - col0) / self.max_cols))
        if cell >= self.overview_cell:
            return None, visible
        return (col0 // cell * cell, -(-col1 // cell) * cell, row0, row1), visible

    def cell_of(self, window: tuple[int, int, int, int] | None) -> int:
        if window is None:
            return self.overview_cell
        return min(self.overview_cell, pow2_at_least((window[1] - window[0]) / self.max_cols))

    def render(self) -> dict[str, list]:
        """The image source's data: the uint8 category image of the window and its placement."""
        if self.window is None:
            col0, col1, row0, row1, cell = 0, self.row_pages, 0, self.rows, self.overview_cell
            image = self._overview.copy()
        else:
            col0, col1, row0, row1 = self.window
            cell = self.cell_of(self.window)
            image = downsample(self._cats[row0:row1, col0:col1], cell, self._weights)
        return {"image": [image], "x": [col0], "y": [row0], "dw": [col1 - col0],
                "dh": [row1 - row0], "cell": [cell], "row_pages": [self.row_pages]}

    def changed_mask(self, data: dict) -> np.ndarray:
        """Which drawn cells of ``data`` (from :meth:`render`) hold a page the last update changed."""
        image = data["image"][0]
        mask = np.zeros(image.shape, dtype=bool)
        if self.changed is not None and len(self.changed):
            col0, row0, cell = data["x"][0], data["y"][0], data["cell"][0]
            rows, cols = np.divmod(self.changed, self.row_pages)
            hit = (rows >= row0) & (rows < row0 + data["dh"][0]) & (cols >= col0) & (
                cols < col0 + data["dw"][0])
            mask[rows[hit] - row0, (cols[hit] - col0) // cell] = True
        return mask

    def changed_boxes(self, data: dict) -> np.ndarray:
        """Rectangles ``(col0, col1, row0, row1)`` in pages-of-a-row and rows that cover the changed
        cells of ``data`` (a few hundred at most: :func:`labkit.viz.changes.box_cover`)."""
        boxes = box_cover(self.changed_mask(data))
        if len(boxes) == 0:
            return boxes
        cell, col0, row0 = data["cell"][0], data["x"][0], data["y"][0]
        return boxes * np.array([cell, cell, 1, 1]) + np.array([col0, col0, row0, row0])

    def changed_region(self) -> tuple[int, int, int, int] | None:
        """``(col0, col1, row0, row1)`` of the pages changed by the last update, or None."""
        if self.changed is None or not len(self.changed):
            return None
        rows, cols = np.divmod(self.changed, self.row_pages)
        return int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1


def zone_key(zones) -> tuple:
    """A snapshot's zones ``(name, node, start, end)`` as plain ints: comparable, hashable."""
    return tuple((str(z[0]), int(z[1]), int(z[2]), int(z[3])) for z in zones or ())


def zone_lines(zones, row_pages: int) -> tuple[dict[str, list], dict[str, list]]:
    """Where each zone after the first starts on a map of ``row_pages`` pages a row (the kernel's
    zones of every node: DMA, DMA32, Normal, Movable; docs/mechanisms.md §10.1): a step between
    the pages before and the pages from it on (segments ``x0, y0, x1, y1``), and each zone's name
    at its first page (``x, y, text``)."""
    segments: dict[str, list] = {"x0": [], "y0": [], "x1": [], "y1": []}
    labels: dict[str, list] = {"x": [], "y": [], "text": []}

    def line(x0: float, y0: float, x1: float, y1: float) -> None:
        for key, value in zip(("x0", "y0", "x1", "y1"), (x0, y0, x1, y1), strict=True):
            segments[key].append(float(value))

    for name, node, start, end in zone_key(zones):
        if end <= start:
            continue
        r, c = divmod(start, row_pages)
        labels["x"].append(float(c))
        labels["y"].append(float(r))
        labels["text"].append(name + (f" (node {node})" if node else ""))
        if start == 0:
            continue
        if c == 0:  # a boundary between rows
            line(0, r, row_pages, r)
        else:  # inside row r: the rest of row r, down one, the start of row r + 1
            line(c, r, row_pages, r)
            line(c, r, c, r + 1)
            line(0, r + 1, c, r + 1)
    return segments, labels
