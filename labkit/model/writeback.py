"""Guest page cache writeback: the flusher thread and its sysctls (fs/fs-writeback.c,
mm/page-writeback.c).

Linux does not write dirty page cache at once. Dirtying an inode records ``inode->dirtied_when``
and, if the bdi had nothing dirty, arms the flusher (``wb_wakeup_delayed``) to run after
``dirty_writeback_centisecs`` (500 = 5 s). Each run (``wb_workfn`` -> ``wb_check_old_data_flush``,
"kupdate") writes back every inode dirtied more than ``dirty_expire_centisecs`` (3000 = 30 s) ago,
and re-arms itself while dirty data remains: so dirty data reaches the disk 30 to 35 s after it was
first written. Above ``dirty_background_ratio`` (10 %) of dirtyable memory (free pages plus file
pages, ``global_dirtyable_memory``), background writeback starts at once and writes the oldest
inodes until the guest is below it. ``sync`` writes everything and flushes every disk.
``vm.dirty_writeback_centisecs = 0`` disables periodic writeback, as in Linux.

In the model an inode is a file handle (``kind="file"``) and writing it back takes no simulated
time. Where the pages go is the handle's *target*: a virtio-blk disk registers one
(:mod:`labkit.devices.virtio_blk`) so the written pages land in the host page cache or on the
disk; other handles just become clean. Dirtying is noticed where it happens: ``alloc(kind="file",
dirty=True)`` through the allocator's hooks, ``touch`` and the ops of virtio-blk directly.
Simplifications: one flusher for the whole guest; ``vm.dirty_ratio`` throttling of writers is not
modelled; dirty pages taken by direct reclaim (labkit/model/kernel.py) are counted as written but
do not reach a virtio-blk target.

>>> import labkit
>>> vm = labkit.open(memory="1G", seed=0)
>>> h = vm.guest("alloc", size="8M", kind="file", dirty=True)
>>> vm.advance(29_000); vm.meminfo()["Dirty"]
8192
>>> vm.advance(7_000); vm.meminfo()["Dirty"]
0
>>> vm.guest("sysctl", name="vm.dirty_expire_centisecs")
3000
>>> vm.close()
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simpy

from labkit.model.kernel import Handle, Kernel
from labkit.model.pagecache import (
    DIRTY_BACKGROUND_RATIO,
    DIRTY_EXPIRE_CENTISECS,
    DIRTY_WRITEBACK_CENTISECS,
)
from labkit.model.pages import PageState

_FILE_DIRTY = int(PageState.FILE_DIRTY)  # a plain int: compared on every allocation

SYSCTL_DEFAULTS = {
    "vm.dirty_writeback_centisecs": DIRTY_WRITEBACK_CENTISECS,
    "vm.dirty_expire_centisecs": DIRTY_EXPIRE_CENTISECS,
    "vm.dirty_background_ratio": DIRTY_BACKGROUND_RATIO,
}
SYSCTL_RANGES = {"vm.dirty_writeback_centisecs": (0, 2**31 - 1), "vm.dirty_expire_centisecs": (0, 2**31 - 1),
                 "vm.dirty_background_ratio": (0, 100)}

# a target receives (handle, indices into handle.pages that were written back)
Target = Callable[[Handle, np.ndarray], None]


class GuestWriteback:
    """The guest's flusher: ``dirtied_when`` per file handle, the kupdate timer, background and
    ``sync`` writeback (see the module docstring)."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, ops=None):
        self.env = env
        self.kernel = kernel
        self.sysctl = dict(SYSCTL_DEFAULTS)
        self.dirtied_when: dict[int, float] = {}  # handle id -> inode->dirtied_when (ms)
        self.targets: dict[int, Target] = {}
        self.sync_hooks: list[Callable[[], None]] = []  # sync(2) also flushes each disk
        self.armed = False
        self.runs = 0
        self.written_pages = 0
        self.history: list[tuple[float, str, int]] = []  # (t_ms, "kupdate"/"background"/"sync", pages)
        if ops is not None:
            alloc = ops.alloc

            def alloc_and_notice(size: int, kind: str = "anon", **options) -> int:
                handle = alloc(size, kind, **options)  # a file written as it is created
                h = kernel.handles.get(handle)
                if h is not None and h.kind == "file" and options.get("dirty"):
                    self.dirtied_when.setdefault(h.id, self.env.now)
                    self.arm()
                return handle

            ops.alloc = alloc_and_notice
            touch = ops.touch  # GuestOps.touch(write=True) dirties a file without allocating

            def touch_and_notice(handle: int, *, write: bool = True) -> None:
                touch(handle, write=write)
                h = kernel.handles.get(handle)
                if write and h is not None and h.kind == "file":
                    self.mark_dirty(h)

            ops.touch = touch_and_notice

    # --- noticing dirty data ------------------------------------------------------------------
    def mark_dirty(self, h: Handle) -> None:
        """__mark_inode_dirty: the first dirtying sets dirtied_when and arms the flusher."""
        self.dirtied_when.setdefault(h.id, self.env.now)
        self.arm()
        self.background()

    def arm(self) -> None:
        """wb_wakeup_delayed: run the flusher after dirty_writeback_centisecs, unless it is armed."""
        if not self.armed and self.sysctl["vm.dirty_writeback_centisecs"] > 0:
            self.armed = True
            self.env.process(self._flusher())

    def _flusher(self):
        while True:
            yield self.env.timeout(self.sysctl["vm.dirty_writeback_centisecs"] * 10.0)
            self.runs += 1
            self.kupdate()
            self.background()
            if self.dirty_pages() == 0 or self.sysctl["vm.dirty_writeback_centisecs"] == 0:
                self.armed = False
                return

    # --- what is dirty ------------------------------------------------------------------------
    def dirty_pages(self) -> int:
        return self.kernel.mem.count(PageState.FILE_DIRTY)

    def _dirty_handles(self) -> list[Handle]:
        """File handles holding dirty pages, stamped with dirtied_when if not yet (oldest first)."""
        out = []
        state = self.kernel.mem.state
        for h in self.kernel.handles.values():
            if h.kind != "file" or not h.alive or len(h.pages) == 0:
                continue
            if (state[h.pages] == PageState.FILE_DIRTY).any():
                self.dirtied_when.setdefault(h.id, self.env.now)
                out.append(h)
            else:
                self.dirtied_when.pop(h.id, None)
        return sorted(out, key=lambda h: self.dirtied_when[h.id])

    def write_back(self, h: Handle, reason: str = "kupdate") -> int:
        """Write back every dirty page of ``h`` (writeback_single_inode); returns pages written."""
        idx = np.flatnonzero(self.kernel.mem.state[h.pages] == PageState.FILE_DIRTY)
        if len(idx):
            self.kernel.mem.set_state(h.pages[idx], PageState.FILE_CLEAN)
            self.kernel.vmstat.pgwriteback += len(idx)
            self.written_pages += len(idx)
            target = self.targets.get(h.id)
            if target is not None:
                target(h, idx)
            self.history.append((float(self.env.now), reason, len(idx)))
        self.dirtied_when.pop(h.id, None)
        return len(idx)

    def kupdate(self) -> int:
        """wb_check_old_data_flush: inodes dirtied at least dirty_expire_centisecs ago."""
        older_than = self.env.now - self.sysctl["vm.dirty_expire_centisecs"] * 10.0
        return sum(self.write_back(h) for h in self._dirty_handles()
                   if self.dirtied_when[h.id] <= older_than)

    def background_threshold(self) -> int:
        """dirty_background_ratio % of global_dirtyable_memory (free + file pages - reserve)."""
        t = self.kernel.mem.totals()
        reserve = sum(w.high for w in self.kernel.watermarks)
        dirtyable = max(0, int(t[PageState.FREE]) - reserve) + int(
            t[PageState.FILE_CLEAN] + t[PageState.FILE_DIRTY])
        return dirtyable * self.sysctl["vm.dirty_background_ratio"] // 100

    def background(self) -> int:
        """wb_start_background_writeback: oldest inodes first until below the threshold."""
        written = 0
        if self.dirty_pages() <= self.background_threshold():
            return 0
        for h in self._dirty_handles():
            written += self.write_back(h, "background")
            if self.dirty_pages() <= self.background_threshold():
                break
        return written

    def sync(self) -> int:
        """sync(2): write back every dirty file, then flush every disk; returns pages written."""
        written = sum(self.write_back(h, "sync") for h in self._dirty_handles())
        leftover = self.kernel.mem.pages_in(PageState.FILE_DIRTY)  # dirty pages of no handle
        if len(leftover):
            self.kernel.mem.set_state(leftover, PageState.FILE_CLEAN)
            self.kernel.vmstat.pgwriteback += len(leftover)
            written += len(leftover)
        for hook in self.sync_hooks:
            hook()
        return written

    # --- /proc/sys/vm ---------------------------------------------------------------------------
    def set_sysctl(self, name: str, value: int | None = None) -> int:
        """Read (``value=None``) or write one of the writeback sysctls; returns its value."""
        if name not in self.sysctl:
            raise ValueError(f"sysctl {name!r} is not one the model knows; accepted: {sorted(self.sysctl)}")
        if value is None:
            return self.sysctl[name]
        lo, hi = SYSCTL_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"sysctl {name} = {value!r}: Invalid argument (accepted: {lo}..{hi})")
        self.sysctl[name] = value
        if name == "vm.dirty_writeback_centisecs" and value > 0 and self.dirty_pages():
            self.arm()  # dirty_writeback_centisecs_handler wakes the flusher
        if name == "vm.dirty_background_ratio":
            self.background()
        return value
