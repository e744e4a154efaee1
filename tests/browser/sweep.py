"""The real-browser sweep of one notebook, as a student meets it: open, Run All, wait for idle, then
move every slider, dropdown and toggle and click every button of every widget; collect what is wrong.

Five conditions fail a notebook (issue 9, "What to build" 1), each found by its own function so that
tests/browser/test_sweep.py can prove, on a deliberately broken notebook, that each one can fail:

* ``errors``: an error output (a traceback) or anything written to stderr, in any cell;
* ``log``: a message in JupyterLab's Log Console for the notebook (ipywidgets routes the output of
  a widget callback that raised there, jupyterlab-manager's ``onUnhandledIOPubMessage``);
* ``wide``: an output area whose content is wider than the notebook panel (1400x1000 viewport);
* ``empty``: a Bokeh figure whose visible x/y range holds none of its glyphs' data (or whose glyphs
  all have no data): the figure opens empty;
* ``static``: a Step button or a Play control (ipywidgets' Play, or labkit's Play toggle, which the
  kernel ticks while it is on) that changes no pixel of the figures of its output.

Screenshots: the whole notebook after Run All (one viewport at a time, top to bottom) and each
widget output after each interaction, under ``shots``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.browser.test_lab import Notebook

CONDITIONS = ("errors", "log", "wide", "empty", "static")
STEP_RE = re.compile(r"\bstep\b", re.IGNORECASE)
PLAY_S = 2.5          # how long Play runs before it is paused again
SETTLE_S = 0.4        # after an interaction, before waiting for the kernel to be idle
IDLE_TIMEOUT_MS = 120_000
SCROLLER = "(w.content.outerNode || w.content.node)"  # the notebook's scrolling element (JupyterLab 4)

# --- JavaScript run in the page -------------------------------------------------------------------
# JupyterLab's logger registry is the service of the logconsole plugin (no global exposes it); the
# logger of a notebook is keyed by its path, as jupyterlab-manager's logging uses it.
LOG_JS = """
const reg = window.jupyterapp.pluginRegistry;
const plugin = reg && reg._plugins.get('@jupyterlab/logconsole-extension:plugin');
const registry = plugin && (plugin._service || plugin.service);
if (!registry) return ['(the Log Console plugin was not found: cannot check it)'];
const logger = registry.getLogger(path);
return logger.outputAreaModel.toJSON().map(m => {
  if (m.output_type === 'error') return `${m.level}: ${m.ename}: ${m.evalue}`;
  if (m.output_type === 'stream') return `${m.level}: ${m.name}: ${String(m.text).slice(0, 300)}`;
  if (m.output_type === 'text') return `${m.level}: ${String(m.data).slice(0, 300)}`;
  return `${m.level}: ${m.output_type}: ${JSON.stringify(m.data || m).slice(0, 300)}`;
});
"""

STDERR_JS = """
const found = [];
w.content.widgets.forEach((c, i) => { if (c.model.type !== 'code') return;
  for (const o of c.model.outputs.toJSON()) {
    if (o.output_type === 'error') found.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    else if (o.output_type === 'stream' && o.name === 'stderr')
      found.push(`cell ${i}: stderr: ${String(o.text).slice(0, 300)}`);
  } });
