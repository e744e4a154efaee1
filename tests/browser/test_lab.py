"""JupyterLab in headless Chromium: the notebooks run in the browser, their Bokeh plots paint, and the
explorer's widgets drive the plots through the kernel.

What a student sees on Binder, checked by pixels: notebooks/00_start.ipynb is opened and run with
``notebook:run-all-cells``; no cell shows an error; every cell that shows a page map, a time series
or the explorer paints a canvas that is not a single colour. Then the explorer (labkit/viz/explorer.py)
is driven as a person would: ArrowLeft on the target slider's handle lowers the balloon target by
one slider step (1 MiB) per key, and Step makes one balloon request (``vm.step()``), which moves
``actual``, the clock, the page map and the time series. 05_virtio_mem.ipynb's first memory-block
grid renders too. On failure a screenshot of the page is saved under pytest's temporary directory
and named in the message, with the browser console's errors and the end of the server's log.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from labkit.viz.palette import G_BALLOON, GUEST_CATEGORIES

pytestmark = pytest.mark.browser

START = "notebooks/00_start.ipynb"  # the server serves the repository's notebooks/ and docs/
VIRTIO_MEM = "notebooks/05_virtio_mem.ipynb"
LOAD_TIMEOUT_MS = 60_000     # JupyterLab's page up to the notebook panel
KERNEL_TIMEOUT_MS = 120_000  # kernel start (a busy 2-core machine)
RUN_TIMEOUT_MS = 120_000     # notebook:run-all-cells
CHANGE_TIMEOUT_S = 30.0      # a widget action until the status line / canvas shows it
SLIDER_PRESSES = 4           # ArrowLeft presses: 4 slider steps of 1 MiB
# cells that display plots, by what their source calls (each must paint at least one canvas)
PLOT_CALLS = {START: ("page_map(", "TimeSeries(", "explore("), VIRTIO_MEM: ("MemoryBlockGrid(",)}

# the page map's colour for a ballooned page in the guest view (labkit/viz/palette.py)
BALLOON_COLOUR = GUEST_CATEGORIES[G_BALLOON].color
_FIND = ("(path) => Array.from(window.jupyterapp.shell.widgets('main'))"
         ".find(w => w.context && w.context.path === path)")
STATUS_RE = re.compile(r"t = (?P<t>[\d.]+) s .*target (?P<target>[\d.]+ \w+) .*actual (?P<actual>[\d.]+ \w+)")


class Notebook:
    """One notebook open in its own browser tab, with what the page logged."""

    def __init__(self, context: Any, lab: Any, name: str, shots: Path):
        self.name, self.lab, self.shots = name, lab, shots
        self.console: list[str] = []
        self.page = context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.console.append(m.text[:300]))
        self.page.on("pageerror", lambda e: self.console.append(f"page error: {e}"[:300]))

    @contextmanager
    def evidence(self, what: str) -> Iterator[None]:
        """Turn a failed check or a Playwright timeout into an AssertionError that names a
        screenshot of the page, the browser's console errors and the end of the server log."""
        from playwright.sync_api import Error as PlaywrightError

        try:
            yield
        except (AssertionError, PlaywrightError) as e:
            shot = self.shots / f"{Path(self.name).stem}-{what}.png"
            try:
                self.page.screenshot(path=str(shot))
            except PlaywrightError as why:
                shot = Path(f"(no screenshot: {why})")
            console = "\n".join(self.console[-10:]) or "(none)"
            raise AssertionError(f"{self.name}, {what}: {e}\nscreenshot: {shot}\nbrowser console "
                                 f"errors:\n{console}\njupyter log ends:\n{self.lab.log_tail(15)}") from e

    def js(self, body: str, arg: Any = None) -> Any:
        """Evaluate ``(path, arg) => body`` with ``w`` bound to this notebook's panel."""
        return self.page.evaluate(f"([path, arg]) => {{ const w = ({_FIND})(path); {body} }}",
                                  [self.name, arg])

    def open(self) -> None:
        # "reset": a fresh workspace, so notebooks of earlier tests are not reopened (nor their
        # kernels started again) in this page
        self.page.goto(self.lab.url(f"lab/tree/{self.name}") + "&reset", timeout=LOAD_TIMEOUT_MS)
        self.page.wait_for_function(f"(path) => window.jupyterapp && !!({_FIND})(path)",
                                    arg=self.name, timeout=LOAD_TIMEOUT_MS, polling=250)
        self.wait_idle(KERNEL_TIMEOUT_MS)

    def wait_idle(self, timeout_ms: float) -> None:
        self.page.wait_for_function(
            f"(path) => {{ const w = ({_FIND})(path); const k = w && w.sessionContext.session"
            " && w.sessionContext.session.kernel; return !!k && w.sessionContext.isReady"
            " && k.status === 'idle'; }", arg=self.name, timeout=timeout_ms, polling=250)
        self.page.locator("#jp-main-statusbar >> text=Idle").wait_for(timeout=timeout_ms)

    def run_all(self, through: int | None = None) -> float:
        """``notebook:run-all-cells`` (or, with ``through``, the cells above that cell index and
        that cell: ``notebook:run-all-above`` + ``notebook:run-cell``); returns its seconds.
        Fails if a cell it should have run was left unexecuted."""
        start = time.monotonic()
        self.js("const app = window.jupyterapp; app.shell.activateById(w.id); window.__labkitRun = null;"
                "let run; if (arg === null) run = app.commands.execute('notebook:run-all-cells');"
                "else { w.content.activeCellIndex = arg;"
                "  run = app.commands.execute('notebook:run-all-above')"
                "    .then(() => app.commands.execute('notebook:run-cell')); }"
                "run.then(ok => { window.__labkitRun = {ok}; },"
                "         e => { window.__labkitRun = {error: String(e)}; });", through)
        self.page.wait_for_function("() => window.__labkitRun !== null", timeout=RUN_TIMEOUT_MS,
                                    polling=250)
        outcome = self.page.evaluate("() => window.__labkitRun")
        self.wait_idle(RUN_TIMEOUT_MS)
        seconds = time.monotonic() - start
        counts = self.js("return w.content.widgets.map((c, i) => [i, c.model.type === 'code'"
                         " && c.model.executionCount])"
                         ".filter(([i, n]) => n !== false && (arg === null || i <= arg));", through)
        assert outcome.get("ok") is True, f"running the cells did not finish cleanly: {outcome}"
        unrun = [i for i, n in counts if n is None]
        assert counts and not unrun, f"code cells left unexecuted: {unrun}"
        return seconds

    def error_outputs(self) -> list[str]:
        """Error outputs: the kernel's (in the notebook model) and what the page shows."""
        errors = self.js(
            "const found = []; w.content.widgets.forEach((c, i) => { if (c.model.type !== 'code') return;"
            " for (const o of c.model.outputs.toJSON()) if (o.output_type === 'error')"
            "   found.push(`cell ${i}: ${o.ename}: ${o.evalue}`); }); return found;")
        shown = self.page.locator(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_text_contents()
        broken = self.page.locator(".jupyter-widgets-error-widget").count()  # ipywidgets' error box
        return (errors + [text[:400] for text in shown if "Error" in text or "Traceback" in text]
                + [f"{broken} widget view(s) failed to render (see the console errors)"] * (broken > 0))

    def cells_calling(self, calls: tuple[str, ...]) -> list[tuple[int, Any]]:
        """(index, locator) of the code cells whose source contains one of ``calls``."""
        indices = self.js(
            "const found = []; w.content.widgets.forEach((c, i) => { c.node.dataset.labkitCell = i;"
            " const src = c.model.sharedModel.getSource();"
            " if (c.model.type === 'code' && arg.some(s => src.includes(s))) found.push(i); });"
            " return found;", list(calls))
        return [(i, self.page.locator(f'[data-labkit-cell="{i}"]')) for i in indices]

    def close(self) -> None:
        """Shut the notebook's kernel down (the server's teardown would too) and close the tab."""
        from playwright.sync_api import Error as PlaywrightError

        try:  # stop the kernel, then close the tab unsaved, so that JupyterLab's workspace does
            # not reopen this notebook (and start its kernel again) in the next test's page
            self.js("if (!w) return; return w.sessionContext.shutdown().then(() => {"
                    " w.context.model.dirty = false; w.dispose(); });")
            time.sleep(0.5)  # the workspace saves the new layout
        except PlaywrightError:
            pass  # a broken page: the server's shutdown stops the kernel
        self.page.close()


# --- pixels ---------------------------------------------------------------------------------------
def plot_canvases(scope: Any) -> list[Any]:
    """One canvas per Bokeh plot under ``scope`` (open shadow DOM included), in page order.

    A Bokeh plot stacks two full-size layers (primary, overlays) at the same place; legend glyphs
    are small canvases of their own (``bk-glyph``). Screenshots show the layers composited."""
    canvases = []
    for canvas in scope.locator("canvas.bk-layer:not(.bk-glyph)").all():
        if canvas.evaluate("c => !!c.previousElementSibling && c.previousElementSibling.matches('canvas')"):
            continue  # the overlays layer above the primary one
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        if box is not None and box["width"] >= 50 and box["height"] >= 50:
            canvases.append(canvas)
    return canvases


def pixels(canvas: Any) -> np.ndarray:
    """The canvas as it shows on screen: an (h, w, 3) uint8 array from an element screenshot.

    The canvas is scrolled to the middle of the notebook first: at the edge of the viewport the
    screenshot would catch the notebook toolbar's shadow, which moves with the scroll position."""
    from PIL import Image

    canvas.evaluate("c => c.scrollIntoView({block: 'center', inline: 'nearest'})")
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))


