"""``labkit regress``: run the regression notebooks under papermill over a parameter grid, hold
every metric against its fact (:mod:`labkit.regress.facts`), store the run, and compare it with the
last stored one (drift).

A grid is ``name=v1,v2,...`` items (``memory=1G,4G seed=0,1,2``); every notebook of the fact registry
runs at every combination of the grid's values **that it declares as parameters** (a notebook
without ``memory`` runs once per seed), minus the points its facts file rules out (``memory_min``).
Each run is one papermill execution, on a Dask cluster (:mod:`labkit.cluster`); a notebook that
fails gives a result with its error (and every check of it fails), never a stopped run.

Runs are stored as JSON under ``<store>/runs/`` (default ``out/regress``); the report compares
each value with the same check at the same grid point in the previous stored run.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labkit.cluster import run_tasks, stderr_to
from labkit.regress import facts as fact_registry

DEFAULT_GRID = ("memory=1G,4G", "seed=0,1,2")
NOTEBOOK_TIMEOUT_S = 600


def parse_grid(items: Iterable[str]) -> dict[str, list]:
    """``["memory=1G,4G", "seed=0,1"]`` -> ``{"memory": ["1G", "4G"], "seed": [0, 1]}`` (whole
    numbers become ints; anything else stays a string).

    >>> parse_grid(["memory=1G,4G", "seed=0,1,2"])
    {'memory': ['1G', '4G'], 'seed': [0, 1, 2]}
    >>> parse_grid(["memory"])
    Traceback (most recent call last):
    ...
    ValueError: grid item 'memory' is not NAME=V1,V2,... (e.g. memory=1G,4G seed=0,1,2)
    """
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", name) or not parts:
            raise ValueError(f"grid item {item!r} is not NAME=V1,V2,... (e.g. memory=1G,4G seed=0,1,2)")
        if name in grid:
            raise ValueError(f"grid parameter {name!r} is given twice")
        grid[name] = [int(v) if re.fullmatch(r"-?\d+", v) else v for v in parts]
    return grid


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The parameters a notebook declares (its ``parameters`` cell), with their defaults."""
    import papermill

    return {name: p["default"] for name, p in papermill.inspect_notebook(str(path)).items()}


