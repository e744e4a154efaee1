"""Execute every notebook, drive one explorer widget in a live kernel, and hold 01_balloon's metrics
against the facts of data/baselines/facts/01_balloon.toml (labkit.regress.facts).

Notebooks run under papermill with the venv's ``python3`` kernel, ``BOKEH_RESOURCES=inline`` (no
internet) and a temporary working directory, so nothing is written into the repository. The
regression notebooks under notebooks/regression/ are not collected here: they are committed with
their outputs and nbval runs them (notebooks/regression/conftest.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tests import notebook_quotes as quotes

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
REGRESSION_DIR = NOTEBOOK_DIR / "regression"  # committed WITH outputs; nbval runs them
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
                   and REGRESSION_DIR not in p.parents)
TEACHING = [p for p in NOTEBOOKS if p.parent == NOTEBOOK_DIR]  # 00..08: the lessons
KERNEL = "python3"
NOTEBOOK_TIMEOUT_S = 300

pytestmark = pytest.mark.notebook


def _name(path: Path) -> str:
    return str(path.relative_to(NOTEBOOK_DIR))


@pytest.fixture(autouse=True)
def _offline_bokeh(monkeypatch):
    # the kernel inherits this: BokehJS is inlined instead of fetched from the CDN
    monkeypatch.setenv("BOKEH_RESOURCES", "inline")


def execute(notebook: Path, workdir: Path,
            parameters: dict | None = None) -> tuple[nbformat.NotebookNode, float]:
    """Run ``notebook`` under papermill in ``workdir``; returns the executed notebook and seconds."""
    import papermill

    out = workdir / notebook.name
    start = time.perf_counter()
    result = papermill.execute_notebook(
        str(notebook), str(out), parameters=parameters or {}, kernel_name=KERNEL, cwd=str(workdir),
        progress_bar=False, log_output=False, execution_timeout=NOTEBOOK_TIMEOUT_S)
    seconds = time.perf_counter() - start
    assert seconds < NOTEBOOK_TIMEOUT_S, f"{notebook.name} took {seconds:.0f} s"
    return result, seconds


def test_there_are_notebooks():
    assert {"00_start.ipynb", "01_balloon.ipynb"} <= {p.name for p in NOTEBOOKS}


def test_kernel_is_this_venv():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    # jupyter_client runs a spec whose argv[0] is "python" with sys.executable (this venv)
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv
    assert spec.language == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_committed_without_outputs_and_with_parameters_first(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook with no code"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged parameters"
    assert "out_json" in code[0].source, "the parameters cell must offer out_json"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"commit notebooks without outputs: {cell.source[:60]!r}")
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL


def markdown_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


@pytest.mark.parametrize("path", TEACHING, ids=_name)
def test_every_number_a_note_quotes_is_checked_or_a_fact(path: Path):
    """Each "What you just saw" note's numbers lie inside a registered quote (checked against the
    notebook's metrics when it runs) or fact phrase (tests/notebook_quotes.py), and every
    registered phrase is still in the text."""
    nb = nbformat.read(path, as_version=4)
    cells = markdown_cells(nb)
    assert any(quotes.notes(c) for c in cells), f"{path.name} has no 'What you just saw' note"
    missing = quotes.unregistered(path.name, cells)
    assert not missing, "numbers the notes quote but nothing checks:\n" + "\n".join(missing)
    text = " ".join(" ".join(c.split()) for c in cells)
    gone = [q.phrase for q in quotes.QUOTES.get(path.name, []) if quotes.normalise(q.phrase) not in text]
    assert not gone, f"{path.name}: the text no longer says {gone}"


def test_the_number_check_catches_an_unregistered_number():
    note = "**What you just saw:** host RSS fell by only 66 MiB, then by 12 MiB."
    found = quotes.unregistered("00_start.ipynb", [note])
    assert len(found) == 1 and found[0].startswith("00_start.ipynb: '12' in …")  # 66 is a quote
    linked = "**What you just saw:** see [§1.6](../docs/mechanisms.md#s1.6), `x = 3`."
    assert quotes.unregistered("00_start.ipynb", [linked]) == []  # citations and code are not quotes


def check_quoted(path: Path, metrics: dict) -> None:
    """Every quote of ``path``'s notes holds on this run's metrics."""
    from labkit.regress.facts import evaluate_expression

    values = {**quotes.flat(metrics), "MiB": quotes.MiB, "GiB": quotes.GiB}
    off = []
    for q in quotes.QUOTES.get(path.name, []):
        if isinstance(q, quotes.Quote):
            got = evaluate_expression(q.expression, values)
            if not abs(got - q.value) <= q.tol:
                off.append(f"the text says {q.phrase!r} ({q.value} ± {q.tol}); {q.expression} = {got}")
    assert not off, f"{path.name}: text and data disagree:\n" + "\n".join(off)


def check_facts(path: Path, metrics: dict) -> None:
    """The notebook still writes every metric its facts file (data/baselines/facts) uses, and the
    facts hold at its default parameters."""
    from labkit.regress import facts

    registry = facts.load()
    if path.name not in registry:
        return
    bad = [f"{r.id}: {r.value} {r.note}" for r in registry[path.name].evaluate(metrics) if not r.ok]
    assert not bad, f"{path.name} breaks its facts:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_executes(path: Path, tmp_path: Path, notebook_times: dict, tmp_path_factory):
    # the live notebook replays recorded real runs unless live tests were asked for (LABKIT_LIVE=1)
    real_guest = path.name in ("07_live_qemu.ipynb", "10_model_vs_real.ipynb")
    live = real_guest and os.environ.get("LABKIT_LIVE") == "1"
    params = {"MODE": "replay"} if real_guest and not live else {}
    quoted = not live  # a live run's numbers are its own
    if quoted:
        out_json = tmp_path_factory.mktemp("metrics") / "metrics.json"
        params["out_json"] = str(out_json)
    nb, seconds = execute(path, tmp_path, params or None)
    notebook_times[_name(path)] = seconds
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    assert list(tmp_path.iterdir()) == [tmp_path / path.name], "notebooks must not leave files behind"
    if quoted:
        metrics = json.loads(out_json.read_text())
        check_quoted(path, metrics)
        check_facts(path, metrics)


def test_explorer_slider_drives_the_vm_and_the_plots(tmp_path: Path, notebook_times: dict):
    from testbook import testbook

    start = time.perf_counter()
    with testbook(str(NOTEBOOK_DIR / "00_start.ipynb"), execute=False, kernel_name=KERNEL,
                  timeout=NOTEBOOK_TIMEOUT_S) as tb:
        tb.execute_cell("parameters")
        tb.inject('memory = "1G"')
        tb.execute_cell(["setup", "explorer"])
        tb.inject("""
            from labkit.units import MiB
            image_before = explorer.page_map.source.data["image"][0].copy()
            rows_before = len(explorer.timeseries.source.data["t"])
            new_target = explorer.slider.max - 200
            explorer.slider.value = new_target          # what dragging the slider does
            target_after = explorer.vm.sample()["balloon_target"]
            for _ in range(5):
                explorer.tick()                          # what Play does, one tick at a time
            actual_after = explorer.vm.qmp("query-balloon")["actual"]
            rows_after = len(explorer.timeseries.source.data["t"])
            image_changed = bool((explorer.page_map.source.data["image"][0] != image_before).any())
            actuals = list(explorer.timeseries.source.data["balloon_actual"])
        """)
        new_target = tb.value("new_target")
        assert tb.value("target_after") == new_target * 2**20
        assert tb.value("actual_after") == new_target * 2**20
        assert tb.value("rows_after") >= tb.value("rows_before") + 6
        assert tb.value("image_changed")
        actuals = tb.value("actuals")
        assert actuals[-1] < actuals[0]  # the plotted balloon actual followed the VM
    notebook_times["00_start.ipynb (explorer cells, 1G, widget test)"] = time.perf_counter() - start


def test_01_balloon_facts(tmp_path: Path, notebook_times: dict):
    """01_balloon's metrics hold the facts of data/baselines/facts/01_balloon.toml (256 pages per
    request, MemTotal with and without deflate-on-oom, 256 pages per OOM event, ...): facts with
    sources and tolerances, not the model's own numbers, so they survive a change of the guest
    kernel's defaults."""
    from labkit.regress import facts

    params = {"memory": "2G", "seed": 0}
    out_json = tmp_path / "metrics.json"
    _, seconds = execute(NOTEBOOK_DIR / "01_balloon.ipynb", tmp_path, {**params, "out_json": str(out_json)})
    notebook_times[f"01_balloon.ipynb (facts, {params})"] = seconds
    results = facts.for_notebook("01_balloon.ipynb").evaluate(json.loads(out_json.read_text()))
    failing = [f"{r.id}: {r.value} {r.note}" for r in results if not r.ok]
    assert len(results) >= 9 and not failing, "01_balloon breaks facts:\n" + "\n".join(failing)