def settled(canvas: Any) -> np.ndarray:
    """The canvas's pixels once two screenshots in a row agree (painting has settled)."""
    last = None
    deadline = time.monotonic() + 10
    while True:
        now = pixels(canvas)
        if (last is not None and same(now, last)) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.1)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and hashlib.sha1(a.tobytes()).digest() == hashlib.sha1(b.tobytes()).digest()


def colour_count(image: np.ndarray, hex_colour: str) -> int:
    """How many pixels of ``image`` have exactly the colour ``#RRGGBB``."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return int((image == rgb).all(axis=-1).sum())


def blank_reason(image: np.ndarray) -> str | None:
    """Why ``image`` looks unpainted (a single colour, or nearly), or None when it is painted."""
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    dominant = counts.max() / counts.sum()
    if len(colours) < 2 or dominant > 0.995:
        height, width = image.shape[:2]
        return f"{len(colours)} colour(s), the commonest covering {dominant:.1%} of {width}x{height}"
    return None


def poll(check: Any, timeout_s: float = CHANGE_TIMEOUT_S, interval_s: float = 0.25) -> Any:
    """``check()`` until it returns something truthy or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def parse_status(text: str) -> dict[str, str]:
    match = STATUS_RE.search(text.replace("\xa0", " "))
    assert match, f"the explorer's status line does not read 't = … s … target … actual …': {text!r}"
    return match.groupdict()


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def start_notebook(browser_context: Any, lab: Any, shots: Path, browser_figures: dict) -> Iterator[Notebook]:
    """00_start.ipynb open in JupyterLab, all cells run."""
    nb = Notebook(browser_context, lab, START, shots)
    try:
        with nb.evidence("open"):
            start = time.monotonic()
            nb.open()
            browser_figures[f"{START}: open until kernel idle"] = f"{time.monotonic() - start:.1f} s"
        with nb.evidence("run-all"):
            browser_figures[f"{START}: run-all-cells"] = f"{nb.run_all():.1f} s"
        yield nb
    finally:
        nb.close()