def plan(grid: dict[str, list], notebooks: Iterable[str] | None = None,
         registry: dict[str, fact_registry.NotebookFacts] | None = None,
         notebook_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    """The runs to make, ``[{"notebook", "path", "params"}]``, and notes on points left out."""
    from labkit.cli_args import project_root

    registry = registry if registry is not None else fact_registry.load()
    notebook_dir = notebook_dir or project_root() / "notebooks"
    names = list(notebooks) if notebooks is not None else sorted(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"no facts for {unknown}; notebooks with facts: {sorted(registry)}")
    tasks, notes = [], []
    for name in names:
        path = notebook_dir / name
        declared = notebook_parameters(path)
        only = registry[name].grid_parameters
        keys = [k for k in grid if k in declared and (only is None or k in only)]
        ignored = [k for k in grid if k not in keys]
        if ignored:
            notes.append(f"{name}: takes no {ignored} from the grid (its own defaults); runs once per "
                         f"value of {keys or 'nothing'}")
        for values in itertools.product(*(grid[k] for k in keys)):
            params = dict(zip(keys, values, strict=True))
            why = registry[name].applies(params)
            if why:
                notes.append(f"{name} {params}: left out ({why})")
                continue
            tasks.append({"notebook": name, "path": str(path), "params": params})
    return tasks, notes


def run_point(task: dict) -> dict:
    """Execute one notebook at one grid point; returns its metrics (or the error). Never raises."""
    import os

    import papermill

    start = time.monotonic()
    out: dict[str, Any] = {"notebook": task["notebook"], "params": task["params"], "metrics": {},
                           "error": None}
    os.environ.setdefault("BOKEH_RESOURCES", "inline")
    with tempfile.TemporaryDirectory(prefix="labkit-regress-") as tmp:
        metrics_path = Path(tmp) / "metrics.json"
        try:
            with stderr_to(Path(tmp) / "kernel.log"):
                papermill.execute_notebook(
                    task["path"], str(Path(tmp) / "out.ipynb"),
                    parameters={**task["params"], "out_json": str(metrics_path)}, kernel_name="python3",
                    cwd=tmp, progress_bar=False, log_output=False,
                    execution_timeout=task.get("timeout", NOTEBOOK_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001 - the run records it; the checks then fail
            lines = str(e).strip().splitlines()
            out["error"] = f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"
        if metrics_path.exists():
            out["metrics"] = json.loads(metrics_path.read_text())
    out["seconds"] = round(time.monotonic() - start, 1)
    return out


def point_key(params: dict) -> str:
    """A grid point as text, e.g. ``memory=1G seed=0`` (``-`` for a notebook without grid parameters)."""
    return " ".join(f"{k}={v}" for k, v in params.items()) or "-"


def evaluate(results: list[dict], registry: dict[str, fact_registry.NotebookFacts]) -> list[dict]:
    """Every check at every point: ``{"notebook", "point", "check", "value", "ok", "note"}``."""
    rows = []
    for r in results:
        for res in registry[r["notebook"]].evaluate(r["metrics"]):
            note = res.note if not r["error"] else f"the notebook failed: {r['error']}"
            rows.append({"notebook": r["notebook"], "point": point_key(r["params"]), "check": res.id,
                         "value": None if math.isnan(res.value) else res.value, "ok": res.ok,
                         "note": note})
    return rows


def previous_run(store: Path) -> dict | None:
    runs = sorted((store / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text()) if runs else None


def drift(rows: list[dict], previous: dict | None) -> None:
    """Add ``previous`` (the value in the last stored run, or None) and ``drift`` (relative change,
    or None) to each row, in place."""
    before = {(r["notebook"], r["point"], r["check"]): r for r in (previous or {}).get("checks", [])}
    for row in rows:
        old = before.get((row["notebook"], row["point"], row["check"]))
        row["previous"] = old["value"] if old else None
        row["previous_ok"] = old["ok"] if old else None
        if old and old["value"] is not None and row["value"] is not None:
            scale = max(abs(old["value"]), 1e-12)
            row["drift"] = (row["value"] - old["value"]) / scale
        else:
            row["drift"] = None


def regress(grid: dict[str, list] | None = None, *, notebooks: Iterable[str] | None = None,
            store: str | Path = "out/regress", report: str | Path | None = None,
            scheduler: str | None = None, workers: int | None = None,
            progress: Callable[[str], None] | None = print) -> dict:
    """Run, evaluate, compare with the last stored run, store this one and write the HTML report
    (default ``<store>/report.html``). Returns the run (what is stored)."""
    from labkit.regress import report as html_report

    grid = grid if grid is not None else parse_grid(DEFAULT_GRID)
    registry = fact_registry.load()
    tasks, notes = plan(grid, notebooks, registry)
    if not tasks:
        raise ValueError(f"the grid {grid} leaves no notebook to run: " + "; ".join(notes))
    store = Path(store)
    previous = previous_run(store)

    def failed(task: dict, message: str) -> dict:
        return {"notebook": task["notebook"], "params": task["params"], "metrics": {},
                "error": message, "seconds": 0.0}

    def describe(r: dict) -> str:
        res = registry[r["notebook"]].evaluate(r["metrics"])
        text = f"{sum(x.ok for x in res)}/{len(res)} facts hold"
        return f"{text}; failed: {r['error'][:120]}" if r["error"] else text

    results = run_tasks(run_point, tasks, scheduler=scheduler, workers=workers,
                        label=lambda t: f"{t['notebook']} {point_key(t['params'])}",
                        describe=describe, on_error=failed, progress=progress)
    rows = evaluate(results, registry)
    drift(rows, previous)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    run = {"run": stamp, "grid": grid, "notes": notes, "results": results, "checks": rows,
           "previous": (previous or {}).get("run")}
    (store / "runs").mkdir(parents=True, exist_ok=True)
    (store / "runs" / f"{stamp}.json").write_text(json.dumps(run, indent=1))
    html_report.write(Path(report) if report else store / "report.html", run, registry)
    return run
