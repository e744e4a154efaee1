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
from labkit.viz.changes import step_readout
from labkit.viz.migration import MigrationView, comparison
from labkit.viz.migration_data import MigrationRecorder, hinting_status
from labkit.viz.pagemap import PageMap

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


class MigrationExplorer(widgets.VBox):
    """Step a migrating VM: ``step_button`` / ``play`` advance ``tick_ms`` simulated ms per tick.

    ``vm`` may be migrating already or start later (``vm.qmp("migrate", ...)`` between ticks).
    With ``factory`` (a function returning a new VM) the explorer opens and owns its VM, and
    **Reset** re-opens it; with ``migrate`` (a URI) it starts the migration itself, right after its
    recorder is attached, so pass 1 is recorded from its first page. Attributes: ``recorder`` (a
    :class:`MigrationRecorder`), ``view``, ``page_map`` (or None without snapshots), ``status``
    (the latest status dict), ``status_html``, ``change_html`` (what the last step changed).
    """

    def __init__(self, vm: Any = None, tick_ms: float = 1.0, sample_ms: float | None = None,
                 page_map: bool = True, *, factory: Any = None, migrate: str | None = None):
        if not isinstance(tick_ms, int | float) or isinstance(tick_ms, bool) or tick_ms <= 0:
            raise ValueError(f"tick_ms must be a number of milliseconds > 0, got {tick_ms!r}")
        if (vm is None) == (factory is None):
            raise TypeError("MigrationExplorer needs a VM or a factory= (a function that opens one), "
                            "not both")
        self.factory, self.migrate_uri = factory, migrate
        self.owns_vm = vm is None
        self.vm = vm if vm is not None else factory()
        self.tick_ms = float(tick_ms)
        self.sample_ms = sample_ms
        self.recorder = self._attach()
        self.view = MigrationView(self.recorder, width=520, height=240)
        self.page_map = PageMap(self.vm.snapshot(), width=360, height=300, legend="below") if (
            page_map and callable(getattr(self.vm, "snapshot", None))) else None
        choices = dict((v, k) for k, v in TICKS)
        choices.setdefault(self.tick_ms, f"{tick_ms:g} ms")
        self.speed = widgets.Dropdown(options=[(label, v) for v, label in sorted(choices.items())],
                                      value=self.tick_ms, description="per tick",
                                      layout=widgets.Layout(width="170px"))
        self.step_button = widgets.Button(description="Step", icon="step-forward",
                                          layout=widgets.Layout(width="90px"))
        self.play = widgets.Play(value=0, min=0, max=100_000, interval=300, show_repeat=False)
        self.reset_button = widgets.Button(description="Reset", icon="undo", layout=widgets.Layout(
            width="90px", display="" if factory is not None else "none"),
            tooltip="re-open the VM and migrate again")
        self.status_html = widgets.HTML()
        self.change_html = widgets.HTML("<i>Step or Play: what each tick changed is said here and "
                                        "outlined in magenta on the page map.</i>")
        self.error: BaseException | None = None
        plots = [self.view.widget()] + ([self.page_map.widget()] if self.page_map else [])
        super().__init__(children=[
            widgets.HBox([self.step_button, self.play, self.speed, self.reset_button]),
            self.change_html,
            widgets.HBox([self.status_html] + plots, layout=widgets.Layout(flex_flow="row wrap"))])
        self.step_button.on_click(self._guarded(lambda _b: self.tick()))
        self.reset_button.on_click(self._guarded(lambda _b: self.reset()))
        self.play.observe(self._guarded(lambda c: self.tick() if c["new"] != c["old"] else None),
                          names="value")
        self.speed.observe(self._guarded(lambda c: setattr(self, "tick_ms", float(c["new"]))),
                           names="value")
        self._show()

    def _guarded(self, callback):
        def run(argument: Any) -> None:
            try:
                callback(argument)
            except Exception as e:  # shown in the status line, kept in self.error
                self.error = e
                self.play.playing = False
                self.status_html.value = (f'<span style="color:#D55E00"><b>{type(e).__name__}</b>: '
                                          f"{html.escape(str(e))}</span>")
        return run

    def _attach(self) -> MigrationRecorder:
        recorder = MigrationRecorder(self.vm)
        recorder.poll()
        if self.migrate_uri:
            self.vm.qmp("migrate", uri=self.migrate_uri)
            # one tick in: the setup sync has run and pass 1 has started, so every plot opens on data
            recorder.advance(self.tick_ms, self.sample_ms or self.tick_ms)
        return recorder

    def tick(self) -> None:
        """Advance ``tick_ms`` (sampling every ``sample_ms``, default the tick) and redraw."""
        before = self.vm.qmp("query-migrate").get("ram", {})
        self.recorder.advance(self.tick_ms, self.sample_ms or self.tick_ms)
        self.refresh()
        ram = self.vm.qmp("query-migrate").get("ram", {})
        sent = ram.get("transferred", 0) - before.get("transferred", 0)
        moves = self.page_map.last_moves if self.page_map is not None else []
        what = f"{self.tick_ms:g} ms"
        self.change_html.value = (f"<b>{step_readout(what, moves)}; sent {format_size(int(sent))}, "
                                  f"backlog {format_size(int(ram.get('remaining', 0)))}</b>")

    def reset(self) -> None:
        """Re-open the VM with ``factory`` (and migrate again); the plots start over."""
        if self.factory is None:
            raise RuntimeError("this explorer was given a VM: it cannot re-open it (pass factory=)")
        self.play.playing = False
        if self.owns_vm:
            self.vm.close()
        self.vm, self.owns_vm = self.factory(), True
        self.recorder = self._attach()
        self.refresh()
        self.change_html.value = "reset: a fresh VM" + (", migrating" if self.migrate_uri else "")

    def refresh(self) -> None:
        self.view.update(self.recorder)
        if self.page_map is not None:
            self.page_map.update(self.vm.snapshot())
        self._show()

    def _show(self) -> None:
        if getattr(self.vm, "hinting", None) is not None:
            self.status = hinting_status(self.vm)
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


__all__ = ["MigrationExplorer", "PolicySwitch", "status_table"]
