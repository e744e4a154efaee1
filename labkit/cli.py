"""The ``labkit`` command: JupyterLab for the notebooks, and the model headless from a terminal.

    labkit lab [--headless] [--port N]        JupyterLab on 127.0.0.1 at notebooks/00_start.ipynb
    labkit balloon --memory 4G --target 2G    inflate the balloon on the model, print a timeline
    labkit meminfo --memory 4G                the model guest's /proc/meminfo and /proc/buddyinfo
    labkit --version

Subcommands live in one table, :data:`COMMANDS`: ``@command("name", help=..., arguments=...)``
adds a function that takes the parsed arguments and returns an exit code. A name with a space
(``"guest build"``) makes a group (``labkit guest build``). The live backend's commands
(:mod:`labkit.backends.qemu.commands`) and the VM commands ``labkit run`` and ``labkit serve``
(:mod:`labkit.backends.vm_commands`) are listed in their modules as data and join the table when
:func:`main` runs (they import heavier modules than the CLI needs to start).

Sizes are parsed here, at the edge, with QEMU's suffixes (``4G`` is 4 GiB). Bad input never shows a
traceback: a malformed option exits 2 with argparse's usage line; a value the model refuses exits 1
with ``labkit <command>: error: <what was wrong>``. Set ``LABKIT_DEBUG=1`` to see the traceback.

>>> main(["meminfo", "--memory", "256M"])  # doctest: +ELLIPSIS
MemTotal:         ... kB
...
Node 0, zone   Normal ...
0
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import labkit
from labkit.cli_args import positive_ms, project_root, size
from labkit.errors import GuestError, HostOutOfMemory, QMPError
from labkit.units import MiB, parse_size

START_NOTEBOOK = "notebooks/00_start.ipynb"
DEFAULT_LAB_PORT = 8888
LAB_READY_TIMEOUT_S = 120
MAX_SAMPLES = 10_000
# errors that mean "the input or the modelled guest said no", shown as one line, not a traceback
USER_ERRORS = (ValueError, TypeError, QMPError, GuestError, HostOutOfMemory)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name (``"balloon"`` or ``"guest build"``), help, options and body."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str,
            arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register the decorated ``run(args) -> int`` as ``labkit <name>``."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"labkit command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, run, arguments or (lambda parser: None))
        return run
    return register




def build_parser() -> argparse.ArgumentParser:
    """The ``labkit`` parser, with one subparser per registered command (groups for spaced names)."""
    parser = argparse.ArgumentParser(
        prog="labkit", description="labkit: how a hypervisor and its guests share memory.")
    parser.add_argument("--version", action="version", version=f"labkit {labkit.__version__}")
    groups = {(): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    for cmd in COMMANDS.values():
        *path, leaf = cmd.name.split()
        for depth in range(len(path)):
            key = tuple(path[:depth + 1])
            if key not in groups:
                group = groups[key[:-1]].add_parser(key[-1], help=f"{' '.join(key)} commands")
                groups[key] = group.add_subparsers(dest=f"command_{depth + 1}", metavar="COMMAND",
                                                   required=True)
        sub = groups[tuple(path)].add_parser(leaf, help=cmd.help, description=cmd.help)
        cmd.arguments(sub)
        sub.set_defaults(command_name=cmd.name, run=cmd.run)
    return parser


def _more_commands() -> None:
    """The commands other modules declare in their ``CLI_COMMANDS`` tables (live backend, VMs, grading,
    regression, the matrix)."""
    from labkit.backends.qemu.commands import CLI_COMMANDS as live
    from labkit.backends.vm_commands import CLI_COMMANDS as vms
    from labkit.grading.cli import CLI_COMMANDS as grading
    from labkit.regress.cli import CLI_COMMANDS as regress
    from labkit.scenarios.matrix_cli import CLI_COMMANDS as matrix

    for name, help_text, run, arguments in live + vms + grading + regress + matrix:
        if name not in COMMANDS:
            COMMANDS[name] = Command(name, help_text, run, arguments)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``labkit`` with ``argv`` (default: the command line) and return the exit code."""
    _more_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse has already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        if os.environ.get("LABKIT_DEBUG"):
            raise
        print(f"labkit {args.command_name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `labkit balloon ... | head`: the reader left, which is fine
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


# --- labkit balloon ------------------------------------------------------------------------------
TIMELINE_COLUMNS = (  # (sample key, header); sizes are printed in MiB
    ("t_ms", "t ms"), ("balloon_actual", "actual"), ("balloon_size", "balloon"),
    ("memtotal", "MemTotal"), ("memfree", "MemFree"), ("memavailable", "MemAvail"),
    ("cached", "Cached"), ("host_rss", "host RSS"), ("oom_kills", "OOM kills"),
)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", type=size, default="4G",
                        help="guest RAM, as QEMU's -m (default 4G)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the guest's boot layout")
    parser.add_argument("--host-ram", type=size, default=None,
                        help="host RAM (default: twice the guest's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _balloon_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--target", type=size, required=True,
                        help="the QMP 'balloon' value: the target logical VM size, e.g. 2G")
    parser.add_argument("--deflate-on-oom", action="store_true",
                        help="virtio-balloon deflate-on-oom=on (the guest takes pages back on OOM)")
    parser.add_argument("--ms", type=positive_ms, default=3000.0,
                        help="simulated milliseconds to run (default 3000)")
    parser.add_argument("--every", type=positive_ms, default=100.0,
                        help="milliseconds between samples (default 100)")
    parser.add_argument("--alloc", type=size, default=None,
                        help="anonymous memory a guest process allocates during the run, e.g. 3G")
    parser.add_argument("--alloc-at", type=float, default=None,
                        help="when the --alloc happens, in ms (default: half of --ms)")


