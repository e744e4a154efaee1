"""Free page reporting (placeholder while it is being written; see issue 3)."""

from __future__ import annotations


def attach(backend):
    """Attach free page reporting when the balloon asks for it (free_page_reporting=True)."""
    opts = backend.balloon_options
    if opts and opts["free_page_reporting"]:
        raise ValueError("balloon option free_page_reporting=True is not modelled yet; use False")
    return None
