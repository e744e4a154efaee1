"""QMP for the live backend: ``qemu.qmp``'s async ``QMPClient`` on its own event loop and thread.

A Jupyter kernel already runs an asyncio loop on the main thread, where neither ``asyncio.run`` nor
the library's legacy synchronous wrapper can be used. So the client lives on a private loop in a
daemon thread, and :class:`QMPConnection` offers a plain synchronous ``execute()`` that works the same
in a script, under pytest and inside a notebook cell. QMP errors become
:class:`labkit.QMPError` with QEMU's class and text; events are kept in the model's shape
(``{"event", "data", "timestamp": {"seconds", "microseconds"}}``).

>>> conn = QMPConnection("/path/to/qmp.sock")  # doctest: +SKIP
>>> conn.execute("query-balloon")  # doctest: +SKIP
{'actual': 1073741824}
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

try:
    from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient
    from qemu.qmp import QMPError as LibraryQMPError
except ImportError:  # the model backend, the unit tests and the docs work without it
    QMPClient = None

    class LibraryQMPError(Exception):
        pass

    ConnectError = ExecInterruptedError = ExecuteError = LibraryQMPError

from labkit.errors import QMPError

CONNECT_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0


class QMPConnectionLost(RuntimeError):
    """The QMP connection is gone (QEMU exited or closed the socket)."""


class QMPConnection:
    """A connected ``QMPClient`` driven from any thread through :meth:`execute`."""

    def __init__(self, socket_path: str, name: str = "labkit", timeout: float = CONNECT_TIMEOUT_S):
        if QMPClient is None:
            raise ModuleNotFoundError("the live backend needs the qemu.qmp library: "
                                      "pip install 'qemu.qmp>=0.0.3'")
        self.socket_path = socket_path
        self._events: list[dict] = []
        self.event_arrived = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._closed = False
        self._client: QMPClient | None = None
        self._reader: asyncio.Future | None = None
        try:
            self._client = self._call(self._connect(name), timeout)
        except BaseException:
            self.close()
            raise

    # --- running coroutines on the private loop ----------------------------------------------
    def _call(self, coro, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _connect(self, name: str) -> QMPClient:
        client = QMPClient(name)
        await client.connect(self.socket_path)
        self._reader = asyncio.ensure_future(self._collect(client))
        return client

    async def _collect(self, client: QMPClient) -> None:
        async for message in client.events:
            event = {"event": message["event"], "data": dict(message.get("data", {})),
                     "timestamp": dict(message["timestamp"])}
            with self.event_arrived:
                self._events.append(event)
                self.event_arrived.notify_all()

    # --- public -------------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict | None = None,
                timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """Run one QMP command and return its ``return`` value (plain dicts and lists).

        Raises :class:`labkit.QMPError` when QEMU answers with an error, and
        :class:`QMPConnectionLost` when the connection is gone."""
        if self._closed or self._client is None:
            raise QMPConnectionLost("the QMP connection is closed")
        try:
            result = self._call(self._client.execute(command, arguments or None), timeout)
        except ExecuteError as e:
            raise QMPError(e.error_class, str(e)) from None
        except (ExecInterruptedError, ConnectionError, EOFError, LibraryQMPError) as e:
            raise QMPConnectionLost(f"QMP connection lost during {command!r}: {e!r}") from None
        return _plain(result)

    def events(self) -> list[dict]:
        with self.event_arrived:
            return [dict(e) for e in self._events]

    def wait_event(self, name: str, after: int, timeout: float) -> dict | None:
        """Wait up to ``timeout`` s for an event called ``name`` with index >= ``after``."""
        deadline = time.monotonic() + timeout
        with self.event_arrived:
            while True:
                for event in self._events[after:]:
                    if event["event"] == name:
                        return dict(event)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.event_arrived.wait(left)

    @property
    def event_count(self) -> int:
        with self.event_arrived:
            return len(self._events)

    def close(self) -> None:
        """Disconnect (ignoring a connection QEMU already closed), stop the loop, join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            try:
                self._call(self._disconnect(), 5.0)
            except Exception:  # noqa: BLE001 - closing after QEMU died must not raise
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        try:
            await self._client.disconnect()
        except Exception:  # noqa: BLE001 - EOFError etc. when QEMU went first
            pass


def _plain(value: Any) -> Any:
    """QMP replies as plain dicts/lists (the library's Message objects are mappings)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


__all__ = ["ConnectError", "QMPConnection", "QMPConnectionLost"]


MIGRATION_RUNNING = ("setup", "active", "pre-switchover", "device", "postcopy-active", "cancelling")


def migration_sample(execute) -> dict[str, float]:
    """The model's ``migration_*`` sample columns from ``query-migrate`` (``{}`` before any
    migration: all zero). ``migration_threshold`` is what QEMU computes and does not report:
    bandwidth (``ram.mbps``) times ``downtime-limit`` (migration/migration.c
    ``migration_update_counters``); read from ``query-migrate-parameters`` only while one runs.

    >>> migration_sample(lambda command: {})["migration_active"]
    0.0
    """
    info = execute("query-migrate")
    ram = info.get("ram", {})
    active = info.get("status") in MIGRATION_RUNNING
    threshold = 0.0
    if active and ram.get("mbps"):
        downtime_ms = execute("query-migrate-parameters").get("downtime-limit", 300)
        threshold = ram["mbps"] * 1e6 / 8 / 1000 * downtime_ms
    return {"migration_active": float(active), "migration_transferred": float(ram.get("transferred", 0)),
            "migration_remaining": float(ram.get("remaining", 0)), "migration_threshold": threshold,
            "migration_syncs": float(ram.get("dirty-sync-count", 0)),
            "migration_throttle": float(info.get("cpu-throttle-percentage", 0))}
