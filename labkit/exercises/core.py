"""The machinery every exercise shares: seeded variants, answer parts, checking with hints.

An exercise is a :class:`Spec`: how to draw one student's numbers from a seeded generator
(``derive``), how to run the model on them (``run``, which returns the facts the prompt shows and
the expected answers), the prompt, and a ``hint`` for a wrong part. :meth:`Spec.make` turns a
student id and a seed into an :class:`Exercise`; its :meth:`Exercise.check` prints a tick, or a
cross with a hint (so Run All goes on); with ``strict=True`` (an nbgrader test cell) a wrong answer
raises ``AssertionError`` with the same text.

Expected answers are never written down: they come from running the model on the student's
variant, once, the first time they are needed (:meth:`Exercise.solve`).

>>> spec = Spec(name="double", title="Twice a number", sections=("§0",),
...             parts=(Part("twice", "int", "twice n"),),
...             derive=lambda rng: {"n": int(rng.integers(1, 100))},
...             run=lambda p: ({}, {"twice": 2 * p["n"]}),
...             prompt="What is twice {n}?")
>>> ex = spec.make("alice")
>>> ex.params == spec.make("alice").params          # the same student, the same numbers
True
>>> _ = ex.check(2 * ex.params["n"])
✓ double (alice, seed 0): right.
>>> ex.check(2 * ex.params["n"] + 1).passed
✗ double (alice, seed 0): 1 of 1 part is wrong.
  twice: ... is too high. Hint: ...
False
>>> ex.check(2 * ex.params["n"] + 1, strict=True)
Traceback (most recent call last):
...
AssertionError: double (alice, seed 0): 1 of 1 part is wrong.
  twice: ... is too high. Hint: ...
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labkit import docs

KINDS = ("int", "float", "bool")
DOCS_FROM = "notebooks/exercises"  # where the exercise notebooks are: the prompt's links start there
MISSING_NOTE = "✎ write your answer in the cell above (replace None), then run this cell again."


@dataclass(frozen=True)
class Part:
    """One answer of an exercise: its ``name`` (the key in an answer dict), ``kind`` (``int``,
    ``float`` or ``bool``), a short ``label``, its ``unit``, and for measured quantities the
    tolerance: ``|given - expected| <= abs + rel * |expected|``."""

    name: str
    kind: str
    label: str
    unit: str = ""
    rel: float = 0.0
    abs: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"part {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")

    @property
    def tolerance_text(self) -> str:
        """How close an answer must be, in words (empty for exact answers)."""
        bits = [f"{self.rel:.0%}" if self.rel else "",
                f"{self.abs:g} {self.unit}".strip() if self.abs else ""]
        return " + ".join(b for b in bits if b)

    def coerce(self, value: Any) -> int | float | bool | None:
        """The answer as this part's kind; None stays None (not answered yet).

        Raises ``TypeError`` naming the value and the kind accepted (a string, a bool for a number,
        a number for a bool) and ``ValueError`` for a non-whole count or a NaN."""
        if value is None:
            return None
        accepted = {"int": "a whole number (int)", "float": f"a number ({self.unit or 'float'})",
                    "bool": "True or False"}[self.kind]
        if self.kind == "bool":
            if isinstance(value, bool | np.bool_):
                return bool(value)
            raise TypeError(f"{self.name} must be {accepted}, got {value!r}")
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise TypeError(f"{self.name} must be {accepted}, got {value!r} ({type(value).__name__})")
        try:  # an int beyond a float (10**400) is not an answer either: OverflowError otherwise
            number = float(value)
        except OverflowError:
            digits = str(value)
            raise ValueError(f"{self.name} must be a finite number, got {digits[:12]}... "
                             f"({len(digits)} digits, too large for any answer)") from None
        if not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number, got {value!r}")
        if self.kind == "int":
            if not number.is_integer():
                raise ValueError(f"{self.name} must be {accepted}, got {value!r}")
            return int(value)
        return number

    def matches(self, given: int | float | bool, expected: int | float | bool) -> bool:
        """Whether ``given`` is right: equal for int and bool parts, within tolerance for floats."""
        if self.kind != "float":
            return given == expected
        return abs(given - expected) <= self.abs + self.rel * abs(expected) + 1e-9


@dataclass(frozen=True)
class Result:
    """What :meth:`Exercise.check` found: per part, right (True), wrong (False) or missing (None)."""

    exercise: str
    student: str
    seed: int
    parts: dict[str, bool | None]

    @property
    def passed(self) -> bool:
        return all(ok is True for ok in self.parts.values())

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(name for name, ok in self.parts.items() if ok is None)

    def __str__(self) -> str:
        who = f"{self.exercise} ({self.student}, seed {self.seed})"
        if self.passed:
            return f"✓ {who}: right."
        if len(self.missing) == len(self.parts):
            return f"{who}: not answered yet."
        right = [n for n, ok in self.parts.items() if ok]
        return f"{who}: right so far: {right}; still to answer: {list(self.missing)}"


@dataclass(frozen=True)
class Spec:
    """An exercise generator. ``derive(rng) -> params`` draws a variant; ``run(params) ->
    (facts, expected)`` runs the model; ``prompt`` is a format string over params and facts (or a
    callable of both); ``hint(part, given, expected, params, facts)`` returns a hint for a wrong
    part or None (then ``hints[part]`` is used); ``explain(params, facts, expected)`` writes the
    worked solution. ``sections`` cite the sections of the mechanism reference (e.g. §1.2)."""

    name: str
    title: str
    sections: tuple[str, ...]
    parts: tuple[Part, ...]
    derive: Callable[[np.random.Generator], dict]
    run: Callable[[dict], tuple[dict, dict]]
    prompt: str | Callable[[dict, dict], str]
    hints: Mapping[str, str] = field(default_factory=dict)
    hint: Callable[..., str | None] | None = None
    explain: Callable[[dict, dict, dict], str] | None = None

    def make(self, student: str | int, seed: int = 0) -> Exercise:
        """This exercise's variant for ``student`` (a non-empty str, or an int such as a roll
        number) and ``seed`` (an int; change it to give the class a new set of numbers)."""
        student, seed = check_student(student, seed)
        return Exercise(self, student, seed, self.derive(variant_rng(self.name, student, seed)))


def check_student(student: Any, seed: Any) -> tuple[str, int]:
    """Validate a student id and a seed; an int id becomes its decimal string."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(student, bool) or not isinstance(student, str | numbers.Integral):
        raise TypeError(f"student must be a str (a name or login) or an int, got {student!r}")
    student = str(student)
    if not student.strip():
        raise ValueError(f"student must be a non-empty id, got {student!r}")
    return student, int(seed)


