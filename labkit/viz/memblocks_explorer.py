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
import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from bokeh.layouts import column

from labkit.units import MiB, format_size
from labkit.viz.changes import describe
from labkit.viz.controls import SteppingControls
from labkit.viz.explorer import _factory, _tick_choices, reopen_options
from labkit.viz.memblocks import (
    DEFAULT_MAX_BLOCKS,
    MemoryBlockGrid,
    ResizeTimeline,
    retry_schedule,
    virtio_mem_view,
)
from labkit.viz.shown import LiveBokeh

EXTRA_TICKS = (("10 s", 10_000.0), ("1 min", 60_000.0))  # the retry backoff is 50 s to 300 s
STEP_MAX_MS = 600_000.0  # Step gives up after 10 simulated minutes without a driver event


def driver_signature(vm: Any) -> tuple:
    """What changes at every virtio-mem driver event: requests sent, work runs, blocks added,
    blocks online (from ``vm.inspect("virtio-mem")``)."""
    view = virtio_mem_view(vm)
    return (sum(sum(d.requests.values()) for d in view.devices), sum(len(d.history) for d in view.devices),
            len(view.added_blocks), tuple(sorted(view.online_blocks.items())))


def driver_facts(vm: Any, device: int = 0, view: Any = None) -> dict:
    """What one step of the virtio-mem driver can change, for :func:`virtio_mem_readout`: time,
    requests sent by type, the work runs so far, memory blocks added and online, plugged size.
    ``view``: a ``vm.inspect("virtio-mem")`` taken now."""
    view = virtio_mem_view(vm) if view is None else view
    dev = view.devices[device]
    return {"t_ms": float(vm.now_ms), "requests": dict(dev.requests), "runs": list(dev.history),
            "added": len(view.added_blocks), "online": len(view.online_blocks),
            "plugged": int(dev.size), "requested": int(dev.requested_size)}


def virtio_mem_readout(what: str, before: dict, after: dict, moves: list | None = None) -> str:
    """In words and numbers, what a step of a virtio-mem guest did (two :func:`driver_facts`): the
    time it took, the requests sent, the driver's work runs and their result (§5.6: a failure arms
    the retry timer), memory blocks added and onlined, plugged size, and the grid's moves in 2 MiB
    cells.

    >>> b = {"t_ms": 0.0, "requests": {"PLUG": 0, "UNPLUG": 0}, "runs": [], "added": 0, "online": 0,
    ...      "plugged": 0, "requested": 200 << 20}
    >>> a = dict(b, t_ms=0.5, requests={"PLUG": 1, "UNPLUG": 0}, plugged=128 << 20)
    >>> virtio_mem_readout("step", b, a)
    'step (+0.5 ms): 1 PLUG request; plugged 0 B → 128 MiB (requested-size 200 MiB)'
    """
    parts = [f"{n} {kind} request{'s' if n > 1 else ''}" for kind, n in
             ((k, after["requests"][k] - before["requests"].get(k, 0)) for k in after["requests"]) if n]
    for t, run, rc in after["runs"][len(before["runs"]):]:
        result = "ok" if rc == 0 else f"failed -{errno.errorcode.get(-rc, str(-rc))}"
        parts.append(f"work run at {t / 1000:.1f} s ({run}): {result}")
    added, online = after["added"] - before["added"], after["online"] - before["online"]
    for delta, done, undone in ((added, "added", "removed"), (online, "onlined", "offlined")):
        if delta:
            parts.append(f"{abs(delta)} memory block{'s' * (abs(delta) > 1)} {done if delta > 0 else undone}")
    elapsed = after["t_ms"] - before["t_ms"]
    text = (f"{what} (+{_ms(elapsed)}): " + "; ".join(parts or ["no driver event"])
            + f"; plugged {format_size(before['plugged'])} → {format_size(after['plugged'])} "
              f"(requested-size {format_size(after['requested'])})")
    if moves is not None:
        text += " · grid: " + (describe(moves).replace(" pages ", " cells ").replace(" page ", " cell ")
                               if moves else "no cell changed")
    return text


def _ms(ms: float) -> str:
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:g} ms"


def step_driver(vm: Any, max_ms: float = STEP_MAX_MS) -> bool:
    """Run ``vm`` until the next virtio-mem driver event (``advance_until("virtio-mem-driver")``:
    a request answered, a work run, a block added or onlined), at most ``max_ms``; returns whether
    one happened."""
    return vm.advance_until("virtio-mem-driver", max_ms) is not None


