"""Choosing KVM or TCG, and remembering that KVM failed on this host.

``/dev/kvm`` can exist, open, and even create a VM, and a guest still hang or QEMU abort (nested
virtualization without the CPU features QEMU asks for). So ``"auto"`` tries KVM when
:func:`~labkit.backends.qemu.process.kvm_unusable_reason` finds nothing wrong, the backend falls back
to TCG when that boot fails, and the failure is remembered (in this process and in
``<cache>/accel.json``, keyed by the host kernel and QEMU version) so the next VM goes straight to TCG.

>>> choose("tcg")
('tcg', 'asked for TCG')
"""

from __future__ import annotations

import json
import os
import subprocess

from labkit.backends.qemu.image import cache_root
from labkit.backends.qemu.process import QEMU_BINARY, kvm_unusable_reason

_known: dict[str, str] = {}


def host_key() -> str:
    try:
        version = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        version = "qemu ?"
    return f"{os.uname().release} | {version}"


def _verdict_file():
    return cache_root() / "accel.json"


def known_kvm_failure() -> str | None:
    key = host_key()
    if key in _known:
        return _known[key]
    try:
        return json.loads(_verdict_file().read_text()).get(key)
    except (OSError, ValueError):
        return None


def remember_kvm_failure(reason: str) -> None:
    key = host_key()
    _known[key] = reason
    path = _verdict_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = reason
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except (OSError, ValueError):
        pass


def choose(requested: str) -> tuple[str, str]:
    """``(accel, reason)`` for ``requested`` in ``"auto"``, ``"kvm"``, ``"tcg"``."""
    if requested == "tcg":
        return "tcg", "asked for TCG"
    reason = kvm_unusable_reason()
    if requested == "kvm":
        return "kvm", reason or "asked for KVM"
    if reason:
        return "tcg", reason
    failed = known_kvm_failure()
    if failed:
        return "tcg", f"KVM failed on this host before ({failed})"
    return "kvm", "/dev/kvm works"
