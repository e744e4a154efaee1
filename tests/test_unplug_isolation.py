"""Issue 12, D1 and D2: taking online memory back (virtio-mem unplug) while the balloon and reclaim
are at work loses nothing.

* D1: balloon pages in flight cannot be migrated. ``leak_balloon`` dequeues up to 256 pages and
  waits for the host before releasing them; ``balloon_page_list_dequeue`` (mm/balloon_compaction.c)
  has taken them off the balloon list and cleared their movable ops, and an Out-of-puff fill holds
  its pages on a local list across its 200 ms sleep: ``isolate_migratepages_block`` cannot isolate
  either, so ``alloc_contig_range`` (mm/page_alloc.c) fails with -EBUSY and virtio-mem skips the
  subblock (drivers/virtio/virtio_mem.c ``virtio_mem_fake_offline``; mechanisms.md §5.5).
* D2: ``alloc_contig_range`` isolates the whole range first (``start_isolate_page_range``,
  mm/page_isolation.c): a page freed into it while migration targets are allocated (reclaim of page
  cache listed for migration) goes to the MIGRATE_ISOLATE free list and stays isolated; nothing in
  the range is handed out again, and nothing listed for migration is migrated after its owner
  freed it.
* Balloon list pages do migrate (``virtballoon_migratepage``): the new page is inflated, so the host
  discards it, and the old one deflated.

Each test failed before the fix (the two reproducers are the issue's own).
"""

from __future__ import annotations

import errno

import numpy as np

import labkit
from labkit.model.pages import PageFlag, PageState
from tests.machine_invariants import check_machine

MiB = 1 << 20
VMEM = [{"id": "vmem0", "size": "512M", "block_size": "2M"}]
SUBBLOCK = 512  # pages: a 2 MiB virtio-mem subblock (pageblock_order 9)


def _movable(vm) -> int:
    """The index of ZONE_MOVABLE (after the boot zones DMA and DMA32 of a q35 guest)."""
    return next(i for i, z in enumerate(vm.mem.zones) if z.name == "Movable")


def _kernel_zones_room(vm, watermark: str) -> int:
    """Free pages a GFP_KERNEL allocation may take from the zones it may use (all but Movable)
    before ``watermark``: each zone keeps its watermark plus ``lowmem_reserve`` against ZONE_NORMAL,
    the allocation's class zone (mm/page_alloc.c ``zone_watermark_ok``; /proc/zoneinfo's protection)."""
    return sum(z["free"] - z[watermark] - z["protection"][2]
               for z in vm.zoneinfo() if z["zone"] != "Movable")


def _subblock_of(pfn: int) -> tuple[int, int]:
    a = int(pfn) // SUBBLOCK * SUBBLOCK
    return a, a + SUBBLOCK


def test_d1_reproducer_balloon_deflating_while_unplug_runs():
    """The issue's D1 reproducer: the unplug runs while the balloon deflates (pages in flight)."""
    vm = labkit.open(memory="512M", seed=4, balloon={"free_page_reporting": True},
                     virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=370 * MiB)
    vm.qmp("balloon", value=190 * MiB)
    vm.advance(2641.6)
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=58 * MiB)  # unplug runs...
    vm.qmp("balloon", value=434 * MiB)  # ...while the balloon deflates
    vm.advance(0.22)
    check_machine(vm)
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=304 * MiB)
    vm.advance(1104.2)
    check_machine(vm)  # before the fix: counts drifted, 256 balloon-list pages were FREE
    assert (vm.mem.state[vm.balloon.pages] == PageState.BALLOON).all()


