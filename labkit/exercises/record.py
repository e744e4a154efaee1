"""Record every exercise check a notebook makes, for a grader to collect (``labkit grade``).

``start(path)`` makes every later :meth:`labkit.exercises.core.Exercise.check` in this Python
process append one JSON line to ``path``: the exercise, the student and seed of the variant that was
checked, and the answer exactly as given (before any verdict, so a check that raises, a crash later
in the notebook or a time-out keeps what was checked up to then). The grader never trusts a verdict
computed inside the student's kernel: it re-checks each recorded answer against its own trusted
variant (:func:`labkit.grading.marks.verify`). Nothing is recorded until ``start`` is called, so
notebooks behave the same outside a grader.

>>> import contextlib, io, os, tempfile
>>> from labkit import exercises
>>> path = os.path.join(tempfile.mkdtemp(), "checks.jsonl")
>>> start(path)
>>> ex = exercises.make("dommemstat", "alice")
>>> with contextlib.redirect_stdout(io.StringIO()):  # the check prints its tick
...     _ = ex.check(ex.solve())
>>> [(r["exercise"], r["student"], sorted(r["answer"])) for r in read(path)]
[('dommemstat', 'alice', ['actual', 'available', 'usable'])]
>>> stop()
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from pathlib import Path
from typing import Any

from labkit.exercises.core import Exercise

_ORIGINAL_CHECK = Exercise.check
_path: Path | None = None


def jsonable(value: Any) -> Any:
    """``value`` as JSON: numbers, bools, None, str, dicts and lists of them; numpy scalars become
    Python ones; anything else becomes ``{"repr": repr(value)}`` (a malformed answer stays visible)."""
    if value is None or isinstance(value, bool | str):
        return value
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()  # numpy scalar
        if isinstance(value, bool):
            return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else {"repr": repr(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return {"repr": repr(value)[:200]}


def note(exercise: Exercise, answer: Any) -> None:
    """Append one check of ``exercise`` with ``answer`` to the file given to :func:`start`."""
    if _path is None:
        return
    row = {"exercise": exercise.name, "student": exercise.student, "seed": exercise.seed,
           "answer": jsonable(answer)}
    with open(_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


@functools.wraps(_ORIGINAL_CHECK)
def _recording_check(self: Exercise, answer: Any, *args: Any, **kwargs: Any) -> Any:
    note(self, answer)
    return _ORIGINAL_CHECK(self, answer, *args, **kwargs)


def start(path: str | Path) -> None:
    """Record every later check into ``path`` (a JSON-lines file, created empty)."""
    global _path
    _path = Path(path)
    _path.write_text("", encoding="utf-8")
    Exercise.check = _recording_check


def stop() -> None:
    """Stop recording (checks behave as before :func:`start`)."""
    global _path
    _path = None
    Exercise.check = _ORIGINAL_CHECK


def read(path: str | Path) -> list[dict]:
    """The checks recorded in ``path``, in order (an unreadable line is skipped: a student's code
    could have written to the file; the grader re-checks every answer anyway)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"exercise", "student", "seed", "answer"} <= set(row):
            rows.append(row)
    return rows
