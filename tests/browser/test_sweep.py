"""Every notebook in a real browser, as a student meets it (issue 9, "What to build" 1).

For each notebook under notebooks/ (found by glob: the lessons 00-08, the exercises,
notebooks/regression/ and any notebook added later are swept too): JupyterLab in headless Chromium
at 1400x1000 opens it, runs all cells, waits for the kernel to be idle, then moves every slider,
dropdown and toggle and clicks every button of every widget (tests/browser/sweep.py). A notebook
fails on any error or stderr output, any Log Console message, any output wider than the notebook
panel, any Bokeh figure that opens empty, and any Step/Play that changes no pixel of its figures.
Screenshots of every notebook after Run All and after each interaction go to ``$LABKIT_SHOTS`` (or a
folder under pytest's temporary directory); the folder is printed in the summary.

The second half builds one deliberately broken notebook per condition in the server's temporary
directory and shows that the sweep reports exactly that condition.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.browser.conftest import NOTEBOOK_DIR
from tests.browser.sweep import CONDITIONS, check_empty, check_errors, check_log, check_wide, sweep
from tests.browser.test_lab import Notebook

pytestmark = pytest.mark.browser

NOTEBOOKS = sorted(str(p.relative_to(NOTEBOOK_DIR.parent)) for p in NOTEBOOK_DIR.rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)  # "notebooks/...": the server serves the repo
# papermill parameters the sweep gives a notebook, as tests/test_notebooks.py does (07 replays a
# recorded real run unless live runs were asked for with LABKIT_LIVE=1)
PARAMETERS = {"notebooks/07_live_qemu.ipynb": {"MODE": "replay"},
              "notebooks/10_model_vs_real.ipynb": {"MODE": "replay"}}


@pytest.fixture(scope="session")
def shots_dir(tmp_path_factory: pytest.TempPathFactory, browser_figures: dict) -> Path:
    wanted = os.environ.get("LABKIT_SHOTS")
    path = Path(wanted) if wanted else tmp_path_factory.mktemp("sweep-shots")
    path.mkdir(parents=True, exist_ok=True)
    browser_figures["sweep screenshots"] = str(path)
    return path


def with_parameters(lab: Any, name: str) -> None:
    """Write PARAMETERS[name] into the served copy's parameters cell (the repository is untouched)."""
    params = PARAMETERS.get(name)
    if not params or os.environ.get("LABKIT_LIVE") == "1":
        return
    path = lab.root / name
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# set by the browser sweep\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nbformat.write(nb, path)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_sweep_notebook(name: str, browser_context: Any, lab: Any, shots_dir: Path, browser_figures: dict):
    with_parameters(lab, name)
    nb = Notebook(browser_context, lab, name, shots_dir)
    start = time.monotonic()
    try:
        with nb.evidence("sweep"):
            result = sweep(nb, shots_dir)
    finally:
        nb.close()
    browser_figures[f"sweep {name}"] = (
        f"{time.monotonic() - start:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        + f"), {len(result.interactions)} interactions, {len(result.shots)} screenshots")
    assert not result.failed(), result.report() + f"\nscreenshots: {shots_dir}"


# --- each condition can fail ----------------------------------------------------------------------
SETUP = "import ipywidgets as w\nimport labkit.viz\nlabkit.viz.setup_notebook()"
FIGURE = ("from bokeh.plotting import figure\nfrom jupyter_bokeh.widgets import BokehModel\n"
          "f = figure(width=300, height=200, title='t')\nr = f.line([0, 1, 2], [0, 1, 4])\n")
BROKEN = {
    "errors": [SETUP, "import sys\nprint('something went wrong', file=sys.stderr)"],
    "log": [SETUP, "b = w.Button(description='go')\n"
                   "def fail(_):\n    raise RuntimeError('a callback error')\n"
                   "b.on_click(fail)\nb"],
    "wide": [SETUP, "from IPython.display import HTML\nHTML('<div style=\"width:2400px\">wide</div>')"],
    "empty": [SETUP, FIGURE + "f.x_range.start, f.x_range.end = 100, 200\nBokehModel(f)"],
    "static": [SETUP, FIGURE + "b = w.Button(description='Step')\nb.on_click(lambda _: None)\n"
                               "w.VBox([b, BokehModel(f)])"],
}
CHECKS = {"errors": check_errors, "log": check_log, "wide": check_wide, "empty": check_empty}


def broken_notebook(lab: Any, condition: str) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in BROKEN[condition]]
    folder = lab.root / "notebooks" / "_broken"
    folder.mkdir(exist_ok=True)
    nbformat.write(nb, folder / f"{condition}.ipynb")
    return f"notebooks/_broken/{condition}.ipynb"


@pytest.mark.parametrize("condition", CONDITIONS)
def test_sweep_catches(condition: str, browser_context: Any, lab: Any, tmp_path: Path):
    """A notebook broken in one way fails the sweep on that condition, and on no other."""
    name = broken_notebook(lab, condition)
    nb = Notebook(browser_context, lab, name, tmp_path)
    try:
        with nb.evidence(f"broken-{condition}"):
            result = sweep(nb, tmp_path)
            found = result.failed()
            assert list(found) == [condition], (
                f"expected the sweep to report only {condition!r}, it reported:\n{result.report()}")
            if condition in CHECKS:  # the check alone sees it too
                assert CHECKS[condition](nb), f"check_{condition} found nothing"
    finally:
        nb.close()