def test_d1_pages_leak_balloon_holds_make_the_range_busy():
    """A subblock holding a page ``leak_balloon`` dequeued and has not released is -EBUSY, and
    the attempt changes nothing."""
    vm = labkit.open(memory="512M", seed=1, virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=256 * MiB)
    vm.advance(100)
    vm.qmp("balloon", value=448 * MiB)  # 64 MiB balloon: all of it in ZONE_MOVABLE
    vm.advance(1000)
    vm.qmp("balloon", value=512 * MiB)
    vm.advance(0.1)  # the first leak request is waiting for the host's ack
    held = vm.balloon.in_flight
    assert len(held) == 256
    a, b = _subblock_of(held[0])
    before = vm.mem.state[a:b].copy(), vm.mem.counts.copy(), vm.mem.flags[a:b].copy()
    assert vm.kernel.hotplug.alloc_contig_range(a, b, attempts=5) == -errno.EBUSY
    assert (vm.mem.state[a:b] == before[0]).all() and (vm.mem.counts == before[1]).all()
    assert (vm.mem.flags[a:b] == before[2]).all()
    vm.advance(1000)  # the leak completes; the pages go back to the buddy allocator
    check_machine(vm)
    assert vm.kernel.hotplug.alloc_contig_range(a, b, attempts=5) == 0  # not held any more


def test_d1_pages_an_out_of_puff_fill_holds_make_the_range_busy():
    """The pages an Out-of-puff fill holds across its 200 ms sleep are not movable either."""
    vm = labkit.open(memory="512M", seed=1, virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=128 * MiB)
    vm.advance(100)
    vm.guest("drop_caches")
    room = _kernel_zones_room(vm, "min")
    # DMA32 and DMA near their min: the fill that leaves ZONE_MOVABLE finds no room there
    vm.guest("alloc", size=(room - 100) * 4096, kind="slab")
    vm.qmp("balloon", value=1 * MiB)
    for _ in range(4000):
        vm.advance(0.5)
        if vm.balloon.out_of_puff and len(vm.balloon.in_flight):
            break
    held = vm.balloon.in_flight
    movable = held[vm.mem.zone_index_of(held) == _movable(vm)]
    assert vm.balloon.out_of_puff and len(movable), "the fill ran out of puff in ZONE_MOVABLE"
    a, b = _subblock_of(movable[0])
    counts = vm.mem.counts.copy()
    assert vm.kernel.hotplug.alloc_contig_range(a, b, attempts=5) == -errno.EBUSY
    assert (vm.mem.counts == counts).all()
    vm.advance(300)  # the sleep ends: the pages go on the balloon list, movable again
    check_machine(vm)


def test_d1_balloon_list_pages_migrate_and_the_host_discards_the_new_ones():
    """virtballoon_migratepage: the list follows the pages, the new pages are inflated."""
    vm = labkit.open(memory="512M", seed=1, virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=256 * MiB)
    vm.advance(100)
    vm.qmp("balloon", value=448 * MiB)
    vm.advance(1000)
    pages = vm.balloon.pages.copy()
    a, b = _subblock_of(pages[0])
    inside = pages[(pages >= a) & (pages < b)]
    assert len(inside)
    inflates = vm.balloon_device.inflate_requests
    assert vm.kernel.hotplug.alloc_contig_range(a, b, attempts=5) == 0
    moved = vm.balloon.pages
    assert not ((moved >= a) & (moved < b)).any()
    assert (vm.mem.state[moved] == PageState.BALLOON).all()
    assert not (vm.mem.flags[moved] & PageFlag.BACKED).any()
    assert vm.balloon_device.inflate_requests > inflates
    check_machine(vm)


def test_d2_reproducer_reclaim_during_unplug():
    """The issue's D2 reproducer: file pages reclaimed while the range is being offlined."""
    vm = labkit.open(memory="512M", seed=7, balloon={"free_page_reporting": True},
                     virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=270 * MiB)
    for size in (82, 47, 189):
        vm.guest("alloc", size=size * MiB, kind="anon")
    vm.advance(1688)
    f1 = vm.guest("alloc", size=244 * MiB, kind="file")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=144 * MiB)
    f2 = vm.guest("alloc", size=108 * MiB, kind="file")
    vm.advance(301)
    check_machine(vm)  # before the fix: files owned PageOffline pages, page cache had no owner
    vm.guest("free", handle=f1)
    vm.guest("free", handle=f2)
    check_machine(vm)  # ... and freeing the files put unplugged memory on the free lists


