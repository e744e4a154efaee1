"""Real-browser tests: JupyterLab on 127.0.0.1 driven by Debian's Chromium through Playwright.

Skipped, with the reason, where Chromium or the Python playwright package is missing (never run
``playwright install``: it downloads a browser of its own; these tests use ``/usr/bin/chromium``,
or ``$LABKIT_CHROMIUM``).

The JupyterLab server (one per session) serves a temporary copy of the repository's ``notebooks/``
and ``docs/`` (so a notebook's "§" link, ``../docs/mechanisms.md#s1.2``, opens the reference), with
temporary Jupyter config, data and runtime directories, so nothing in the repository or the user's home is
written; it runs with ``BOKEH_RESOURCES=inline`` (no CDN) and is stopped by its PID at the end,
also when a test fails. Timings (server start, kernel start, run-all) go to pytest's terminal
summary under "browser figures".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labkit.cli import any_free_port, lab_ready

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
DOCS_DIR = ROOT / "docs"
SERVED = ("notebooks", "docs")  # what the server's root holds: notebooks link into docs/
SERVER_START_TIMEOUT_S = 120
# headless, no GPU, nothing fetched from the network; the user-data-dir is a fresh temporary one
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
# JupyterLab's news/update toast covers the notebook (binder/overrides.json holds the same setting);
# every cell is rendered (no windowing), so off-screen outputs have a layout to measure and shoot
NO_NEWS = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                            "checkForUpdates": False},
           "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"}}
FIGURES = pytest.StashKey[dict]()


def chromium_path() -> str | None:
    """Debian's Chromium (or ``$LABKIT_CHROMIUM``), or None."""
    wanted = os.environ.get("LABKIT_CHROMIUM")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def browser_unavailable() -> str | None:
    """Why browser tests can't run here, or None."""
    if chromium_path() is None:
        where = os.environ.get("LABKIT_CHROMIUM") or "/usr/bin/chromium"
        return f"Chromium not found at {where} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("the Python playwright package is not installed (pip install playwright; "
                "do not run `playwright install`: Debian's chromium is used)")
    return None


@pytest.fixture(autouse=True, scope="session")
def _need_browser() -> None:
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def browser_figures(pytestconfig: pytest.Config) -> dict:
    """Measured seconds (server start, run-all, ...), printed at the end of the run."""
    return pytestconfig.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, {})
    if figures:
        terminalreporter.section("browser figures (JupyterLab in headless Chromium)")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")


# --- the JupyterLab server -----------------------------------------------------------------------
@dataclass
class Lab:
    """A running JupyterLab: where it listens, its token, its root dir and its log."""

    port: int
    token: str
    root: Path
    log: Path
    pid: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(line[:200] for line in text.splitlines()[-lines:])


def private_home(base: Path) -> dict[str, str]:
    """HOME and the XDG directories inside ``base``: Chromium (~/.config/chromium, dconf, ~/.pki)
    and Jupyter write nothing into the user's home."""
    dirs = {"HOME": base, "XDG_CONFIG_HOME": base / ".config", "XDG_CACHE_HOME": base / ".cache",
            "XDG_DATA_HOME": base / ".local" / "share"}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {name: str(path) for name, path in dirs.items()}


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server by its PID (it shuts its kernels down), SIGKILL its group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:  # the server's own process group (start_new_session): kernels it left behind
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, browser_figures: dict) -> Iterator[Lab]:
    """JupyterLab serving a temporary copy of notebooks/ and docs/, stopped by PID at the end.
    Notebooks are opened as ``notebooks/<name>``."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "repo"
    for folder in SERVED:
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    config_dir = base / "config"
    (config_dir / "labconfig").mkdir(parents=True)
    # <JUPYTER_CONFIG_DIR>/labconfig/default_setting_overrides.json: read by jupyterlab_server
    # whatever the venv's share/jupyter/lab/settings/overrides.json holds
    (config_dir / "labconfig" / "default_setting_overrides.json").write_text(json.dumps(NO_NEWS))
    env = dict(os.environ)
    env.update(private_home(base / "home"))
    env.update({
        "BOKEH_RESOURCES": "inline",  # BokehJS from the kernel: no CDN here
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(config_dir / "lab" / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(config_dir / "lab" / "workspaces"),
        "IPYTHONDIR": str(base / "ipython"),
        "JUPYTER_TOKEN": secrets.token_hex(24),  # via the environment: not in `ps`
    })
    env.pop("JUPYTER_PATH", None)
    port = any_free_port()
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI runs as root; Jupyter refuses otherwise
        cmd.append("--ServerApp.allow_root=True")
    log = base / "jupyter.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(port=port, token=env["JUPYTER_TOKEN"], root=root, log=log, pid=process.pid)
    try:
        deadline = start + SERVER_START_TIMEOUT_S
        while not lab_ready(port, server.token):
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {process.returncode} before it answered; "
                            f"its log ({log}) ends:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on 127.0.0.1:{port} within "
                            f"{SERVER_START_TIMEOUT_S} s; its log ({log}) ends:\n{server.log_tail()}")
            time.sleep(0.2)
        browser_figures["jupyter server start"] = f"{time.monotonic() - start:.1f} s"
        yield server
    finally:
        _stop(process)


# --- Chromium ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Playwright context of headless Debian Chromium with a fresh user-data-dir."""
    from playwright.sync_api import sync_playwright

    base = tmp_path_factory.mktemp("chromium")
    env = {**os.environ, **private_home(base / "home")}
    with sync_playwright() as p:
        # Playwright refuses --user-data-dir in args: the persistent context passes it itself
        context = p.chromium.launch_persistent_context(
            str(base / "profile"), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            env=env, viewport={"width": 1400, "height": 1000}, timeout=60_000)
        try:
            yield context
        finally:
            context.close()