def _open_model(args: argparse.Namespace, balloon: dict | None = None) -> labkit.Backend:
    host = {} if args.host_ram is None else {"ram": args.host_ram}
    return labkit.open(backend="model", memory=args.memory, seed=args.seed,
                       balloon=balloon or {}, host=host)


@command("balloon", help="inflate the virtio-balloon on the model and print a timeline of samples",
         arguments=_balloon_arguments)
def run_balloon(args: argparse.Namespace) -> int:
    """``labkit balloon``: ask for a target, sample every ``--every`` ms for ``--ms`` ms."""
    from labkit.scenarios.base import record

    target = parse_size(args.target, name="target")
    if args.ms / args.every > MAX_SAMPLES:
        raise ValueError(f"--ms {args.ms:g} / --every {args.every:g} gives more than {MAX_SAMPLES} "
                         "samples; sample less often")
    alloc_at = args.ms / 2 if args.alloc_at is None else args.alloc_at
    if args.alloc is not None and not 0 <= alloc_at <= args.ms:
        raise ValueError(f"--alloc-at must be between 0 and --ms {args.ms:g}, got {alloc_at:g}")
    notes: list[str] = []
    with _open_model(args, {"deflate_on_oom": args.deflate_on_oom}) as vm:
        rows = [vm.sample()]
        vm.qmp("balloon", value=target)
        if args.alloc is None:
            record(vm, args.ms, args.every, rows)
        else:
            record(vm, alloc_at, args.every, rows)
            try:
                vm.guest("alloc", size=args.alloc, kind="anon")
                notes.append(f"t={alloc_at:g} ms: a guest process allocated {args.alloc}")
            except GuestError as e:
                notes.append(f"t={alloc_at:g} ms: allocating {args.alloc} failed: {e}")
            record(vm, args.ms - alloc_at, args.every, rows)
        reached = next((r["t_ms"] for r in rows if r["balloon_actual"] == target), None)
        driver = vm.balloon
        result = {
            "memory": parse_size(args.memory), "target": target,
            "deflate_on_oom": args.deflate_on_oom, "seed": args.seed,
            "reached_target_ms": reached, "samples": rows, "events": vm.events(),
            "out_of_puff": driver.out_of_puff, "oom_deflated_pages": driver.oom_deflated_pages,
            "notes": notes, "dmesg": vm.dmesg(),
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"labkit balloon: {args.memory} guest, balloon target {args.target} "
          f"(deflate-on-oom {'on' if args.deflate_on_oom else 'off'}), seed {args.seed}; sizes in MiB")
    print(_table(rows))
    for note in notes:
        print(note)
    if reached is None:
        print(f"target not reached in {args.ms:g} ms: actual {rows[-1]['balloon_actual'] / MiB:.1f} MiB")
    else:
        print(f"target reached by t={reached:g} ms")
    changes = sum(1 for event in result["events"] if event["event"] == "BALLOON_CHANGE")
    print(f"{changes} BALLOON_CHANGE events (QEMU sends at most one a second); "
          f"out of puff {driver.out_of_puff} times; {driver.oom_deflated_pages} pages deflated on OOM")
    return 0


