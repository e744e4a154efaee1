"""Live tests: a real guest under QEMU. The ``live`` marker is all they need (``pytest -m live``).

Where QEMU or the qemu.qmp library is absent they skip, saying why. Where QEMU is there but no
guest image can be built (no kernel to fetch, no static busybox) they skip too, except under CI
(``CI`` set, as ``.ci/run`` does), where that is an error: CI installs everything they need, and a
broken kernel fetch must not turn the live tests into a row of silent skips. The first test pays
for the kernel fetch and the image build (``apt-get download`` + ``dpkg -x``, ~10 s on a fresh
cache); the image is cached per kernel version.

Figures measured here (boot time, balloon rates, model-vs-real numbers) are printed in pytest's
terminal summary under "live figures", so a CI log shows them.
"""

from __future__ import annotations

import functools
import os
import shutil
import time

import pytest

FIGURES = pytest.StashKey[dict]()


@functools.cache
def live_unavailable() -> tuple[str, bool] | None:
    """``(why live tests can't run here, whether that is a failure)``, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)", False
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp library is not installed (pip install qemu.qmp)", False
    from labkit.backends.qemu import KernelNotFound, build_guest_image

    started = time.monotonic()
    try:
        image = build_guest_image()
    except (KernelNotFound, FileNotFoundError, OSError, RuntimeError) as e:
        return f"no guest image: {e}", bool(os.environ.get("CI"))
    _image_facts.update(image=f"{image.version} ({image.origin}), helper {image.helper}",
                        seconds=time.monotonic() - started)
    return None


_image_facts: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _need_live(pytestconfig: pytest.Config):
    """Session-scoped, so it runs before the module-scoped VM fixtures (a fixture of a wider scope
    is set up first): without QEMU they are never started, and every test skips."""
    problem = live_unavailable()
    if problem and problem[1]:
        pytest.fail(f"CI: {problem[0]}", pytrace=False)
    if problem:
        pytest.skip(problem[0])
    figures = pytestconfig.stash.setdefault(FIGURES, {})
    if _image_facts and "guest image" not in figures:
        figures["guest image"] = (f"{_image_facts['image']}; found or built in "
                                  f"{_image_facts['seconds']:.1f} s")


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
