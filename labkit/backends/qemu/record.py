"""Record a live run, and replay it without QEMU (Binder, CI without QEMU, a laptop).

:class:`Recorder` wraps a backend and logs every call notebooks make (``qmp``, ``guest``,
``meminfo``, ``sample``, ``advance``, ``step``, ``events``, ``inspect``, ``advance_until``) with its
arguments and answer, plus the
VM's facts (memory, balloon options, kernel, QEMU version, accelerator, boot time) and, for a live VM,
its fine-grained trace (balloon ``actual`` and host RSS every ~50 ms while ``advance`` waited).
:meth:`Recorder.save` writes JSON (under ``data/recorded/`` for the runs the project ships).

:class:`ReplayBackend` reads that file and answers the same calls, in the same order, with the
recorded answers: a notebook written against ``labkit.open(...)`` renders real behaviour without
QEMU. A call that differs from the recording raises :class:`ReplayMismatch` naming what was
recorded next.

>>> import labkit, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "run.json")
>>> with Recorder(labkit.open(memory="512M", seed=0)) as vm:
...     _ = vm.qmp("balloon", value=384 << 20); vm.advance(1000)
...     actual = vm.qmp("query-balloon")["actual"]
...     _ = vm.save(path)
>>> replay = ReplayBackend(path)
>>> _ = replay.qmp("balloon", value=384 << 20); replay.advance(1000)
>>> replay.qmp("query-balloon")["actual"] == actual
True
>>> replay.meminfo()
Traceback (most recent call last):
...
labkit.backends.qemu.record.ReplayMismatch: call 3 is meminfo() but the recording has close()
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

RECORD_FORMAT = 1
RECORDED_CALLS = ("qmp", "guest", "meminfo", "sample", "advance", "step", "events", "inspect",
                  "advance_until")


class ReplayMismatch(RuntimeError):
    """The replayed notebook asked for something the recording does not have next."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def describe(vm: Any) -> dict:
    """The facts of a backend that a reader of the recording needs."""
    facts = {"backend": getattr(vm, "name", type(vm).__name__), "memory": getattr(vm, "memory", None),
             "balloon": getattr(vm, "balloon_options", None), "python": platform.python_version(),
             "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    image = getattr(vm, "image", None)
    if image is not None:
        facts |= {"kernel": image.version, "kernel_origin": image.origin, "helper": image.helper,
                  "accel": getattr(vm, "accel", None), "accel_reason": getattr(vm, "accel_reason", None),
                  "boot_s": round(getattr(vm, "boot_s", 0.0), 2), "qemu": _qemu_version(),
                  "cmdline": getattr(vm, "cmdline", "")}
    return _jsonable(facts)


def _qemu_version() -> str:
    from labkit.backends.qemu.accel import host_key

    return host_key().split(" | ", 1)[1]


class Recorder:
    """A backend wrapper that logs calls and answers; everything else passes through."""

    def __init__(self, vm: Any, note: str = ""):
        self.vm = vm
        self.note = note
        self.calls: list[dict] = []
        self.facts = describe(vm)

    def _log(self, call: str, args: dict, result: Any) -> Any:
        self.calls.append({"call": call, "args": _jsonable(args), "result": _jsonable(result)})
        return result

    def qmp(self, command: str, **arguments: Any) -> Any:
        from labkit.errors import QMPError

        try:
            result = self.vm.qmp(command, **arguments)
        except QMPError as e:
            self._log("qmp", {"command": command, **arguments}, e.as_qmp())
            raise
        return self._log("qmp", {"command": command, **arguments}, result)

    def guest(self, op: str, **arguments: Any) -> Any:
        return self._log("guest", {"op": op, **arguments}, self.vm.guest(op, **arguments))

    def meminfo(self) -> dict[str, int]:
        return self._log("meminfo", {}, self.vm.meminfo())

    def sample(self) -> dict[str, float]:
        return self._log("sample", {}, self.vm.sample())

    def advance(self, ms: float) -> None:
        return self._log("advance", {"ms": ms}, self.vm.advance(ms))

    def step(self, *args: Any, **kwargs: Any) -> bool:
        return self._log("step", {}, self.vm.step(*args, **kwargs))

    def events(self) -> list[dict]:
        return self._log("events", {}, self.vm.events())

    def inspect(self, mechanism: str) -> Any:
        from labkit.backends.inspect import as_dict

        snapshot = self.vm.inspect(mechanism)
        self._log("inspect", {"mechanism": mechanism}, as_dict(snapshot))
        return snapshot

    def advance_until(self, event: str, max_ms: float = 60_000.0, **data: Any) -> dict | None:
        return self._log("advance_until", {"event": event, "max_ms": max_ms, **data},
                         self.vm.advance_until(event, max_ms, **data))

    def close(self) -> None:
        if not self.calls or self.calls[-1]["call"] != "close":
            self.calls.append({"call": "close", "args": {}, "result": None})
        self.vm.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vm, name)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_json(self) -> dict:
        trace = [list(t) for t in getattr(self.vm, "trace", [])]
        events = self.vm.events() if not getattr(self.vm, "closed", False) else []
        closed = self.calls[-1:] == [{"call": "close", "args": {}, "result": None}]
        return {"format": RECORD_FORMAT, "note": self.note, "facts": self.facts,
                "calls": self.calls + ([] if closed else [{"call": "close", "args": {}, "result": None}]),
                "events": _jsonable(events), "trace": {"columns": ["t_ms", "actual", "host_rss"],
                                                       "rows": _jsonable(trace)}}

    def save(self, path: str | Path) -> Path:
        """Write the recording as JSON (pretty enough to diff); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=None, separators=(",", ":")) + "\n")
        return path


class ReplayBackend:
    """Answers a recorded run's calls in order, without QEMU. ``facts``, ``trace`` and
    ``recorded_events`` give the whole recording to plots that want more than the calls."""

    name = "replay"

    def __init__(self, path: str | Path):
        data = json.loads(Path(path).read_text())
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"{path}: recording format {data.get('format')!r}, expected {RECORD_FORMAT}")
        self.path = str(path)
        self.facts = data["facts"]
        self.note = data.get("note", "")
        self.memory = self.facts.get("memory")
        self.balloon_options = self.facts.get("balloon")
        self.recorded_calls = data["calls"]
        self.recorded_events = data["events"]
        self.trace = [tuple(row) for row in data["trace"]["rows"]]
        self._next = 0
        self.closed = False

    def _answer(self, call: str, args: dict) -> Any:
        position = self._next
        want = f"{call}({_show(args)})"
        if position >= len(self.recorded_calls):
            raise ReplayMismatch(f"call {position} is {want} but the recording ended "
                                 f"after {len(self.recorded_calls)} calls")
        recorded = self.recorded_calls[position]
        if recorded["call"] != call or recorded["args"] != _jsonable(args):
            raise ReplayMismatch(f"call {position} is {want} but the recording has "
                                 f"{recorded['call']}({_show(recorded['args'])})")
        self._next += 1
        return recorded["result"]

    def qmp(self, command: str, **arguments: Any) -> Any:
        result = self._answer("qmp", {"command": command, **arguments})
        if isinstance(result, dict) and set(result) == {"error"}:
            from labkit.errors import QMPError

            raise QMPError(result["error"]["class"], result["error"]["desc"])
        return result

    def guest(self, op: str, **arguments: Any) -> Any:
        return self._answer("guest", {"op": op, **arguments})

    def meminfo(self) -> dict[str, int]:
        return self._answer("meminfo", {})

    def sample(self) -> dict[str, float]:
        return self._answer("sample", {})

    def advance(self, ms: float) -> None:
        return self._answer("advance", {"ms": ms})

    def step(self, *args: Any, **kwargs: Any) -> bool:
        return self._answer("step", {})

    def events(self) -> list[dict]:
        return self._answer("events", {})

    def inspect(self, mechanism: str) -> Any:
        """The recorded snapshot, as the same frozen dataclass the live run returned."""
        from labkit.backends.inspect import from_dict

        return from_dict(mechanism, self._answer("inspect", {"mechanism": mechanism}))

    def advance_until(self, event: str, max_ms: float = 60_000.0, **data: Any) -> dict | None:
        return self._answer("advance_until", {"event": event, "max_ms": max_ms, **data})

    def snapshot(self) -> dict:
        raise NotImplementedError("a recorded live run has no page map (the live backend has none)")

    def close(self) -> None:
        if not self.closed and self._next < len(self.recorded_calls):
            self._answer("close", {})
        self.closed = True

    def __enter__(self) -> ReplayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ReplayBackend {Path(self.path).name}: {self._next}/{len(self.recorded_calls)} calls>"


def _show(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
