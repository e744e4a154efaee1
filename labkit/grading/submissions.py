"""What was handed in: find the submissions, tell whose they are, match each to the notebook it was
made from, and flag what a student changed that they were not meant to.

**Layout.** ``SUBMISSIONS_DIR/<student>/.../<notebook>.ipynb`` (one folder per student, any depth
below it: nbgrader's ``submitted/<student>/<assignment>/`` works as is) or
``SUBMISSIONS_DIR/<student>.ipynb``. Who a submission belongs to comes from that path (what the
course's hand-in system vouches for), never from the notebook. Hidden files and
``.ipynb_checkpoints`` are skipped; any other file is a submission (a ``.pdf`` gets a "not a
notebook" row).

**Template.** Each submission is matched to the exercise notebook it started from (default
``notebooks/exercises/``): by the ``labkit.template`` notebook metadata, else by file name, else by
the exercises it makes. The template says which exercises the notebook holds (its
``exercises.make("<name>", student, seed)`` calls, or its nbgrader ``grade_id``s), which cells are
answer cells (the cells that say "replace each None with your answer", or nbgrader ``solution``
cells) and which are locked (every other code cell but the parameters cell).

**Trust.** The student id and seed come from the notebook's ``parameters`` cell, and are checked:
the student must be the one the path names, the seed the one the roster gives that student
(``--roster``: a CSV with a ``student`` column and optionally ``seed``, such as the answer key; else
``--seed``, default 0), ``solution`` must be False, and every locked cell must be there unchanged.
A submission that fails any of these is **flagged**, and graded with the trusted values anyway
(papermill injects them): a changed seed or id never earns a mark for someone else's numbers.
"""

from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ANSWER_MARK = "replace each None with your answer"
MAKE_CALL = re.compile(r"""exercises\.make\(\s*["'](\w+)["']\s*,\s*student\b""")
SOLVER_CALL = re.compile(r"\.(solve|explain)\(|exercises\.variants\(")
TRUSTED_PARAMETERS = ("student", "seed", "solution")


def normalized(source: str) -> str:
    """A cell's source without trailing spaces and surrounding blank lines (what a checksum sees)."""
    return "\n".join(line.rstrip() for line in source.strip("\n").splitlines()).strip()


def is_parameters(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])


def literal_parameters(source: str) -> dict:
    """The ``name = <literal>`` assignments of a parameters cell (anything else is ignored)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


@dataclass(frozen=True)
class Template:
    """An exercise notebook as handed out: its name, exercises, and locked cells."""

    name: str
    path: Path
    exercises: tuple[str, ...]
    locked: tuple[str, ...]           # normalized sources of the code cells a student must not change
    parameters: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> Template:
        path = Path(path)
        nb = nbformat.read(path, as_version=4)
        exercises: list[str] = []
        locked = []
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("grade") and meta.get("grade_id") and not meta.get("solution"):
                name = str(meta["grade_id"]).split(".")[0]
                if name not in exercises:
                    exercises.append(name)
            for name in MAKE_CALL.findall(cell.source):
                if name not in exercises:
                    exercises.append(name)
            answer = meta.get("solution") or ANSWER_MARK in cell.source
            if not is_parameters(cell) and not answer:
                locked.append(normalized(cell.source))
        params = next((literal_parameters(c.source) for c in nb.cells if is_parameters(c)), {})
        return cls(path.stem, path, tuple(exercises), tuple(locked), params)


def read_templates(directory: str | Path) -> dict[str, Template]:
    """Every ``*.ipynb`` of ``directory`` that makes at least one exercise, by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"templates must be a folder of exercise notebooks, got {str(directory)!r}")
    templates = {}
    for path in sorted(directory.glob("*.ipynb")):
        template = Template.read(path)
        if template.exercises:
            templates[template.name] = template
    if not templates:
        raise ValueError(f"no exercise notebook (one that calls exercises.make) in {str(directory)!r}")
    return templates


