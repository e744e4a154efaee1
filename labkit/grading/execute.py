"""Grade one submission: run it under papermill with the trusted parameters and a recorder, then
re-check what it recorded. This is the function the Dask workers run; it never raises.

The notebook runs as the student left it, with two cells added: a first cell that starts
:mod:`labkit.exercises.record`, and papermill's injected parameters (the trusted ``student`` and
``seed``, ``solution=False``). Cells run on after an error (nbclient's ``allow_errors``), so a typo
in one answer costs that answer only; an ``AssertionError`` raised by a locked check cell is a wrong
answer, not an error. Each cell has ``timeout`` seconds; a kernel that dies is a crash. In every case
the checks recorded before it still count.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat

from labkit.cluster import stderr_to
from labkit.exercises import record
from labkit.grading.marks import other_variants, verify
from labkit.grading.submissions import Submission, Template, normalized

INJECTED_TAGS = ("labkit-grader", "injected-parameters")


def _student_cell_number(nb: nbformat.NotebookNode, index: int) -> int:
    """1-based number of cell ``index`` among the student's own cells (the injected ones left out)."""
    return sum(1 for c in nb.cells[:index + 1]
               if not set(c.get("metadata", {}).get("tags", [])) & set(INJECTED_TAGS))


def _errors(nb: nbformat.NotebookNode, locked: set[str]) -> list[str]:
    notes = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") != "error":
                continue
            if out.get("ename") == "AssertionError" and normalized(cell.source) in locked:
                continue  # a check cell saying "wrong": the marks say it already
            value = str(out.get("evalue", "")).splitlines()[0][:160] if out.get("evalue") else ""
            notes.append(f"error in cell {_student_cell_number(nb, i)}: {out.get('ename')}: {value}")
    return notes


def _running_cell(path: Path) -> str:
    """The cell that was running when execution stopped: papermill saves the notebook as each cell
    starts, so it is the last one with a start time."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001
        return "a cell"
    started = [i for i, c in enumerate(nb.cells)
               if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    return f"cell {_student_cell_number(nb, started[-1])}" if started else "a cell"


def _last_words(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()
                 and "without encryption" not in ln]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def grade_submission(task: dict[str, Any]) -> dict[str, Any]:
    """Execute and grade one submission. ``task``: ``submission`` (a :class:`Submission`),
    ``template`` (its :class:`Template` or None), ``kernel``, ``timeout`` (s per cell),
    ``executed_dir`` (where the executed copy goes, or None). Returns the result dict the marks
    table reads: ``student``, ``seed``, ``relpath``, ``template``, ``exercises``, ``status``,
    ``flags``, ``notes``, ``parts`` (see :func:`labkit.grading.marks.verify`), ``seconds``."""
    sub: Submission = task["submission"]
    template: Template | None = task.get("template")
    result: dict[str, Any] = {"student": sub.student, "seed": sub.seed, "relpath": sub.relpath,
                              "template": sub.template, "exercises": list(sub.exercises),
                              "flags": list(sub.flags), "notes": [], "parts": {}, "seconds": 0.0}
    if not sub.runnable or template is None:
        result.update(status="not a notebook", notes=[sub.problem or "no template"])
        return result
    start = time.monotonic()
    status = "graded"
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        records_path = Path(tmp) / "checks.jsonl"
        executed = Path(task["executed_dir"]) / sub.relpath if task.get("executed_dir") else \
            Path(tmp) / "executed.ipynb"
        executed.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        try:
            status = _execute(sub, template, records_path, executed, workdir, task, result)
        except Exception as e:  # noqa: BLE001 - a row, never a traceback
            status = "crashed"
            result["notes"].append(f"the grader could not run it: {type(e).__name__}: {e}")
        records = record.read(records_path)
    result["parts"] = verify(sub.student, sub.seed, sub.exercises, records)
    for variant in other_variants(sub.student, sub.seed, sub.exercises, records):
        result["flags"].append(f"checked a variant that is not theirs: {variant}")
    if status == "graded" and result["flags"]:
        status = "flagged"
    result["status"] = status
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def _execute(sub: Submission, template: Template, records_path: Path, executed: Path, workdir: Path,
             task: dict, result: dict) -> str:
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.read(sub.path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import labkit.exercises.record as _labkit_record\n_labkit_record.start({str(records_path)!r})",
        metadata={"tags": ["labkit-grader"]}))
    trusted = {"student": sub.student, "seed": sub.seed, "solution": False, "out_json": ""}
    params = {k: v for k, v in trusted.items() if k in template.parameters}
    timeout = task.get("timeout", 120)
    kernel_log = records_path.with_name("kernel.log")
    env_before = os.environ.get("BOKEH_RESOURCES")
    os.environ.setdefault("BOKEH_RESOURCES", "inline")  # offline: BokehJS from the kernel
    try:
        with stderr_to(kernel_log):
            out = papermill.execute_notebook(
                nb, str(executed), parameters=params, kernel_name=task.get("kernel", "python3"),
                cwd=str(workdir), progress_bar=False, log_output=False, execution_timeout=timeout,
                start_timeout=120, allow_errors=True)
    except PapermillExecutionError:
        out = nbformat.read(executed, as_version=4)
    except (CellTimeoutError, TimeoutError):
        result["notes"].append(f"timed out: {_running_cell(executed)} ran longer than {timeout:g} s")
        return "timeout"
    except DeadKernelError:
        words = _last_words(kernel_log)
        result["notes"].append(f"crashed: the kernel died in {_running_cell(executed)}"
                               + (f" (its last words: {words})" if words else ""))
        return "crashed"
    finally:
        if env_before is None:
            os.environ.pop("BOKEH_RESOURCES", None)
    errors = _errors(out, set(template.locked))
    result["notes"] += errors
    return "error" if errors else "graded"
