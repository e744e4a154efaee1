"""The registry of fact checks: what a regression notebook's metrics must be, and why.

Each ``data/baselines/facts/<name>.toml`` names one notebook (relative to ``notebooks/``) and its
checks. A check holds one metric the notebook writes with ``out_json`` (or an arithmetic expression
of several: ``a / b``, ``max(a, b)``) against a fact:

* ``expect`` with a tolerance ``abs + rel * |expect|`` (both 0 by default: exact), or bounds
  ``min`` / ``max``;
* ``fact``: the fact in words; ``source``: where it comes from (a section of the project's
  reference, §N.N, plus the kernel or QEMU function, the published paper or series, or a recording
  under ``data/recorded/``); ``kind``: ``kernel``, ``qemu``, ``published`` or ``recorded``;
* ``tolerance``: why the tolerance is what it is.

A notebook file may restrict the grid it is meaningful on: ``memory_min = "2G"`` leaves smaller
guests out, ``grid_parameters = ["seed"]`` passes only those grid parameters (the notebook's own
defaults for the rest, e.g. a published experiment's fixed size). Nothing here is a
number the model produced and someone copied: a fact that the model stops meeting is a regression
(or a fact to re-read), whatever the guest kernel's defaults are.

>>> checks = load()["regression/balloon.ipynb"].checks
>>> c = next(c for c in checks if c.id == "balloon.pages_per_request")
>>> c.evaluate({"pages_per_request": 256.0}).ok, c.evaluate({"pages_per_request": 128.0}).ok
(True, False)
>>> c.expected_text
'256 (exact)'
"""

from __future__ import annotations

import ast
import math
import operator
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.units import parse_size

KINDS = ("kernel", "qemu", "published", "recorded")
REQUIRED = ("id", "metric", "fact", "source", "kind", "tolerance")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_CALLS = {"max": max, "min": min, "abs": abs}


def facts_dir() -> Path:
    from labkit.cli_args import project_root

    return project_root() / "data" / "baselines" / "facts"


def _names(expression: str) -> list[str]:
    return sorted({n.id for n in ast.walk(ast.parse(expression, mode="eval"))
                   if isinstance(n, ast.Name) and n.id not in _CALLS})


def evaluate_expression(expression: str, metrics: dict[str, Any]) -> float:
    """``expression`` (metric names, ``name[i]`` of a list metric, numbers, + - * /, max/min/abs)
    over ``metrics``; NaN when a
    metric is missing or not a number, or on a division by zero.

    >>> evaluate_expression("a / b", {"a": 512, "b": 2})
    256.0
    """
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            value = metrics.get(node.id)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
                else (float(value) if isinstance(value, bool) else math.nan)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
            seq = metrics.get(node.value.id)
            try:
                return float(seq[node.slice.value])
            except (TypeError, IndexError, ValueError):
                return math.nan
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                return math.nan
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS \
                and not node.keywords:
            return float(_CALLS[node.func.id](*(ev(a) for a in node.args)))
        raise ValueError(f"metric expression {expression!r}: {ast.dump(node)[:60]} is not allowed "
                         "(use metric names, list[index], numbers, + - * /, max, min, abs)")

    return ev(ast.parse(expression, mode="eval"))


