"""One transcript, driven by real QMP clients against any QMP socket: ``labkit serve`` (the model) in
tests/test_serve.py and a live QEMU in tests/live/test_live_monitor.py, so the answers can be
compared field by field.

The transcript is the talk's: the virtio-mem commands as HMP lines (``qom-set vm0 requested-size
4G``, ``qom-get vm0 size``, ``info memory-devices``), the same over QMP (``query-memory-devices``),
and a balloon inflation with its ``BALLOON_CHANGE`` events. :func:`run_transcript` uses qemu.qmp's
``QMPClient``; :func:`qmp_shell` runs the ``qmp-shell`` program (QMP or HMP mode) on a script.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qemu.qmp import QMPClient

GiB = 1 << 30
MiB = 1 << 20
TALK_LINE = ("-m 4G,maxmem=20G -object memory-backend-ram,id=mem0,size=16G "
             "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0 "
             "-device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on "
             "-append memhp_default_state=online_movable")
PLUG = 4 * GiB
BALLOON_TARGET = 3 * GiB


async def _until(client: QMPClient, check, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check(client)
        if value is not None or time.monotonic() > deadline:
            return value
        await asyncio.sleep(poll_s)


async def _transcript(socket_path: str, timeout_s: float) -> dict:
    client = QMPClient("labkit-transcript")
    out: dict = {"events": []}
    await client.connect(socket_path)
    events: list[dict] = []

    async def collect() -> None:
        async for event in client.events:
            events.append({"event": event["event"], "data": dict(event.get("data", {})),
                           "timestamp": dict(event["timestamp"])})

    reader = asyncio.create_task(collect())
    hmp = lambda line: client.execute("human-monitor-command", {"command-line": line})  # noqa: E731
    try:
        out["greeting"] = client.greeting._asdict()["QMP"]
        out["before"] = await client.execute("query-memory-devices")
        out["qom-set"] = await hmp("qom-set vm0 requested-size 4G")
        out["requested"] = await client.execute("qom-get", {"path": "vm0", "property": "requested-size"})

        async def plugged(c):
            size = await c.execute("qom-get", {"path": "vm0", "property": "size"})
            return size if size == PLUG else None
        out["plugged"] = await _until(client, plugged, timeout_s)
        out["qom-get size"] = await hmp("qom-get vm0 size")
        out["info memory-devices"] = await hmp("info memory-devices")
        out["query-memory-devices"] = await client.execute("query-memory-devices")
        out["balloon"] = await client.execute("balloon", {"value": BALLOON_TARGET})

        async def reached(c):
            actual = (await c.execute("query-balloon"))["actual"]
            return actual if actual == BALLOON_TARGET else None
        out["balloon-reached"] = await _until(client, reached, timeout_s)
        await asyncio.sleep(1.5)  # QEMU holds a throttled BALLOON_CHANGE for up to 1 s
        out["info balloon"] = await hmp("info balloon")
        out["events"] = list(events)
    finally:
        reader.cancel()
        await client.disconnect()
    return out


def run_transcript(socket_path: str, timeout_s: float = 120.0) -> dict:
    """Run the transcript on ``socket_path`` with qemu.qmp's QMPClient; returns every answer.

    It runs on its own thread and event loop: a test session may already run a loop on this one
    (Playwright's sync API in the browser tests does)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _transcript(socket_path, timeout_s)).result()


def qmp_shell(socket_path: str, script: list[tuple[str, float]], hmp: bool = False,
              timeout_s: float = 120.0) -> list[str]:
    """Run qemu.qmp's ``qmp-shell`` (``-H``: HMP mode) on ``socket_path``, typing each line of
    ``script`` and then waiting its delay (seconds); returns the text after each prompt."""
    program = shutil.which("qmp-shell") or str(Path(sys.executable).with_name("qmp-shell"))
    shell = subprocess.Popen([program, *(["-H"] if hmp else []), socket_path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, HOME=str(Path(socket_path).parent)))
    try:
        for line, delay in script:
            shell.stdin.write(line + "\n")
            shell.stdin.flush()
            time.sleep(delay)
        out, err = shell.communicate(timeout=timeout_s)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    assert shell.returncode == 0, err
    return out.split("(QEMU) ")[1:]


def parse_shell_answer(text: str) -> object:
    """One answer of qmp-shell in QMP mode: JSON; an empty line's answer: the events, each a
    Python dict repr."""
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [ast.literal_eval(line) for line in text.splitlines()]


def shapes(value: object) -> object:
    """The shape of a QMP answer: keys and types, not values."""
    if isinstance(value, dict):
        return {k: shapes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shapes(v) for v in value]
    return type(value).__name__
