"""``labkit run`` and ``labkit serve``: a VM from a QEMU command line, with QEMU's monitor.

    labkit run [--backend model|qemu] [--speed X] [--after-each MS] -- QEMU ARGS
        opens the VM and reads HMP lines on stdin, as ``qemu-system-x86_64 ... -monitor stdio``
        would: ``info balloon``, ``qom-set vm0 requested-size 4G``, ``info memory-devices``, ...;
        ``quit`` (or the end of input) stops it. On the model, simulated time follows wall time x
        ``--speed`` while you type, and ``--after-each MS`` runs MS more after every line (for
        scripts piped in); on the live backend (``--backend qemu``) the lines go to the real QEMU.

    labkit serve --qmp unix:PATH [--hmp unix:PATH] [--speed X] [QEMU ARGS]
        a model VM behind a QMP socket (and an HMP one) that qemu.qmp's QMPClient, ``qmp-shell``
        and ``qmp-shell -H`` talk to unchanged (:mod:`labkit.backends.qmp_server`). ``unix:`` with no
        path makes a private directory (mode 0700) for the socket; the path is printed. Stops on
        SIGTERM, SIGINT or QMP ``quit``, and removes its sockets.

:data:`CLI_COMMANDS` lists them for :mod:`labkit.cli`.

>>> import io, sys
>>> from labkit.cli import main
>>> sys.stdin = io.StringIO("info balloon\\nballoon 512\\ninfo balloon\\n")
>>> main(["run", "--after-each", "2000", "--", "-m", "1G", "-device", "virtio-balloon-pci,id=b0"])
balloon: actual=1024
balloon: actual=512
0
>>> sys.stdin = sys.__stdin__
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import labkit


def _qemu_args(args: argparse.Namespace) -> list[str]:
    rest = list(args.qemu_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return rest


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a speed > 0 (simulated ms per wall ms), e.g. 10")
    return value


def _ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time in milliseconds >= 0, e.g. 1000")
    return value


# --- labkit run ---------------------------------------------------------------------------------
def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("model", "qemu"), default="model",
                        help="the model (default) or a real QEMU and Linux guest")
    parser.add_argument("--seed", type=int, default=0, help="the model guest's seed")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="model: simulated ms per wall ms while waiting for input (default 1)")
    parser.add_argument("--after-each", type=_ms, default=0.0, metavar="MS",
                        help="model: simulated ms to run after each line (default 0)")
    parser.add_argument("qemu_args", nargs=argparse.REMAINDER,
                        help="QEMU's options, after --: -m 4G,maxmem=20G -object ... -device ...")


def run_vm(args: argparse.Namespace) -> int:
    """``labkit run``: an HMP console on stdin/stdout over a VM made from the command line."""
    options: dict[str, Any] = {"qemu_args": _qemu_args(args)}
    if args.backend == "model":
        options["seed"] = args.seed
    interactive = sys.stdin.isatty()
    with labkit.open(backend=args.backend, **options) as vm:
        if interactive:
            what = "the model, with QEMU 7.2's monitor texts" if args.backend == "model" else "QEMU's monitor"
            print(f"labkit run: {what}; type 'help' for more information, 'quit' to stop")
        last = time.monotonic()
        while True:
            if interactive:
                print("(qemu) ", end="", flush=True)
            line = sys.stdin.readline()
            if args.backend == "model":  # the time spent waiting for this line, at --speed
                now = time.monotonic()
                vm.advance((now - last) * 1000.0 * args.speed)
            if not line or line.strip() in ("quit", "q"):
                break
            if line.strip():
                text = vm.qmp("human-monitor-command", **{"command-line": line.rstrip("\n")})
                print(text.replace("\r\n", "\n"), end="", flush=True)
            if args.backend == "model" and args.after_each:
                vm.advance(args.after_each)
            last = time.monotonic()
    return 0


# --- labkit serve -------------------------------------------------------------------------------
def _socket_path(spec: str, private: list[str], name: str) -> str:
    """``unix:PATH``; ``unix:`` alone is a fresh private directory (mode 0700)."""
    if not spec.startswith("unix:"):
        raise ValueError(f"--{name} takes unix:PATH (a Unix socket), got {spec!r}")
    path = spec[len("unix:"):]
    if not path:
        if not private:
            private.append(tempfile.mkdtemp(prefix="labkit-serve-"))
        return os.path.join(private[0], f"{name}.sock")
    if os.path.exists(path):
        import stat

        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ValueError(f"--{name} {path} exists and is not a socket: labkit will not replace it")
        os.unlink(path)  # a stale socket, as QEMU's server=on replaces it
    return path


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qmp", required=True, metavar="unix:PATH",
                        help="the QMP socket (unix: alone: a private directory, printed)")
    parser.add_argument("--hmp", metavar="unix:PATH", help="an HMP socket too (like -monitor unix:...)")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="simulated ms per wall ms (default 1: real time)")
    parser.add_argument("--seed", type=int, default=0, help="the model guest's seed")
    parser.add_argument("qemu_args", nargs=argparse.REMAINDER,
                        help="QEMU's options: -m 4G,maxmem=20G -object ... -device ...")


def serve_vm(args: argparse.Namespace) -> int:
    """``labkit serve``: the model behind QMP (and HMP) until a signal or ``quit``."""
    from labkit.backends.qmp_server import QmpServer

    private: list[str] = []
    try:
        qmp_path = _socket_path(args.qmp, private, "qmp")
        hmp_path = _socket_path(args.hmp, private, "hmp") if args.hmp else None
        qemu_args = _qemu_args(args)
        vm = labkit.open(seed=args.seed, **({"qemu_args": qemu_args} if qemu_args else {}))
        server = QmpServer(vm, speed=args.speed)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, server.stop)
            task = asyncio.create_task(server.serve(qmp_path, hmp_path))
            while not os.path.exists(qmp_path) and not task.done():
                await asyncio.sleep(0.01)
            print(f"labkit serve: pid {os.getpid()}, QMP on unix:{qmp_path}"
                  + (f", HMP on unix:{hmp_path}" if hmp_path else "")
                  + f"; simulated time runs x{args.speed:g} wall time", flush=True)
            await task

        with vm:
            asyncio.run(main())
    finally:
        for directory in private:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


CLI_COMMANDS = (
    ("run", "a VM from a QEMU command line, with an HMP monitor on stdin (-- QEMU ARGS)", run_vm,
     _run_arguments),
    ("serve", "a model VM behind a QMP socket (qmp-shell, qemu.qmp) and an optional HMP socket",
     serve_vm, _serve_arguments),
)