def variant_rng(exercise: str, student: str, seed: int) -> np.random.Generator:
    """The generator a variant is drawn from: SHA-256 of (exercise, student, seed), so the numbers
    are the same on every machine and Python version and differ between students and exercises.

    >>> a = variant_rng("x", "alice", 0).integers(1 << 30)
    >>> int(a) == int(variant_rng("x", "alice", 0).integers(1 << 30))
    True
    """
    digest = hashlib.sha256(f"labkit-exercise\0{exercise}\0{student}\0{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


class Exercise:
    """One student's variant of an exercise: ``prompt``, ``check(answer)``, ``solve()``,
    ``explain()``. Make one with :func:`labkit.exercises.make` or :meth:`Spec.make`."""

    def __init__(self, spec: Spec, student: str, seed: int, params: dict):
        self.spec = spec
        self.student = student
        self.seed = seed
        self.params = dict(params)
        self.docs_from = DOCS_FROM  # the folder the prompt is shown in (its § links are relative)
        self._outcome: tuple[dict, dict] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.spec.parts

    def _run(self) -> tuple[dict, dict]:
        if self._outcome is None:  # one model run per variant, kept
            self._outcome = self.spec.run(dict(self.params))
        return self._outcome

    @property
    def facts(self) -> dict:
        """What the model showed before the question (the prompt quotes them)."""
        return dict(self._run()[0])

    @property
    def prompt(self) -> str:
        """The question, in Markdown, with this student's numbers."""
        facts = self._run()[0]
        if callable(self.spec.prompt):
            body = self.spec.prompt(self.params, facts)
        else:
            body = self.spec.prompt.format(**self.params, **facts)
        lines = [f"**{self.spec.title}** ({self.name}; student `{self.student}`, seed {self.seed})", "",
                 body.strip(), "", "Answer with:"]
        for p in self.parts:
            tol = f", within {p.tolerance_text}" if p.tolerance_text else ""
            unit = f" in {p.unit}" if p.unit else ""
            lines.append(f"* `{p.name}`: {p.label} ({p.kind}{unit}{tol})")
        if len(self.parts) > 1:
            lines.append("\nas a dict: `{" + ", ".join(f'"{p.name}": ...' for p in self.parts) + "}`.")
        lines += ["", "The mechanism: " + " · ".join(docs.link(s, self.docs_from) for s in self.spec.sections)
                  + " (labkit's reference)."]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.prompt

    def __repr__(self) -> str:
        return f"<Exercise {self.name} student={self.student!r} seed={self.seed} params={self.params}>"

    def blank(self) -> dict[str, None] | None:
        """An unanswered answer of the right shape (what a notebook pre-fills)."""
        return None if len(self.parts) == 1 else {p.name: None for p in self.parts}

    def solve(self) -> Any:
        """The expected answer, computed by running the model on this variant: a dict of parts, or
        the bare value for a one-part exercise (the same shape :meth:`check` accepts)."""
        expected = self._run()[1]
        if len(self.parts) == 1:
            return expected[self.parts[0].name]
        return {p.name: expected[p.name] for p in self.parts}

    def explain(self) -> str:
        """The worked solution with this variant's numbers, and where its § citations are."""
        facts, expected = self._run()
        if self.spec.explain is None:
            return "\n".join(f"{p.name} = {expected[p.name]!r}" for p in self.parts)
        text = self.spec.explain(self.params, facts, expected)
        return text + references(text)

    def _answers(self, answer: Any) -> dict[str, Any]:
        names = [p.name for p in self.parts]
        if isinstance(answer, Mapping):
            unknown = sorted(set(answer) - set(names), key=str)
            if unknown:
                raise ValueError(f"{self.name}: unknown answer key(s) {unknown}; the parts are {names}")
            return {n: answer.get(n) for n in names}
        if len(names) == 1:
            return {names[0]: answer}
        raise TypeError(f"{self.name} has {len(names)} parts: answer with a dict "
                        f"{{{', '.join(repr(n) for n in names)}}}, got {answer!r}")

    def check(self, answer: Any, *, missing_ok: bool = False, strict: bool = False) -> Result:
        """Check ``answer``: print "✓ ..." and return a :class:`Result` if it is right; otherwise
        print "✗ ..." with a hint for each wrong part and return the (failed) Result, so that a
        notebook's Run All goes on to the next exercise.

        ``strict=True`` (what an nbgrader-style autograded test cell calls) raises
        ``AssertionError`` with the same text instead of printing it. An unanswered part (None)
        counts as not right, unless ``missing_ok`` (for notebooks that must run before the
        student answers): then a note is printed and the right parts are reported. A malformed
        answer (unknown key, a string for a number...) raises ``TypeError`` or ``ValueError``
        naming it, before anything runs, whatever ``strict``.

        Under nbgrader's autograder or validator (``NBGRADER_EXECUTION`` is set in the kernel's
        environment) ``strict`` is forced on and an unanswered part is wrong too: a test cell must
        raise, or an empty submission would score full marks."""
        if os.environ.get("NBGRADER_EXECUTION"):  # nbgrader 0.9: converters/autograde.py, validator.py
            strict, missing_ok = True, False
        given = {p.name: p.coerce(v) for p, v in zip(self.parts, self._answers(answer).values(),
                                                       strict=True)}
        who = f"{self.name} ({self.student}, seed {self.seed})"
        missing = [n for n, v in given.items() if v is None]
        if missing and not missing_ok:
            return self._fail(f"{who}: no answer yet for {missing}", strict,
                              Result(self.name, self.student, self.seed, dict.fromkeys(given)))
        facts, expected = self._run()
        verdict: dict[str, bool | None] = {}
        wrong = []
        for p in self.parts:
            if given[p.name] is None:
                verdict[p.name] = None
                continue
            verdict[p.name] = p.matches(given[p.name], expected[p.name])
            if not verdict[p.name]:
                wrong.append(self._wrong_line(p, given[p.name], expected, facts))
        result = Result(self.name, self.student, self.seed, verdict)
        if wrong:
            n = len(self.parts)
            return self._fail(f"{who}: {len(wrong)} of {n} part{'s' if n > 1 else ''} "
                              f"{'is' if len(wrong) == 1 else 'are'} wrong.\n" + "\n".join(wrong),
                              strict, result)
        print(str(result) if not missing else f"{result}\n{MISSING_NOTE}")
        return result

    @staticmethod
    def _fail(message: str, strict: bool, result: Result) -> Result:
        """Raise ``AssertionError(message)`` (strict) or print it after a cross; a hint's §
        citations are followed by where they are in the repository."""
        message += references(message)
        if strict:
            raise AssertionError(message)
        print(f"✗ {message}")
        return result

    def _wrong_line(self, part: Part, given: Any, expected: dict, facts: dict) -> str:
        hint = None
        if self.spec.hint is not None:
            hint = self.spec.hint(part.name, given, expected, self.params, facts)
        hint = hint or self.spec.hints.get(part.name, "look again at " + ", ".join(self.spec.sections))
        if part.kind == "bool":
            verdict = "is not right"
        else:
            verdict = "is too high" if given > expected[part.name] else "is too low"
            if part.tolerance_text:
                verdict += f" (by more than {part.tolerance_text})"
        return f"  {part.name}: {given!r} {verdict}. Hint: {hint}"


def references(text: str) -> str:
    """For printed text (hints, worked solutions): a last line naming the file and anchor of each §
    the text cites, e.g. "\n  (§1.2 is docs/mechanisms.md#s1.2)"; empty if it cites none.

    >>> print(references("each request moves 256 pages (§1.2); see also §1.7.").strip())
    (§1.2 is docs/mechanisms.md#s1.2, §1.7 is docs/mechanisms.md#s1.7 in labkit's repository)
    """
    cited = list(dict.fromkeys(docs.CITATION.findall(text)))
    if not cited:
        return ""
    where = ", ".join(f"§{n} is {docs.DOCS_DIR}/{docs.MECHANISMS}#{docs.anchor(n)}" for n in cited)
    return f"\n  ({where} in labkit's repository)"


def near(given: float, value: float, rel: float = 0.02, abs_: float = 0.5) -> bool:
    """Whether a wrong answer is close to a known misconception's value (for choosing a hint)."""
    return abs(given - value) <= abs_ + rel * abs(value)
