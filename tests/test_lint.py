"""Static checks and docs: ruff finds nothing in the code, and the README's example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("labkit", "tests", "benchmarks")


def test_ruff_check_is_clean():
    pytest.importorskip("ruff", reason="ruff is a test dependency: pip install -e '.[test]'")
    paths = [name for name in LINTED if (ROOT / name).exists()]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"ruff check {' '.join(paths)} found:\n{done.stdout}{done.stderr}"


def test_readme_python_example_runs(capsys):
    """The README's API example is real code: it runs, and prints what its comments say."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README.md has no ```python example"
    exec(compile(blocks[0], "README.md", "exec"), {})  # noqa: S102 - our own README
    out = capsys.readouterr().out
    assert "{'actual': 2147483648}" in out
    assert re.search(r"^\d+ kB$", out, flags=re.MULTILINE)
    assert re.search(r"^\d+ MiB of guest RAM backed on the host$", out, flags=re.MULTILINE)
