"""A widget changed before it is displayed shows, in the browser, the state it has at display
(labkit/viz/shown.py, "What is shown is the state at display").

jupyter_bokeh draws a view from the widget's ``render_bundle``, made when the widget was created,
and sends later changes as patches to the views that exist: changes made before display reached no
view and were lost. 05's explorer, stepped in the cell that shows it, drew its memory-block grid
empty ("0 B plugged") next to a status line saying 294 MiB. Here three kinds of widget are changed
before display and BokehJS's own models in the page are read back: a LiveBokeh inside an ipywidgets
box (the display hook), a view that shows itself (``Shown``), and the virtio-mem explorer; then a
change after display still arrives as a patch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.browser.test_lab import Notebook

pytestmark = pytest.mark.browser

CELLS = [
    "import ipywidgets as w\nimport labkit.viz\nlabkit.viz.setup_notebook()",
    # a LiveBokeh in a box: what the explorers are made of
    "from bokeh.plotting import figure\nfrom labkit.viz.shown import LiveBokeh\n"
    "f = figure(width=300, height=160, title='boxed: made')\nr = f.line([0, 1, 2], [0, 1, 4])\n"
    "live = LiveBokeh(f)\nf.title.text = 'boxed: changed before display'\nw.VBox([live])",
    # a view that shows itself, updated after its widget was made
    "import labkit\nvm = labkit.open(memory='256M', seed=0)\n"
    "series = labkit.viz.TimeSeries([vm.sample()], width=300)\n_ = series.widget()\n"
    "series.guest_figure.title.text = 'shown: changed before display'\nseries",
    # the explorer, stepped in the cell that shows it
    "from labkit.viz.memblocks_explorer import explore_virtio_mem\n"
    "ex = explore_virtio_mem(memory='1G', seed=0, balloon=False, memhp_default_state='online_movable',\n"
    "                        virtio_mem=[{'id': 'vm0', 'size': '2G'}])\n"
    "ex.slider.value = 300\nex.tick()\nex",
]
AFTER = "f.title.text = 'boxed: changed after display'"
TITLES = ("() => JSON.stringify([...window.Bokeh.index.roots].flatMap(v => {"
          " const out = []; const walk = m => {"
          " if (m && m.title && typeof m.title.text === 'string') out.push(m.title.text);"
          " for (const c of (m && m.children) || []) walk(Array.isArray(c) ? c[0] : c); };"
          " walk(v.model); return out; }))")


def titles(nb: Notebook) -> list[str]:
    return json.loads(nb.page.evaluate(TITLES))


def wait_for_title(nb: Notebook, wanted: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    seen = titles(nb)
    while wanted not in seen and time.monotonic() < deadline:
        time.sleep(0.25)
        seen = titles(nb)
    return seen


def test_widgets_changed_before_display_show_their_state(browser_context: Any, lab: Any, tmp_path: Path):
    nb_file = nbformat.v4.new_notebook()
    nb_file.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb_file.cells = [nbformat.v4.new_code_cell(source) for source in CELLS + [AFTER]]
    folder = lab.root / "notebooks" / "_display"
    folder.mkdir(exist_ok=True)
    nbformat.write(nb_file, folder / "state.ipynb")
    nb = Notebook(browser_context, lab, "notebooks/_display/state.ipynb", tmp_path)
    try:
        with nb.evidence("run"):
            nb.open()
            nb.run_all(through=len(CELLS) - 1)
            nb.wait_idle(60_000)
        with nb.evidence("before display"):
            seen = wait_for_title(nb, "virtio-mem vm0: 300 MiB plugged")
            assert "boxed: changed before display" in seen and "boxed: made" not in seen, seen
            assert "shown: changed before display" in seen, seen
            assert "virtio-mem vm0: 300 MiB plugged" in seen, seen
            assert "virtio-mem vm0: 0 B plugged" not in seen, seen
        with nb.evidence("after display"):
            nb.run_all(through=len(CELLS))
            seen = wait_for_title(nb, "boxed: changed after display")
            assert "boxed: changed after display" in seen, seen
    finally:
        nb.close()


def test_the_page_maps_address_labels_follow_the_physical_layout(browser_context: Any):
    """The page map's JavaScript (labkit/viz/pagemap.py ``_PHYS_JS``) maps a page index to the
    physical frame the model's own mapping gives (ModelBackend._phys_pfn: q35's PCI hole, the
    virtio-mem region's memaddr), at run starts, inside runs and at the very end of the map."""
    import labkit
    from labkit.viz.pagemap import _PHYS_JS

    with labkit.open(memory="4G", seed=0, balloon=False, virtio_mem=[{"id": "v0", "size": "1G"}]) as vm:
        runs = vm.snapshot()["phys"]
        flat = [x for run in runs for x in run]
        indexes = sorted({0, 1, 524287, 524288, 700000, 1048575} | {a for a, _, _ in runs}
                         | {b - 1 for _, b, _ in runs})
        expected = [vm._phys_pfn(i) for i in indexes]
        end = runs[-1][1]
        expected_end = runs[-1][2] + end - runs[-1][0]
    page = browser_context.new_page()
    try:
        got = page.evaluate(f"([P, xs]) => {{ {_PHYS_JS} return xs.map(phys); }}", [flat, indexes + [end]])
    finally:
        page.close()
    assert got == expected + [expected_end]
