"""Shared pytest options and fixtures."""

from __future__ import annotations

import pytest

NOTEBOOK_TIMES = pytest.StashKey[dict]()


@pytest.fixture
def image(tmp_path) -> str:
    """A sparse 1 GiB disk-image file (for virtio-blk and virtio-pmem backing files)."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    return str(path)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-baselines", action="store_true", default=False,
        help="regenerate data/baselines/*.json from the current code instead of comparing to them")


@pytest.fixture(scope="session")
def notebook_times(pytestconfig: pytest.Config) -> dict[str, float]:
    """Wall-clock seconds per executed notebook, printed in the terminal summary."""
    return pytestconfig.stash.setdefault(NOTEBOOK_TIMES, {})


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    times = config.stash.get(NOTEBOOK_TIMES, {})
    if times:
        terminalreporter.section("notebook execution times")
        for name, seconds in sorted(times.items()):
            terminalreporter.write_line(f"{seconds:7.1f} s  {name}")
