"""labkit regress and the fact registry: checks that can fail, the grid, a run on an existing dask
cluster with its HTML report and drift, and nbval catching a changed fact table."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from labkit.cli import main
from labkit.cluster import run_tasks
from labkit.regress import facts, runner

ROOT = Path(__file__).resolve().parent.parent
REGRESSION = ROOT / "notebooks" / "regression"
RECORDED = ROOT / "data" / "recorded"


def test_every_check_has_a_source_a_tolerance_and_a_reason():
    registry = facts.load()
    teaching = {p.name for p in (ROOT / "notebooks").glob("0*.ipynb")}
    assert set(registry) >= teaching | {"regression/balloon.ipynb", "regression/reporting.ipynb",
                                        "regression/hinting.ipynb", "regression/virtio_mem.ipynb"}
    kinds = set()
    for name, nb_facts in registry.items():
        assert (ROOT / "notebooks" / name).exists(), name
        for c in nb_facts.checks:
            kinds.add(c.kind)
            assert c.fact and c.tolerance and c.source
            if c.kind in ("kernel", "qemu"):
                assert "§" in c.source and ("Linux" in c.source or "QEMU" in c.source), c.id
            if c.kind == "published":
                assert c.source.startswith("published:"), c.id
            if c.kind == "recorded":
                recording = c.source.split("data/recorded/")[1].split()[0]
                assert (RECORDED / recording).exists(), c.id
    assert kinds == set(facts.KINDS)


def test_published_results_are_held_in_their_published_shape():
    checks = {c.id: c for nb in facts.load().values() for c in nb.checks}
    assert checks["hinting.wang_idle_8gb_minus_84_percent"].expect == pytest.approx(1 - 284 / 1757, abs=0.01)
    assert checks["hinting.wang_kernel_build_reduction"].expect == pytest.approx(1 - 1402 / 2528, abs=0.01)
    assert checks["reporting.duyck_memhog_returns_about_30_of_32_gb"].expect == 30
    assert checks["reporting.duyck_settles_in_about_30_s"].expect == 30
    assert checks["virtio_mem.block_size_2mib_on_x86_64"].expect == 2


def test_checks_can_fail():
    c = facts.Check(id="x", metric="a / b", fact="f", source="s", kind="kernel", tolerance="t",
                    expect=256)
    assert c.evaluate({"a": 512, "b": 2}).ok
    assert not c.evaluate({"a": 510, "b": 2}).ok
    missing = c.evaluate({"a": 512})
    assert not missing.ok and "missing ['b']" in missing.note
    assert not c.evaluate({"a": 1, "b": 0}).ok  # NaN never holds
    band = facts.Check(id="y", metric="v", fact="f", source="s", kind="published", tolerance="t",
                       expect=0.84, abs=0.08)
    assert band.bounds == pytest.approx((0.76, 0.92))
    assert band.evaluate({"v": 0.77}).ok and not band.evaluate({"v": 0.70}).ok
    upper = facts.Check(id="z", metric="max(p, q)", fact="f", source="s", kind="qemu", tolerance="t",
                        max=2000)
    assert upper.evaluate({"p": 10, "q": 1999}).ok and not upper.evaluate({"p": 2001, "q": 0}).ok
    assert upper.expected_text == "≤ 2000" and band.expected_text == "0.84 (±0.08)"
    listed = facts.Check(id="w", metric="d[1] / d[0]", fact="f", source="s", kind="kernel", tolerance="t",
                         expect=2)
    assert listed.evaluate({"d": [50, 100]}).ok and not listed.evaluate({"d": [50]}).ok


def test_the_01_golden_master_became_facts():
    """01_balloon's old baseline pinned the model's own numbers; its facts hold on them, and fail
    when a number no fact allows turns up."""
    old = json.loads((ROOT / "data" / "baselines" / "01_balloon.json").read_text())["metrics"] \
        if (ROOT / "data" / "baselines" / "01_balloon.json").exists() else None
    if old is None:
        pytest.skip("the old golden master is gone (replaced by data/baselines/facts/01_balloon.toml)")
    nb = facts.load()["01_balloon.ipynb"]
    assert all(r.ok for r in nb.evaluate(old))
    broken = {**old, "oom_deflated_pages_count": old["oom_deflated_pages_count"] + old["oom_events_count"]}
    assert not all(r.ok for r in nb.evaluate(broken))


@pytest.mark.parametrize("bad, message", [
    ('notebook = "x.ipynb"\n', "at least one"),
    ('notebook = "x.ipynb"\n[[check]]\nid = "a"\nmetric = "m"\nfact = "f"\nsource = "s"\n'
     'kind = "guess"\ntolerance = "t"\nexpect = 1\n', "kind 'guess' is not one of"),
    ('notebook = "x.ipynb"\n[[check]]\nid = "a"\nmetric = "m"\nfact = "f"\nsource = "s"\n'
     'kind = "kernel"\ntolerance = "t"\n', "needs expect, or min and/or max"),
    ('notebook = "x.ipynb"\n[[check]]\nid = "a"\nmetric = "m"\nfact = "f"\nsource = "s"\n'
     'kind = "kernel"\nexpect = 1\n', "lacks ['tolerance']"),
    ('notebook = "x.ipynb"\n[[check]]\nid = "a"\nmetric = "__import__(\'os\')"\nfact = "f"\n'
     'source = "s"\nkind = "kernel"\ntolerance = "t"\nexpect = 1\n', "is not allowed"),
])
def test_a_bad_facts_file_says_what_is_wrong(tmp_path, bad, message):
    (tmp_path / "x.toml").write_text(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        facts.load(tmp_path)


def test_grid_plan():
    assert runner.parse_grid(["memory=1G,4G", "seed=0,1,2"]) == {"memory": ["1G", "4G"], "seed": [0, 1, 2]}
    for bad in (["memory"], ["memory="], ["1x=2"], ["seed=0", "seed=1"]):
        with pytest.raises(ValueError):
            runner.parse_grid(bad)
    tasks, notes = runner.plan(runner.parse_grid(["memory=1G,4G", "seed=0,1,2"]))
    by_nb: dict[str, list] = {}
    for t in tasks:
        by_nb.setdefault(t["notebook"], []).append(t["params"])
    assert len(by_nb["regression/balloon.ipynb"]) == 6
    assert by_nb["regression/hinting.ipynb"] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]  # no memory
    assert all(p["memory"] == "4G" for p in by_nb["01_balloon.ipynb"])  # memory_min = 2G
    assert any("01_balloon.ipynb" in n and "left out" in n for n in notes)
    # grid_parameters = ["seed"]: the 8G guest of 03 keeps its size; 07 (no seed) runs once
    assert by_nb["03_free_page_reporting.ipynb"] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    assert by_nb["07_live_qemu.ipynb"] == [{}]
    with pytest.raises(ValueError, match="no facts for"):
        runner.plan({"seed": [0]}, ["nope.ipynb"])


def test_one_failing_task_never_stops_the_rest():
    seen = []
    out = run_tasks(_maybe_fail, [1, 0, 3], workers=1, on_error=lambda t, m: f"failed {t}: {m}",
                    progress=seen.append)
    assert out[0] == 1.0 and out[2] == pytest.approx(1 / 3)
    assert out[1].startswith("failed 0: ZeroDivisionError")
    assert len(seen) == 3 and all(line.startswith("[") for line in seen)


def _maybe_fail(x: int) -> float:
    return 1 / x


def test_a_broken_notebook_is_a_result_not_a_crash(tmp_path):
    nb = nbformat.read(REGRESSION / "virtio_mem.ipynb", as_version=4)
    nb.cells[2].source = "raise RuntimeError('boom')"
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    result = runner.run_point({"notebook": "regression/virtio_mem.ipynb", "path": str(path),
                               "params": {"seed": 0}})
    assert result["error"] and "boom" in result["error"] and result["metrics"] == {}
    rows = runner.evaluate([result], facts.load())
    assert rows and not any(r["ok"] for r in rows) and "the notebook failed" in rows[0]["note"]


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        yield c.scheduler_address


def test_regress_on_an_existing_cluster_report_and_drift(tmp_path, cluster, capsys):
    args = ["regress", "--grid", "memory=1G,2G", "seed=0", "--notebook", "regression/virtio_mem.ipynb",
            "--notebook", "regression/hinting.ipynb", "--store", str(tmp_path), "--scheduler", cluster]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "[3/3]" in first.err and "0 failing" in first.out
    assert main(args) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 2
    run = json.loads(runs[-1].read_text())
    assert run["previous"] == json.loads(runs[0].read_text())["run"]
    points = {(r["notebook"], r["point"]) for r in run["checks"]}
    assert points == {("regression/virtio_mem.ipynb", "memory=1G seed=0"),
                      ("regression/virtio_mem.ipynb", "memory=2G seed=0"),
                      ("regression/hinting.ipynb", "seed=0")}
    assert all(r["ok"] and r["previous"] is not None for r in run["checks"])
    assert all(r["drift"] == 0 for r in run["checks"])  # the model is deterministic for a seed
    html = (tmp_path / "report.html").read_text()
    assert "virtio_mem.block_size_2mib_on_x86_64" in html and "Bokeh" in html
    assert "hinting.wang_idle_8gb_minus_84_percent" in html and "cdn.bokeh.org" not in html


def test_regress_bad_input(capsys, tmp_path):
    assert main(["regress", "--grid", "memory", "--store", str(tmp_path)]) == 1
    assert "is not NAME=V1,V2" in capsys.readouterr().err
    assert main(["regress", "--notebook", "nope.ipynb", "--store", str(tmp_path)]) == 1
    assert "no facts for ['nope.ipynb']" in capsys.readouterr().err


def test_nbval_catches_a_changed_fact_table(tmp_path):
    """The committed outputs are the record: a stored table that no longer matches fails nbval."""
    nb = nbformat.read(REGRESSION / "virtio_mem.ipynb", as_version=4)
    table = next(c for c in nb.cells if c.cell_type == "code" and "facts.table" in c.source)
    text = table.outputs[0]["text"]
    assert "5 of 5 facts hold." in text and "measured" not in text
    table.outputs[0]["text"] = text.replace("[qemu]", "[kernel]", 1)
    nbformat.write(nb, tmp_path / "changed.ipynb")
    shutil.copy(REGRESSION / "sanitize.cfg", tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "changed.ipynb", "--nbval-sanitize-with", "sanitize.cfg",
         "-p", "no:cacheprovider", "-q", "-o", "addopts=", "-o", "testpaths=", "--rootdir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "1 failed" in done.stdout


def test_regression_notebooks_are_committed_with_outputs():
    for path in sorted(REGRESSION.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []) and "out_json" in code[0].source
        outputs = [o for c in code for o in c.outputs]
        assert outputs and not any(o.output_type == "error" for o in outputs), path.name
        assert not any("data" in o and any("bokeh" in k for k in o["data"]) for o in outputs)
        name = f"regression/{path.name}"
        assert name in facts.load(), f"{name} has no facts file"


def test_measured_values_are_numbers():
    from labkit.regress import measure

    m = measure.virtio_mem()
    assert all(isinstance(v, float) and not math.isnan(v) for v in m.values())
