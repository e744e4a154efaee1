"""Free page hinting (placeholder while it is being written; see issue 3)."""

from __future__ import annotations


def attach(backend):
    """Attach free page hinting when the balloon asks for it (free_page_hint=True)."""
    opts = backend.balloon_options
    if opts and opts["free_page_hint"]:
        raise ValueError("balloon option free_page_hint=True is not modelled yet; use False")
    return None
