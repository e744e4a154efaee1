"""``labkit serve``: a model VM behind a real QMP socket that unmodified clients talk to: qemu.qmp's
QMPClient and its qmp-shell (QMP and HMP modes), plus an HMP socket. The wire protocol is QEMU's
(docs/interop/qmp-spec.rst: greeting, capabilities negotiation, ``id`` echoed, asynchronous events);
the server runs in its own process, started and stopped by PID as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.transcript import (
    BALLOON_TARGET,
    PLUG,
    TALK_LINE,
    parse_shell_answer,
    qmp_shell,
    run_transcript,
    shapes,
)

SPEED = "20"  # simulated ms per wall ms


class Served:
    def __init__(self, process: subprocess.Popen, qmp: str, hmp: str | None, banner: str):
        self.process, self.qmp, self.hmp, self.banner = process, qmp, hmp, banner


def serve(tmp_path, *extra: str, qmp: str | None = None, hmp: bool = True, line: str = TALK_LINE) -> Served:
    qmp_spec = qmp if qmp is not None else f"unix:{tmp_path / 'qmp.sock'}"
    args = [sys.executable, "-m", "labkit.cli", "serve", "--qmp", qmp_spec, "--speed", SPEED, *extra]
    if hmp:
        args += ["--hmp", f"unix:{tmp_path / 'hmp.sock'}"]
    process = subprocess.Popen(args + ["--", *line.split()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    banner = process.stdout.readline()
    if "QMP on unix:" not in banner:
        process.kill()
        raise AssertionError(f"labkit serve did not start: {banner}{process.stderr.read()}")
    qmp_path = banner.split("QMP on unix:")[1].split(",")[0].split(";")[0]
    return Served(process, qmp_path, str(tmp_path / "hmp.sock") if hmp else None, banner)


def stop(served: Served) -> int:
    served.process.send_signal(signal.SIGTERM)  # by PID, as a user would
    try:
        return served.process.wait(timeout=30)
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


@pytest.fixture
def served(tmp_path):
    s = serve(tmp_path)
    try:
        yield s
    finally:
        assert stop(s) == 0
    assert not os.path.exists(s.qmp) and not os.path.exists(s.hmp)  # its sockets are removed


def test_the_talks_transcript_through_qmpclient(served):
    t = run_transcript(served.qmp)
    assert t["greeting"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert t["qom-set"] == "" and t["requested"] == PLUG and t["plugged"] == PLUG
    assert t["qom-get size"] == f"{PLUG}\r\n"
    (vm0,) = t["query-memory-devices"]
    assert vm0 == {"type": "virtio-mem", "data": {
        "memaddr": 0x180000000, "node": 0, "requested-size": PLUG, "size": PLUG, "max-size": 16 << 30,
        "block-size": 2 << 20, "memdev": "/objects/mem0", "id": "vm0"}}
    assert t["info memory-devices"].startswith('Memory device [virtio-mem]: "vm0"\r\n  memaddr: 0x180000000')
    assert t["balloon-reached"] == BALLOON_TARGET and t["info balloon"] == "balloon: actual=3072\r\n"
    names = [e["event"] for e in t["events"]]
    sizes = [e["data"] for e in t["events"] if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
    assert sizes[-1] == {"id": "vm0", "size": PLUG, "qom-path": "/machine/peripheral/vm0"}
    balloon = [e["data"]["actual"] for e in t["events"] if e["event"] == "BALLOON_CHANGE"]
    assert "BALLOON_CHANGE" in names and balloon[-1] == BALLOON_TARGET
    assert all(a >= b for a, b in zip(balloon, balloon[1:], strict=False))  # inflating: actual only falls
    # per event (and memory device) the timestamps only grow; across events they need not: a
    # throttled event keeps the time it was built at and is sent when its period ends
    # (monitor/monitor.c monitor_qapi_event_queue_no_reenter), after newer events of other kinds
    for key in {(e["event"], e["data"].get("qom-path")) for e in t["events"]}:
        stamps = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6 for e in t["events"]
                  if (e["event"], e["data"].get("qom-path")) == key]
        assert stamps == sorted(stamps), key


def test_qmp_shell_in_qmp_mode(served):
    answers = qmp_shell(served.qmp, [
        ("query-status", 0.1), (f"qom-set path=vm0 property=requested-size value={PLUG}", 1.5),
        ("qom-get path=vm0 property=size", 0.1), ("", 0.1), ("query-commands", 0.1)])
    assert parse_shell_answer(answers[0]) == {"return": {"status": "running", "singlestep": False,
                                                          "running": True}}
    assert parse_shell_answer(answers[1]) == {"return": {}}
    assert parse_shell_answer(answers[2]) == {"return": PLUG}
    events = parse_shell_answer(answers[3])  # an empty line prints the events received
    assert any(e["event"] == "MEMORY_DEVICE_SIZE_CHANGE" for e in events)
    assert {"name": "human-monitor-command"} in parse_shell_answer(answers[4])["return"]


def test_qmp_shell_in_hmp_mode_types_the_talks_lines(served):
    answers = qmp_shell(served.qmp, [("qom-set vm0 requested-size 4G", 1.5), ("qom-get vm0 size", 0.1),
                                     ("info memory-devices", 0.1), ("nonsense", 0.1)], hmp=True)
    assert answers[1].strip() == str(PLUG)
    assert "  size: 4294967296" in answers[2] and "  memdev: /objects/mem0" in answers[2]
    assert answers[3].strip() == "unknown command: 'nonsense'"


def _raw(path: str, *messages: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.settimeout(10)
        s.sendall(b"".join(messages))
        data = b""
        while data.count(b"\r\n") < len(messages) + 1:
            data += s.recv(65536)
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def test_the_protocol_refuses_what_qemu_refuses(served):
    greeting, *answers = _raw(served.qmp, b'{"execute": "query-status", "id": 1}',
                              b'{"execute": "qmp_capabilities", "id": "x"}', b'[1, 2]',
                              b'{"arguments": {}, "id": 3}', b'{"execute": "query-status", "arguments": 5}',
                              b'{"execute": "nope", "id": {"a": 1}}')
    assert greeting["QMP"]["capabilities"] == ["oob"]  # as QEMU 7.2 offers
    assert answers == [
        {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with "
                                                      "'qmp_capabilities'"}, "id": 1},
        {"return": {}, "id": "x"},
        {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}},
        {"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 3},
        {"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}},
        {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
         "id": {"a": 1}},
    ]


def test_out_of_band_and_unknown_capabilities_are_qemus(served):
    # monitor/qmp.c and qapi/qmp-dispatch.c, as qemu-system-x86_64 7.2 answered here
    assert _raw(served.qmp, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}')[1] == {
        "error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}}
    assert _raw(served.qmp, b'{"execute": "qmp_capabilities"}', b'{"exec-oob": "query-status", "id": 1}')[2] \
        == {"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 1}
    answers = _raw(served.qmp, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
                   b'{"exec-oob": "query-status", "id": 1}')
    assert answers[2] == {"error": {"class": "GenericError",
                                    "desc": "The command query-status does not support OOB"}, "id": 1}


def test_the_hmp_socket_is_a_monitor_with_a_prompt(served):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(served.hmp)
        s.settimeout(10)

        def until_prompt() -> str:
            data = b""
            while not data.endswith(b"(qemu) "):
                data += s.recv(65536)
            return data.decode()
        assert "monitor" in until_prompt()
        s.sendall(b"info balloon\n")
        assert until_prompt() == "balloon: actual=4096\r\n(qemu) "


def test_simulated_time_follows_wall_time_times_speed(served):
    """Two balloon commands 1.5 s of wall time apart: their first BALLOON_CHANGE events (each the
    first of its throttle period, so sent at once) are ~30 s apart in the simulated clock at x20.
    The bound is half of that: a loaded machine runs the clock late, then catches up."""
    wall_s, speed = 1.5, float(SPEED)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(served.qmp)
        s.settimeout(10)
        s.sendall(b'{"execute": "qmp_capabilities"}\r\n'
                  b'{"execute": "balloon", "arguments": {"value": 3959422976}}\r\n')  # 4 GiB - 128 MiB
        time.sleep(wall_s)
        s.sendall(b'{"execute": "balloon", "arguments": {"value": 3825205248}}\r\n')  # 4 GiB - 256 MiB
        time.sleep(wall_s)
        s.settimeout(0.5)
        data = b""
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                data += chunk
    messages = [json.loads(line) for line in data.split(b"\r\n") if line]
    events = [m for m in messages if m.get("event") == "BALLOON_CHANGE"]

    def at(m: dict) -> float:
        return m["timestamp"]["seconds"] + m["timestamp"]["microseconds"] / 1e6
    first = min(at(m) for m in events)
    second = min(at(m) for m in events if m["data"]["actual"] < 3959422976)
    assert second - first >= wall_s * speed / 2, (first, second)


def test_a_private_socket_directory_is_0700_and_removed(tmp_path):
    s = serve(tmp_path, qmp="unix:", hmp=False)
    try:
        directory = os.path.dirname(s.qmp)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert run_transcript(s.qmp, timeout_s=60)["plugged"] == PLUG
    finally:
        assert stop(s) == 0
    assert not os.path.exists(directory)


def test_quit_ends_the_vm_and_the_server(tmp_path):
    s = serve(tmp_path, hmp=False)
    try:
        greeting, *answers = _raw(s.qmp, b'{"execute": "qmp_capabilities"}', b'{"execute": "quit"}')
        assert answers[0] == {"return": {}}
        assert s.process.wait(timeout=30) == 0
    finally:
        if s.process.poll() is None:
            stop(s)
    assert not os.path.exists(s.qmp)


def test_a_bad_command_line_is_refused_before_anything_listens(tmp_path):
    result = subprocess.run([sys.executable, "-m", "labkit.cli", "serve", "--qmp", f"unix:{tmp_path / 'q'}",
                             "--", "-m", "4G", "-device", "virtio-balloon-pci,deflate-on-oom=maybe"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Parameter 'deflate-on-oom' expects 'on' or 'off'" in result.stderr
    assert not os.path.exists(tmp_path / "q")


def test_labkit_run_reads_hmp_lines_for_a_qemu_command_line():
    result = subprocess.run([sys.executable, "-m", "labkit.cli", "run", "--after-each", "1000", "--",
                             *TALK_LINE.split()],
                            input="qom-set vm0 requested-size 4G\ninfo memory-devices\nballoon 3072\n"
                                  "info balloon\nquit\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "  size: 4294967296\n" in result.stdout and "balloon: actual=3072\n" in result.stdout


def test_shapes_of_answers_do_not_depend_on_sizes(served):
    t = run_transcript(served.qmp)
    assert shapes(t["query-memory-devices"]) == [{"type": "str", "data": {
        "memaddr": "int", "node": "int", "requested-size": "int", "size": "int", "max-size": "int",
        "block-size": "int", "memdev": "str", "id": "str"}}]