class VirtioMemExplorer(SteppingControls, widgets.VBox):
    """The virtio-mem explorer widget; build it with :func:`explore_virtio_mem`.

    Controls: ``slider`` (requested-size in MiB of device ``device``, steps of its block size),
    ``step_button``, ``play``, ``speed`` (ms per tick), ``reset_button``. Views: ``grid`` (a
    :class:`MemoryBlockGrid`), ``timeline`` (a :class:`ResizeTimeline`), ``status_html``.
    """


    def __init__(self, vm: Any = None, *, factory: Callable[[], Any] | None = None, device: int = 0,
                 tick_ms: float = 1000.0, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 play_interval_ms: int = 100, **options: Any):
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
        devices = virtio_mem_view(vm).devices
        if not isinstance(device, int) or isinstance(device, bool) or not 0 <= device < len(devices):
            raise ValueError(f"device must be an index from 0 to {len(devices) - 1}, got {device!r}")
        self.vm, self.device = vm, device
        dev = devices[device]
        step = max(1, dev.block_size // MiB)
        self.slider = widgets.IntSlider(
            value=dev.requested_size // MiB, min=0, max=dev.region_size // MiB, step=step,
            description=f"{dev.id} requested-size (MiB)", continuous_update=False,
            style={"description_width": "initial"}, layout=widgets.Layout(width="460px"))
        choices = dict(_tick_choices(tick_ms))
        choices.update(dict(EXTRA_TICKS))
        self._build_controls(step_tooltip="run until the next virtio-mem driver event",
                             tick_choices=sorted(choices.items(), key=lambda c: c[1]), tick_ms=tick_ms,
                             play_interval_ms=play_interval_ms)
        self.status_html = widgets.HTML()
        self.change_html = widgets.HTML("<i>Step: what each step did is said here, and the cells it "
                                        "changed are outlined in magenta on the grid.</i>")
        self.last_step: bool | None = None
        self.last_readout = ""
        self._syncing = False
        first = vm.sample()
        self.grid = MemoryBlockGrid(vm, max_blocks=max_blocks)
        self.timeline = ResizeTimeline([first])
        self.live = LiveBokeh(column(self.grid.figure, self.timeline.layout))
        self.plots = widgets.HBox([self.live])
        self._facts = driver_facts(vm, device)
        super().__init__(children=[
            widgets.HBox([self.slider, self.step_button, self.visible_button, self.reset_button]),
            widgets.HBox([self.play, self.speed]),
            self.status_html, self.change_html, self.plots])
        self.slider.observe(self._guarded(self._on_slider), names="value")
        self._wire_controls()
        self._show_status(first)

    def _device(self) -> Any:
        """The explored device's :class:`labkit.backends.inspect.VirtioMemDeviceView`, now."""
        return virtio_mem_view(self.vm).devices[self.device]

    @property
    def path(self) -> str:
        return self._device().id

    # --- actions ------------------------------------------------------------------------------
    def set_requested(self, mib: int) -> None:
        """``qom-set requested-size`` to ``mib`` MiB, then redraw."""
        self.vm.qmp("qom-set", path=self.path, property="requested-size", value=int(mib) * MiB)
        self.refresh(f"requested-size {int(mib)} MiB")

    def step(self) -> bool:
        """Run until the next driver event (at most 10 simulated minutes); returns whether one
        happened."""
        self.last_step = step_driver(self.vm)
        self.refresh("step")
        return self.last_step

    def tick(self) -> None:
        """One Play tick: advance ``tick_ms`` simulated milliseconds, then redraw."""
        self.vm.advance(self.tick_ms)
        self.refresh(_ms(self.tick_ms))

    def picture(self):
        return self.grid.image

    def changed_something(self, before) -> bool:
        return self.grid.changed_cells > 0 or super().changed_something(before)

    def reset(self) -> None:
        """Re-open the VM with the same arguments; the views start over."""
        self.reopen_vm()
        self._syncing = True
        try:
            self.slider.value = self._device().requested_size // MiB
        finally:
            self._syncing = False
        self.last_step = None
        first = self.vm.sample()
        with self.live.batch():
            self.timeline.reset([first])
            self.grid.update(self.vm)
        self._facts = driver_facts(self.vm, self.device)
        self._show_status(first)
        self.change_html.value = "reset: a fresh VM"

    def refresh(self, what: str = "now") -> dict:
        """Sample the VM and redraw the grid, the timeline and the status line (one message set);
        the readout says what changed since the last redraw (``what``: "step", "1 s"...)."""
        row = self.vm.sample()
        view = virtio_mem_view(self.vm)  # one snapshot for every view redrawn
        with self.live.batch():
            self.timeline.append(row)
            self.timeline.update_history(self.vm, view)
            self.grid.update(self.vm, view)
        self._show_status(row, view)
        before, self._facts = self._facts, driver_facts(self.vm, self.device, view)
        self.last_readout = virtio_mem_readout(what, before, self._facts, self.grid.last_moves)
        self.change_html.value = f"<b>{html.escape(self.last_readout)}</b>"
        return row

    # --- callbacks ----------------------------------------------------------------------------
    def _on_slider(self, change: dict) -> None:
        if not self._syncing:
            self.set_requested(change["new"])

    def _show_status(self, row: dict, view: Any = None) -> None:
        dev = (virtio_mem_view(self.vm) if view is None else view).devices[self.device]
        rc = dev.last_rc
        fails = retry_schedule(dev.history)
        pending = [f["retry_at_ms"] for f in fails if f["retry_at_ms"] and f["retry_at_ms"] > row["t_ms"]]
        parts = [f"t = {row['t_ms'] / 1000:.3f} s",
                 f"requested <b>{format_size(dev.requested_size)}</b>",
                 f"plugged <b>{format_size(dev.size)}</b>",
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

