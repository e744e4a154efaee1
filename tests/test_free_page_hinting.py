"""Free page hinting: command IDs, the rounds the precopy notifier drives, order-10 blocks under
the min watermark, the ring's reserved slot, the shrinker, DONE, postcopy, and what QEMU does with
a hint (docs/mechanisms.md §2)."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.devices.free_page_hinting import (
    UINT_MAX,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN,
    VIRTIO_BALLOON_HINT_BLOCK_PAGES,
    VIRTQUEUE_MAX_SIZE,
    HintStatus,
    PrecopyNotify,
)
from labkit.model.buddy import free_blocks
from labkit.model.pages import PageFlag, PageState
from tests.helpers import check_invariants

HINT = {"free_page_hint": True, "iothread": "iothread0"}
SLOW = 1 << 20  # max-bandwidth 1 MiB/s: the migration stays active while a test looks


def open_vm(memory="1G", **kwargs):
    return labkit.open(memory=memory, seed=0, balloon=dict(HINT), **kwargs)


def hinted_pfns(vm) -> np.ndarray:
    return np.flatnonzero(vm.mem.state == PageState.HINTED)


def start_slow_migration(vm, settle_ms=200):
    """Start a migration that stays active and let the first hinting round finish: the guest zeroes
    each 4 MiB block it hints (init_on_alloc, ~0.4 ms a block here), ~220 blocks on 1 GiB."""
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": SLOW})
    vm.qmp("migrate", uri="exec:cat > /dev/null")
    vm.advance(settle_ms)


def test_free_page_hint_needs_an_iothread_as_in_qemu():
    with pytest.raises(ValueError, match="'free-page-hint' requires 'iothread' to be set"):
        labkit.open(memory="512M", balloon={"free_page_hint": True})


def test_without_a_migration_nothing_is_hinted():
    with open_vm() as vm:
        vm.advance(10_000)
        dev = vm.hinting.device
        assert dev.cmd_id == VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        assert dev.status == HintStatus.STOP and dev.rounds == 0
        assert len(hinted_pfns(vm)) == 0


def test_a_round_grabs_free_order_10_blocks_down_to_the_min_watermark():
    with open_vm() as vm:
        zones = range(len(vm.mem.zones))
        before = np.concatenate([free_blocks(vm.mem, vm.mem.zones[z]).starts[10] for z in zones])
        start_slow_migration(vm)
        pfns = hinted_pfns(vm)
        assert len(pfns) > 0 and len(pfns) % VIRTIO_BALLOON_HINT_BLOCK_PAGES == 0
        starts = pfns[::VIRTIO_BALLOON_HINT_BLOCK_PAGES]
        # whole, aligned 4 MiB blocks that were free order-10 blocks
        assert (starts % VIRTIO_BALLOON_HINT_BLOCK_PAGES == 0).all()
        assert np.array_equal(pfns, (starts[:, None] + np.arange(1024)).ravel())
        assert np.isin(starts, before).all()
        # it stopped because the allocation failed: in no zone a free order-10 block the min
        # watermark allows (__zone_watermark_ok with the zone's lowmem_reserve for ZONE_NORMAL,
        # the highest zone a GFP flags without zone modifier may use)
        for z in zones:
            free = vm.kernel.zone_free(z)
            floor = vm.kernel.watermark_threshold(z, "min", vm.kernel.classzone(False))
            left = free_blocks(vm.mem, vm.mem.zones[z]).starts[10]
            assert len(left) == 0 or free - (VIRTIO_BALLOON_HINT_BLOCK_PAGES - 1) <= floor
            assert free >= vm.kernel.watermarks[z].min  # never below min: no memory reserves
        assert vm.hinting.driver.num_free_page_blocks == len(starts)
        assert vm.sample()["hinted"] == len(pfns) * 4096
        check_invariants(vm.mem)


def test_command_ids_start_above_0x80000000_and_wrap_after_uint_max():
    with open_vm() as vm:
        dev = vm.hinting.device
        cfg = vm.balloon_device.config
        start_slow_migration(vm, settle_ms=0)
        assert dev.cmd_id == VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1  # MIN, then +1 per round
        assert cfg.free_page_hint_cmd_id == dev.cmd_id  # config shows the ID while REQUESTED
        vm.advance(20)
        assert dev.status in (HintStatus.START, HintStatus.STOP)  # the guest echoed the ID
        assert vm.hinting.driver.cmd_id_active == dev.cmd_id
        dev.precopy_notify(PrecopyNotify.BEFORE_BITMAP_SYNC, True, False)
        assert dev.status == HintStatus.STOP and cfg.free_page_hint_cmd_id == VIRTIO_BALLOON_CMD_ID_STOP
        dev.cmd_id = UINT_MAX
        dev.precopy_notify(PrecopyNotify.AFTER_BITMAP_SYNC, True, False)
        assert dev.cmd_id == VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        dev.precopy_notify(PrecopyNotify.AFTER_BITMAP_SYNC, True, False)
        assert dev.cmd_id == VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1
        dev.precopy_notify(PrecopyNotify.AFTER_BITMAP_SYNC, False, False)  # VM stopped: DONE
        assert dev.status == HintStatus.DONE and cfg.free_page_hint_cmd_id == VIRTIO_BALLOON_CMD_ID_DONE


def test_every_bitmap_sync_stops_hinting_and_starts_a_new_round_and_the_final_one_says_done():
    with open_vm("2G") as vm:
        seen = []
        dev = vm.hinting.device

        def spy(reason, running, postcopy):
            seen.append((reason, running, dev.status, dev.cmd_id))
        vm.migration.precopy_notifiers.append(spy)
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 2000})
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance(10_000)
        assert vm.qmp("query-migrate")["status"] == "completed"
        syncs = vm.qmp("query-migrate")["ram"]["dirty-sync-count"]
        befores = [s for s in seen if s[0] is PrecopyNotify.BEFORE_BITMAP_SYNC]
        afters = [s for s in seen if s[0] is PrecopyNotify.AFTER_BITMAP_SYNC]
        assert len(befores) == len(afters) == syncs >= 2
        assert all(s[2] == HintStatus.STOP for s in befores)  # BEFORE_BITMAP_SYNC -> STOP
        running_afters = [s for s in afters if s[1]]
        assert [s[3] for s in running_afters] == [
            VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN + 1 + i for i in range(len(running_afters))]
        assert not afters[-1][1] and afters[-1][2] == HintStatus.DONE  # the final sync: VM stopped
        assert seen[-1][0] is PrecopyNotify.CLEANUP
        # the guest, running again (on the destination), gave every block back
        assert vm.hinting.driver.num_free_page_blocks == 0 and len(hinted_pfns(vm)) == 0
        check_invariants(vm.mem)


def test_hints_leave_the_migration_bitmap_and_its_count():
    with open_vm() as vm:
        start_slow_migration(vm)
        mig = vm.migration
        pfns = hinted_pfns(vm)
        assert len(pfns) > 0
        assert not mig.bitmap[pfns].any()
        assert not (vm.mem.flags[pfns] & PageFlag.DIRTY_LOG).any()
        assert mig.dirty_pages == int(mig.bitmap.sum())
        assert mig.hinted_pages > 0
        assert vm.qmp("query-migrate")["ram"]["remaining"] == mig.dirty_pages * 4096
        assert vm.hinting.device.hinted_blocks * VIRTIO_BALLOON_HINT_BLOCK_PAGES >= mig.hinted_pages


def test_a_hint_without_a_migration_changes_nothing_on_the_host():
    with open_vm() as vm:
        dev = vm.hinting.device
        dev.precopy_notify(PrecopyNotify.AFTER_BITMAP_SYNC, True, False)  # a round, no migration
        vm.advance(50)
        assert vm.hinting.driver.num_free_page_blocks > 0  # the guest holds blocks...
        assert dev.hinted_blocks > 0
        assert vm.migration.hinted_pages == 0 and vm.migration.dirty_pages == 0  # ...QEMU ignored them


def test_hinted_pages_are_never_sent_unless_written_again():
    with open_vm("1G") as vm:
        n = vm.mem.n_pages
        sent = np.zeros(n, dtype=bool)
        send = vm.migration._send

        def record(pfns, zero, nbytes, *, downtime):
            sent[pfns] = True
            send(pfns, zero, nbytes, downtime=downtime)
        vm.migration._send = record
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 64 << 20})
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance(100)
        hinted = vm.mem.state == PageState.HINTED
        assert hinted.any()
        already = sent.copy()
        # memory pressure: a process needs more than what is left outside the hinted blocks,
        # so reclaim calls the shrinker, which gives blocks back, and the process writes them
        want = vm.kernel.zone_free(0) + vm.meminfo()["Cached"] // 4 + (64 << 20) // 4096
        pages = vm.kernel.alloc_pages(want, PageState.ANON)
        vm.kernel.touch(pages)
        rewritten = np.zeros(n, dtype=bool)
        rewritten[pages] = True
        rewritten &= hinted
        assert vm.hinting.driver.shrunk_blocks > 0 and rewritten.any()
        sent[:] = False
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0})
        vm.advance(20_000)
        assert vm.qmp("query-migrate")["status"] == "completed"
        untouched = hinted & ~rewritten & ~already
        assert untouched.any()
        assert not (untouched & sent).any()  # hinted and never rewritten: never sent
        assert not (rewritten & ~sent).any()  # rewritten after the hint: dirty-logged and sent


def test_the_shrinker_counts_blocks_and_frees_whole_blocks_rounding_up():
    with open_vm() as vm:
        start_slow_migration(vm)
        drv = vm.hinting.driver
        blocks = drv.num_free_page_blocks
        assert blocks >= 3
        assert drv.shrinker_count() == blocks * VIRTIO_BALLOON_HINT_BLOCK_PAGES
        last = drv._free_page_list[-1]
        assert drv.shrinker_scan(1) == VIRTIO_BALLOON_HINT_BLOCK_PAGES  # ceil(1 / 1024) = 1 block
        assert vm.mem.state[last] == PageState.FREE  # the last hinted block goes back first
        assert drv.shrinker_scan(VIRTIO_BALLOON_HINT_BLOCK_PAGES + 1) == 2 * VIRTIO_BALLOON_HINT_BLOCK_PAGES
        assert drv.num_free_page_blocks == blocks - 3
        assert drv.shrinker_scan(10**9) == (blocks - 3) * VIRTIO_BALLOON_HINT_BLOCK_PAGES
        assert drv.num_free_page_blocks == 0 and len(hinted_pfns(vm)) == 0
        check_invariants(vm.mem)


def test_memory_pressure_gets_hinted_blocks_back_through_reclaim():
    with open_vm() as vm:
        start_slow_migration(vm)
        held = vm.hinting.driver.num_free_page_blocks
        vm.guest("alloc", size="300M")
        assert vm.kernel.vmstat.oom_kill == 0
        assert 0 < vm.hinting.driver.num_free_page_blocks < held


def test_no_hinting_with_postcopy_ram():
    with open_vm("2G") as vm:
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": "postcopy-ram", "state": True}])
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 2000})
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance(10_000)
        assert vm.qmp("query-migrate")["status"] == "completed"
        dev = vm.hinting.device
        assert dev.rounds == 0 and dev.cmd_id == VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        assert vm.migration.hinted_pages == 0


def test_one_ring_slot_stays_for_the_command_id():
    with open_vm() as vm:
        dev, drv = vm.hinting.device, vm.hinting.driver
        assert dev.ring_size == VIRTQUEUE_MAX_SIZE  # QEMU's VIRTQUEUE_MAX_SIZE (UNCONFIRMED: 1024)
        dev.ring_size = 8
        vm.hinting.timing.host_block_us = 1e9  # the iothread takes one entry per step
        start_slow_migration(vm, settle_ms=0)
        most = 0
        for _ in range(40):
            vm.advance(1)
            blocks = sum(1 for kind, _ in dev.ring if kind == "block")
            most = max(most, blocks)
            assert len(dev.ring) <= dev.ring_size
            assert blocks <= dev.ring_size - 1
        assert most == dev.ring_size - 1
        assert drv.ring_full_retries > 0  # allocated, found the ring full, freed at once
        assert len(hinted_pfns(vm)) == drv.num_free_page_blocks * VIRTIO_BALLOON_HINT_BLOCK_PAGES


def test_cancel_sends_done_and_the_guest_takes_its_pages_back():
    with open_vm() as vm:
        start_slow_migration(vm)
        assert vm.hinting.driver.num_free_page_blocks > 0
        vm.qmp("migrate_cancel")
        vm.advance(10)
        assert vm.qmp("query-migrate")["status"] == "cancelled"
        assert vm.hinting.device.status == HintStatus.DONE
        assert vm.hinting.driver.num_free_page_blocks == 0 and len(hinted_pfns(vm)) == 0
        check_invariants(vm.mem)
