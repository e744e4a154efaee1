"""nbgrader-compatible cell metadata for the exercise notebooks, so a course already on nbgrader can
autograde them (and ``labkit grade`` reads the same markup).

:func:`mark` gives every cell nbgrader's schema-3 metadata:

* every given code cell but two kinds: ``locked`` (nbgrader restores it from the source version
  when autograding, and its checksum shows an edit);
* the ``parameters`` cell and the answer cells (``answer = {...}  # replace each None with your
  answer``): **no** nbgrader metadata. They are the student's to edit, and nbgrader leaves such
  cells alone. (As ``solution`` cells, ``generate_assignment`` would replace them with
  ``raise NotImplementedError()``, and a locked parameters cell would be reset to the template's
  student id: both tried with nbgrader 0.9.6.);
* the check cells (``results[...] = (ex, ex.check(answer, ...))``): ``grade`` cells (autograder
  tests) worth one point per part of the exercise, with ``grade_id`` = the exercise's name;
* markdown cells: ``locked``.

The notebook also gets ``metadata.labkit.template`` (its name), which ``labkit grade`` uses to match
a renamed submission. :func:`problems` checks the rules nbgrader's own validator enforces for this
markup (unique ids, points on grade cells, solution cells unlocked, ...), so the tests can hold the
markup without nbgrader installed. A check cell must raise under nbgrader when the answer is wrong:
the exercise checks do that when nbgrader runs them (``strict``; see the project's notes).

    python -m labkit.grading.nbgrader notebooks/exercises/*.ipynb     (marks them in place)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

from labkit import exercises
from labkit.grading.submissions import ANSWER_MARK, MAKE_CALL, is_parameters

SCHEMA_VERSION = 3
GRADE_ID = re.compile(r"^[a-zA-Z0-9_\-]+$")
CHECK_CALL = re.compile(r"\b(\w+)\.check\(\s*answer")


def mark(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """Add nbgrader (and labkit) metadata to ``nb`` in place; returns it."""
    made: dict[str, str] = {}  # variable -> exercise, from `ex1 = exercises.make("name", student, seed)`
    for cell in nb.cells:
        if cell.cell_type == "code":
            for var, ex in re.findall(r"(\w+)\s*=\s*exercises\.make\(\s*[\"'](\w+)[\"']\s*,\s*student\b",
                                      cell.source):
                made[var] = ex
    used: set[str] = set()

    def unique(base: str) -> str:
        gid, n = base, 1
        while gid in used:
            n += 1
            gid = f"{base}-{n}"
        used.add(gid)
        return gid

    for i, cell in enumerate(nb.cells):
        meta = {"schema_version": SCHEMA_VERSION, "grade": False, "solution": False, "locked": True,
                "task": False}
        if cell.cell_type == "code" and (is_parameters(cell) or ANSWER_MARK in cell.source):
            cell.metadata.pop("nbgrader", None)  # the student's cells: nbgrader leaves them alone
            continue
        if cell.cell_type == "markdown":
            meta["grade_id"] = unique(f"md-{i}")
        elif (m := CHECK_CALL.search(cell.source)) and m.group(1) in made:
            exercise = made[m.group(1)]
            meta.update(grade=True, points=len(exercises.spec(exercise).parts), grade_id=unique(exercise))
        else:
            meta["grade_id"] = unique(f"cell-{i}")
        cell.metadata["nbgrader"] = meta
    nb.metadata.setdefault("labkit", {})["template"] = name
    return nb


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What nbgrader's validator (nbgrader/nbgraderformat/v3.py) would refuse, as sentences."""
    out, ids = [], set()
    for i, cell in enumerate(nb.cells):
        meta = cell.get("metadata", {}).get("nbgrader")
        if meta is None:
            continue
        where = f"cell {i}"
        if meta.get("schema_version") != SCHEMA_VERSION:
            out.append(f"{where}: schema_version {meta.get('schema_version')!r} is not {SCHEMA_VERSION}")
        for key in ("grade", "solution", "locked", "task", "grade_id"):
            if key not in meta:
                out.append(f"{where}: no {key!r}")
        gid = meta.get("grade_id", "")
        if not isinstance(gid, str) or not GRADE_ID.match(gid):
            out.append(f"{where}: grade_id {gid!r} is not made of letters, digits, _ and -")
        elif gid in ids:
            out.append(f"{where}: grade_id {gid!r} is used twice")
        ids.add(gid)
        if meta.get("grade") or meta.get("task"):
            points = meta.get("points")
            if not isinstance(points, int | float) or points < 0:
                out.append(f"{where}: a grade cell needs points >= 0, has {points!r}")
        if meta.get("solution") and meta.get("locked"):
            out.append(f"{where}: a solution cell cannot be locked")
        if meta.get("grade") and meta.get("solution") and cell.cell_type == "code":
            out.append(f"{where}: a code cell cannot be both an autograder test and a solution")
        if cell.cell_type == "markdown" and meta.get("grade") and not meta.get("solution"):
            out.append(f"{where}: a graded markdown cell must be a solution (manually graded) cell")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for arg in argv:
        path = Path(arg)
        nb = mark(nbformat.read(path, as_version=4), path.stem)
        bad = problems(nb)
        if bad:
            print(f"{path}: " + "; ".join(bad), file=sys.stderr)
            return 1
        if not MAKE_CALL.search("\n".join(c.source for c in nb.cells if c.cell_type == "code")):
            print(f"{path}: makes no exercise; not an exercise notebook", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        grades = [c.metadata["nbgrader"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
        print(f"{path}: {len(grades)} autograded cells, {sum(g['points'] for g in grades)} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