@dataclass(frozen=True)
class Result:
    """One check on one run: the measured ``value`` and whether it holds the fact."""

    id: str
    value: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Check:
    """One fact check (see the module docstring for the fields)."""

    id: str
    metric: str
    fact: str
    source: str
    kind: str
    tolerance: str
    expect: float | None = None
    abs: float = 0.0
    rel: float = 0.0
    min: float | None = None
    max: float | None = None

    @classmethod
    def from_toml(cls, row: dict, where: str) -> Check:
        missing = [k for k in REQUIRED if not row.get(k)]
        if missing:
            raise ValueError(f"{where}: check {row.get('id', '?')!r} lacks {missing}")
        unknown = sorted(set(row) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: check {row['id']!r} has unknown keys {unknown}")
        if row["kind"] not in KINDS:
            raise ValueError(f"{where}: check {row['id']!r}: kind {row['kind']!r} is not one of "
                             f"{list(KINDS)}")
        if row.get("expect") is None and row.get("min") is None and row.get("max") is None:
            raise ValueError(f"{where}: check {row['id']!r} needs expect, or min and/or max")
        evaluate_expression(row["metric"], {})  # a malformed expression fails here, not mid-run
        for name in _names(row["metric"]):
            if not name.isidentifier():
                raise ValueError(f"{where}: check {row['id']!r}: {name!r} is not a metric name")
        return cls(**row)

    @property
    def metrics(self) -> list[str]:
        return _names(self.metric)

    @property
    def bounds(self) -> tuple[float, float]:
        """The accepted interval ``(lo, hi)``."""
        if self.expect is not None:
            slack = self.abs + self.rel * abs(self.expect)
            return self.expect - slack, self.expect + slack
        return (-math.inf if self.min is None else self.min, math.inf if self.max is None else self.max)

    @property
    def expected_text(self) -> str:
        if self.expect is not None:
            tol = [f"±{self.abs:g}" if self.abs else "", f"±{self.rel:.0%}" if self.rel else ""]
            tol = " ".join(t for t in tol if t)
            return f"{self.expect:g} ({tol or 'exact'})"
        if self.min is not None and self.max is not None:
            return f"{self.min:g} .. {self.max:g}"
        return f"≥ {self.min:g}" if self.min is not None else f"≤ {self.max:g}"

    def evaluate(self, metrics: dict[str, Any]) -> Result:
        value = evaluate_expression(self.metric, metrics)
        if math.isnan(value):
            missing = [m for m in self.metrics if m not in metrics]
            return Result(self.id, value, False, f"not measured (missing {missing})" if missing
                          else "not a number")
        lo, hi = self.bounds
        ok = lo - 1e-9 * max(1.0, abs(lo)) <= value <= hi + 1e-9 * max(1.0, abs(hi))
        return Result(self.id, value, ok)


@dataclass(frozen=True)
class NotebookFacts:
    """The checks of one notebook, and the grid it is meaningful on."""

    notebook: str
    checks: tuple[Check, ...]
    memory_min: int | None = None
    path: Path = field(default=Path())
    grid_parameters: tuple[str, ...] | None = None  # None: every grid parameter it declares

    def applies(self, parameters: dict) -> str | None:
        """None when the grid point suits this notebook, else why not."""
        if self.memory_min is not None and "memory" in parameters:
            if parse_size(parameters["memory"], name="memory") < self.memory_min:
                return f"needs memory >= {self.memory_min >> 20} MiB"
        return None

    def evaluate(self, metrics: dict[str, Any]) -> list[Result]:
        return [c.evaluate(metrics) for c in self.checks]


def load(directory: str | Path | None = None) -> dict[str, NotebookFacts]:
    """Every ``*.toml`` of ``directory`` (default ``data/baselines/facts``), by notebook."""
    directory = Path(directory) if directory is not None else facts_dir()
    out: dict[str, NotebookFacts] = {}
    ids: set[str] = set()
    for path in sorted(directory.glob("*.toml")):
        with open(path, "rb") as f:
            data = tomllib.load(f)
        where = str(path.name)
        if "notebook" not in data or not data.get("check"):
            raise ValueError(f"{where}: needs notebook = '...' and at least one [[check]]")
        checks = tuple(Check.from_toml(row, where) for row in data["check"])
        for c in checks:
            if c.id in ids:
                raise ValueError(f"{where}: check id {c.id!r} is used twice")
            ids.add(c.id)
        memory_min = parse_size(data["memory_min"], name="memory_min") if "memory_min" in data else None
        if data["notebook"] in out:
            raise ValueError(f"{where}: notebook {data['notebook']!r} has a second facts file")
        only = data.get("grid_parameters")
        if only is not None and (not isinstance(only, list) or not all(isinstance(x, str) for x in only)):
            raise ValueError(f"{where}: grid_parameters must be a list of parameter names, got {only!r}")
        out[data["notebook"]] = NotebookFacts(data["notebook"], checks, memory_min, path,
                                              None if only is None else tuple(only))
    return out


def for_notebook(notebook: str) -> NotebookFacts:
    """The checks of ``notebook`` (relative to notebooks/, e.g. ``regression/balloon.ipynb``)."""
    registry = load()
    if notebook not in registry:
        raise ValueError(f"no facts for {notebook!r}; known: {sorted(registry)}")
    return registry[notebook]


def table(notebook: str, metrics: dict[str, Any]) -> str:
    """The fact table a regression notebook prints: every check, its fact, source, what is
    accepted and why, and the verdict. Measured values are left out on purpose: they move with the
    model's details; the verdict and the facts do not (this text is what nbval compares)."""
    facts = for_notebook(notebook)
    lines = []
    for check, result in zip(facts.checks, facts.evaluate(metrics), strict=True):
        mark = "✓ holds" if result.ok else f"✗ FAILS{': ' + result.note if result.note else ''}"
        lines += [f"{mark}  {check.id}  [{check.kind}]",
                  f"    fact:      {check.fact}",
                  f"    source:    {check.source}",
                  f"    accepted:  {check.expected_text} ({check.tolerance})"]
    held = sum(r.ok for r in facts.evaluate(metrics))
    lines.append(f"{held} of {len(facts.checks)} facts hold.")
    return "\n".join(lines)


def measured(notebook: str, metrics: dict[str, Any]) -> str:
    """The measured value of every check (for a cell nbval does not compare)."""
    facts = for_notebook(notebook)
    return "\n".join(f"{c.id:55s} {r.value:14.6g}   accepted {c.expected_text}"
                     for c, r in zip(facts.checks, facts.evaluate(metrics), strict=True))