def read_roster(path: str | Path, default_seed: int = 0) -> dict[str, int]:
    """``{student: seed}`` from a CSV with a ``student`` column and optionally ``seed`` (the answer
    key has both; several rows for one student must agree on the seed)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the roster {str(path)!r}: {e}") from None
    if not rows or "student" not in rows[0]:
        raise ValueError(f"the roster {str(path)!r} needs a 'student' column (and optionally 'seed')")
    roster: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        student = (row.get("student") or "").strip()
        if not student:
            continue
        text = (row.get("seed") or "").strip()
        try:
            seed = int(text) if text else default_seed
        except ValueError:
            raise ValueError(f"roster {str(path)!r} line {number}: seed {text!r} is not an int") from None
        if roster.get(student, seed) != seed:
            raise ValueError(f"roster {str(path)!r}: student {student!r} has two seeds, "
                             f"{roster[student]} and {seed}")
        roster[student] = seed
    return roster


@dataclass
class Submission:
    """One handed-in file: whose (from the path), which template, what to trust, what is off."""

    student: str
    path: Path
    relpath: str
    template: str | None = None
    exercises: tuple[str, ...] = ()
    seed: int = 0
    problem: str | None = None            # "not a notebook: ..." (then nothing runs)
    flags: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return self.problem is None


def find_files(directory: Path) -> list[tuple[str, Path]]:
    """``(student, file)`` for every submitted file under ``directory`` (see the module docstring)."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts) or \
                ".ipynb_checkpoints" in rel.parts:
            continue
        student = rel.parts[0] if len(rel.parts) > 1 else Path(rel.parts[0]).stem
        out.append((student, path))
    return out


def _match_template(nb: nbformat.NotebookNode, path: Path,
                    templates: dict[str, Template]) -> Template | None:
    named = nb.metadata.get("labkit", {}).get("template")
    if isinstance(named, str) and named in templates:
        return templates[named]
    if path.stem in templates:
        return templates[path.stem]
    made = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            made += [n for n in MAKE_CALL.findall(cell.source) if n not in made]
    return next((t for t in templates.values() if set(t.exercises) == set(made) and made), None)


def inspect(student: str, path: Path, directory: Path, templates: dict[str, Template],
            roster: dict[str, int] | None, default_seed: int) -> Submission:
    """Read one submitted file and decide what to trust (see the module docstring)."""
    sub = Submission(student, path, str(path.relative_to(directory)))
    sub.seed = roster.get(student, default_seed) if roster else default_seed
    if roster is not None and student not in roster:
        sub.flags.append(f"{student!r} is not on the roster")
    if path.suffix != ".ipynb":
        sub.problem = f"not a notebook ({path.name} is a {path.suffix or 'suffix-less'} file)"
        return sub
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it gets a row, not a traceback
        sub.problem = f"not a notebook ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        return sub
    template = _match_template(nb, path, templates)
    if template is None:
        sub.problem = (f"not one of the exercise notebooks ({', '.join(sorted(templates))}) and it "
                       "makes none of their exercises")
        return sub
    sub.template, sub.exercises = template.name, template.exercises
    code = [c for c in nb.cells if c.cell_type == "code"]
    params_cells = [c for c in code if is_parameters(c)]
    if not params_cells:
        sub.flags.append("the parameters cell is missing (or lost its 'parameters' tag)")
        given = {}
    else:
        given = literal_parameters(params_cells[0].source)
    trusted = {"student": student, "seed": sub.seed, "solution": False}
    for name in TRUSTED_PARAMETERS:
        if name in given and given[name] != trusted[name]:
            sub.flags.append(f"{name} changed to {given[name]!r} (graded as {trusted[name]!r})")
    present = {normalized(c.source) for c in code}
    edited = [src for src in template.locked if src not in present]
    if edited:
        first = edited[0].splitlines()[0][:60] if edited[0] else "(empty)"
        sub.flags.append(f"{len(edited)} locked cell(s) changed or removed, e.g. {first!r}")
    own = [c.source for c in code if not is_parameters(c) and normalized(c.source) not in template.locked]
    if any(SOLVER_CALL.search(src) for src in own):
        sub.flags.append("an answer cell calls the model's own solution (.solve() / .explain())")
    return sub
