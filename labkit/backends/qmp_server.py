"""A model VM behind a real QMP socket (and an HMP one): what ``labkit serve`` runs.

QEMU's QMP wire protocol (docs/interop/qmp-spec.rst), so existing clients work unchanged
(qemu.qmp's ``QMPClient``, ``qmp-shell`` and its HMP mode ``qmp-shell -H``, libvirt-style scripts):

* on connect the server sends its greeting, ``{"QMP": {"version": {"qemu": {...}, "package": ...},
  "capabilities": ["oob"]}}`` (no model command runs out of band, as most of QEMU's don't); until
  the client sends ``qmp_capabilities`` every other command gets
  ``CommandNotFound`` "Expecting capabilities negotiation with 'qmp_capabilities'";
* then each ``{"execute": NAME, "arguments": {...}, "id": ID}`` is answered with ``{"return": ...}``
  or ``{"error": {"class", "desc"}}`` (``id`` echoed), from the model's monitor
  (:mod:`labkit.backends.monitor`); input that is not a JSON object, or lacks ``execute``, gets
  QEMU's texts;
* QMP events (``BALLOON_CHANGE``, ``MEMORY_DEVICE_SIZE_CHANGE``, ``MIGRATION``...) are sent to every
  negotiated client as the model emits them, with their timestamps;
* simulated time follows wall time times ``speed`` (the model runs ``speed`` ms for every wall ms);
* ``quit`` ends the VM (a ``SHUTDOWN`` event, then the connection closes) and the server.

The HMP socket speaks like QEMU's ``-monitor unix:PATH,server=on``: a banner, the ``(qemu)`` prompt,
one command a line (``nc -U PATH`` or ``socat - UNIX-CONNECT:PATH``).

>>> import asyncio, json, os, tempfile, labkit
>>> d = tempfile.mkdtemp(); path = os.path.join(d, "qmp.sock")
>>> server = QmpServer(labkit.open(memory="1G", seed=0), speed=100.0)
>>> async def talk():
...     task = asyncio.create_task(server.serve(path))
...     while not os.path.exists(path):
...         await asyncio.sleep(0.01)
...     reader, writer = await asyncio.open_unix_connection(path)
...     greeting = json.loads(await reader.readline())
...     writer.write(b'{"execute": "qmp_capabilities"}{"execute": "query-balloon", "id": 7}')
...     answers = [json.loads(await reader.readline()) for _ in range(2)]
...     writer.close(); server.stop(); await task
...     return greeting["QMP"]["version"]["qemu"]["major"], answers
>>> asyncio.run(talk())
(7, [{'return': {}}, {'return': {'actual': 1073741824}, 'id': 7}])
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from labkit.backends import hmp
from labkit.backends.monitor import PACKAGE, QEMU_VERSION
from labkit.errors import QMPError

log = logging.getLogger("labkit.serve")
TICK_S = 0.02  # how often simulated time catches up with wall time
HMP_BANNER = (f"QEMU {QEMU_VERSION['major']}.{QEMU_VERSION['minor']}.{QEMU_VERSION['micro']} monitor "
              f"(labkit's model) - type 'help' for more information\r\n")
HMP_PROMPT = "(qemu) "


def greeting() -> dict:
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE}, "capabilities": ["oob"]}}


def _error(error_class: str, desc: str) -> dict:
    return {"error": {"class": error_class, "desc": desc}}


@dataclass
class _Client:
    writer: asyncio.StreamWriter
    negotiated: bool = False
    oob: bool = False  # out-of-band execution enabled at negotiation


class JsonStreamer:
    """Splits a byte stream into top-level JSON texts, as QEMU's json-streamer does: by counting
    braces and brackets outside strings (messages need no separator)."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> list[str]:
        out = []
        for c in text:
            if self.depth == 0 and not self.pending and c.isspace():
                continue
            self.pending.append(c)
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
            if self.depth <= 0 and not self.in_string and (c in "}]" or c.isspace()):
                out.append("".join(self.pending))
                self.pending, self.depth = [], 0
        return out