return found;
"""

# every output area's content against the notebook panel's right edge (scrollWidth counts content
# that overflows, shadow DOM layouts included)
WIDE_JS = """
const panel = w.content.node.getBoundingClientRect();
const found = [];
w.content.widgets.forEach((c, i) => {
  c.node.querySelectorAll('.jp-OutputArea-output').forEach(o => {
    const r = o.getBoundingClientRect();
    if (r.width === 0) return;
    const right = r.left + Math.max(o.scrollWidth, r.width);
    if (o.scrollWidth > o.clientWidth + 2 || right > panel.right + 2)
      found.push(`cell ${i}: output content ${Math.round(Math.max(o.scrollWidth, r.width))} px wide ` +
                 `in a ${Math.round(o.clientWidth)} px output area (panel right edge at ` +
                 `${Math.round(panel.right)} px, content ends at ${Math.round(right)} px)`);
  });
});
return found;
"""

# every Bokeh figure on the page (Bokeh.index holds the root views; walk their children)
EMPTY_JS = """
const idx = window.Bokeh && Bokeh.index;
if (!idx) return [];
const roots = idx.roots ? [...idx.roots] : Object.values(idx);
const seen = new Set(), stack = [...roots], found = [];
let figures = 0;
while (stack.length) {
  const v = stack.pop();
  if (!v || seen.has(v)) continue;
  seen.add(v);
  try { for (const c of v.children()) stack.push(c); } catch (e) {}
  if (!v.model || !v.frame || !v.renderer_views || !v.el || !v.el.isConnected) continue;
  figures += 1;
  const xr = v.frame.x_range, yr = v.frame.y_range;
  const [x0, x1] = [Math.min(xr.start, xr.end), Math.max(xr.start, xr.end)];
  const [y0, y1] = [Math.min(yr.start, yr.end), Math.max(yr.start, yr.end)];
  let glyphs = 0, withData = 0, inside = 0;
  for (const [r, rv] of v.renderer_views) {
    if (!rv.glyph || !r.visible) continue;
    glyphs += 1;
    let b;
    try { b = rv.glyph.bounds(); } catch (e) { continue; }
    if (!b || ![b.x0, b.x1, b.y0, b.y1].every(Number.isFinite)) continue;
    withData += 1;
    if (b.x1 >= x0 && b.x0 <= x1 && b.y1 >= y0 && b.y0 <= y1) inside += 1;
  }
  if (glyphs === 0) continue;
  const title = (v.model.title && v.model.title.text) || v.model.id;
  if (withData === 0)
    found.push(`figure "${title}": none of its ${glyphs} glyph renderer(s) has data`);
  else if (inside === 0)
    found.push(`figure "${title}": its visible range x ${x0.toPrecision(4)}..${x1.toPrecision(4)}, ` +
               `y ${y0.toPrecision(4)}..${y1.toPrecision(4)} holds none of the data of its ` +
               `${withData} glyph renderer(s)`);
}
return found;
"""


@dataclass
class SweepResult:
    """What a sweep found, condition by condition, and what it did."""

    notebook: str
    problems: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CONDITIONS})
    interactions: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, condition: str, items: list[str]) -> None:
        for item in items:
            if item not in self.problems[condition]:
                self.problems[condition].append(item)

    def failed(self) -> dict[str, list[str]]:
        return {c: items for c, items in self.problems.items() if items}

    def report(self) -> str:
        lines = [f"{self.notebook}:"]
        for condition, items in self.failed().items():
            lines.append(f"  [{condition}]")
            lines += [f"    - {item}" for item in items[:12]]
            if len(items) > 12:
                lines.append(f"    ... and {len(items) - 12} more")
        return "\n".join(lines)


# --- the checks -----------------------------------------------------------------------------------
def check_errors(nb: Notebook) -> list[str]:
    shown = nb.page.locator(".jupyter-widgets-error-widget").count()  # ipywidgets' "failed to render"
    return nb.js(STDERR_JS) + [f"{shown} widget view(s) failed to render"] * (shown > 0)


def check_log(nb: Notebook) -> list[str]:
    return nb.page.evaluate(f"(path) => {{ {LOG_JS} }}", nb.name)


def check_wide(nb: Notebook) -> list[str]:
    return nb.js(WIDE_JS)


def check_empty(nb: Notebook) -> list[str]:
    return nb.page.evaluate(f"() => {{ {EMPTY_JS} }}")


# --- driving the page -----------------------------------------------------------------------------
def wait_kernel(nb: Notebook) -> None:
    time.sleep(SETTLE_S)
    nb.wait_idle(IDLE_TIMEOUT_MS)


def shot_prefix(name: str) -> str:
    """``notebooks/regression/balloon.ipynb`` -> ``regression_balloon``."""
    return name.removeprefix("notebooks/").removesuffix(".ipynb").replace("/", "_")


def snap(nb: Notebook, result: SweepResult, shots: Path, what: str, target: Any = None) -> None:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", what).strip("_")[:80]
    path = shots / f"{shot_prefix(nb.name)}-{len(result.shots):03d}-{safe}.png"
    if target is None:
        nb.page.screenshot(path=str(path))
    else:
        target.screenshot(path=str(path))
    result.shots.append(path)


def snap_whole(nb: Notebook, result: SweepResult, shots: Path, what: str) -> None:
    """The notebook top to bottom, one viewport-high screenshot at a time."""
    height = nb.js(f"const s = {SCROLLER}; s.scrollTop = 0; return [s.scrollHeight, s.clientHeight];")
    total, page = height
    offset, part = 0, 1
    while True:
        nb.js(f"{SCROLLER}.scrollTop = arg;", offset)
        time.sleep(0.15)
        snap(nb, result, shots, f"{what}-{part:02d}")
        offset += max(200, page - 80)
        part += 1
        if offset >= total - 40 or part > 40:
            break
    nb.js(f"{SCROLLER}.scrollTop = 0;")


def outputs_with_widgets(nb: Notebook) -> list[tuple[int, Any]]:
    """(cell index, locator) of the code cells whose outputs hold an ipywidgets control."""
    indices = nb.js(
        "const found = []; w.content.widgets.forEach((c, i) => { c.node.dataset.labkitCell = i;"
        " if (c.model.type === 'code' && c.node.querySelector('.jp-OutputArea-output .widget-button,"
        " .jp-OutputArea-output .widget-slider, .jp-OutputArea-output .widget-dropdown,"
        " .jp-OutputArea-output .widget-toggle-buttons, .jp-OutputArea-output .widget-checkbox,"
        " .jp-OutputArea-output .widget-play, .jp-OutputArea-output .widget-radio-box'))"
        " found.push(i); }); return found;")
    return [(i, nb.page.locator(f'[data-labkit-cell="{i}"] .jp-Cell-outputArea')) for i in indices]


def drive(nb: Notebook, result: SweepResult, shots: Path) -> None:
    """Every control of every widget output, at least once: sliders (PageDown: five steps, so a
    stepper has work to show), dropdowns, toggles and checkboxes first, then Step buttons and Play
    (checked for pixels), other buttons, Reset last."""
    for index, area in outputs_with_widgets(nb):
        label = f"cell{index}"
        for k, handle in enumerate(area.locator(".widget-slider .noUi-handle").all()):
            handle.scroll_into_view_if_needed()
            handle.focus()
            handle.press("PageDown")  # noUiSlider: 5 steps at once (one change, one callback)
            wait_kernel(nb)
            result.interactions.append(f"{label}: slider {k} PageDown")
            snap(nb, result, shots, f"{label}-slider{k}", area)
        for k, select in enumerate(area.locator(".widget-dropdown select").all()):
            options = select.locator("option").count()
            if options < 2:
                continue
            current = select.evaluate("s => s.selectedIndex")
            select.select_option(index=(current + 1) % options)
            wait_kernel(nb)
            result.interactions.append(f"{label}: dropdown {k} option {(current + 1) % options}")
            snap(nb, result, shots, f"{label}-dropdown{k}", area)
        for k, group in enumerate(area.locator(".widget-toggle-buttons").all()):
            buttons = group.locator("button").all()
            for b, button in enumerate(buttons):
                if "mod-active" in (button.get_attribute("class") or ""):
                    continue
                button.click()
                wait_kernel(nb)
                result.interactions.append(f"{label}: toggle {k} button {b}")
                snap(nb, result, shots, f"{label}-toggle{k}-{b}", area)
        toggles = [b for b in area.locator("button.widget-toggle-button").all()
                   if not b.evaluate("b => !!b.closest('.widget-toggle-buttons')")]
        plays = [b for b in toggles if (b.text_content() or "").strip() == "Play"]  # labkit's Play
        boxes = area.locator(".widget-checkbox input").all() + [b for b in toggles if b not in plays]
        for k, box in enumerate(boxes):
            box.click()
            wait_kernel(nb)
            result.interactions.append(f"{label}: checkbox/toggle {k}")
            snap(nb, result, shots, f"{label}-check{k}", area)
        for k, radio in enumerate(area.locator(".widget-radio-box input").all()):
            if radio.is_checked():
                continue
            radio.click()
            wait_kernel(nb)
            result.interactions.append(f"{label}: radio {k}")
        buttons = [b for b in area.locator("button.widget-button").all()
                   if b.is_visible()  # a control the widget hides (Reset without a factory) is not offered
                   and not b.evaluate("b => !!b.closest('.widget-play, .widget-toggle-buttons')")]
        texts = [(b.text_content() or b.get_attribute("title") or "").strip() for b in buttons]
        kinds = ["step" if STEP_RE.search(t) else "reset" if t.lower().startswith("reset") else "other"
                 for t in texts]
        steps = [(b, t) for b, t, k in zip(buttons, texts, kinds, strict=True) if k == "step"]
        resets = [(b, t) for b, t, k in zip(buttons, texts, kinds, strict=True) if k == "reset"]
        others = [(b, t) for b, t, k in zip(buttons, texts, kinds, strict=True) if k == "other"]
        for button, text in steps:
            press_and_compare(nb, result, shots, area, label, f"button {text!r}", button.click)
        for k, play in enumerate(area.locator(".widget-play").all()):  # ipywidgets' Play
            def run_play(play: Any = play) -> None:
                play.locator("button").first.click()  # play
                time.sleep(PLAY_S)
                play.locator("button").nth(1).click()  # pause
            press_and_compare(nb, result, shots, area, label, f"Play {k}", run_play)
        for k, toggle in enumerate(plays):  # labkit's Play: a toggle; the kernel ticks while it is on
            def run_toggle(toggle: Any = toggle) -> None:
                toggle.click()  # Play
                time.sleep(PLAY_S)
                toggle.click()  # Pause
            press_and_compare(nb, result, shots, area, label, f"Play {k}", run_toggle)
        for button, text in others + resets:
            button.scroll_into_view_if_needed()
            button.click()
            wait_kernel(nb)
            result.interactions.append(f"{label}: button {text!r}")
            snap(nb, result, shots, f"{label}-{text or 'button'}", area)


def canvas_pixels(area: Any) -> list[str]:
    """The pixels of every Bokeh canvas layer under ``area``, as PNG data URLs read from the canvases
    themselves (not screenshots: no dependence on scroll position or compositing)."""
    return area.locator("canvas.bk-layer").evaluate_all(
        "cs => cs.filter(c => c.width > 0 && c.height > 0).map(c => c.toDataURL())")


def press_and_compare(nb: Notebook, result: SweepResult, shots: Path, area: Any, label: str,
                      what: str, action: Any) -> None:
    """Do ``action`` (a Step click, a Play run) and report it when no figure pixel changed."""
    before = canvas_pixels(area)
    action()
    wait_kernel(nb)
    result.interactions.append(f"{label}: {what}")
    if not before:
        snap(nb, result, shots, f"{label}-{what}", area)
        return  # nothing drawn to change (the check is about figures)
    deadline = time.monotonic() + 5  # BokehJS repaints after the kernel's message
    while True:
        after = canvas_pixels(area)
        if after != before or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    snap(nb, result, shots, f"{label}-{what}", area)
    if after == before:
        result.add("static", [f"{label}: {what} changed no pixel of the {len(before)} canvas layer(s) "
                              "of its output"])


def sweep(nb: Notebook, shots: Path, interact: bool = True) -> SweepResult:
    """Open ``nb``, Run All, check, drive every widget, check again; returns what was found."""
    result = SweepResult(nb.name)
    start = time.monotonic()
    nb.open()
    result.seconds["open"] = time.monotonic() - start
    result.seconds["run all"] = nb.run_all()
    time.sleep(1.0)  # let BokehJS lay the last figures out
    snap_whole(nb, result, shots, "after-run-all")
    result.add("errors", check_errors(nb))
    result.add("log", check_log(nb))
    result.add("wide", check_wide(nb))
    result.add("empty", check_empty(nb))
    if interact:
        start = time.monotonic()
        drive(nb, result, shots)
        result.seconds["interactions"] = time.monotonic() - start
        result.add("errors", check_errors(nb))
        result.add("log", check_log(nb))
        result.add("wide", check_wide(nb))
    return result
