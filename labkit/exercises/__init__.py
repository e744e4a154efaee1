"""Seeded exercises that check themselves: one variant per student, answers computed by the model.

Every exercise draws its numbers (guest size, target, workload sizes...) from a hash of its name,
the student's id and a seed, so a student always gets the same variant, two students get different
ones, and an instructor can list everyone's numbers and expected answers (the answer key). The expected
answer is never written down: the checker runs the model on the variant and compares. A wrong
answer prints a cross and a hint that points at the mechanism (and its section of the mechanism
reference, e.g. §1.2), and the notebook runs on; a right one prints a tick. With ``strict=True``
(an nbgrader autograded test cell) a wrong answer raises ``AssertionError`` with the same text.

=======================  ===============================================================  ===============
exercise                 what the student predicts                                        sections
=======================  ===============================================================  ===============
``balloon_requests``     inflate requests for a target; query-balloon's actual after k    §1.2, §1.7
``dommemstat``           virsh dommemstat's actual / available / usable after inflating   §1.3, §1.5, §1.7
``reporting_rss``        reporting passes and host RSS returned t s after a job exits     §3.2, §3.3
``virtio_mem_requests``  PLUG requests, memmap cost, UNPLUG requests of a resize           §5.3-§5.5
``migration_converges``  pre-copy threshold; does a write-heavy guest converge            §6.2, §6.3
=======================  ===============================================================  ===============

A student:

>>> from labkit import exercises
>>> ex = exercises.make("balloon_requests", student="alice", seed=0)
>>> print(ex.prompt)                                    # doctest: +SKIP
>>> _ = ex.check({"requests": ex.solve()["requests"], "actual_after": ex.solve()["actual_after"]})
✓ balloon_requests (alice, seed 0): right.

An nbgrader test cell is just ``exercises.check("balloon_requests", "alice", answer, strict=True)``.
An instructor:

>>> table = exercises.variants("balloon_requests", students=["alice", "bob"])
>>> table.columns[:3]
['exercise', 'student', 'seed']
>>> csv_text = table.to_csv()                           # or table.to_csv("answer_key.csv")
>>> csv_text.splitlines()[1].startswith("balloon_requests,alice,0,")
True
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable, Iterator
from typing import Any

from labkit.exercises.balloon import BALLOON_REQUESTS, DOMMEMSTAT
from labkit.exercises.core import Exercise, Part, Result, Spec
from labkit.exercises.migration import MIGRATION_CONVERGES
from labkit.exercises.reporting import REPORTING_RSS
from labkit.exercises.virtio_mem import VIRTIO_MEM_REQUESTS

EXERCISES: dict[str, Spec] = {spec.name: spec for spec in (
    BALLOON_REQUESTS, DOMMEMSTAT, REPORTING_RSS, VIRTIO_MEM_REQUESTS, MIGRATION_CONVERGES)}


def spec(exercise: str | Spec) -> Spec:
    """The exercise named ``exercise`` (or ``exercise`` itself if it already is a :class:`Spec`).

    >>> spec("dommemstat").sections
    ('§1.3', '§1.5', '§1.7')
    >>> spec("balloon")
    Traceback (most recent call last):
    ...
    ValueError: unknown exercise 'balloon'; accepted: ['balloon_requests', 'dommemstat', ...]
    """
    if isinstance(exercise, Spec):
        return exercise
    if not isinstance(exercise, str) or exercise not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise!r}; accepted: {list(EXERCISES)}")
    return EXERCISES[exercise]


def names() -> list[str]:
    """The exercises, in teaching order."""
    return list(EXERCISES)


def make(exercise: str | Spec, student: str | int, seed: int = 0) -> Exercise:
    """``student``'s variant of ``exercise`` (a name from :func:`names`), for ``seed``.

    >>> make("dommemstat", "bob").params == make("dommemstat", "bob").params
    True
    """
    return spec(exercise).make(student, seed)


def check(exercise: str | Spec, student: str | int, answer: Any, seed: int = 0, *,
          strict: bool = False) -> Result:
    """Check ``answer`` for ``student``'s variant: a tick, or a cross with a hint (printed).

    An nbgrader test cell calls it with ``strict=True``: a wrong or missing answer then raises
    ``AssertionError`` with the same text (the test cell only needs to raise)."""
    return make(exercise, student, seed).check(answer, strict=strict)


class Variants:
    """The answer key :func:`variants` returns: one row per student (a dict), with the
    variant's parameters and the expected answers (``expected_<part>``)."""

    def __init__(self, rows: list[dict], columns: list[str]):
        self.rows = rows
        self.columns = columns

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def to_csv(self, path: str | None = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        text = out.getvalue()
        if path is not None:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[_fmt(r[c]) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in self.columns)
                       + "</tr>" for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def variants(exercise: str | Spec, students: Iterable[str | int], seed: int = 0) -> Variants:
    """The answer key: each student's parameters and expected answers (runs the model per student).
    ``labkit answer-key`` writes it for several exercises at once; ``labkit grade`` marks what the
    students hand in.

    >>> rows = variants("virtio_mem_requests", students=["alice", "bob"])
    >>> [row["student"] for row in rows], "expected_plug_requests" in rows.columns
    (['alice', 'bob'], True)
    """
    s = spec(exercise)
    students = list(students)
    if not students:
        raise ValueError("variants() needs at least one student")
    rows = []
    for student in students:
        ex = s.make(student, seed)
        expected = ex.solve()
        expected = expected if isinstance(expected, dict) else {s.parts[0].name: expected}
        rows.append({"exercise": s.name, "student": ex.student, "seed": ex.seed, **ex.params,
                     **{f"expected_{name}": value for name, value in expected.items()}})
    columns = list(rows[0])
    return Variants(rows, columns)


__all__ = ["EXERCISES", "Exercise", "Part", "Result", "Spec", "Variants", "check", "make", "names",
           "spec", "variants"]
