"""Tables for notebooks: one small helper, one style, units in the header.

:func:`table` takes columns (a dict of sequences, as the scenario tables are) or rows (a list of
dicts) and returns a :class:`Table` that Jupyter shows as an HTML table (``_repr_html_``) and
``print`` shows as aligned text. ``units`` names a column's unit: sizes ("B", "KiB", "MiB", "GiB")
take values in bytes and show them in that unit; any other unit ("ms", "s", "%", "pages") is only
written in the header. Booleans read yes/no, NaN reads "–". Numbers are right-aligned.

>>> t = table({"policy": ["plain", "hinting"], "sent": [3 << 30, 1 << 29], "time": [1757.0, 284.0],
...            "converged": [True, True]}, units={"sent": "MiB", "time": "ms"})
>>> print(t)
 policy  sent (MiB)  time (ms)  converged
  plain        3072       1757        yes
hinting         512        284        yes
>>> ">sent (MiB)</th>" in t._repr_html_()
True
>>> t.column("sent")
[3072.0, 512.0]
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# one style for every notebook: compact, numbers right-aligned, header on a light band
STYLE = ("border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums;"
         "margin:4px 0;max-width:100%")
TH = ("padding:3px 8px;border-bottom:2px solid #888;background:#F2F2F2;text-align:right;"
      "font-weight:600;vertical-align:bottom")
TD = "padding:2px 8px;border-bottom:1px solid #DDD;text-align:right;white-space:nowrap"


class Table:
    """A table of rows; Jupyter renders it as HTML, ``str()`` as text. Build it with :func:`table`."""

    def __init__(self, columns: list[str], rows: list[list[Any]], units: Mapping[str, str],
                 title: str | None = None, digits: Mapping[str, int] | None = None):
        self.columns, self.rows, self.units = columns, rows, dict(units)
        self.title, self.digits = title, dict(digits or {})
        self.first_left = bool(rows) and all(isinstance(r[0], str) and len(r[0]) > 8 for r in rows)

    def header(self, name: str) -> str:
        unit = self.units.get(name)
        return f"{name} ({unit})" if unit else name

    def column(self, name: str) -> list[Any]:
        """The values of column ``name`` as shown (sizes converted to their unit)."""
        j = self.columns.index(name)
        return [self._value(name, row[j]) for row in self.rows]

    def _value(self, name: str, value: Any) -> Any:
        unit = self.units.get(name)
        if unit in SIZE_UNITS and _is_number(value):
            return float(value) / SIZE_UNITS[unit]
        return value

    def _text(self, name: str, value: Any) -> str:
        value = self._value(name, value)
        if isinstance(value, bool | np.bool_):
            return "yes" if value else "no"
        if _is_number(value):
            value = float(value)
            if math.isnan(value):
                return "–"
            digits = self.digits.get(name)
            if digits is None:
                digits = 0 if value == int(value) or abs(value) >= 100 else (1 if abs(value) >= 10 else 2)
            return f"{value:,.{digits}f}".replace(",", "\u2009") if abs(value) >= 10_000 else (
                f"{value:.{digits}f}")
        return str(value)

    def cells(self) -> list[list[str]]:
        return [[self._text(name, v) for name, v in zip(self.columns, row, strict=True)]
                for row in self.rows]

    def __str__(self) -> str:
        body = [[self.header(c) for c in self.columns]] + self.cells()
        widths = [max(len(r[j]) for r in body) for j in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) if j == 0 and self.first_left else c.rjust(w)
                           for j, (c, w) in enumerate(zip(r, widths, strict=True))) for r in body]
        return "\n".join(([self.title] if self.title else []) + lines)

    def _repr_html_(self) -> str:
        head = "".join(f'<th style="{TH}">{html.escape(self.header(c))}</th>' for c in self.columns)
        body = "".join("<tr>" + "".join(f'<td style="{TD}">{html.escape(v)}</td>' for v in row) + "</tr>"
                       for row in self.cells())
        caption = (f'<caption style="caption-side:top;text-align:left;font-weight:600;padding:2px 0">'
                   f"{html.escape(self.title)}</caption>") if self.title else ""
        # a wide table scrolls inside its own box: it never makes the output area wider
        return (f'<div style="overflow-x:auto;max-width:100%"><table class="labkit-table" style="{STYLE}">'
                f"{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")

    def __repr__(self) -> str:
        return f"<Table {len(self.rows)} rows x {len(self.columns)} columns>"


def _is_number(value: Any) -> bool:
    numeric = isinstance(value, int | float | np.integer | np.floating)
    return numeric and not isinstance(value, bool | np.bool_)


def table(data: Mapping[str, Sequence] | Sequence[Mapping[str, Any]], units: Mapping[str, str] | None = None,
          columns: Sequence[str] | None = None, title: str | None = None,
          rename: Mapping[str, str] | None = None, digits: Mapping[str, int] | None = None,
          flags: Sequence[str] = ()) -> Table:
    """A :class:`Table` of ``data`` (columns as a dict of sequences, or rows as a list of dicts).

    ``columns`` picks and orders the columns (default: all, in order); ``units`` maps a column to
    its unit (sizes convert from bytes); ``rename`` gives a column a shorter header; ``digits``
    fixes the decimals of a column; ``flags`` are 0/1 columns shown as yes/no. Bad input raises
    ``ValueError`` naming what is wrong.
    """
    if isinstance(data, Mapping):
        names = list(data)
        lengths = {len(data[n]) for n in names}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: { {n: len(data[n]) for n in names} }")
        n_rows = lengths.pop() if lengths else 0
        get = {n: list(data[n]) for n in names}
        rows_by_name = [{n: get[n][i] for n in names} for i in range(n_rows)]
    elif isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        rows_by_name = [dict(r) for r in data]
        names = list(dict.fromkeys(k for r in rows_by_name for k in r))
    else:
        raise ValueError(f"table() takes a dict of columns or a list of row dicts, got {type(data).__name__}")
    columns = list(columns) if columns is not None else names
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise ValueError(f"columns {unknown} are not in the data; it has {names}")
    units = dict(units or {})
    for name in units:
        if name not in columns:
            raise ValueError(f"units for {name!r}, which is not a column shown ({columns})")
    rename = dict(rename or {})
    shown = [rename.get(c, c) for c in columns]
    unknown = [c for c in flags if c not in columns]
    if unknown:
        raise ValueError(f"flags {unknown} are not columns shown ({columns})")
    rows = [[bool(r[c]) if c in flags and r.get(c) == r.get(c) else r.get(c, float("nan"))
             for c in columns] for r in rows_by_name]
    return Table(shown, rows, {rename.get(k, k): v for k, v in units.items()}, title,
                 {rename.get(k, k): v for k, v in (digits or {}).items()})


def metric_table(metrics: Sequence[tuple[str, str, Sequence]], columns: Sequence[str],
                 title: str | None = None) -> Table:
    """A table with one row per metric and one column per variant: ``metrics`` holds
    ``(label, unit, values)``; sizes ("MiB", ...) take bytes, as in :func:`table`.

    >>> print(metric_table([("removed", "MiB", [2 << 30, 1 << 30]), ("time", "ms", [5.0, 7.5])],
    ...                    ["virtio-mem", "balloon"]))
    metric         virtio-mem  balloon
    removed (MiB)        2048     1024
    time (ms)               5     7.50
    """
    rows = []
    for label, unit, values in metrics:
        values = list(values)
        if len(values) != len(columns):
            raise ValueError(f"metric {label!r} has {len(values)} values for {len(columns)} columns")
        scale = SIZE_UNITS.get(unit, 1)
        shown = [float(v) / scale if _is_number(v) else v for v in values]
        rows.append([f"{label} ({unit})" if unit else label, *shown])
    return Table(["metric", *columns], rows, {}, title)


def guess_unit(name: str) -> str:
    """The unit of a scenario column by its name: ``*_bytes`` and sizes in MiB, ``*_ms`` in ms,
    ``*_s`` in s, counts and flags without one."""
    if name.endswith("_ms"):
        return "ms"
    if name.endswith("_s"):
        return "s"
    if name.endswith("_count") or name.startswith(("oom_", "out_of_puff")) or name.endswith(
            ("_kills", "_events", "_alive", "reached", "_changes", "_pages")):
        return ""
    return "MiB"


def summary_table(runs: Mapping[str, Any], keys: Sequence[str], title: str | None = None,
                  units: Mapping[str, str] | None = None, label: str = "policy") -> Table:
    """One row per run of ``runs`` (name -> a scenario ``Run``), the ``keys`` of its ``summary``;
    units from the names (:func:`guess_unit`) unless ``units`` says otherwise; ``_bytes`` dropped
    from the headers."""
    columns = {label: list(runs)}
    for key in keys:
        columns[key] = [float(r.summary.get(key, float("nan"))) for r in runs.values()]
    given = dict(units or {})
    unit_of = {k: given.get(k, guess_unit(k)) for k in keys}
    def header(key: str) -> str:
        for suffix in ("_bytes", "_ms", "_s"):
            key = key.removesuffix(suffix)
        return key.replace("_", " ")
    return table(columns, units={k: u for k, u in unit_of.items() if u},
                 rename={k: header(k) for k in keys}, title=title)
