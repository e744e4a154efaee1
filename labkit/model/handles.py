"""What a guest workload holds: a :class:`Handle` per process's anonymous memory, tmpfs or page cache
file, or kernel cache (its own module, so the kernel and its mixins share it without a circle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labkit.model.host import ascending_run


@dataclass
class Handle:
    """A guest allocation a workload made: a process's anonymous memory, a tmpfs file or a file."""

    id: int
    kind: str  # "anon", "shmem", "file", or the kernel's own "kernel"
    size: int  # bytes asked for
    pages: np.ndarray  # PFNs currently holding it (file handles lose pages to reclaim)
    name: str = ""
    killable: bool = True
    alive: bool = True
    created_ms: float = 0.0
    overhead: np.ndarray | None = None  # the unmovable kernel memory it costs (page tables, xa_nodes)
    _run: tuple | None = field(default=None, repr=False, compare=False)

    def run_start(self) -> int | None:
        """The first PFN if ``pages`` is one ascending run, else None; remembered for this very
        ``pages`` array (a process writes the same memory again and again)."""
        pages = self.pages
        if self._run is None or self._run[0] is not pages:
            self._run = (pages, int(pages[0]) if len(pages) and ascending_run(pages) else None)
        return self._run[1]
