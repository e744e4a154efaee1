"""nbgrader-compatible metadata for the exercise notebooks: every exercise's check cell is an
autograded cell worth a point a part, answers are solution cells, the rest is locked, and the markup
obeys nbgrader's schema-3 rules (nbgrader/nbgraderformat/v3.py); labkit grade reads it the same way."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

from labkit import exercises
from labkit.grading import nbgrader, submissions

EXERCISES = sorted((Path(__file__).resolve().parent.parent / "notebooks" / "exercises").glob("*.ipynb"))


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_marked_exercise_notebooks_validate(path, tmp_path):
    plain = nbformat.read(path, as_version=4)
    nb = nbgrader.mark(copy.deepcopy(plain), path.stem)
    assert nbgrader.problems(nb) == []
    made = submissions.Template.read(path).exercises
    marked = [c for c in nb.cells if "nbgrader" in c.metadata]
    grades = {c.metadata.nbgrader["grade_id"]: c.metadata.nbgrader["points"]
              for c in marked if c.metadata.nbgrader["grade"]}
    assert grades == {name: len(exercises.spec(name).parts) for name in made}
    # the student's own cells (parameters, answers) carry no nbgrader markup: nbgrader leaves them be
    free = [c for c in nb.cells if c not in marked]
    assert free and all(submissions.ANSWER_MARK in c.source or submissions.is_parameters(c) for c in free)
    assert all(c.metadata.nbgrader["locked"] for c in marked)
    assert nb.metadata["labkit"]["template"] == path.stem
    # labkit grade sees the same exercises and the same locked cells with or without the markup
    nbformat.write(nb, tmp_path / path.name)
    again = submissions.Template.read(tmp_path / path.name)
    assert again.exercises == made and set(again.locked) == set(submissions.Template.read(path).locked)


def test_problems_are_found():
    nb = nbgrader.mark(nbformat.read(EXERCISES[0], as_version=4), EXERCISES[0].stem)
    cells = nb.cells
    marked = [c for c in cells if "nbgrader" in c.metadata]
    grade = next(c for c in marked if c.metadata.nbgrader["grade"])
    grade.metadata.nbgrader.pop("points")
    marked[1].metadata.nbgrader["solution"] = True  # and still locked
    marked[0].metadata.nbgrader["grade_id"] = marked[2].metadata.nbgrader["grade_id"]
    marked[3].metadata.nbgrader["grade_id"] = "has space"
    text = " | ".join(nbgrader.problems(nb))
    assert "needs points" in text and "cannot be locked" in text
    assert "used twice" in text and "is not made of letters" in text


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_committed_exercise_notebooks_carry_the_markup(path):
    nb = nbformat.read(path, as_version=4)
    assert nbgrader.problems(nb) == [] and nb.metadata["labkit"]["template"] == path.stem
    marked = copy.deepcopy(nb)
    assert nbgrader.mark(marked, path.stem) == nb  # marking again changes nothing: nothing is stale
