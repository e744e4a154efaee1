"""The source audit of issue 11: each behaviour held against the kernel or QEMU function it comes
from (docs/mechanisms.md §1, §5, §6, §10, §11.4). Items tested elsewhere: the virtio-mem driver's
-EAGAIN restart and per-run retry-timer cancel, and requested-size > memdev (tests/test_virtio_mem.py),
auto-movable's early pages (tests/test_virtio_mem.py), the stats timer armed at once
(tests/test_balloon.py)."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.devices.balloon import DEFAULT_RATELIMIT_INTERVAL_MS
from labkit.model.pages import PAGES_PER_MEMORY_BLOCK, PageFlag, PageState
from labkit.model.reclaim import DEF_PRIORITY, SHRINK_BATCH, Shrinker, do_shrink_slab

MiB, GiB = 1 << 20, 1 << 30


def run_migration(vm, limit_ms=60_000):
    vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    info = vm.qmp("query-migrate")
    waited = 0
    while info["status"] not in ("completed", "failed") and waited < limit_ms:
        vm.advance(100)
        waited += 100
        info = vm.qmp("query-migrate")
    assert info["status"] == "completed"
    return info


# --- virtio-balloon (§1) ----------------------------------------------------------------------
def test_out_of_puff_is_ratelimited_ten_lines_per_five_seconds():
    # drivers/virtio/virtio_balloon.c fill_balloon: dev_info_ratelimited(..., "Out of puff! ...");
    # lib/ratelimit.c ___ratelimit: DEFAULT_RATELIMIT_BURST 10 per DEFAULT_RATELIMIT_INTERVAL 5 s,
    # then "<func>: N callbacks suppressed" when the next interval opens
    with labkit.open(memory="1G", seed=0) as vm:
        vm.guest("alloc", size="700M", kind="anon")
        vm.qmp("balloon", value=64 * MiB)
        vm.advance(12_000)  # ~60 failed fills, one per 200 ms
        lines = [(t, msg) for t, msg in vm.kernel.dmesg if "Out of puff" in msg]
        suppressed = [msg for _, msg in vm.kernel.dmesg if "callbacks suppressed" in msg]
        assert vm.balloon.out_of_puff >= 40
        assert len(lines) < vm.balloon.out_of_puff
        times = np.array([t for t, _ in lines])
        start = times[0]
        windows = np.bincount(((times - start) // DEFAULT_RATELIMIT_INTERVAL_MS).astype(int))
        assert windows.max() == 10  # a full burst, never more
        assert suppressed and all(msg.startswith("fill_balloon: ") for msg in suppressed)
        missed = sum(int(msg.split()[1]) for msg in suppressed)
        assert len(lines) + missed <= vm.balloon.out_of_puff  # what the current interval holds back


def test_changing_a_running_stats_interval_waits_one_new_interval():
    # hw/virtio/virtio-balloon.c balloon_stats_set_poll_interval: a new timer fires at once
    # (balloon_stats_change_timer(s, 0)); an interval change re-arms one *new* interval from now
    # (balloon_stats_change_timer(s, value)); the same value changes nothing
    with labkit.open(memory="1G", seed=0) as vm:
        stats = lambda: vm.qmp("qom-get", path="balloon0", property="guest-stats")["last-update"]  # noqa: E731
        epoch = vm.knobs["epoch"]
        vm.advance(1000)
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=2)
        vm.advance(100)
        assert stats() == epoch + 1  # at once
        vm.advance(1000)  # t = 2.1 s
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=5)
        vm.advance(4800)  # t = 6.9 s: the old timer (due at 3 s) was re-armed to 7.1 s
        assert stats() == epoch + 1
        vm.advance(300)
        assert stats() == epoch + 7
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=5)
        vm.advance(5000)  # same value: the timer keeps its 12.1 s deadline
        assert stats() == epoch + 12


# --- migration (§6, §11.4) --------------------------------------------------------------------
def test_migration_counts_ram_blocks_and_skips_unplugged_virtio_mem_memory():
    # migration/ram.c ram_bytes_total: the used lengths of the RAM blocks (pc.ram and the virtio-mem
    # device's memory backend), not the address gap between them; ram_init_bitmaps ->
    # migration_bitmap_clear_discarded_pages: what the RamDiscardManager (virtio-mem) reports
    # unplugged leaves the bitmap and is never sent (docs/mechanisms.md §11.4)
    with labkit.open(memory="512M", seed=0, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "1G", "requested_size": 256 * MiB}]) as vm:
        vm.advance(5000)
        assert vm.qmp("qom-get", path="vm0", property="size") == 256 * MiB
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0})
        info = run_migration(vm)
        ram = info["ram"]
        assert ram["total"] == 512 * MiB + GiB
        sent_first_pass = (512 * MiB + 256 * MiB) // 4096
        assert sent_first_pass <= ram["normal"] + ram["duplicate"] < sent_first_pass + 4096
        unplugged = vm.migration.bitmap  # nothing of the unplugged 768 MiB was ever set
        a, b = vm.migration.ram_blocks()[-1]
        assert not unplugged[a + 256 * MiB // 4096:b].any()


@pytest.mark.parametrize("xbzrle", [False, True])
def test_query_migrate_has_xbzrle_cache_exactly_when_the_capability_is_on(xbzrle):
    # migration/migration.c populate_ram_info: info->xbzrle_cache when migrate_use_xbzrle(), with
    # cache-size, bytes, pages, cache-miss, cache-miss-rate, encoding-rate, overflow
    with labkit.open(memory="256M", seed=0) as vm:
        vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": xbzrle}])
        vm.qmp("migrate-set-parameters", **{"xbzrle-cache-size": 32 * MiB})
        info = run_migration(vm)
        assert ("xbzrle-cache" in info) == xbzrle
        if xbzrle:
            cache = info["xbzrle-cache"]
            assert sorted(cache) == sorted(["cache-size", "bytes", "pages", "cache-miss",
                                            "cache-miss-rate", "encoding-rate", "overflow"])
            assert cache["cache-size"] == 32 * MiB


# --- reclaim and the hint shrinker (§10.6) ----------------------------------------------------
def test_do_shrink_slab_scans_in_proportion_to_what_a_shrinker_holds():
    # mm/vmscan.c do_shrink_slab: delta = (freeable >> priority) * 4 / seeks, in SHRINK_BATCH steps
    held = [1 << 20]

    def scan(nr):
        held[0] -= nr
        return nr

    s = Shrinker(lambda: held[0], scan)
    assert do_shrink_slab(s, DEF_PRIORITY) == ((1 << 20) >> DEF_PRIORITY) * 4 // 2
    assert s.scanned % SHRINK_BATCH == 0
    small = Shrinker(lambda: 100, lambda nr: 0)
    assert do_shrink_slab(small, DEF_PRIORITY) == 0  # (100 >> 12) * 2 = 0: nothing at this priority


def test_a_shrinker_gives_back_while_page_cache_is_still_being_reclaimed():
    # mm/vmscan.c shrink_node -> shrink_node_memcgs: shrink_lruvec and shrink_slab on every pass,
    # so a shrinker (the free page hint one: virtio_balloon_shrinker_scan) is not kept for last
    with labkit.open(memory="1G", seed=0) as vm:
        held = {"pages": 0}
        pool = vm.kernel.alloc_pages(64 * MiB // 4096, PageState.KERNEL, movable=False)
        held["pages"] = len(pool)

        def scan(nr):
            n = min(nr, held["pages"])
            held["pages"] -= n
            vm.kernel.free_pages(pool[held["pages"]:held["pages"] + n], was=PageState.KERNEL)
            return n

        shrinker = Shrinker(lambda: held["pages"], scan, name="virtio-balloon")
        vm.kernel.shrinkers.append(shrinker)
        cache = vm.guest("alloc", size="600M", kind="file")
        vm.guest("alloc", size="300M", kind="anon")  # needs reclaim
        left = len(vm.kernel.handles[cache].pages)
        assert shrinker.freed > 0
        assert left > 0  # page cache was still there when the shrinker gave back


# --- memory hotplug (§5) ----------------------------------------------------------------------
def test_contig_zones_inherits_zone_movable_between_movable_blocks():
    # mm/memory_hotplug.c default_zone_for_pfn: a range only ZONE_MOVABLE's span intersects
    # inherits ZONE_MOVABLE ("We inherit the existing zone in a simple case where zones do not
    # overlap"); memory_hotplug.online_policy=contig-zones is the default
    with labkit.open(memory="1G", seed=0, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "512M"}, {"id": "vm1", "size": "512M"}]) as vm:
        for dev in ("vm0", "vm1"):
            vm.qmp("qom-set", path=dev, property="requested-size", value=128 * MiB)
        vm.advance(5000)
        movable = [b for b in vm.guest("memory_blocks") if b["zone"] == "Movable"]
        assert len(movable) == 2  # the first block of each device: ZONE_MOVABLE spans both
        vm.kernel.hotplug.online_type = "online"  # echo online > .../memory/auto_online_blocks
        vm.qmp("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        vm.advance(5000)
        zones = [b["zone"] for b in vm.guest("memory_blocks")]
        assert zones.count("Movable") == 3 and "Normal" not in zones
        # beyond the span (vm1's second block) only the kernel zone's rule is left: ZONE_NORMAL
        vm.qmp("qom-set", path="vm1", property="requested-size", value=256 * MiB)
        vm.advance(5000)
        zones = [b["zone"] for b in vm.guest("memory_blocks")]
        assert zones.count("Normal") == 1


def test_auto_movable_sets_aside_the_kernel_memory_other_groups_need():
    # mm/memory_hotplug.c auto_movable_can_online_movable: walk_dynamic_memory_groups over the other
    # groups; each needs movable * 100 / ratio kernel pages of its own, which the early kernel
    # pages lend it: two 4 GiB devices on a 1 GiB guest can't both be mostly movable
    with labkit.open(memory="1G", seed=0, memhp_default_state="online",
                     cmdline={"memory_hotplug.online_policy": "auto-movable"},
                     virtio_mem=[{"id": "vm0", "size": "4G"}, {"id": "vm1", "size": "4G"}]) as vm:
        vm.qmp("qom-set", path="vm0", property="requested-size", value=3 * GiB)
        vm.advance(20_000)
        vm.qmp("qom-set", path="vm1", property="requested-size", value=3 * GiB)
        vm.advance(20_000)
        blocks = vm.guest("memory_blocks")
        early = 1 * GiB // 4096 - 98  # boot memory present (less the e820 holes)
        movable = sum(b["zone"] == "Movable" for b in blocks) * PAGES_PER_MEMORY_BLOCK
        kernel_hot = sum(b["zone"] == "Normal" for b in blocks) * PAGES_PER_MEMORY_BLOCK
        assert movable * 100 <= 301 * (early + kernel_hot)
        assert kernel_hot > 0


# --- per-CPU lists (§10.3) and boot memory (§10.7) --------------------------------------------
def test_a_process_exit_empties_its_per_cpu_list_but_a_balloon_deflate_does_not():
    # mm/page_alloc.c free_unref_page_commit (6.1): an order 1-3 free while free_factor > 0 is a
    # "free_high" free that empties the list; the last page an exiting mm frees is its order-1 pgd
    # (arch/x86 PGD_ALLOCATION_ORDER with page table isolation). The balloon frees order-0 pages only.
    # Measured: pcp count 167 after a 256 MiB holder exits, 13612 of high 13860 after a 256 MiB
    # deflate at the live guest's pace (TCG: ~2.8 ms per 256-page request, data/recorded/balloon.json).
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal", "balloon_request_ms": 2.8}) as vm:
        pcp = lambda: sum(z["pcp"][0]["count"] for z in vm.zoneinfo())  # noqa: E731
        high = max(z["pcp"][0]["high"] for z in vm.zoneinfo())
        job = vm.guest("alloc", size="256M", kind="anon")
        vm.guest("free", handle=job)
        assert pcp() < 2 * vm.zoneinfo()[1]["pcp"][0]["batch"]
        vm.qmp("balloon", value=768 * MiB)
        vm.advance(3000)
        vm.qmp("balloon", value=GiB)
        vm.advance(3000)
        assert high - pcp() < 2 * MiB // 4096 + vm.zoneinfo()[1]["pcp"][0]["batch"]


def test_zeroed_boot_reservations_read_as_zero_pages():
    # kernel/dma/swiotlb.c swiotlb_init_remap (memblock_alloc: zeroed), fs/dcache.c
    # dcache_init_early and fs/inode.c inode_init_early (alloc_large_system_hash with HASH_ZERO),
    # the kernel's bss (cleared at boot): backed on the host, but all zeros, so migration's
    # buffer_is_zero sends them as zero pages (docs/mechanisms.md §10.7)
    with labkit.open(memory="6G", seed=0) as vm:
        plan = vm.reservations
        zeroed = np.concatenate([np.arange(a, b) for a, b, _, kind in plan.ranges if kind == "zeroed"])
        names = {name for _, _, name, kind in plan.ranges if kind == "zeroed"}
        assert {"kernel bss", "swiotlb", "dentry and inode hash tables"} <= names
        flags = vm.mem.flags[zeroed]
        assert np.all(flags & PageFlag.BACKED) and np.all(flags & PageFlag.ZEROED)
        assert np.all(vm.mem.state[zeroed] == int(PageState.RESERVED))
