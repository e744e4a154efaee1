"""Live tests: a real guest under QEMU. Skipped, with the reason, where QEMU or a kernel can't be had.

Figures measured here (boot time, balloon rates, model-vs-real numbers) are printed in pytest's
terminal summary under "live figures", so a CI log shows them.
"""

from __future__ import annotations

import functools
import shutil

import pytest

FIGURES = pytest.StashKey[dict]()


@functools.cache
def live_unavailable() -> str | None:
    """Why live tests can't run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp library is not installed (pip install qemu.qmp)"
    from labkit.backends.qemu import KernelNotFound, build_guest_image

    try:
        build_guest_image()
    except (KernelNotFound, FileNotFoundError, OSError, RuntimeError) as e:
        return f"no guest image: {e}"
    return None


@pytest.fixture(autouse=True)
def _need_live():
    reason = live_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def figures(pytestconfig: pytest.Config) -> dict:
    """A dict the tests fill with measured numbers; printed at the end of the run."""
    return pytestconfig.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, {})
    if figures:
        terminalreporter.section("live figures (real guest under QEMU, and the model beside it)")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")
