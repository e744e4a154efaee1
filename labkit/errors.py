"""Errors that speak the language of the real thing.

``QMPError`` carries QEMU's error class and description, exactly as a QMP client sees them
(``{"error": {"class": "GenericError", "desc": "..."}}``), on the model and on the live backend.
"""

from __future__ import annotations

from typing import Any


class QMPError(Exception):
    """A QMP command failed: ``error_class`` is QEMU's class, ``desc`` its text.

    >>> e = QMPError("CommandNotFound", "The command nope has not been found")
    >>> e.error_class, str(e)
    ('CommandNotFound', 'The command nope has not been found')
    """

    def __init__(self, error_class: str, desc: str):
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def as_qmp(self) -> dict:
        return {"error": {"class": self.error_class, "desc": self.desc}}


class GuestError(RuntimeError):
    """A guest operation failed the way it would in the guest (e.g. the guest kernel panicked)."""


class HostOutOfMemory(RuntimeError):
    """The host ran out of RAM and swap: the real host's OOM killer would kill a VM here."""


def shown(value: Any, limit: int = 48) -> str:
    """``repr(value)`` for an error message, cut in the middle when it is long (a 10**400 or a
    size string of 400 digits names itself without filling the screen).

    >>> shown(10**400)
    '100000000000000000000000...00000000 (401 digits)'
    >>> shown("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxx' (100 characters)"
    >>> shown("4G")
    "'4G'"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{repr(value[:24])[:-1]}...{repr(value[-8:])[1:]} ({len(value)} characters)"
    if isinstance(value, int):
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:24]}...{digits[-8:]} ({len(digits)} digits)"
    return f"{text[:24]}...{text[-8:]} ({len(text)} characters)"
class NotOnThisHost(ValueError):
    """The live backend can't run this switch on this machine (no IOMMU group for vfio-pci, no
    /dev/sev, no free huge pages, an arm64-only page size...); the text says why and what would."""


class NotModelled(ValueError):
    """A combination labkit's model does not model (QEMU would run it): the text says what and why."""
