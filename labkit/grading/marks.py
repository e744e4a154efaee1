"""From recorded checks to marks: re-check every answer against the trusted variant, then one row a
student, one column a part.

A part is worth one mark when the last answer checked for it (for the student and seed the grader
trusts) is right by the exercise's own rule (:meth:`labkit.exercises.core.Part.matches`, after
:meth:`~labkit.exercises.core.Part.coerce`): exact for counts and yes/no answers, within the stated
tolerance for measured quantities. The expected answer comes from running the model on the
student's variant (:meth:`labkit.exercises.core.Exercise.solve`), never from a table. A wrong part
keeps the hint the exercise gives for it: the report groups wrong answers by that hint, which names
the misconception (the mechanism a student got wrong), since every student's numbers differ.

>>> from labkit import exercises
>>> ex = exercises.make("balloon_requests", "alice")
>>> right = ex.solve()
>>> parts = verify("alice", 0, ["balloon_requests"],
...                [{"exercise": "balloon_requests", "student": "alice", "seed": 0,
...                  "answer": {**right, "requests": right["requests"] + 1}}])
>>> {name: p["verdict"] for name, p in parts["balloon_requests"].items()}
{'requests': False, 'actual_after': True}
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import Any

from labkit import exercises

WORKED_EXAMPLE = "worked-example"  # the student id of the exercise notebooks' worked examples


def _as_parts(ex: exercises.Exercise, answer: Any) -> dict[str, Any] | str:
    names = [p.name for p in ex.parts]
    if isinstance(answer, Mapping) and "repr" not in answer:
        unknown = sorted(set(answer) - set(names))
        if unknown:
            return f"unknown answer key(s) {unknown}; the parts are {names}"
        return {n: answer.get(n) for n in names}
    if len(names) == 1:
        return {names[0]: answer}
    return f"answered with {answer!r}, not a dict of {names}"


def _hint(ex: exercises.Exercise, part: exercises.Part, given: Any, expected: dict) -> str:
    spec = ex.spec
    hint = spec.hint(part.name, given, expected, ex.params, ex.facts) if spec.hint else None
    return hint or spec.hints.get(part.name) or "look again at " + ", ".join(spec.sections)


def verify(student: str, seed: int, names: Iterable[str], records: list[dict]) -> dict[str, dict]:
    """``{exercise: {part: {"verdict", "given", "expected", "hint"}}}`` for ``student``'s variants
    (seed ``seed``) of the exercises ``names``, from the last recorded check of each. ``verdict`` is
    True (right), False (wrong or malformed) or None (never checked, or left as None)."""
    out: dict[str, dict] = {}
    for name in names:
        ex = exercises.make(name, student, seed)
        expected = ex.solve()
        expected = expected if isinstance(expected, dict) else {ex.parts[0].name: expected}
        mine = [r for r in records if r["exercise"] == name and str(r["student"]) == student
                and r["seed"] == seed]
        parts: dict[str, dict] = {p.name: {"verdict": None, "given": None,
                                            "expected": expected[p.name], "hint": None}
                                  for p in ex.parts}
        out[name] = parts
        if not mine:
            continue
        given = _as_parts(ex, mine[-1]["answer"])
        for p in ex.parts:
            row = parts[p.name]
            if isinstance(given, str):
                row.update(verdict=False, hint=f"malformed answer: {given}")
                continue
            row["given"] = given[p.name]
            try:
                value = p.coerce(given[p.name])
            except (TypeError, ValueError) as e:
                row.update(verdict=False, hint=f"malformed answer: {e}")
                continue
            if value is None:
                continue
            row["verdict"] = bool(p.matches(value, expected[p.name]))
            if not row["verdict"]:
                row["hint"] = _hint(ex, p, value, expected)
    return out


def other_variants(student: str, seed: int, names: Iterable[str], records: list[dict]) -> list[str]:
    """Variants of this notebook's exercises that were checked for someone else (or another seed)
    and never for the trusted one: a sign the notebook's ids were changed."""
    names = set(names)
    trusted = {r["exercise"] for r in records if str(r["student"]) == student and r["seed"] == seed}
    return sorted({f"{r['exercise']} as {r['student']!r}, seed {r['seed']}" for r in records
                   if r["exercise"] in names and r["exercise"] not in trusted
                   and str(r["student"]) != WORKED_EXAMPLE})


STATUS_ORDER = ("graded", "flagged", "error", "timeout", "crashed", "not a notebook", "no submission")


def columns_for(results: list[dict]) -> list[str]:
    """The part columns, ``<exercise>.<part>``, in the order the templates make them."""
    cols: list[str] = []
    for result in results:
        for name in result.get("exercises", ()):
            for part in exercises.spec(name).parts:
                col = f"{name}.{part.name}"
                if col not in cols:
                    cols.append(col)
    return cols


def marks_table(results: list[dict], roster: Mapping[str, int] | None = None) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: one row a student (sorted by id), one column a part (1 right, 0 not),
    ``total`` and ``max`` over the exercises of the notebooks the student handed in, ``percent``
    over every part column, ``status`` (the worst of the student's submissions, in
    :data:`STATUS_ORDER`), ``flags`` and ``notes`` (per file). A roster student who handed in
    nothing gets a ``no submission`` row."""
    parts = columns_for(results)
    by_student: dict[str, list[dict]] = {}
    for result in results:
        by_student.setdefault(result["student"], []).append(result)
    for student in roster or {}:
        by_student.setdefault(student, [])
    rows = []
    for student in sorted(by_student):
        own = by_student[student]
        row: dict[str, Any] = {"student": student,
                               "seed": own[0]["seed"] if own else (roster or {}).get(student, "")}
        row.update({col: 0 for col in parts})
        handed = set()
        for result in own:
            for name, verdicts in result.get("parts", {}).items():
                for part, v in verdicts.items():
                    row[f"{name}.{part}"] = max(row[f"{name}.{part}"], int(v["verdict"] is True))
                    handed.add(f"{name}.{part}")
        row["total"] = sum(row[col] for col in parts)
        row["max"] = len(handed)
        row["percent"] = round(100 * row["total"] / len(parts), 1) if parts else 0.0
        statuses = [r["status"] for r in own] or ["no submission"]
        row["status"] = max(statuses, key=STATUS_ORDER.index)
        row["flags"] = " | ".join(f"{r['relpath']}: {f}" for r in own for f in r.get("flags", []))
        row["notes"] = " | ".join(f"{r['relpath']}: {n}" for r in own for n in r.get("notes", []))
        rows.append(row)
    columns = ["student", "seed", *parts, "total", "max", "percent", "status", "flags", "notes"]
    return columns, rows


def to_csv(columns: list[str], rows: list[dict], path: str | None = None) -> str:
    """The marks as CSV text (also written to ``path`` when given)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = out.getvalue()
    if path is not None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return text
