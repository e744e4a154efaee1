"""nbval for the regression notebooks, as part of the plain ``pytest`` run (``make test``).

The notebooks here are committed with their outputs; nbval re-executes each one in this
environment's ``python3`` kernel and compares every output but those marked ``# NBVAL_IGNORE_OUTPUT``,
after applying ``sanitize.cfg`` (wall-clock times, temporary paths). Without ``--nbval`` on the
command line this hook collects them itself (so ``pytest`` alone runs them, and
``pytest --nbval notebooks/regression --nbval-sanitize-with notebooks/regression/sanitize.cfg`` does
the same thing nbval's own way). Refresh the stored outputs after an intended change with
``jupyter nbconvert --to notebook --execute --inplace notebooks/regression/*.ipynb``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SANITIZE = HERE / "sanitize.cfg"

try:
    from nbval.plugin import IPyNbFile
except ImportError:  # nbval is a test dependency; without it these notebooks are not collected
    IPyNbFile = None


if IPyNbFile is not None:
    class RegressionNotebook(IPyNbFile):
        """nbval's notebook item, with this folder's sanitize file."""

        def get_sanitize_files(self):
            return [str(SANITIZE)]


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    option = parent.config.option
    if IPyNbFile is None or getattr(option, "nbval", False) or getattr(option, "nbval_lax", False) \
            or getattr(option, "nbmake", False):
        return None  # nbval's (or nbmake's) own hook collects them, or nbval is not installed
    if file_path.suffix == ".ipynb" and file_path.parent == HERE:
        item = RegressionNotebook.from_parent(parent, path=file_path)
        item.add_marker(pytest.mark.notebook)
        return item
    return None