def _table(rows: list[dict]) -> str:
    widths = [max(9, len(header)) for _, header in TIMELINE_COLUMNS]
    lines = ["  ".join(f"{h:>{w}}" for (_, h), w in zip(TIMELINE_COLUMNS, widths, strict=True))]
    for row in rows:
        cells = []
        for (key, _), width in zip(TIMELINE_COLUMNS, widths, strict=True):
            value = row[key]
            text = f"{value:g}" if key in ("t_ms", "oom_kills") else f"{value / MiB:.1f}"
            cells.append(f"{text:>{width}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


# --- labkit meminfo ------------------------------------------------------------------------------
def _meminfo_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--target", type=size, default=None,
                        help="inflate the balloon to this logical VM size first")
    parser.add_argument("--ms", type=positive_ms, default=3000.0,
                        help="with --target: simulated milliseconds to run first (default 3000)")


@command("meminfo", help="print the model guest's /proc/meminfo and /proc/buddyinfo",
         arguments=_meminfo_arguments)
def run_meminfo(args: argparse.Namespace) -> int:
    """``labkit meminfo``: the guest right after boot (or after a balloon inflation)."""
    with _open_model(args) as vm:
        if args.target is not None:
            vm.qmp("balloon", value=parse_size(args.target, name="target"))
            vm.advance(args.ms)
        info, buddy = vm.meminfo(), vm.buddyinfo()
    if args.json:
        print(json.dumps({"meminfo_kb": info, "buddyinfo": buddy.splitlines()}, indent=1))
        return 0
    for key, value in info.items():  # fs/proc/meminfo.c: a 16-wide label, an 8-wide number
        unit = "" if key.startswith("HugePages_") else " kB"
        print(f"{key + ':':<16}{value:>8}{unit}")
    print()
    print(buddy)
    return 0


# --- labkit lab ----------------------------------------------------------------------------------
def _lab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headless", action="store_true",
                        help="do not open a browser; print the URL (with its token) instead")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port on 127.0.0.1 (default {DEFAULT_LAB_PORT}, or a free one if taken)")



def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def any_free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_ready(port: int, token: str) -> bool:
    """Whether the Jupyter server on 127.0.0.1:``port`` answers ``/api/status`` with ``token``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status",
                                     headers={"Authorization": f"token {token}"})
    try:
        with opener.open(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@command("lab", help="start JupyterLab on 127.0.0.1 at notebooks/00_start.ipynb",
         arguments=_lab_arguments)
def run_lab(args: argparse.Namespace) -> int:
    """``labkit lab``: JupyterLab in the checkout; headless, wait until it answers and print the URL."""
    if args.port is not None and not (0 < args.port < 65536 and _port_free(args.port)):
        raise ValueError(f"--port must be a free port from 1 to 65535 on 127.0.0.1, got {args.port}")
    port = args.port or (DEFAULT_LAB_PORT if _port_free(DEFAULT_LAB_PORT) else any_free_port())
    root = project_root()
    start = START_NOTEBOOK if (root / START_NOTEBOOK).exists() else ""
    if not start:
        print(f"labkit lab: {START_NOTEBOOK} not found under {root}; opening the file browser",
              file=sys.stderr)
    env = dict(os.environ)
    env.setdefault("BOKEH_RESOURCES", "inline")  # BokehJS from the kernel, not a CDN: works offline
    cmd = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and containers run as root; Jupyter refuses
        cmd.append("--ServerApp.allow_root=True")
    if not args.headless:
        cmd += [start] if start else []
        os.chdir(root)
        os.execve(sys.executable, cmd, env)  # JupyterLab itself handles Ctrl-C and the browser
    token = env["JUPYTER_TOKEN"] = secrets.token_hex(24)  # via the environment: not in `ps`
    cmd.append("--no-browser")
    lab = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        deadline = time.monotonic() + LAB_READY_TIMEOUT_S
        while not lab_ready(port, token):
            if lab.poll() is not None:
                print(f"labkit lab: error: JupyterLab exited with code {lab.returncode} before it "
                      "was ready (its log is above)", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"JupyterLab did not answer within {LAB_READY_TIMEOUT_S} s")
            time.sleep(0.25)
        path = f"lab/tree/{start}" if start else "lab"
        print(f"JupyterLab (pid {lab.pid}) is listening on 127.0.0.1:{port} only. Open:\n"
              f"    http://127.0.0.1:{port}/{path}?token={token}\n"
              f"Stop it with Ctrl-C or `kill {os.getpid()}`.", flush=True)
        return lab.wait()
    except (KeyboardInterrupt, TimeoutError) as e:
        if isinstance(e, TimeoutError):
            print(f"labkit lab: error: {e}", file=sys.stderr)
        return 0 if isinstance(e, KeyboardInterrupt) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lab.poll() is None:
            lab.terminate()  # jupyter_server shuts its kernels down on SIGTERM
            try:
                lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lab.kill()
                lab.wait()


if __name__ == "__main__":
    sys.exit(main())
