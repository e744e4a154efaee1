"""Free page hinting, the guest's side: Linux's virtio_balloon driver (drivers/virtio/virtio_balloon.c).

``report_free_page_func`` on ``balloon-wq``, the order-10 allocations, ``free_page_list``, the
"virtio-balloon" shrinker. The protocol, the facts behind it and the model's simplifications are in
:mod:`labkit.devices.free_page_hinting` (the QEMU device lives there).
"""

from __future__ import annotations

import numpy as np
import simpy

from labkit.devices.free_page_hinting import (
    REPORTED,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_HINT_BLOCK_BYTES,
    VIRTIO_BALLOON_HINT_BLOCK_PAGES,
    FreePageHintDevice,
    HintTiming,
    block_rows,
    expand_blocks,
)
from labkit.model.block_scan import block_runs
from labkit.model.buddy import free_blocks
from labkit.model.kernel import Kernel
from labkit.model.pages import MAX_PAGE_ORDER, PageFlag, PageState
from labkit.model.runstate import RunState


class FreePageHintDriver:
    """The Linux driver's side: report_free_page_work, free_page_list and the shrinker."""

    def __init__(self, env: simpy.Environment, kernel: Kernel, device: FreePageHintDevice,
                 timing: HintTiming, run_state: RunState):
        self.env = env
        self.kernel = kernel
        self.run_state = run_state
        self.device = device
        self.timing = timing
        device.driver = self
        self.cmd_id_active = VIRTIO_BALLOON_CMD_ID_STOP
        self.cmd_id_received = VIRTIO_BALLOON_CMD_ID_STOP
        self._read_cmd_id = False  # VIRTIO_BALLOON_CONFIG_READ_CMD_ID in config_read_bitmap
        self._work_queued = False  # report_free_page_work is queued on balloon-wq
        self._free_page_list = np.zeros(0, dtype=np.int64)  # block starts, last pushed at the end
        self._reporting = False  # inside virtio_balloon_report_free_page
        self._candidates: list[np.ndarray] = []  # per zone: free order-10 blocks still to try
        self.ring_full_retries = 0  # blocks allocated and freed again because the ring was full
        self.shrunk_blocks = 0
        self.returned_blocks = 0
        self._wake: simpy.Event = self.env.event()
        self.kernel.shrinkers.append(self.shrinker_scan)
        self._worker = self.env.process(self._pump())

    # --- bookkeeping --------------------------------------------------------------------------
    @property
    def num_free_page_blocks(self) -> int:
        return len(self._free_page_list)

    @property
    def hinted_bytes(self) -> int:
        return self.num_free_page_blocks * VIRTIO_BALLOON_HINT_BLOCK_BYTES

    def shrinker_count(self) -> int:
        """virtio_balloon_shrinker_count: pages the shrinker could give back."""
        return self.num_free_page_blocks * VIRTIO_BALLOON_HINT_BLOCK_PAGES

    def shrinker_scan(self, nr_to_scan: int) -> int:
        """virtio_balloon_shrinker_scan -> shrink_free_pages: whole blocks, rounded up."""
        blocks = -(-max(0, int(nr_to_scan)) // VIRTIO_BALLOON_HINT_BLOCK_PAGES)
        returned = self.return_free_pages_to_mm(blocks)
        self.shrunk_blocks += returned
        return returned * VIRTIO_BALLOON_HINT_BLOCK_PAGES

    def return_free_pages_to_mm(self, num_to_return: int) -> int:
        """Pop blocks off free_page_list (last hinted first) and free them to the buddy allocator."""
        n = min(num_to_return, self.num_free_page_blocks)
        if n <= 0:
            return 0
        starts = self._free_page_list[len(self._free_page_list) - n:][::-1]
        self._free_page_list = self._free_page_list[:len(self._free_page_list) - n]
        self.kernel.free_pages(expand_blocks(starts))
        self.returned_blocks += n
        return n

    # --- config interrupt ---------------------------------------------------------------------
    def config_changed(self) -> None:
        """virtballoon_changed -> virtio_balloon_queue_free_page_work."""
        if self._read_cmd_id:
            return  # the bit was already set: the work is already queued
        self._read_cmd_id = True
        self._work_queued = True
        self._kick()

    def _kick(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _received(self) -> int:
        """virtio_balloon_cmd_id_received: re-read config only after a config interrupt."""
        if self._read_cmd_id:
            self._read_cmd_id = False
            self.cmd_id_received = self.device.config_cmd_id()
        return self.cmd_id_received

    # --- the work item and the iothread, one step at a time -----------------------------------
    def _guest_running(self) -> bool:
        return self.run_state.running

    def _pump(self):
        while True:
            if not (self._work_queued or self._reporting or self.device.ring):
                self._wake = self.env.event()
                yield self._wake
            step = self.timing.step_ms
            yield self.env.timeout(step)
            if not self._guest_running():  # vCPUs stopped and QEMU's iothread blocked
                continue
            self.device.consume(max(1, int(step * 1000 / self.timing.host_block_us)))
            self._guest_step(step)

    def _guest_step(self, step_ms: float) -> None:
        """report_free_page_func, or one step of its send_free_pages loop."""
        if not self._reporting:
            if not self._work_queued:
                return
            self._work_queued = False  # report_free_page_func runs
            received = self._received()
            if received == VIRTIO_BALLOON_CMD_ID_DONE:
                self.return_free_pages_to_mm(self.num_free_page_blocks)
                return
            if received in (VIRTIO_BALLOON_CMD_ID_STOP, self.cmd_id_active):
                return
            self.cmd_id_active = received  # send_cmd_id_start
            if self._add("id", received):
                self._reporting = True
                self._candidates = []
            else:
                self.kernel.log("virtio_balloon virtio0: Failed to send a start id, err = -28")
            return
        if self._read_cmd_id and self._received() != self.cmd_id_active:
            self._end_round()  # STOP, DONE or a newer round: stop sending
            return
        budget = max(1, int(step_ms * 1000 / self.timing.guest_block_us))
        room = max(0, self.device.ring_size - len(self.device.ring) - 1)  # one slot for the ID
        starts = self._alloc_blocks(min(budget, room))
        for start in starts.tolist():
            self._add("block", start)
        if len(starts):
            self._free_page_list = np.concatenate([self._free_page_list, starts])
        if len(starts) < min(budget, room):
            self._end_round()  # the allocation failed: every free 4 MiB block is taken
        elif budget > room:
            # ring full: get_free_page_and_send frees each new block at once and loops
            self.ring_full_retries += budget - room

    def _end_round(self) -> None:
        """send_cmd_id_stop, then the work item returns."""
        self._reporting = False
        self._candidates = []
        if not self._add("id", VIRTIO_BALLOON_CMD_ID_STOP):  # the slot kept for it is free
            self.kernel.log("virtio_balloon virtio0: Failed to send a stop id, err = -28")

    def _add(self, kind: str, value: int) -> bool:
        if len(self.device.ring) >= self.device.ring_size:
            return False
        self.device.ring.append((kind, value))
        return True

    # --- the order-10 allocation --------------------------------------------------------------
    def _alloc_blocks(self, want: int) -> np.ndarray:
        """alloc_pages(VIRTIO_BALLOON_FREE_PAGE_ALLOC_FLAG, 10), ``want`` times at most."""
        kernel = self.kernel
        if not self._candidates:
            self._candidates = [np.zeros(0, dtype=np.int64) for _ in kernel.mem.zones]
        got = []
        for zi in kernel.zonelist(movable=False, node=None):
            if want <= 0:
                break
            # __zone_watermark_ok(order 10, ALLOC_WMARK_MIN): free - (1024 - 1) > min
            headroom = kernel.zone_free(zi) - (VIRTIO_BALLOON_HINT_BLOCK_PAGES - 1) \
                - kernel.watermarks[zi].min
            allowed = -(-headroom // VIRTIO_BALLOON_HINT_BLOCK_PAGES) if headroom > 0 else 0
            take = self._take_free_blocks(zi, min(want, allowed))
            if len(take):
                self._mark_hinted(take)
                got.append(take)
                want -= len(take)
        return np.concatenate(got) if got else np.zeros(0, dtype=np.int64)

    def _mark_hinted(self, starts: np.ndarray) -> None:
        """The blocks leave the free lists: state HINTED, PageReported cleared (after the
        kernel's alloc hooks saw it, as in ``kernel.alloc_pages``). By contiguous runs."""
        mem = self.kernel.mem
        reported = []
        for a, b in zip(*block_runs(starts, VIRTIO_BALLOON_HINT_BLOCK_PAGES), strict=True):
            mem.set_range_state(int(a), int(b), PageState.HINTED)
            if (mem.flags[a:b] & REPORTED).any():
                reported.append(np.arange(a, b, dtype=np.int64))
        if reported:  # only runs with a reported page can matter to the hooks
            pfns = np.concatenate(reported)
            for hook in getattr(self.kernel, "alloc_hooks", ()):
                hook(pfns)
            mem.clear_flag(pfns, PageFlag.REPORTED)  # del_page_from_free_list

    def _take_free_blocks(self, zi: int, n: int) -> np.ndarray:
        """The next ``n`` free order-10 blocks of zone ``zi`` (fewer if it has fewer).

        The zone's order-10 free list is derived once per round and re-derived only when it runs
        short; blocks that others allocated since then are skipped (only the blocks looked at are
        checked, so a step costs what it takes, not a pass over the zone)."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        mem = self.kernel.mem
        out: list[np.ndarray] = []
        got = 0
        for refresh in (False, True):
            if refresh:
                blocks = free_blocks(mem, mem.zones[zi])
                by_tail = np.argsort(blocks.reported[MAX_PAGE_ORDER], kind="stable")
                self._candidates[zi] = blocks.starts[MAX_PAGE_ORDER][by_tail]
                out, got = [], 0  # the fresh list holds every block still free
            cand = self._candidates[zi]
            pos = 0
            while got < n and pos < len(cand):
                look = cand[pos:pos + (n - got)]
                pos += len(look)
                ok = look[~block_rows(mem.state, look).any(axis=1)]  # FREE is 0
                out.append(ok)
                got += len(ok)
            self._candidates[zi] = cand[pos:]
            if got >= n:
                break
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