def test_d2_pages_freed_into_the_range_stay_isolated():
    """Reclaim inside alloc_contig_range frees page cache of the range itself (the oldest file
    pages are the range's): those pages are not migrated, are not handed out as targets, and the
    range is claimed whole. Before the fix the file ended up owning PageOffline pages."""
    vm = labkit.open(memory="512M", seed=3, virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=128 * MiB)
    vm.advance(100)
    vm.guest("drop_caches")
    f = vm.guest("alloc", size=64 * MiB, kind="file")  # page cache, in ZONE_MOVABLE first
    a, b = _subblock_of(vm.kernel.handles[f].pages[0])
    assert (vm.mem.state[a:b] == PageState.FILE_CLEAN).all()
    # leave 256 pages above the low watermarks: the 512 targets need reclaim, which takes the
    # oldest page cache first, the range's own pages
    k = vm.kernel
    room = sum(k.zone_free(z) - k.watermarks[z].low for z in range(len(vm.mem.zones)))
    vm.guest("alloc", size=(room - 256) * 4096, kind="anon")
    steal = k.vmstat.pgsteal_direct + k.vmstat.pgsteal_kswapd
    assert k.hotplug.alloc_contig_range(a, b, attempts=5) == 0
    assert k.vmstat.pgsteal_direct + k.vmstat.pgsteal_kswapd > steal  # reclaim ran
    assert (vm.mem.state[a:b] == PageState.OFFLINE).all()
    pages = k.handles[f].pages
    assert not ((pages >= a) & (pages < b)).any()
    check_machine(vm)


def test_alloc_contig_range_failure_un_isolates_the_range():
    """-ENOMEM: the range's free pages return to the buddy allocator (undo_isolate_page_range),
    pages already migrated stay where they went, and nothing is lost."""
    vm = labkit.open(memory="512M", seed=2, virtio_mem=VMEM, memhp_default_state="online_movable")
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=128 * MiB)
    vm.advance(100)
    vm.guest("drop_caches")
    a = vm.mem.zones[_movable(vm)].start
    b = a + 64 * MiB // 4096
    vm.guest("alloc", size=120 * MiB, kind="anon")  # fills ZONE_MOVABLE
    rest = _kernel_zones_room(vm, "min") - 64
    vm.guest("alloc", size=max(rest, 1) * 4096, kind="slab")  # no room left to migrate 64 MiB to
    free_before = vm.mem.count(PageState.FREE) + vm.mem.count(PageState.PCP)
    assert vm.kernel.hotplug.alloc_contig_range(a, b, attempts=5) == -errno.ENOMEM
    check_machine(vm)
    assert not (vm.mem.state[a:b] == PageState.OFFLINE).any()
    # free pages stay free (drain_all_pages moved the per-CPU lists' pages to the buddy lists)
    assert vm.mem.count(PageState.FREE) + vm.mem.count(PageState.PCP) == free_before
    assert np.isin(vm.mem.state[a:b], [PageState.ANON, PageState.FREE, PageState.FILE_CLEAN]).all()


def test_a_failed_big_block_unplug_gives_back_only_what_it_took_offline():
    """BBM (a 256 MiB block: two memory blocks, one online, one added but offline): the device
    answers BUSY while a migration runs (-ETXTBSY); the rollback fake-onlines the pages
    alloc_contig_range took from the online block (drivers/virtio/virtio_mem.c
    ``virtio_mem_bbm_offline_remove_and_unplug_bb``, its rollback), not the offline block's
    PageOffline pages: before, those 32768 pages went to the free lists of no zone."""
    vm = labkit.open(memory="512M", seed=0, memhp_default_state="offline",
                     virtio_mem=[{"id": "vmem0", "size": "512M", "block_size": "256M"}])
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=256 * MiB)
    vm.advance(100)
    first = vm.guest("memory_blocks")[0]["block"]
    vm.guest("online_memory", block=first, zone="movable")
    vm.qmp("migrate-set-parameters", **{"max-bandwidth": MiB})
    vm.qmp("migrate", uri="exec:cat > /dev/null")  # QEMU answers BUSY while it runs
    vm.advance(10)
    vm.qmp("qom-set", path="vmem0", property="requested-size", value=0)
    vm.advance(10)
    check_machine(vm)
    blocks = {b["block"]: b for b in vm.guest("memory_blocks")}
    assert blocks[first]["zone"] == "Movable" and blocks[first + 1]["zone"] is None
    assert vm.qmp("qom-get", path="vmem0", property="size") == 256 * MiB  # nothing unplugged
