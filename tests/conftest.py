"""Shared pytest options and fixtures."""

from __future__ import annotations

import os

import pytest

NOTEBOOK_TIMES = pytest.StashKey[dict]()


@pytest.fixture
def image(tmp_path) -> str:
    """A sparse 1 GiB disk-image file (for virtio-blk and virtio-pmem backing files)."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    return str(path)


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


# CI sets these (in .ci/run) so that it cannot pass by skipping: a live or browser test that skips
# (no QEMU, no kernel, no chromium) is reported as a failure carrying the skip's reason.
REQUIRED_MARKERS = {"live": "LABKIT_REQUIRE_LIVE", "browser": "LABKIT_REQUIRE_BROWSER"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, variable in REQUIRED_MARKERS.items():
        if item.get_closest_marker(marker) and os.environ.get(variable) == "1":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"{variable}=1 but this {marker} test was skipped: {reason}"
            return
