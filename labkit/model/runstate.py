"""The machine-wide state QEMU's devices consult, which exists before any device: the VM's run
state and what the migration subsystem offers them.

In QEMU these are globals: ``runstate_is_running()`` (system/runstate.c), ``migration_is_running()``
on the migration object made at startup (migration/migration.c), the precopy notifier list a
device joins with ``precopy_add_notifier()`` and ``qemu_guest_free_page_hint()`` (migration/ram.c).
The model keeps them in one :class:`RunState` per VM, made first, so devices built before the
migration engine (QEMU's order) take it as an explicit argument:

* virtio-mem answers BUSY while a migration runs (``virtio_mem_is_busy``);
* free page hinting joins the precopy notifiers and hands its hints to the migration, and its guest
  side stands still while the vCPUs are stopped;
* the migration engine (:mod:`labkit.model.migration`) sets the run state and the migration status
  and fires the notifiers.

>>> import simpy
>>> rs = RunState(simpy.Environment())
>>> rs.running, rs.migration_running
(True, False)
>>> rs.set_state("finish-migrate"); rs.running
False
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np
import simpy

RUNNING_STATES = ("setup", "active", "cancelling")  # migration_is_running()


class PrecopyNotify(enum.Enum):
    """PRECOPY_NOTIFY_* (include/migration/misc.h): why the precopy notifier chain is called."""

    SETUP = "setup"
    BEFORE_BITMAP_SYNC = "before-bitmap-sync"
    AFTER_BITMAP_SYNC = "after-bitmap-sync"
    COMPLETE = "complete"
    CLEANUP = "cleanup"


PrecopyNotifier = Callable[[PrecopyNotify, bool, bool], None]  # (reason, vm_running, postcopy_ram)


class RunState:
    """One VM's run state (``running``, ``finish-migrate``, ``postmigrate``), its migration status
    (``none``, ``setup``, ``active``, ...), the precopy notifier list and the free page hint sink."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.state = "running"
        self.migration_status = "none"
        self.precopy_notifiers: list[PrecopyNotifier] = []
        # qemu_guest_free_page_hint: set by the migration engine; (block starts, pages a block)
        self.free_page_hint: Callable[[np.ndarray, int], None] | None = None
        self._resumed = env.event()

    @property
    def running(self) -> bool:
        """The vCPUs run: False only while the VM is stopped for a migration's switchover (after
        completion the model goes on as the guest on the destination)."""
        return self.state != "finish-migrate"

    @property
    def migration_running(self) -> bool:
        """QEMU's migration_is_running(): setup, active or cancelling."""
        return self.migration_status in RUNNING_STATES

    def set_state(self, state: str) -> None:
        self.state = state
        if self.running:
            resumed, self._resumed = self._resumed, self.env.event()
            resumed.succeed()

    def wait_running(self):
        """A simpy generator: return at once, or when the vCPUs run again."""
        while not self.running:
            yield self._resumed

    def notify_precopy(self, reason: PrecopyNotify, postcopy_ram: bool) -> None:
        """precopy_notify: every notifier, in the order they joined."""
        running = self.state == "running"
        for notifier in self.precopy_notifiers:
            notifier(reason, running, postcopy_ram)
