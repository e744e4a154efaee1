"""The ``labkit`` command: in-process through ``main(argv)``, and once through the installed script."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

import labkit
from labkit import cli

LAB_OVERRIDES = "share/jupyter/lab/settings/overrides.json"
NOTIFICATION_PLUGIN = "@jupyterlab/apputils-extension:notification"
MIB_COLUMNS = ("actual", "balloon", "MemTotal", "MemFree", "MemAvail", "Cached", "host RSS")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def balloon_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, "balloon", "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def column(result: dict, key: str) -> list[float]:
    return [row[key] for row in result["samples"]]


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"labkit {labkit.__version__}"


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: labkit" in err and "COMMAND" in err


def test_balloon_timeline_reaches_the_target_like_the_api(capsys):
    result = balloon_json(capsys, "--memory", "1G", "--target", "768M", "--ms", "1000", "--every", "50")
    times = column(result, "t_ms")
    assert times == [50.0 * i for i in range(21)]
    actual = column(result, "balloon_actual")
    assert actual[0] == 1 << 30 and actual[-1] == 768 << 20
    assert all(b <= a for a, b in zip(actual, actual[1:], strict=False)), "inflation only shrinks actual"
    assert result["reached_target_ms"] == times[actual.index(768 << 20)]
    # without deflate-on-oom, every balloon page leaves MemTotal
    memtotal, balloon = column(result, "memtotal"), column(result, "balloon_size")
    assert [memtotal[0] - m for m in memtotal] == balloon
    # the CLI is a thin edge over the public API: same seed, same run, same numbers
    with labkit.open(memory="1G", seed=0) as vm:
        vm.qmp("balloon", value=768 << 20)
        vm.advance(1000)
        assert vm.sample() == result["samples"][-1]
        assert vm.events() == result["events"]


def test_balloon_deflate_on_oom_keeps_memtotal(capsys):
    result = balloon_json(capsys, "--memory", "1G", "--target", "512M", "--deflate-on-oom", "--ms", "800")
    assert result["deflate_on_oom"] is True
    assert column(result, "balloon_actual")[-1] == 512 << 20
    assert len(set(column(result, "memtotal"))) == 1


@pytest.mark.parametrize("deflate_on_oom", [False, True])
def test_balloon_alloc_under_pressure_kills_or_deflates(capsys, deflate_on_oom):
    flags = ["--deflate-on-oom"] if deflate_on_oom else []
    result = balloon_json(capsys, "--memory", "1G", "--target", "256M", "--alloc", "768M",
                          "--alloc-at", "500", "--ms", "1000", "--every", "250", *flags)
    assert any("allocated 768M" in note for note in result["notes"])
    kills = column(result, "oom_kills")[-1]
    if deflate_on_oom:  # the OOM notifier gives balloon pages back instead of killing
        assert kills == 0 and result["oom_deflated_pages"] > 0
        assert column(result, "balloon_actual")[-1] > 256 << 20
    else:
        assert kills >= 1 and result["oom_deflated_pages"] == 0
        assert column(result, "balloon_actual")[-1] == 256 << 20


def test_balloon_table(capsys):
    code, out, err = run(capsys, "balloon", "--memory", "512M", "--target", "384M", "--ms", "500")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["t", "ms"])
    rows = [line.split() for line in lines[header + 1:] if re.match(r"\s+\d", line)]
    assert [float(r[0]) for r in rows] == [100.0 * i for i in range(6)]
    actual_mib = [float(r[1]) for r in rows]
    assert actual_mib[0] == 512.0 and actual_mib[-1] == 384.0
    assert "target reached by t=" in out
    for name in MIB_COLUMNS:
        assert name in lines[header]


def test_meminfo_matches_the_model(capsys):
    code, out, err = run(capsys, "meminfo", "--memory", "512M", "--seed", "3")
    assert code == 0, err
    fields = dict(re.findall(r"^([\w()]+):\s+(\d+) kB$", out, flags=re.MULTILINE))
    with labkit.open(memory="512M", seed=3) as vm:
        assert {k: int(v) for k, v in fields.items()} == vm.meminfo()
        assert vm.buddyinfo() in out


def test_meminfo_after_a_balloon_target(capsys):
    code, out, _ = run(capsys, "meminfo", "--memory", "512M", "--target", "256M", "--json")
    assert code == 0
    shrunk = json.loads(out)["meminfo_kb"]["MemTotal"]
    code, out, _ = run(capsys, "meminfo", "--memory", "512M", "--json")
    full = json.loads(out)["meminfo_kb"]["MemTotal"]
    assert full - shrunk == 256 * 1024  # kB: the balloon took 256 MiB out of MemTotal


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["meminfo", "--memory", "3X"], 2, "'3X' is not a size"),
    (["balloon", "--target", "2Q"], 2, "'2Q' is not a size"),
    (["balloon", "--target", "1G", "--ms", "-5"], 2, "'-5' is not a time"),
    (["balloon", "--memory", "512M"], 2, "--target"),
    (["meminfo", "--memory", "1M"], 1, "at least 64 MiB, got '1M'"),
    (["balloon", "--memory", "512M", "--target", "0"], 1, "'target' expects a size"),
    (["balloon", "--memory", "512M", "--target", "256M", "--ms", "1e6", "--every", "1"], 1, "samples"),
    (["balloon", "--memory", "512M", "--target", "256M", "--alloc", "64M", "--alloc-at", "9000"], 1,
     "--alloc-at"),
    (["lab", "--port", "70000"], 1, "--port"),
    (["nope"], 2, "invalid choice"),
])
def test_bad_input_gets_a_clear_message_and_no_traceback(capsys, argv, code, says):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert says in err
    assert "Traceback" not in err + out
    if code == 1:
        assert err.startswith(f"labkit {argv[0]}: error: ")


def test_labkit_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("LABKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="at least 64 MiB"):
        cli.main(["meminfo", "--memory", "1M"])


def test_registry_takes_new_commands_and_groups(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = []

    @cli.command("demo sub", help="a grouped example command",
                 arguments=lambda p: p.add_argument("--kernel", default="auto"))
    def build(args):
        seen.append(args.kernel)
        return 7

    assert cli.main(["demo", "sub", "--kernel", "6.12"]) == 7
    assert seen == ["6.12"]
    assert cli.main(["demo"]) == 2  # a group alone needs a subcommand
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("demo sub", help="again")(build)
    out = capsys.readouterr().out + cli.build_parser().format_help()
    assert "demo" in out and "balloon" in out and "guest" in out  # guest: the live backend's group


# --- the installed entry point ------------------------------------------------------------------
def labkit_script() -> str:
    beside = Path(sys.executable).with_name("labkit")
    found = str(beside) if beside.exists() else shutil.which("labkit")
    if found is None:
        pytest.skip("the labkit console script is not installed (pip install -e .)")
    return found


def test_console_script():
    script = labkit_script()
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"labkit {labkit.__version__}"
    bad = subprocess.run([script, "balloon", "--memory", "3X", "--target", "1G"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "'3X' is not a size" in bad.stderr and "Traceback" not in bad.stderr
    table = subprocess.run([script, "balloon", "--memory", "256M", "--target", "128M", "--ms", "300"],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "target reached by t=" in table.stdout


def _readline(stream, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def test_lab_headless_serves_on_loopback_with_a_token_and_stops(tmp_path):
    script = labkit_script()
    port = cli.any_free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    lab = subprocess.Popen([script, "lab", "--headless", "--port", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    jupyter_pid = None
    try:
        deadline = time.monotonic() + cli.LAB_READY_TIMEOUT_S
        url = ""
        while not url and time.monotonic() < deadline and lab.poll() is None:
            line = _readline(lab.stdout, deadline - time.monotonic())
            if jupyter_pid is None and (m := re.search(r"\(pid (\d+)\)", line)):
                jupyter_pid = int(m.group(1))
            url = line.strip() if line.strip().startswith("http://") else ""
        assert url, "labkit lab --headless printed no URL"
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/lab(/tree/notebooks/00_start\.ipynb)?"
                            r"\?token=[0-9a-f]{48}", url), url
        token = url.rsplit("=", 1)[1]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=30) as page:
            assert page.status == 200 and "JupyterLab" in page.read().decode()
        with pytest.raises(urllib.error.HTTPError) as denied:
            opener.open(f"http://127.0.0.1:{port}/api/contents", timeout=30)
        assert denied.value.code == 403
        with opener.open(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=30) as status:
            assert status.status == 200
        if (Path(sys.prefix) / LAB_OVERRIDES).exists():  # written by `make` and binder/postBuild
            settings = f"http://127.0.0.1:{port}/lab/api/settings/{NOTIFICATION_PLUGIN}?token={token}"
            with opener.open(settings, timeout=30) as reply:
                schema = json.load(reply)["schema"]["properties"]
            assert schema["fetchNews"]["default"] == "false"
            assert schema["checkForUpdates"]["default"] is False
        listening = {c.laddr.ip for c in psutil.Process(jupyter_pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
    finally:
        lab.send_signal(signal.SIGTERM)
        code = lab.wait(timeout=60)
    assert code == 0
    assert jupyter_pid is not None and not psutil.pid_exists(jupyter_pid)

