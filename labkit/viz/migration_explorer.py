"""Widgets for migrations: step one migration in time, or switch between migrations of a comparison.

:class:`MigrationExplorer` steps a VM that is migrating (Step, Play, the time per tick) and redraws
a status table (the hinting protocol when the VM hints, else ``query-migrate``), the page map
(hinted blocks in yellow) and the :class:`~labkit.viz.migration.MigrationView`. :class:`PolicySwitch`
shows one :class:`~labkit.viz.migration.MigrationView` and toggle buttons to pick which run of a
comparison it draws, next to the side-by-side :func:`~labkit.viz.migration.comparison` bars.
Both only call the VM's public API (``advance``, ``sample``, ``snapshot``, ``qmp``) and change
``ColumnDataSource`` data; headless, :meth:`MigrationExplorer.tick` does what one Play tick does and
setting ``switch.buttons.value`` fires what a click does.

>>> import labkit
>>> vm = labkit.open(memory="512M", seed=0, balloon={"free_page_hint": True, "iothread": "io0"})
>>> ex = MigrationExplorer(vm, tick_ms=1.0)
>>> vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
{}
>>> for _ in range(4):
...     ex.tick()
>>> ex.status["qemu_cmd_id"], ex.status["held_blocks"] > 0
('0x80000001', True)
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from labkit.units import format_size
from labkit.viz.changes import describe
from labkit.viz.controls import SteppingControls
from labkit.viz.migration import MigrationView, comparison
from labkit.viz.migration_data import MigrationRecorder, hinting_status
from labkit.viz.pagemap import PageMap
from labkit.viz.shown import batched

TICKS = (("1 ms", 1.0), ("5 ms", 5.0), ("20 ms", 20.0), ("100 ms", 100.0))
STATUS_LABELS = {
    "t_ms": "t (ms)", "migration": "migration", "syncs": "dirty-sync-count",
    "qemu_status": "QEMU hint status", "qemu_cmd_id": "QEMU cmd id", "config_cmd_id": "config cmd id",
    "guest_cmd_id": "guest's round", "ring": "free page vq entries", "held_blocks": "4 MiB blocks held",
    "bitmap_pages": "pages in the dirty bitmap", "hinted_pages": "bits cleared by hints",
}


def status_table(status: dict[str, Any]) -> str:
    """An HTML table of :func:`~labkit.viz.migration_data.hinting_status` (or any flat dict)."""
    cells = "".join(f"<tr><td>{html.escape(STATUS_LABELS.get(k, k))}</td><td><b>"
                    f"{html.escape(f'{v:.1f}' if isinstance(v, float) else str(v))}</b></td></tr>"
                    for k, v in status.items())
    return f'<table style="font-size:90%">{cells}</table>'


def _hint_status(vm: Any) -> dict[str, Any] | None:
    """:func:`hinting_status` of ``vm``, or None when it does not hint or its hinting can't be seen
    (a live guest's)."""
    try:
        return hinting_status(vm)
    except (ValueError, NotImplementedError):
        return None


def migration_facts(vm: Any) -> dict[str, Any]:
    """What one tick of a migration can change, read through ``query-migrate`` (and, with hinting,
    :func:`~labkit.viz.migration_data.hinting_status`): status, bytes and pages sent, the backlog,
    the bitmap syncs, and the hinting round, QEMU's status, the blocks the guest holds and the
    bitmap bits QEMU cleared for hints."""
    info = vm.qmp("query-migrate")
    ram = info.get("ram", {})
    facts = {"status": info.get("status", "none"), "transferred": int(ram.get("transferred", 0)),
             "normal": int(ram.get("normal", 0)), "zero": int(ram.get("duplicate", 0)),
             "remaining": int(ram.get("remaining", 0)), "syncs": int(ram.get("dirty-sync-count", 0))}
    h = _hint_status(vm)
    if h is not None:
        facts.update(hint_status=h["qemu_status"], hint_round=h["qemu_cmd_id"], held=h["held_blocks"],
                     hinted=h["hinted_pages"])
    return facts


def migration_readout(what: str, before: dict, after: dict,
                      moves: list[tuple[str, str, int]] | None = None) -> str:
    """In words and numbers, what one tick of a migration did (two :func:`migration_facts`).

    >>> before = {"status": "active", "transferred": 0, "normal": 0, "zero": 0,
    ...           "remaining": 300 << 20, "syncs": 1}
    >>> after = dict(before, transferred=13 << 20, normal=3000, zero=400, remaining=287 << 20)
    >>> migration_readout("50 ms", before, after)
    '50 ms: pass 1 sent 13 MiB (3000 normal pages, 400 zero pages); backlog 300 MiB → 287 MiB'
    """
    if before["status"] in ("none", "setup") and after["status"] == "none":
        return f"{what}: no migration"
    sent = after["transferred"] - before["transferred"]
    normal, zero = after["normal"] - before["normal"], after["zero"] - before["zero"]
    syncs = after["syncs"] - before["syncs"]
    first = f"pass {before['syncs']}" if before["syncs"] else "setup"
    last = "stop-and-copy" if after["status"] == "completed" else f"pass {after['syncs']}"
    stage = ("stop-and-copy" if after["status"] == "completed" and syncs == 0 else
             first if syncs == 0 else f"{first} to {last}")
    text = (f"{what}: {stage} sent {format_size(sent)} ({normal} normal pages, {zero} zero pages); "
            f"backlog {format_size(before['remaining'])} → {format_size(after['remaining'])}")
    if syncs:
        text += f"; {syncs} bitmap sync{'s' if syncs > 1 else ''} (now {after['syncs']})"
    if after["status"] != before["status"]:
        text += f"; migration {before['status']} → {after['status']}"
    if "hint_status" in after:
        hint = []
        if after["hint_round"] != before["hint_round"]:
            hint.append(f"QEMU starts round {after['hint_round']}")
        if after["hint_status"] != before["hint_status"]:
            hint.append(f"QEMU {before['hint_status']} → {after['hint_status']}")
        held = after["held"] - before["held"]
        if held:
            hint.append(f"the guest {'holds' if held > 0 else 'frees'} {abs(held)} blocks of 4 MiB "
                        f"({after['held']} held)")
        cleared = after["hinted"] - before["hinted"]
        if cleared:
            hint.append(f"QEMU cleared {cleared} pages from the bitmap for hints")
        if hint:
            text += " · hinting: " + ", ".join(hint)
    if moves is not None:
        text += f" · map: {describe(moves)}"
    return text


class MigrationExplorer(SteppingControls, widgets.VBox):
    """Step a migrating VM: ``step_button`` / ``play`` advance ``tick_ms`` simulated ms per tick.

    ``vm`` may be migrating already or start later (``vm.qmp("migrate", ...)`` between ticks).
    With ``factory`` (a function returning a new VM) the explorer opens and owns its VM, and
    **Reset** re-opens it; with ``migrate`` (a URI) it starts the migration itself, right after its
    recorder is attached, so pass 1 is recorded from its first page. Attributes: ``recorder`` (a
    :class:`MigrationRecorder`), ``view``, ``page_map`` (or None without snapshots), ``status``
    (the latest status dict), ``status_html``, ``change_html`` (what the last tick did: the pass,
    pages and bytes sent, bitmap syncs, the hinting round and blocks, the page map's moves).
    """

    def __init__(self, vm: Any = None, tick_ms: float = 1.0, sample_ms: float | None = None,
                 page_map: bool = True, *, factory: Any = None, migrate: str | None = None,
                 play_interval_ms: int = 100):
        if not isinstance(tick_ms, int | float) or isinstance(tick_ms, bool) or tick_ms <= 0:
            raise ValueError(f"tick_ms must be a number of milliseconds > 0, got {tick_ms!r}")
        if (vm is None) == (factory is None):
            raise TypeError("MigrationExplorer needs a VM or a factory= (a function that opens one), "
                            "not both")
        self.factory, self.migrate_uri = factory, migrate
        self.owns_vm = vm is None
        self.vm = vm if vm is not None else factory()
        self.sample_ms = sample_ms
        self.tick_ms = float(tick_ms)  # _attach runs the first tick
        self.recorder = self._attach()
        self.view = MigrationView(self.recorder, width=520, height=240)
        self.page_map = PageMap(self.vm.snapshot(), width=360, height=300, legend="below") if (
            page_map and callable(getattr(self.vm, "snapshot", None))) else None
        self._build_controls(step_tooltip="advance the migration by the time per tick",
                             tick_choices=self.tick_options([(v, k) for k, v in TICKS], tick_ms),
                             tick_ms=tick_ms, play_interval_ms=play_interval_ms)
        self.reset_button.layout.display = "" if factory is not None else "none"
        self.reset_button.tooltip = "re-open the VM and migrate again"
        self.zoom_button = widgets.Button(description="Zoom to change", icon="search-plus",
                                          tooltip="zoom the page map to the pages the last tick changed",
                                          layout=widgets.Layout(width="150px",
                                                                display="" if self.page_map else "none"))
        self.status_html = widgets.HTML()
        self.change_html = widgets.HTML("<i>Step or Play: what each tick did is said here, and the "
                                        "pages it changed are outlined in magenta on the page map.</i>")
        self.last_readout = ""
        plots = [self.view.widget()] + ([self.page_map.widget()] if self.page_map else [])
        super().__init__(children=[
            widgets.HBox([self.step_button, self.visible_button, self.play, self.speed, self.reset_button,
                          self.zoom_button]),
            self.change_html,
            widgets.HBox([self.status_html] + plots, layout=widgets.Layout(flex_flow="row wrap"))])
        self.zoom_button.on_click(self._guarded(lambda _b: self.zoom_to_change()))
        self._wire_controls()
        self._facts = migration_facts(self.vm)
        self._show()

    def _attach(self) -> MigrationRecorder:
        recorder = MigrationRecorder(self.vm)
        recorder.poll()
        if self.migrate_uri:
            self.vm.qmp("migrate", uri=self.migrate_uri)
            # one tick in: the setup sync has run and pass 1 has started, so every plot opens on data
            recorder.advance(self.tick_ms, self.sample_ms or self.tick_ms)
        return recorder

    def step(self) -> bool:
        """One tick (Step): advance ``tick_ms``; returns whether the migration moved (bytes sent, a
        sync, a status or hinting change) or is still running."""
        before = self._facts
        self.tick()
        return self._facts != before or self._facts["status"] in ("setup", "active", "device")

    def tick(self) -> None:
        """Advance ``tick_ms`` (sampling every ``sample_ms``, default the tick) and redraw; the
        readout says what the tick did."""
        before = self._facts
        self.recorder.advance(self.tick_ms, self.sample_ms or self.tick_ms)
        self.refresh()
        moves = self.page_map.last_moves if self.page_map is not None else None
        self.last_readout = migration_readout(f"{self.tick_ms:g} ms", before, self._facts, moves)
        self.change_html.value = f"<b>{html.escape(self.last_readout)}</b>"

    def reset(self) -> None:
        """Re-open the VM with ``factory`` (and migrate again); the plots start over."""
        self.reopen_vm()
        self.recorder = self._attach()
        self.refresh()
        self.change_html.value = "reset: a fresh VM" + (", migrating" if self.migrate_uri else "")

    def refresh(self) -> None:
        with batched(self.view, self.page_map):
            self.view.update(self.recorder)
            if self.page_map is not None:
                self.page_map.update(self.vm.snapshot())
        self._facts = migration_facts(self.vm)
        self._show()

    def _show(self) -> None:
        hint = _hint_status(self.vm)
        if hint is not None:
            self.status = hint
        else:
            info = self.vm.qmp("query-migrate")
            ram = info.get("ram", {})
            self.status = {"t_ms": float(self.vm.sample()["t_ms"]), "migration": info.get("status", "none"),
                           "syncs": ram.get("dirty-sync-count", 0), "remaining": ram.get("remaining", 0),
                           "normal": ram.get("normal", 0), "duplicate": ram.get("duplicate", 0)}
        self.status_html.value = status_table(self.status)

    def __repr__(self) -> str:
        return f"<MigrationExplorer of {self.vm!r}>"


class PolicySwitch(widgets.VBox):
    """Toggle buttons over ``runs`` ({name: MigrationRun}): the view draws the chosen one.

    Attributes: ``buttons``, ``view`` (a :class:`MigrationView`), ``bars`` (the comparison).
    """

    def __init__(self, runs: dict[str, Any], value: str | None = None):
        if not runs:
            raise ValueError("PolicySwitch needs at least one run")
        value = value if value is not None else next(iter(runs))
        if value not in runs:
            raise ValueError(f"value {value!r} is not one of {list(runs)}")
        self.runs = dict(runs)
        self.buttons = widgets.ToggleButtons(options=list(runs), value=value, description="policy")
        self.view = MigrationView(runs[value], title=f"{value}: backlog vs threshold")
        self.bars = comparison(runs)
        self.buttons.observe(self._on_switch, names="value")
        super().__init__(children=[self.bars.widget(), self.buttons, self.view.widget()])

    def _on_switch(self, change: dict) -> None:
        self.view.update(self.runs[change["new"]])
        self.view.backlog_figure.title.text = f"{change['new']}: backlog vs threshold"

    def __repr__(self) -> str:
        return f"<PolicySwitch of {list(self.runs)}, showing {self.buttons.value}>"


__all__ = ["MigrationExplorer", "PolicySwitch", "migration_facts", "migration_readout", "status_table"]
