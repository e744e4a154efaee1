"""``labkit grade``: run every handed-in exercise notebook, collect its checks, write the marks.

    labkit grade SUBMISSIONS_DIR [--out marks.csv] [--html report.html] [--roster roster.csv]
                 [--seed N] [--templates DIR] [--timeout S] [--executed DIR]
                 [--scheduler ADDRESS | --workers N]

1. :mod:`labkit.grading.submissions` finds the files, names each one's student from its path,
   matches it to the exercise notebook it came from and flags changed parameters or locked cells.
2. :mod:`labkit.grading.execute` runs each notebook under papermill (trusted ``student`` and
   ``seed``, ``solution=False``) with :mod:`labkit.exercises.record` on, through dask.distributed
   (:mod:`labkit.cluster`: a LocalCluster with a worker per core, or ``--scheduler`` for an existing
   cluster); progress is printed as notebooks finish; a crash, a time-out or a file that is not a
   notebook gives a row saying so.
3. :mod:`labkit.grading.marks` re-checks every recorded answer against the model (one mark a part)
   and writes one row a student; :mod:`labkit.grading.report` the HTML summary.

Student code runs with the grader's rights, as with any notebook grader: grade on a machine or
container you can throw away. The answer key (every student's numbers and expected answers) is
:func:`answer_key`.
"""

from __future__ import annotations

import csv
import io
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from labkit import exercises
from labkit.cluster import run_tasks
from labkit.grading import marks, report
from labkit.grading.execute import grade_submission
from labkit.grading.submissions import find_files, inspect, read_roster, read_templates

DEFAULT_TIMEOUT_S = 120


@dataclass
class Grades:
    """What :func:`grade` returns: per-submission results, and the marks table."""

    results: list[dict]
    columns: list[str]
    rows: list[dict]

    def row(self, student: str) -> dict:
        return next(r for r in self.rows if r["student"] == student)

    def to_csv(self, path: str | None = None) -> str:
        return marks.to_csv(self.columns, self.rows, path)


def default_templates() -> Path:
    from labkit.cli_args import project_root

    return project_root() / "notebooks" / "exercises"


def grade(submissions: str | Path, *, roster: str | Path | None = None, seed: int = 0,
          templates: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT_S,
          kernel: str = "python3", executed_dir: str | Path | None = None,
          scheduler: str | None = None, workers: int | None = None,
          progress: Callable[[str], None] | None = print) -> Grades:
    """Grade every submission under ``submissions`` (see the module docstring)."""
    directory = Path(submissions)
    if not directory.is_dir():
        raise ValueError(f"SUBMISSIONS_DIR must be a folder (one sub-folder or notebook per student), "
                         f"got {str(submissions)!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    catalog = read_templates(templates or default_templates())
    people = read_roster(roster, seed) if roster is not None else None
    subs = [inspect(student, path, directory, catalog, people, seed)
            for student, path in find_files(directory)]
    tasks = [{"submission": s, "template": catalog.get(s.template) if s.template else None,
              "kernel": kernel, "timeout": timeout,
              "executed_dir": str(executed_dir) if executed_dir else None} for s in subs]

    def failed(task: dict, message: str) -> dict:
        s = task["submission"]
        return {"student": s.student, "seed": s.seed, "relpath": s.relpath, "template": s.template,
                "exercises": list(s.exercises), "flags": list(s.flags), "parts": {}, "seconds": 0.0,
                "status": "crashed", "notes": [f"the grading worker failed: {message[:300]}"]}

    def describe(r: dict) -> str:
        right = sum(v["verdict"] is True for p in r["parts"].values() for v in p.values())
        total = sum(len(p) for p in r["parts"].values())
        return f"{r['status']}, {right}/{total} parts right"

    results = run_tasks(grade_submission, tasks, scheduler=scheduler, workers=workers,
                        label=lambda t: t["submission"].relpath, describe=describe, on_error=failed,
                        progress=progress)
    columns, rows = marks.marks_table(results, people)
    return Grades(results, columns, rows)


def answer_key(names: Iterable[str], students: Iterable[str | int], seed: int = 0,
               roster: dict[str, int] | None = None) -> tuple[list[str], list[dict]]:
    """The answer key: for every student and exercise, the variant's numbers and the expected answer
    of each part (computed by the model). What ``labkit grade --answer-key`` writes; its ``student``
    and ``seed`` columns make it a roster for ``--roster`` too.

    >>> cols, rows = answer_key(["balloon_requests"], ["alice", "bob"])
    >>> cols[:3], [r["student"] for r in rows]
    (['exercise', 'student', 'seed'], ['alice', 'bob'])
    """
    rows, cols = [], ["exercise", "student", "seed"]
    for name in names:
        spec = exercises.spec(name)
        for student in students:
            s = (roster or {}).get(str(student), seed)
            ex = spec.make(student, s)
            expected = ex.solve()
            expected = expected if isinstance(expected, dict) else {spec.parts[0].name: expected}
            row = {"exercise": name, "student": ex.student, "seed": ex.seed,
                   **{f"param.{k}": v for k, v in ex.params.items()},
                   **{f"expected.{p}": v for p, v in expected.items()}}
            rows.append(row)
            cols += [k for k in row if k not in cols]
    return cols, rows


def answer_key_csv(names: Iterable[str], students: Iterable[str | int], seed: int = 0,
                   roster: dict[str, int] | None = None, path: str | None = None) -> str:
    cols, rows = answer_key(names, students, seed, roster)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue()
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


__all__ = ["Grades", "answer_key", "answer_key_csv", "grade", "report"]
