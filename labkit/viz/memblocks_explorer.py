"""The virtio-mem explorer: a requested-size slider, Step / Play / Reset, the memory-block grid and
the requested-vs-plugged timeline, live in one ipywidgets layout.

Like the balloon :class:`labkit.viz.explorer.Explorer` (whose Reset factory, speed choices and
error-catching callback wrapper it reuses): controls call the backend's public API (``qom-set
requested-size``, ``advance``), then the views are redrawn by ``ColumnDataSource`` patches and
streams. **Step** runs the VM until the next virtio-mem driver event (a PLUG/UNPLUG request
answered, a block added, onlined or removed, a work run finished, a retry timer fired), so one click
shows one request: a run of subblocks plugged, or a single 2 MiB subblock unplugged from an online
block (§5.5). It jumps over the quiet time before a 50 s retry. **Play** advances
``tick_ms`` per tick.

>>> import labkit
>>> ex = explore_virtio_mem(memory="1G", memhp_default_state="online_movable",
...                         virtio_mem=[{"id": "vm0", "size": "1G"}])
>>> ex.slider.value = 6                  # MiB: three 2 MiB subblocks
>>> ex.step()                            # the PLUG request of a new block's first subblocks
True
>>> ex.vm.qmp("qom-get", path="vm0", property="size") >> 20
6
>>> ex.vm.close()
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from labkit.units import MiB, format_size
from labkit.viz.controls import SteppingControls
from labkit.viz.explorer import _factory, _tick_choices, reopen_options
from labkit.viz.memblocks import DEFAULT_MAX_BLOCKS, MemoryBlockGrid, ResizeTimeline, _drivers, retry_schedule

EXTRA_TICKS = (("10 s", 10_000.0), ("1 min", 60_000.0))  # the retry backoff is 50 s to 300 s
STEP_MAX_MS = 600_000.0  # Step gives up after 10 simulated minutes without a driver event


def driver_signature(vm: Any) -> tuple:
    """What changes at every virtio-mem driver event: requests sent, work runs, blocks added,
    blocks online."""
    drivers = _drivers(vm)
    return (sum(sum(d.device.requests.values()) for d in drivers),
            sum(len(d.history) for d in drivers), len(vm.kernel.hotplug.memmap),
            tuple(sorted(vm.kernel.hotplug.online_blocks.items())))


def step_driver(vm: Any, max_ms: float = STEP_MAX_MS) -> bool:
    """Advance ``vm`` event by event until the next virtio-mem driver event (see
    :func:`driver_signature`), at most ``max_ms``; returns whether one happened. Reads the
    simulation's next event time (``vm.env.peek()``) and moves time only with ``vm.advance``."""
    before, start = driver_signature(vm), vm.now_ms
    while vm.now_ms - start < max_ms and vm.env.peek() != float("inf"):
        wait = min(vm.env.peek() - vm.now_ms, start + max_ms - vm.now_ms)
        vm.advance(max(0.0, wait))
        vm.advance(0)  # run what is due now (advance() stops just before its end time)
        if driver_signature(vm) != before:
            return True
    return False


