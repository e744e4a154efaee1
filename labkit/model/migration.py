"""QEMU pre-copy live migration (placeholder while it is being written; see issue 3)."""

from __future__ import annotations


def attach(backend):
    """Register the migration QMP commands on a model backend."""
    return None
