"""The transport controls every stepping explorer shares: Step, "Step to change", Play/Pause, a
per-tick Dropdown, Reset and (with a page map) "Zoom to change", wired to the explorer's ``step()``,
``tick()`` and ``reset()``, with errors shown in its status line (inside the widget, never only in
JupyterLab's Log Console).

**Play runs in the kernel.** ipywidgets' ``Play`` counts in the browser and sends each new value to
the kernel, one at a time: the next waits until the kernel has answered the last, so its frame rate
is one round trip browser -> Jupyter server -> kernel -> browser per frame, whatever the kernel's
work (measured: 4-5 frames/s on a busy 2-core machine for a 15 ms tick). Here Play is a toggle
button, and while it is on the kernel itself calls ``tick()`` every ``play_interval_ms`` on its own
event loop (``loop.call_later``, between the messages it handles), so frames leave at the kernel's
pace; a tick that takes longer than the interval delays the next one (no backlog). JupyterLab may
hand widget messages to a kernel subshell, another thread: every control's action and every Play
tick hold the explorer's lock, so a slider moved while Play runs waits for the tick. Play stops by
itself after ``MAX_PLAY_TICKS`` ticks, and at the first error. Without a running event loop (a
script, a test) nothing ticks by itself: call ``tick()``.

An explorer mixes in :class:`SteppingControls`, calls :meth:`~SteppingControls._build_controls` while it
builds its widgets, gives itself ``status_html`` (an ``ipywidgets.HTML``), ``vm``, ``step()``,
``refresh()`` and ``reset()``, then calls :meth:`~SteppingControls._wire_controls`.
"""

from __future__ import annotations

import asyncio
import html
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np

