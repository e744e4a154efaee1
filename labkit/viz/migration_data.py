"""What the migration view draws, recorded from a VM or taken from a scenario's run.

A :class:`MigrationRecorder` watches one VM's outgoing migration through ``qmp("query-migrate")``
and ``sample()``: one row per poll, and on the model one exact row per dirty-bitmap sync, taken from
the migration's precopy notifier chain (the hook QEMU's balloon uses for free page hinting). The
recorder only reads: it never changes the migration. :func:`from_run` turns a scenario's
:class:`~labkit.scenarios.migration.MigrationRun` into the same :class:`MigrationData`, from the
run's history (one row per 100 ms window and per sync). :func:`hinting_status` is the hinting
protocol's state at one instant, for step-by-step tables.

>>> import labkit
>>> vm = labkit.open(memory="512M", seed=0)
>>> rec = MigrationRecorder(vm)
>>> vm.qmp("migrate", uri="exec:cat > /dev/null")
{}
>>> rec.run()["status"], [int(c) for c in rec.data().syncs["count"]]
('completed', [1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labkit.units import MiB

TERMINAL = ("completed", "failed", "cancelled")
SAMPLE_FIELDS = ("transferred", "remaining", "threshold", "hinted", "normal", "zero")
SYNC_FIELDS = ("t_ms", "count", "transferred", "normal", "zero", "remaining", "last_stage", "cmd_id")
QEMU_FIRST_HINT_ID = 0x80000001  # VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1: the first round


@dataclass
class MigrationData:
    """One migration, normalised for the view. Times in ms since ``migrate``; sizes in bytes.

    ``samples``: ``t_ms``, ``remaining``, ``transferred``, ``threshold``, ``hinted`` (bytes the
    guest holds as hinted blocks; NaN without hinting), cumulative ``normal`` and ``zero`` pages.
    ``syncs``: one entry per bitmap sync: the cumulative ``normal``/``zero`` pages and
    ``transferred`` bytes sent before it (NaN when unknown), ``remaining`` after it, ``last_stage``
    (the VM was stopped: the switchover) and ``cmd_id`` (the hinting round it started, -1: none).
    ``end``: the final ``normal``/``zero``/``transferred``, ``t_ms`` and ``downtime_ms`` (empty
    while running). ``reference``: the configured ``max-bandwidth x downtime-limit`` (0: none).
    ``has_pages``: whether ``normal``/``zero`` are known at all (else the rounds show MiB).
    """

    samples: dict[str, np.ndarray]
    syncs: dict[str, np.ndarray]
    end: dict[str, float] = field(default_factory=dict)
    reference: float = 0.0
    status: str = "none"
    has_pages: bool = True

    @property
    def switchover_ms(self) -> float:
        """When the VM stopped (the last-stage sync), NaN if it has not."""
        last = np.flatnonzero(self.syncs["last_stage"])
        return float(self.syncs["t_ms"][last[-1]]) if len(last) else np.nan

    def rounds(self) -> dict[str, list]:
        """Pages and bytes sent between consecutive syncs; the last round ends at the end of the
        migration ("stop-and-copy" after the last-stage sync) or at the latest sample."""
        s, n = self.syncs, len(self.syncs["t_ms"])
        if n == 0:
            return {k: [] for k in ("round", "start_ms", "end_ms", "normal", "zero", "mib", "pages")}
        now = {k: float(v[-1]) for k, v in self.samples.items() if len(v)}  # a migration still running
        last = {k: self.end.get(k, now.get(k, np.nan)) for k in ("t_ms", "normal", "zero", "transferred")}
        bounds = {k: np.append(s[k], last[k]) for k in ("t_ms", "normal", "zero", "transferred")}
        labels = [f"pass {i + 1}" for i in range(n)]
        if s["last_stage"][-1]:
            labels[-1] = "stop-and-copy"
        normal, zero = np.diff(bounds["normal"]), np.diff(bounds["zero"])
        return {"round": labels, "start_ms": bounds["t_ms"][:-1].tolist(),
                "end_ms": bounds["t_ms"][1:].tolist(), "normal": normal.tolist(), "zero": zero.tolist(),
                "pages": (normal + zero).tolist(), "mib": (np.diff(bounds["transferred"]) / MiB).tolist()}

    def hint_rounds(self) -> dict[str, list]:
        """Hinting rounds: from the sync that started one (a new command ID) to the next sync."""
        s = self.syncs
        starts = np.flatnonzero(s["cmd_id"] >= 0)
        ends = [float(s["t_ms"][i + 1]) if i + 1 < len(s["t_ms"]) else self.end.get(
            "t_ms", float(self.samples["t_ms"][-1])) for i in starts]
        return {"x0": s["t_ms"][starts].tolist(), "x1": ends,
                "label": [f"round {int(c):#x}" for c in s["cmd_id"][starts]]}


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r.get(key, np.nan)) for r in rows], dtype=np.float64)


class MigrationRecorder:
    """Records one VM's outgoing migration over time, through the Backend protocol only.

    ``poll()`` adds a sample (``query-migrate`` and ``sample()``); ``advance(ms, every_ms)`` moves
    the VM's time and polls; ``run()`` polls until the migration ends. Where the backend reports
    each bitmap sync (``vm.inspect("migration").syncs``: the model) the recorder takes those exact
    rows, from the ones at or after its creation on; elsewhere a sync is noticed when
    ``dirty-sync-count`` grows between samples. ``close()`` is kept for callers that release
    recorders: it has nothing to release.
    """

    def __init__(self, vm: Any):
        self.vm = vm
        self.samples: list[dict] = []
        self.syncs: list[dict] = []
        self.info: dict = {}
        self._t0: float | None = None
        first = vm.sample()
        self._since, self._hinted_at_start = float(first["t_ms"]), float(first.get("hinted", np.nan))
        self._exact = self._view_syncs() is not None
        self._seen_count: float | None = None  # the dirty-sync-count at the last look for syncs

    def close(self) -> None:
        """Nothing to release (the recorder only reads the VM)."""

    def _view_syncs(self) -> tuple[dict, ...] | None:
        """The bitmap syncs the backend reports, or None where it reports none (a live guest)."""
        try:
            view = self.vm.inspect("migration")
        except (ValueError, NotImplementedError):
            return None
        return None if view.dirty_pages is None else view.syncs

    def _take_syncs(self, row: dict) -> None:
        """Add the syncs the backend reported since the last look (its rows of the current
        migration; one that started later replaces them, so they are kept here). Looked at only
        when ``row``'s dirty-sync-count moved: the view copies the migration's whole history."""
        if row["count"] == self._seen_count:
            return
        self._seen_count = row["count"]
        last = (self.syncs[-1]["t_abs"], self.syncs[-1]["count"]) if self.syncs else (-np.inf, -1)
        for r in self._view_syncs() or ():
            if r["t_ms"] < self._since or (r["t_ms"], r["count"]) <= last:
                continue
            self.syncs.append({"t_abs": float(r["t_ms"]), "count": float(r["count"]),
                               "transferred": float(r["transferred"]), "normal": float(r["normal"]),
                               "zero": float(r["zero"]), "remaining_before": float(r["remaining_before"]),
                               "remaining": float(r["remaining"]), "threshold": float(r["threshold"]),
                               "last_stage": bool(r["last_stage"]), "cmd_id": float(r["cmd_id"])})
            if self._t0 is None:
                self._t0 = float(r["t_ms"])

    # --- rows ---------------------------------------------------------------------------------
    def _counters(self) -> dict:
        info = self.vm.qmp("query-migrate")
        sample = self.vm.sample()
        ram = info.get("ram", {})
        if self._t0 is None and info.get("status", "none") != "none":
            self._t0 = float(sample["t_ms"]) - float(info.get("total-time", 0))
        self.info = info
        return {"t_abs": float(sample["t_ms"]), "status": info.get("status", "none"),
                "transferred": float(ram.get("transferred", sample.get("migration_transferred", 0))),
                "remaining": float(sample.get("migration_remaining", ram.get("remaining", 0))),
                "threshold": float(sample.get("migration_threshold", np.nan)),
                "normal": float(ram.get("normal", 0)), "zero": float(ram.get("duplicate", 0)),
                "count": float(ram.get("dirty-sync-count", sample.get("migration_syncs", 0))),
                "hinted": float(sample.get("hinted", np.nan))}

    def poll(self) -> dict:
        """Take one sample now; returns it."""
        row = self._counters()
        if self._exact:
            self._take_syncs(row)
        elif self.samples and row["count"] > self.samples[-1]["count"]:
            self.syncs.append({**row, "remaining_before": row["remaining"],
                               "last_stage": row["status"] == "completed", "cmd_id": -1.0})
        self.samples.append(row)
        return row

    def advance(self, ms: float, every_ms: float = 10.0) -> None:
        """Advance the VM ``ms`` milliseconds, sampling every ``every_ms``."""
        if every_ms <= 0:
            raise ValueError(f"every_ms must be > 0, got {every_ms!r}")
        done = 0.0
        while done < ms:
            step = min(every_ms, ms - done)
            self.vm.advance(step)
            done += step
            self.poll()

    @property
    def finished(self) -> bool:
        return self.info.get("status") in TERMINAL

    def run(self, every_ms: float = 10.0, timeout_ms: float = 120_000.0) -> dict:
        """Poll until the migration completes, fails or is cancelled (or ``timeout_ms`` passes);
        returns the last ``query-migrate``."""
        self.poll()
        waited = 0.0
        while not self.finished and waited < timeout_ms:
            self.advance(every_ms, every_ms)
            waited += every_ms
        return self.info

    def data(self) -> MigrationData:
        """What was recorded, with one more look at ``query-migrate`` now, as :class:`MigrationData`."""
        latest = self._counters()
        if self._exact:
            self._take_syncs(latest)
        rows = self.samples + [latest] if not self.samples or (
            latest["t_abs"] > self.samples[-1]["t_abs"] or latest["status"] != self.samples[-1]["status"]) \
            else self.samples
        t0 = self._t0 if self._t0 is not None else rows[0]["t_abs"]
        # the backlog exists from the setup sync on; each sync adds a step (before, after)
        points = [(r["t_abs"], 2, r) for r in rows if r["count"] > 0]
        for s in self.syncs:
            points += [(s["t_abs"], 0, {**s, "remaining": s["remaining_before"]}), (s["t_abs"], 1, s)]
        live = [r for *_, r in sorted(points, key=lambda p: p[:2])] or rows[-1:]
        samples = {k: _column(live, k) for k in SAMPLE_FIELDS}
        # a sync row has no "hinted" of its own (the guest's count): the sample's before it holds
        # (for syncs before any sample, the count when the recorder was made)
        hinted = samples["hinted"]
        known = np.flatnonzero(~np.isnan(hinted))
        if len(known):
            at = np.searchsorted(known, np.arange(len(hinted)), side="right") - 1
            samples["hinted"] = np.where(at >= 0, hinted[known[np.maximum(at, 0)]], self._hinted_at_start)
        samples["t_ms"] = _column(live, "t_abs") - t0
        syncs = {k: _column(self.syncs, k) for k in SYNC_FIELDS if k != "t_ms"}
        syncs["t_ms"] = _column(self.syncs, "t_abs") - t0
        syncs["last_stage"] = syncs["last_stage"].astype(bool) if len(self.syncs) else np.zeros(0, bool)
        end: dict[str, float] = {}
        if self.info.get("status") == "completed":
            ram = self.info["ram"]
            end = {"t_ms": float(self.info["total-time"]), "downtime_ms": float(self.info["downtime"]),
                   "normal": float(ram["normal"]), "zero": float(ram["duplicate"]),
                   "transferred": float(ram["transferred"])}
        params = self.vm.qmp("query-migrate-parameters")
        reference = params.get("max-bandwidth", 0) * params.get("downtime-limit", 0) / 1000
        return MigrationData(samples, syncs, end, float(reference), self.info.get("status", "none"))


def from_run(run: Any) -> MigrationData:
    """:class:`MigrationData` of a :class:`~labkit.scenarios.migration.MigrationRun`."""
    h, s = run.history, run.series
    if not h or len(h.get("t_ms", ())) == 0:
        raise ValueError("this run has no migration history (run.history is empty)")
    t0 = float(s["t_ms"][0] - s["since_migrate_ms"][0]) if "since_migrate_ms" in s else float(h["t_ms"][0])
    sync = h["is_sync"].astype(bool)
    n = int(sync.sum())
    completed = bool(run.summary.get("completed", 0))
    last_stage = np.zeros(n, dtype=bool)
    if completed and n:
        last_stage[-1] = True
    hinting = "hinted" in s
    syncs = {"t_ms": h["t_ms"][sync] - t0, "count": h["dirty_sync_count"][sync],
             "transferred": h["transferred"][sync], "remaining": h["remaining"][sync],
             "normal": h["normal"][sync] if "normal" in h else np.full(n, np.nan),
             "zero": h["zero"][sync] if "zero" in h else np.full(n, np.nan),
             "last_stage": last_stage, "cmd_id": np.full(n, -1.0)}
    if hinting:  # QEMU's IDs: 0x80000001 for the first round, + 1 per round
        syncs["cmd_id"][~last_stage] = QEMU_FIRST_HINT_ID + np.arange(int((~last_stage).sum()))
    samples = {"t_ms": h["t_ms"] - t0, "transferred": h["transferred"], "remaining": h["remaining"],
               "threshold": h["threshold"], **{k: h[k] if k in h else np.full(len(h["t_ms"]), np.nan)
                                                for k in ("normal", "zero")},
               "hinted": np.interp(h["t_ms"], s["t_ms"], s["hinted"]) if hinting else np.full(
                   len(h["t_ms"]), np.nan)}
    end: dict[str, float] = {}
    if completed:
        end = {"t_ms": float(run.summary["total_time_ms"]), "downtime_ms": float(run.summary["downtime_ms"]),
               "normal": float(run.summary["normal_pages"]), "zero": float(run.summary["zero_pages"]),
               "transferred": float(run.summary["transferred"])}
    p = run.params
    reference = p.bandwidth * p.downtime_limit_ms / 1000 if p is not None else 0.0
    return MigrationData(samples, syncs, end, float(reference), "completed" if completed else "active",
                         has_pages="normal" in h and "zero" in h)


def migration_data(source: Any) -> MigrationData:
    """Accept :class:`MigrationData`, a :class:`MigrationRecorder` or a scenario's MigrationRun."""
    if isinstance(source, MigrationData):
        return source
    if isinstance(source, MigrationRecorder):
        return source.data()
    if hasattr(source, "history") and hasattr(source, "series"):
        return from_run(source)
    raise TypeError("the migration view takes a MigrationRecorder, a MigrationRun or MigrationData, "
                    f"got {type(source).__name__}")


