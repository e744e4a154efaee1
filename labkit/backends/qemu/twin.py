"""One timeline of actions on any backend, so the model can be held against the real guest.

:func:`balloon_timeline` only uses the Backend protocol (``qmp``, ``advance``, ``sample``), so the
same call runs on the model (simulated time: instant) and on the live guest (wall-clock time), and
:func:`compare` lines the two up as deltas from each one's own starting row, since a real guest and
the model boot into different absolute numbers.

>>> import labkit
>>> with labkit.open(memory="512M", seed=0, model={"boot": "minimal"}) as vm:
...     rows = balloon_timeline(vm, [384 << 20, 512 << 20])
>>> [r["balloon_actual"] >> 20 for r in rows], [r["reached"] for r in rows]
([512, 384, 512], [True, True, True])
"""

from __future__ import annotations

from typing import Any

COMPARED = ("memtotal", "memfree", "memavailable", "balloon_actual", "host_rss")


def balloon_timeline(vm: Any, targets: list[int], settle_ms: float = 60_000,
                     poll_ms: float = 50) -> list[dict]:
    """Sample, then for each target: ``balloon``, advance until ``actual`` reaches it (at most
    ``settle_ms``), sample. Rows carry ``target``, ``reached`` and ``elapsed_ms`` (time to reach)."""
    start = vm.sample()
    rows = [start | {"target": start["balloon_actual"], "reached": True, "elapsed_ms": 0.0}]
    for target in targets:
        vm.qmp("balloon", value=int(target))
        began = vm.sample()["t_ms"]
        waited = 0.0
        while vm.qmp("query-balloon")["actual"] != target and waited < settle_ms:
            vm.advance(poll_ms)
            waited += poll_ms
        row = vm.sample()
        rows.append(row | {"target": int(target), "reached": row["balloon_actual"] == target,
                           "elapsed_ms": row["t_ms"] - began})
    return rows


def compare(live: list[dict], model: list[dict], keys: tuple[str, ...] = COMPARED) -> list[dict]:
    """Per row and key: the change since the first row on each backend, and their difference.

    Rows pair by position, as far as the shorter run goes: a demo that stops watching once its
    outcome is settled (free page reporting) can end sooner on one backend than on the other."""
    out = []
    for i, (a, b) in enumerate(zip(live, model, strict=False)):
        row = {"step": i, "target": a.get("target", a["balloon_target"])}
        for key in keys:
            row[f"{key}_live"] = a[key] - live[0][key]
            row[f"{key}_model"] = b[key] - model[0][key]
            row[f"{key}_diff"] = row[f"{key}_live"] - row[f"{key}_model"]
        out.append(row)
    return out
