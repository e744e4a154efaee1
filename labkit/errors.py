"""Errors that speak the language of the real thing.

``QMPError`` carries QEMU's error class and description, exactly as a QMP client sees them
(``{"error": {"class": "GenericError", "desc": "..."}}``), on the model and on the live backend.
"""

from __future__ import annotations


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


class NotOnThisHost(ValueError):
    """The live backend can't run this switch on this machine (no IOMMU group for vfio-pci, no
    /dev/sev, no free huge pages, an arm64-only page size...); the text says why and what would."""


class NotModelled(ValueError):
    """A combination labkit's model does not model (QEMU would run it): the text says what and why."""