def hinting_status(vm: Any) -> dict[str, Any]:
    """The free page hinting protocol of a model VM right now, for step-by-step tables.

    ``qemu_status``/``qemu_cmd_id``: QEMU's device (FREE_PAGE_HINT_S_*, its current ID);
    ``config_cmd_id``: what the guest reads in config space (the ID while REQUESTED, 0 STOP, 1 DONE);
    ``guest_cmd_id``: the round the guest driver is in; ``ring``: entries waiting for QEMU;
    ``held_blocks``: 4 MiB blocks the guest holds; ``bitmap_pages``: ``ram.remaining`` in pages;
    ``hinted_pages``: bits QEMU cleared from the dirty bitmap because of hints.
    """
    try:
        h = vm.inspect("hinting")
    except ValueError:
        raise ValueError("this VM has no free page hinting: open it with "
                         "balloon={'free_page_hint': True, 'iothread': 'iothread0'}") from None
    m = vm.inspect("migration")
    return {"t_ms": float(vm.sample()["t_ms"]), "migration": vm.qmp("query-migrate").get("status", "none"),
            "syncs": int(m.dirty_sync_count), "qemu_status": h.qemu_status,
            "qemu_cmd_id": f"{h.qemu_cmd_id:#x}", "config_cmd_id": f"{h.config_cmd_id:#x}",
            "guest_cmd_id": f"{h.guest_cmd_id:#x}", "ring": h.ring, "held_blocks": h.held_blocks,
            "bitmap_pages": int(m.dirty_pages or 0), "hinted_pages": int(m.hinted_pages or 0)}


__all__ = ["MigrationData", "MigrationRecorder", "from_run", "hinting_status", "migration_data"]