class QmpServer:
    """Serve ``vm`` (a model backend) on a QMP socket and optionally an HMP socket."""

    def __init__(self, vm: Any, speed: float = 1.0):
        if not isinstance(speed, int | float) or isinstance(speed, bool) or not 0 < speed < float("inf"):
            raise ValueError(f"speed must be a number > 0 (simulated ms per wall ms), got {speed!r}")
        self.vm = vm
        self.speed = float(speed)
        self.clients: list[_Client] = []
        self._sent_events = len(vm.events())
        self._stopped: asyncio.Event | None = None
        self._servers: list[asyncio.AbstractServer] = []

    # --- lifetime -------------------------------------------------------------------------------
    async def serve(self, qmp_path: str, hmp_path: str | None = None) -> None:
        """Listen on ``qmp_path`` (and ``hmp_path``) until :meth:`stop` or ``quit``."""
        self._stopped = asyncio.Event()
        self._servers.append(await asyncio.start_unix_server(self._qmp_session, path=qmp_path))
        if hmp_path is not None:
            self._servers.append(await asyncio.start_unix_server(self._hmp_session, path=hmp_path))
        try:
            await self._clock()
        finally:
            for server in self._servers:
                server.close()
            for client in self.clients:
                client.writer.close()
            for path in (qmp_path, hmp_path):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def _clock(self) -> None:
        """Simulated time follows wall time x speed; new events go out after each step."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not self._stopped.is_set() and not self.vm.closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), TICK_S)
            now = loop.time()
            if not self.vm.closed:
                self.vm.advance((now - last) * 1000.0 * self.speed)
            last = now
            self._flush_events()

    def _flush_events(self) -> None:
        events = self.vm.events()
        for event in events[self._sent_events:]:
            for client in self.clients:
                if client.negotiated:
                    self._send(client, event)
        self._sent_events = len(events)

    @staticmethod
    def _send(client: _Client, message: dict) -> None:
        if not client.writer.is_closing():
            client.writer.write(json.dumps(message).encode() + b"\r\n")

    # --- QMP ------------------------------------------------------------------------------------
    async def _qmp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self.clients.append(client)
        self._send(client, greeting())
        streamer = JsonStreamer()
        try:
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                for text in streamer.feed(data.decode(errors="replace")):
                    try:
                        message = json.loads(text)
                    except json.JSONDecodeError as e:
                        self._send(client, _error("GenericError", f"JSON parse error, {e.msg}"))
                        continue
                    self._send(client, self._answer(client, message))
                    await writer.drain()
                    if self.vm.closed:
                        self._flush_events()
                        self.stop()
                        return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.clients.remove(client)
            writer.close()

    def _answer(self, client: _Client, message: Any) -> dict:
        """One QMP message's answer (qmp_dispatch's checks, then the monitor)."""
        if not isinstance(message, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        reply_id = {"id": message["id"]} if "id" in message else {}
        name = message.get("execute", message.get("exec-oob"))
        if "exec-oob" in message and "execute" not in message and isinstance(name, str):
            # qmp_dispatch: no command of the model is allowed out of band (QEMU allows a few,
            # such as migrate-recover); without oob negotiated, exec-oob is not even a member
            if not client.oob:
                return _error("GenericError", "QMP input member 'exec-oob' is unexpected") | reply_id
            return _error("GenericError", f"The command {name} does not support OOB") | reply_id
        if not isinstance(name, str):
            return _error("GenericError", "QMP input lacks member 'execute'") | reply_id
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            return _error("GenericError", "QMP input member 'arguments' must be an object") | reply_id
        if not client.negotiated:
            if name != "qmp_capabilities":
                return _error("CommandNotFound",
                              "Expecting capabilities negotiation with 'qmp_capabilities'") | reply_id
            enable = arguments.get("enable", [])
            unknown = [c for c in enable if c != "oob"] if isinstance(enable, list) else [enable]
            if unknown:
                # QEMU 7.2's text, 'null' included (the visitor has no name for the list member)
                return _error("GenericError", f"Parameter 'null' does not accept value "
                                              f"'{unknown[0]}'") | reply_id
            client.negotiated, client.oob = True, "oob" in enable
            return {"return": {}} | reply_id
        try:
            return {"return": self.vm.qmp(name, **arguments)} | reply_id
        except QMPError as e:
            return e.as_qmp() | reply_id
        except Exception as e:  # noqa: BLE001 - a model failure answers as QEMU would: an error
            log.exception("QMP command %s failed", name)
            return _error("GenericError", str(e)) | reply_id

    # --- HMP ------------------------------------------------------------------------------------
    async def _hmp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((HMP_BANNER + HMP_PROMPT).encode())
        try:
            while not self.vm.closed:
                line = await reader.readline()
                if not line:
                    break
                text = line.decode(errors="replace").strip()
                if text in ("quit", "q"):
                    self.vm.qmp("quit")
                    break
                if text:
                    writer.write(hmp.run_line(self.vm.monitor, text).encode())
                writer.write(HMP_PROMPT.encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
