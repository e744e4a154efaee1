"""What the ``labkit`` command and the modules that add subcommands share, without importing
:mod:`labkit.cli` (so a command module never imports the CLI that imports it): argparse value types
and where the checkout is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from labkit.units import parse_size


def size(text: str) -> str:
    """argparse type: a size such as ``4G`` or ``512M`` (checked here, parsed where it is used)."""
    try:
        parse_size(text, name="value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

def positive_ms(text: str) -> float:
    """argparse type: milliseconds of simulated time, > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time in milliseconds > 0, e.g. 3000")
    return value

def project_root() -> Path:
    """The checkout that holds notebooks/: the one above the package if it does, else the cwd."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "notebooks").is_dir():
            return candidate
    return Path.cwd()