def check_plots_paint(nb: Notebook, cells: list[tuple[int, Any]] | None = None) -> int:
    """Every cell of PLOT_CALLS[nb.name] (or of ``cells``) paints at least one canvas, none blank;
    returns how many canvases were checked."""
    cells = nb.cells_calling(PLOT_CALLS[nb.name]) if cells is None else cells
    assert cells, f"no cell calls any of {PLOT_CALLS[nb.name]}"
    painted = 0
    for index, cell in cells:
        canvases = plot_canvases(cell)
        assert canvases, f"cell {index} shows no Bokeh canvas"
        for canvas in canvases:
            reason = blank_reason(pixels(canvas))
            assert reason is None, f"cell {index}: a canvas looks blank: {reason}"
            painted += 1
    return painted


# --- the tests ------------------------------------------------------------------------------------
def test_start_notebook_runs_without_errors_and_paints(start_notebook: Notebook, browser_figures: dict):
    nb = start_notebook
    with nb.evidence("errors"):
        errors = nb.error_outputs()
        assert not errors, "cells show errors:\n" + "\n".join(errors)
    with nb.evidence("canvases"):
        browser_figures[f"{START}: painted canvases"] = check_plots_paint(nb)


def test_explorer_widgets_drive_the_plots(start_notebook: Notebook, browser_figures: dict):
    nb = start_notebook
    with nb.evidence("explorer"):
        found = nb.cells_calling(("explore(",))
        assert len(found) == 1, f"expected one cell calling explore(), found cells {[i for i, _ in found]}"
        cell = found[0][1]
        status = cell.locator(".widget-html", has_text="t = ")
        readout = cell.locator(".widget-slider .widget-readout")
        step = cell.locator("button.widget-button", has_text=re.compile(r"^\s*Step\s*$"))
        first = parse_status(status.text_content())
        plots = plot_canvases(cell)
        assert len(plots) >= 2, f"the explorer shows {len(plots)} plot canvases, expected a page map " \
                                "and a time series"
        value = int(readout.text_content())

        # ArrowLeft on the focused handle: one slider step (1 MiB) per key -> qmp("balloon")
        handle = cell.locator(".widget-slider .noUi-handle")
        handle.focus()
        for _ in range(SLIDER_PRESSES):
            handle.press("ArrowLeft")
        moved = poll(lambda: readout.text_content().strip() == str(value - SLIDER_PRESSES)
                     and parse_status(status.text_content())["target"] != first["target"])
        assert moved, (f"after {SLIDER_PRESSES} x ArrowLeft the slider reads {readout.text_content()!r} "
                       f"(was {value}) and the status {status.text_content()!r} (was {first})")
        targeted = parse_status(status.text_content())
        assert targeted["t"] == first["t"], "setting the target alone must not advance the clock"
        before = [settled(c) for c in plots]
        balloon_before = colour_count(before[0], BALLOON_COLOUR)

        # Step: one balloon request; the clock, actual, the page map and the time series move
        seen: dict[str, Any] = {}

        def repainted() -> bool:
            now = [pixels(c) for c in plots]
            seen["changed"] = [i for i, (a, b) in enumerate(zip(before, now, strict=True)) if not same(a, b)]
            seen["balloon pixels"] = colour_count(now[0], BALLOON_COLOUR)
            return {0, 1} <= set(seen["changed"]) and seen["balloon pixels"] > balloon_before

        start = time.monotonic()
        step.click()
        stepped = poll(lambda: parse_status(status.text_content())["t"] != targeted["t"])
        after_status = parse_status(status.text_content())
        assert stepped, f"after Step the status still reads {status.text_content()!r}"
        assert float(after_status["t"]) > float(targeted["t"]), (targeted, after_status)
        assert after_status["actual"] != first["actual"], f"actual did not move: {first} -> {after_status}"
        # the balloon took guest pages: the page map shows more of the balloon's colour
        assert poll(repainted), (
            f"after Step the canvases that changed are {seen['changed']} of {len(plots)} (0 = page "
            f"map, 1 = time series: expected both), balloon-coloured pixels on the page map "
            f"{balloon_before} -> {seen['balloon pixels']} (expected more)")
        browser_figures["explorer Step until both canvases repainted"] = f"{time.monotonic() - start:.1f} s"
        browser_figures["explorer page map balloon pixels"] = f"{balloon_before} -> {seen['balloon pixels']}"


