"""``labkit guest build`` and ``labkit record``: the live backend's commands.

:data:`CLI_COMMANDS` lists them (name, help, run, arguments); ``labkit.cli`` adds them to its
table when it runs (this module imports nothing from the CLI)::

    labkit guest build [--kernel VMLINUZ] [--rebuild] [--helper auto|memhold|dd]
    labkit record NAME [--out PATH]      NAME: balloon, balloon_deflate_on_oom, reporting, oom_deflate

>>> from labkit.cli import main
>>> main(["record", "nope"])  # doctest: +SKIP
labkit record: error: demo 'nope' is not one of ['balloon', 'balloon_deflate_on_oom', ...]
1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", help="a vmlinuz (default: LABKIT_KERNEL, /boot, then the "
                                         "distribution's kernel package via apt-get download)")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache and build again")
    parser.add_argument("--helper", choices=("auto", "memhold", "dd"), default="auto",
                        help="anon-memory helper: memhold (gcc -static) or busybox dd")


def run_guest_build(args: argparse.Namespace) -> int:
    from labkit.backends.qemu.image import build_guest_image

    with _live_errors("guest build"):
        image = build_guest_image(args.kernel, rebuild=args.rebuild, helper=args.helper)
        print(json.dumps(image.to_json(), indent=1))
        return 0
    return 1


def _record_arguments(parser: argparse.ArgumentParser) -> None:
    from labkit.backends.qemu.demos import DEMOS

    parser.add_argument("name", help=f"the demo to run: {', '.join(sorted(DEMOS))}")
    parser.add_argument("--out", help="where to write the JSON (default: data/recorded/NAME.json)")


def run_record(args: argparse.Namespace) -> int:
    from labkit.backends.qemu.demos import record_demo

    with _live_errors("record"):
        print(record_demo(args.name, args.out))
        return 0
    return 1


@contextlib.contextmanager
def _live_errors(name: str) -> Iterator[None]:
    """Turn what the live backend raises (no kernel, no QEMU, QEMU died) into one line on stderr,
    as the other commands do for bad input (``LABKIT_DEBUG=1`` shows the traceback)."""
    from labkit.backends.qemu.backend import QemuError
    from labkit.backends.qemu.kernel import KernelNotFound

    try:
        yield
    except (KernelNotFound, QemuError, FileNotFoundError, ModuleNotFoundError) as error:
        if os.environ.get("LABKIT_DEBUG"):
            raise
        print(f"labkit {name}: error: {error}", file=sys.stderr)


CLI_COMMANDS = (
    ("guest build", "build (or show the cached) guest kernel + initramfs for the live backend",
     run_guest_build, _build_arguments),
    ("record", "run a demo on a live QEMU guest and save it for replay without QEMU", run_record,
     _record_arguments),
)
