"""The transport controls every stepping explorer shares: Step, "Step to a visible change", Play, a
per-tick Dropdown and Reset, wired to the explorer's ``step()``, ``tick()`` and ``reset()``, with
errors shown in its status line (inside the widget, never only in JupyterLab's Log Console).

An explorer mixes in :class:`SteppingControls`, calls :meth:`~SteppingControls._build_controls` while it
builds its widgets, gives itself ``status_html`` (an ``ipywidgets.HTML``), ``vm``, ``step()``,
``refresh()`` and ``reset()``, then calls :meth:`~SteppingControls._wire_controls`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np

MAX_STEPS_TO_CHANGE = 1000


class SteppingControls:
    """Mixin: the Step / Play / per-tick / Reset row and what each control does."""

    step_button: widgets.Button
    play: widgets.Play
    speed: widgets.Dropdown
    reset_button: widgets.Button
    status_html: widgets.HTML
    tick_ms: float
    error: BaseException | None
    vm: Any

    def _build_controls(self, *, step_tooltip: str, tick_choices: Sequence[tuple[str, float]],
                        tick_ms: float, play_interval_ms: int) -> None:
        self.step_button = widgets.Button(description="Step", tooltip=step_tooltip,
                                          icon="step-forward", layout=widgets.Layout(width="80px"))
        self.visible_button = widgets.Button(
            description="Step to change", icon="fast-forward", layout=widgets.Layout(width="150px"),
            tooltip="step until the picture changes at the current zoom (at most "
                    f"{MAX_STEPS_TO_CHANGE} steps)")
        self.play = widgets.Play(value=0, min=0, max=1000, step=1, interval=play_interval_ms,
                                 repeat=True, show_repeat=False, description="Play")
        self.speed = widgets.Dropdown(options=list(tick_choices), value=float(tick_ms),
                                      description="per tick", layout=widgets.Layout(width="170px"))
        self.reset_button = widgets.Button(description="Reset", icon="undo",
                                           tooltip="re-open the VM with the same arguments",
                                           layout=widgets.Layout(width="80px"))
        self.tick_ms = float(tick_ms)
        self.error = None

    def _wire_controls(self) -> None:
        self.play.observe(self._guarded(self._on_play_tick), names="value")
        self.speed.observe(self._guarded(self._on_speed), names="value")
        self.step_button.on_click(self._guarded(lambda _button: self.step()))
        self.visible_button.on_click(self._guarded(lambda _button: self.step_to_change()))
        self.reset_button.on_click(self._guarded(lambda _button: self.reset()))

    def tick(self) -> None:
        """One Play tick: advance ``tick_ms`` simulated milliseconds, then redraw."""
        self.vm.advance(self.tick_ms)
        self.refresh()

    def picture(self) -> Any:
        """What the explorer shows that a step can change (the page map's image, by default)."""
        page_map = getattr(self, "page_map", None)
        return None if page_map is None else page_map.image

    def step_to_change(self, max_steps: int = MAX_STEPS_TO_CHANGE) -> int:
        """Step until the picture changes at the current zoom, the step does nothing, or
        ``max_steps``; returns the number of steps taken."""
        before = self.picture()
        if before is None:
            return int(bool(self.step()))
        before = np.array(before, copy=True)
        for n in range(1, max_steps + 1):
            if not self.step():
                return n
            now = self.picture()
            if now.shape != before.shape or (now != before).any():
                return n
        return max_steps

    def _guarded(self, callback: Callable[[Any], None]) -> Callable[[Any], None]:
        """Widget callbacks run where nobody sees a traceback (JupyterLab's log console): show
        the error in the status line instead, keep it in ``self.error``, and stop Play."""
        def run(argument: Any) -> None:
            try:
                callback(argument)
            except Exception as e:  # shown to the user and kept in self.error
                self.error = e
                self.play.playing = False
                self.status_html.value = (
                    f'<span style="color:#D55E00"><b>{type(e).__name__}</b>: '
                    f"{html.escape(str(e))}</span>")
        return run

    def _on_play_tick(self, change: dict) -> None:
        if change["new"] != change["old"]:
            self.tick()

    def _on_speed(self, change: dict) -> None:
        self.tick_ms = float(change["new"])

    # what the explorer provides
    def step(self) -> bool:  # pragma: no cover - every explorer defines it
        raise NotImplementedError

    def refresh(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover
        raise NotImplementedError