MAX_STEPS_TO_CHANGE = 1000
MAX_PLAY_TICKS = 3000  # 5 minutes at 10 ticks a second: a forgotten Play stops by itself


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running this code (the kernel's, inside a notebook), or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class SteppingControls:
    """Mixin: the Step / Play / per-tick / Reset row and what each control does."""

    step_button: widgets.Button
    play: widgets.ToggleButton
    speed: widgets.Dropdown
    reset_button: widgets.Button
    status_html: widgets.HTML
    tick_ms: float
    error: BaseException | None
    vm: Any

    @staticmethod
    def tick_options(presets: Sequence[tuple[float, str]], tick_ms: float) -> list[tuple[str, float]]:
        """The per-tick dropdown's ``(label, ms)`` options: the ``(ms, label)`` presets and
        ``tick_ms`` if it is none of them, shortest first."""
        choices = dict(presets)
        choices.setdefault(float(tick_ms), f"{tick_ms:g} ms")
        return [(label, v) for v, label in sorted(choices.items())]

    def _build_controls(self, *, step_tooltip: str, tick_choices: Sequence[tuple[str, float]],
                        tick_ms: float, play_interval_ms: int, step_label: str = "Step") -> None:
        self.step_button = widgets.Button(description=step_label, tooltip=step_tooltip,
                                          icon="step-forward", layout=widgets.Layout(width="90px"))
        self.visible_button = widgets.Button(
            description="Step to change", icon="fast-forward", layout=widgets.Layout(width="150px"),
            tooltip="step until the picture changes at the current zoom (at most "
                    f"{MAX_STEPS_TO_CHANGE} steps)")
        self.play = widgets.ToggleButton(value=False, description="Play", icon="play",
                                         tooltip=f"tick every {play_interval_ms} ms (the kernel "
                                                 "ticks by itself) until pressed again",
                                         layout=widgets.Layout(width="90px"))
        self.speed = widgets.Dropdown(options=list(tick_choices), value=float(tick_ms),
                                      description="per tick", layout=widgets.Layout(width="170px"))
        self.reset_button = widgets.Button(description="Reset", icon="undo",
                                           tooltip="re-open the VM with the same arguments",
                                           layout=widgets.Layout(width="80px"))
        self.tick_ms = float(tick_ms)
        self.play_interval_ms = int(play_interval_ms)
        self.play_ticks = 0
        self._play_timer: asyncio.TimerHandle | None = None
        self._play_loop: asyncio.AbstractEventLoop | None = None
        # JupyterLab may hand widget messages to a kernel subshell (another thread) while Play
        # ticks on the loop that started it: one action at a time on the VM and the plots
        self._lock = threading.RLock()
        self.error = None

    def _wire_controls(self) -> None:
        self.play.observe(self._guarded(self._on_play), names="value")
        self.speed.observe(self._guarded(self._on_speed), names="value")
        self.step_button.on_click(self._guarded(lambda _button: self.step()))
        self.visible_button.on_click(self._guarded(lambda _button: self.step_to_change()))
        self.reset_button.on_click(self._guarded(lambda _button: self.reset()))

    # --- Play, driven by the kernel's event loop ---------------------------------------------------
    @property
    def playing(self) -> bool:
        return bool(self.play.value)

    def stop(self) -> None:
        """Pause Play (what pressing it again does)."""
        self.play.value = False

    def _on_play(self, change: dict) -> None:
        on = bool(change["new"])
        self.play.description, self.play.icon = ("Pause", "pause") if on else ("Play", "play")
        timer, self._play_timer = self._play_timer, None
        if timer is not None:  # cancelled on its own loop (this may be another thread)
            self._play_loop.call_soon_threadsafe(timer.cancel)
        if on:
            self.play_ticks = 0
            self._schedule(self.play_interval_ms / 1000)

    def _schedule(self, delay_s: float) -> None:
        loop = running_loop()
        if loop is not None:
            self._play_loop = loop
            self._play_timer = loop.call_later(max(0.0, delay_s), self._play_tick)

    def _play_tick(self) -> None:
        self._play_timer = None
        if not self.playing:
            return
        start = time.monotonic()
        self.error = None
        self._guarded(lambda _: self.tick())(None)
        if self.error is not None:
            return  # shown in the status line; _guarded stopped Play
        self.play_ticks += 1
        if self.play_ticks >= MAX_PLAY_TICKS:
            self.stop()
            return
        self._schedule(self.play_interval_ms / 1000 - (time.monotonic() - start))

    # --- stepping ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """One Play tick: advance ``tick_ms`` simulated milliseconds, then redraw."""
        self.vm.advance(self.tick_ms)
        self.refresh()

    def zoom_to_change(self) -> bool:
        """Zoom the page map to the pages the last step changed; when it changed none, say so in
        the readout (``change_html``) and leave the zoom alone. Returns whether it zoomed."""
        page_map = getattr(self, "page_map", None)
        if page_map is not None and page_map.zoom_to_change():
            return True
        readout = getattr(self, "change_html", None)
        if readout is not None:
            readout.value = "<b>Zoom to change: the last step changed no page, nothing to zoom to</b>"
        return False

    def picture(self) -> Any:
        """What the explorer shows that a step can change (the page map's image, by default)."""
        page_map = getattr(self, "page_map", None)
        return None if page_map is None else page_map.image

    def changed_something(self, before: Any) -> bool:
        """Whether the last step changed what is shown: the picture differs from ``before``, or the
        page map outlines pages the step changed (a change too small to alter a downsampled cell
        is still outlined, so it is a visible change)."""
        now = self.picture()
        page_map = getattr(self, "page_map", None)
        return (now.shape != before.shape or bool((now != before).any())
                or (page_map is not None and page_map.changed_pages > 0))

    def step_to_change(self, max_steps: int = MAX_STEPS_TO_CHANGE) -> int:
        """Step until the picture changes at the current zoom (or the page map outlines a change),
        the step does nothing, or ``max_steps``; returns the number of steps taken."""
        before = self.picture()
        if before is None:
            return int(bool(self.step()))
        before = np.array(before, copy=True)
        for n in range(1, max_steps + 1):
            if not self.step():
                return n
            if self.changed_something(before):
                return n
        return max_steps

    def _guarded(self, callback: Callable[[Any], None]) -> Callable[[Any], None]:
        """Widget callbacks run where nobody sees a traceback (JupyterLab's log console): show
        the error in the status line instead, keep it in ``self.error``, and stop Play."""
        def run(argument: Any) -> None:
            try:
                with self._lock:
                    callback(argument)
            except Exception as e:  # shown to the user and kept in self.error
                self.error = e
                self.play.value = False
                self.status_html.value = (
                    f'<span style="color:#D55E00"><b>{type(e).__name__}</b>: '
                    f"{html.escape(str(e))}</span>")
        return run

    def _on_speed(self, change: dict) -> None:
        self.tick_ms = float(change["new"])

    # what the explorer provides
    def step(self) -> bool:  # pragma: no cover - every explorer defines it
        raise NotImplementedError

    def refresh(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def reopen_vm(self) -> None:
        """For Reset: stop Play, open a new VM with ``factory`` and close the old one if this
        explorer opened it (a VM handed in stays open: the cell that made it owns it)."""
        if getattr(self, "factory", None) is None:
            raise RuntimeError("this explorer was given a VM: it cannot re-open it (pass factory=)")
        self.stop()
        old, self.vm = self.vm, self.factory()
        if self.owns_vm:
            old.close()
        self.owns_vm = True