def test_virtio_mem_block_grid_renders(browser_context: Any, lab: Any, shots: Path, browser_figures: dict):
    """05_virtio_mem.ipynb up to its first memory-block grid (the whole notebook costs ~15-30 s more
    here, mostly its resize scenarios; papermill runs all of it in tests/test_notebooks.py)."""
    nb = Notebook(browser_context, lab, VIRTIO_MEM, shots)
    try:
        with nb.evidence("open"):
            nb.open()
        with nb.evidence("run"):
            grids = nb.cells_calling(PLOT_CALLS[VIRTIO_MEM])
            assert grids, f"no cell of {VIRTIO_MEM} calls any of {PLOT_CALLS[VIRTIO_MEM]}"
            first = grids[0][0]
            seconds = nb.run_all(through=first)
            browser_figures[f"{VIRTIO_MEM}: cells 0-{first} run"] = f"{seconds:.1f} s"
        with nb.evidence("errors"):
            errors = nb.error_outputs()
            assert not errors, "cells show errors:\n" + "\n".join(errors)
        with nb.evidence("canvases"):
            check_plots_paint(nb, grids[:1])
    finally:
        nb.close()


def test_a_lessons_section_link_opens_the_reference(browser_context: Any, lab: Any, shots: Path):
    """01_balloon's first link to §1.2, clicked in JupyterLab, opens docs/mechanisms.md in the
    Markdown preview at that section: the server serves notebooks/ and docs/ side by side, as a
    clone of the repository or Binder does (docs/README.md)."""
    nb = Notebook(browser_context, lab, "notebooks/01_balloon.ipynb", shots)
    try:
        with nb.evidence("section-link"):
            nb.open()
            link = nb.page.locator(".jp-Notebook .jp-MarkdownOutput a:visible", has_text="§1.2").first
            # JupyterLab resolves the relative link against the server's root: /files/docs/...
            href = urlsplit(link.get_attribute("href") or "")
            assert href.path.endswith("/docs/mechanisms.md") and href.fragment == "s1.2", href
            link.scroll_into_view_if_needed()
            link.click()
            target = nb.page.locator('.jp-MarkdownViewer [data-jupyter-id="s1.2"]')
            target.wait_for(state="attached", timeout=30_000)
            assert nb.page.locator(".jp-MarkdownViewer").first.is_visible()
            nb.page.screenshot(path=str(shots / "01_balloon-section-link-s1.2.png"))
    finally:
        nb.close()