class VirtioMemExplorer(SteppingControls, widgets.VBox):
    """The virtio-mem explorer widget; build it with :func:`explore_virtio_mem`.

    Controls: ``slider`` (requested-size in MiB of device ``device``, steps of its block size),
    ``step_button``, ``play``, ``speed`` (ms per tick), ``reset_button``. Views: ``grid`` (a
    :class:`MemoryBlockGrid`), ``timeline`` (a :class:`ResizeTimeline`), ``status_html``.
    """


    def __init__(self, vm: Any = None, *, factory: Callable[[], Any] | None = None, device: int = 0,
                 tick_ms: float = 1000.0, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 play_interval_ms: int = 300, **options: Any):
        import labkit
        if vm is None and factory is None:
            if not options:
                raise TypeError("explore_virtio_mem() needs a VM, a factory= or labkit.open() options")
            factory = _factory(labkit.open, dict(options))
        elif options:
            raise TypeError(f"pass either a VM or open() options, not both (got {sorted(options)})")
        self.owns_vm = vm is None
        vm = factory() if vm is None else vm
        self.factory = factory or _factory(labkit.open, reopen_options(vm))
        drivers = _drivers(vm)
        if not isinstance(device, int) or not 0 <= device < len(drivers):
            raise ValueError(f"device must be an index from 0 to {len(drivers) - 1}, got {device!r}")
        self.vm, self.device = vm, device
        dev = drivers[device].device
        step = max(1, dev.block_size // MiB)
        self.slider = widgets.IntSlider(
            value=dev.requested_size // MiB, min=0, max=dev.config.region_size // MiB, step=step,
            description=f"{dev.id} requested-size (MiB)", continuous_update=False,
            style={"description_width": "initial"}, layout=widgets.Layout(width="460px"))
        choices = dict(_tick_choices(tick_ms))
        choices.update(dict(EXTRA_TICKS))
        self._build_controls(step_tooltip="run until the next virtio-mem driver event",
                             tick_choices=sorted(choices.items(), key=lambda c: c[1]), tick_ms=tick_ms,
                             play_interval_ms=play_interval_ms)
        self.status_html = widgets.HTML()
        self.last_step: bool | None = None
        self._syncing = False
        first = vm.sample()
        self.grid = MemoryBlockGrid(vm, max_blocks=max_blocks)
        self.timeline = ResizeTimeline([first])
        self.plots = widgets.HBox([self.grid.widget(), self.timeline.widget()],
                                  layout=widgets.Layout(flex_flow="row wrap"))
        super().__init__(children=[
            widgets.HBox([self.slider, self.step_button, self.play, self.speed, self.reset_button]),
            self.status_html, self.plots])
        self.slider.observe(self._guarded(self._on_slider), names="value")
        self._wire_controls()
        self._show_status(first)

    @property
    def path(self) -> str:
        return _drivers(self.vm)[self.device].device.id

    # --- actions ------------------------------------------------------------------------------
    def set_requested(self, mib: int) -> None:
        """``qom-set requested-size`` to ``mib`` MiB, then redraw."""
        self.vm.qmp("qom-set", path=self.path, property="requested-size", value=int(mib) * MiB)
        self.refresh()

    def step(self) -> bool:
        """Run until the next driver event (at most 10 simulated minutes); returns whether one
        happened."""
        self.last_step = step_driver(self.vm)
        self.refresh()
        return self.last_step

    def reset(self) -> None:
        """Re-open the VM with the same arguments; the views start over."""
        self.play.playing = False
        old, self.vm = self.vm, self.factory()
        if self.owns_vm:
            old.close()
        self.owns_vm = True
        self._syncing = True
        try:
            self.slider.value = _drivers(self.vm)[self.device].device.requested_size // MiB
        finally:
            self._syncing = False
        self.last_step = None
        first = self.vm.sample()
        self.timeline.reset([first])
        self.grid.update(self.vm)
        self._show_status(first)

    def refresh(self) -> dict:
        """Sample the VM and redraw the grid, the timeline and the status line."""
        row = self.vm.sample()
        self.timeline.append(row)
        self.timeline.update_history(self.vm)
        self.grid.update(self.vm)
        self._show_status(row)
        return row

    # --- callbacks ----------------------------------------------------------------------------
    def _on_slider(self, change: dict) -> None:
        if not self._syncing:
            self.set_requested(change["new"])

    def _show_status(self, row: dict) -> None:
        drv = _drivers(self.vm)[self.device]
        rc = drv.last_rc
        fails = retry_schedule(drv.history)
        pending = [f["retry_at_ms"] for f in fails if f["retry_at_ms"] and f["retry_at_ms"] > row["t_ms"]]
        parts = [f"t = {row['t_ms'] / 1000:.3f} s",
                 f"requested <b>{format_size(drv.device.requested_size)}</b>",
                 f"plugged <b>{format_size(drv.device.size)}</b>",
                 f"MemTotal {format_size(int(row['memtotal']))}",
                 f"last work run: {'ok' if rc == 0 else '-' + errno.errorcode.get(-rc, str(-rc))}",
                 f"next retry at {pending[-1] / 1000:.0f} s" if pending else "no retry pending",
                 f"host RSS {format_size(int(row['host_rss']))}"]
        if self.last_step is False:
            parts.append("(no driver event)")
        self.status_html.value = " &middot; ".join(parts)

    def __repr__(self) -> str:
        return f"<VirtioMemExplorer of {self.vm!r}>"


def explore_virtio_mem(vm: Any = None, *, factory: Callable[[], Any] | None = None, device: int = 0,
                       tick_ms: float = 1000.0, **options: Any) -> VirtioMemExplorer:
    """A :class:`VirtioMemExplorer` for ``vm`` (or a VM opened with ``labkit.open(**options)``).
    Call :func:`labkit.viz.setup_notebook` once before displaying it.

    >>> ex = explore_virtio_mem(memory="1G", virtio_mem=[{"id": "vm0", "size": "512M"}])
    >>> ex.step()            # the driver's first work run, at probe: nothing to do ("idle")
    True
    >>> ex.step()            # nothing requested and no timer pending: no event will come
    False
    >>> ex.vm.close()
    """
    return VirtioMemExplorer(vm, factory=factory, device=device, tick_ms=tick_ms, **options)

