"""The resize comparison (labkit.scenarios.resize): virtio-mem against the balloon, each shape held
against the fact it comes from in docs/mechanisms.md (§) or docs/results.md."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import labkit
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.devices.virtio_mem import VIRTIO_MEM_USABLE_EXTENT
from labkit.devices.virtio_mem_driver import TIMING, VIRTIO_MEM_RETRY_TIMER_MIN_MS
from labkit.model.layout import q35_layout
from labkit.model.pages import STRUCT_PAGE_SIZE
from labkit.model.reservations import plan_reservations
from labkit.scenarios.resize import (
    TABLE_ROWS,
    VARIANTS,
    ResizeParams,
    format_table,
    resize_compare,
    resize_table,
    run_variant,
)

MiB, GiB, PAGE = 1 << 20, 1 << 30, 4096
PARAMS = ResizeParams(boot_memory="1G", device_size="1G", shrink="1G", app="256M", slab="64M")


@pytest.fixture(scope="module")
def rows():
    return resize_table(resize_compare(PARAMS))


def col(rows, variant: str, key: str) -> float:
    return float(rows[key][list(rows["variant"]).index(variant)])


def test_table_has_one_row_per_variant(rows):
    assert list(rows["variant"]) == list(VARIANTS)
    text = format_table(rows)
    assert text.splitlines()[0].split() == list(VARIANTS)
    assert len(text.splitlines()) == 2 + len(TABLE_ROWS)


def test_zone_movable_unplugs_everything_asked_and_memtotal_really_shrinks(rows):
    # §5.5: ZONE_MOVABLE holds only movable pages, alloc_contig_range migrates them away; the
    # unplugged memory is offlined and removed, so MemTotal falls by exactly what was unplugged
    v = "virtio_mem_movable"
    assert col(rows, v, "removed_bytes") == PARAMS.shrink
    assert col(rows, v, "unplug_rc") == 0
    assert col(rows, v, "memtotal_drop_bytes") == PARAMS.shrink
    assert col(rows, v, "migrated_bytes") > 0  # the fill's freed pages were not all it held
    assert col(rows, v, "removable_max_bytes") == PARAMS.device_size


def test_zone_normal_stops_partway_on_kernel_pages_and_arms_the_50s_timer(rows):
    # §5.5: an unmovable page in a ZONE_NORMAL subblock makes it -EBUSY (one attempt);
    # §5.6: -EBUSY arms the retry timer at VIRTIO_MEM_RETRY_TIMER_MIN_MS = 50 s
    v = "virtio_mem_kernel"
    removed = col(rows, v, "removed_bytes")
    stuck = PARAMS.shrink - removed
    memmap = PARAMS.device_size * STRUCT_PAGE_SIZE // PAGE
    assert 0 < stuck <= PARAMS.slab + memmap  # slab, and memmap of later blocks, pin subblocks
    assert stuck % (2 * MiB) == 0  # whole 2 MiB subblocks stay (§5.3)
    assert col(rows, v, "unplug_rc") == -errno.EBUSY
    assert col(rows, v, "retry_ms") == VIRTIO_MEM_RETRY_TIMER_MIN_MS
    assert np.isnan(col(rows, v, "shrink_ms"))  # never reached within settle_ms
    assert col(rows, v, "memtotal_drop_bytes") == removed
    # asking for 0 frees nothing more; growing back in between re-added the removed blocks, whose
    # memmap (GFP_KERNEL: ZONE_NORMAL first, i.e. the hot-plugged blocks) may pin one more subblock
    assert 0 <= removed - col(rows, v, "removable_max_bytes") <= memmap


def test_balloon_memtotal_shrinks_only_without_deflate_on_oom(rows):
    # §1.3 / §8.2: adjust_managed_page_count(-1) per page only without DEFLATE_ON_OOM
    for v in ("balloon", "balloon_doo"):
        assert col(rows, v, "removed_bytes") == PARAMS.shrink
        # every page the fill wrote was backed; the balloon may also take a few free pages of the
        # kernel's UNMOVABLE pageblocks, which the (movable) fill never reached
        assert PARAMS.shrink - MiB <= col(rows, v, "host_returned_bytes") <= PARAMS.shrink
    assert col(rows, "balloon", "memtotal_drop_bytes") == PARAMS.shrink
    assert col(rows, "balloon_doo", "memtotal_drop_bytes") == 0
    assert col(rows, "balloon_doo", "memtotal_min") == col(rows, "balloon_doo", "memtotal_full")


def test_the_balloon_can_take_more_than_virtio_mem_can_unplug(rows):
    # the talk: virtio-mem "cannot unplug as much": the balloon takes any free page, boot memory
    # included, until Out of puff (§1.2); virtio-mem only its own region, only where movable (§5.5)
    balloon = col(rows, "balloon", "removable_max_bytes")
    assert balloon > PARAMS.device_size
    assert balloon == col(rows, "balloon_doo", "removable_max_bytes")
    assert balloon > col(rows, "virtio_mem_movable", "removable_max_bytes") > col(
        rows, "virtio_mem_kernel", "removable_max_bytes")
    # what the balloon leaves: the guest's unreclaimable memory, far below the workload's size
    assert col(rows, "balloon", "memtotal_min") < PARAMS.boot_memory // 2


def test_speed_follows_each_mechanisms_granularity(rows):
    # §1.2: 256 pages (1 MiB) per balloon request, one request each balloon_request_ms (0.5 ms)
    requests = PARAMS.shrink // (VIRTIO_BALLOON_ARRAY_PFNS_MAX * PAGE)
    res = PARAMS.resolution_ms
    for v in ("balloon", "balloon_doo"):
        for key in ("shrink_ms", "grow_ms"):
            assert abs(col(rows, v, key) - requests * 0.5) <= res, (v, key)
    # virtio-mem: whole blocks per request; unplug pays the page migrations, plug the memmap and
    # add_memory of each 128 MiB block (model timings, labkit.devices.virtio_mem_driver.TIMING)
    v = "virtio_mem_movable"
    migrate_ms = col(rows, v, "migrated_bytes") / PAGE * TIMING.migrate_page_us / 1000
    assert migrate_ms <= col(rows, v, "shrink_ms") <= migrate_ms + 2 * res + 8 * TIMING.request_ms
    blocks = PARAMS.device_size // (128 * MiB)
    assert blocks * TIMING.add_memory_ms <= col(rows, v, "grow_ms") <= blocks * (
        TIMING.add_memory_ms + TIMING.request_ms) + res


def test_hot_plugged_memmap_costs_64_bytes_per_4k_page(rows):
    # docs/results.md#firecracker: 64 B of struct page per 4 KiB page, ~1.6 %; taken from ZONE_NORMAL
    # at add_memory, so it is inside MemTotal, where the balloon VM's boot memmap is reserved
    for v in ("virtio_mem_movable", "virtio_mem_kernel"):
        assert col(rows, v, "memmap_bytes") == PARAMS.device_size * STRUCT_PAGE_SIZE // PAGE
        assert col(rows, v, "memmap_share") == pytest.approx(1 / 64)
        # the boot memmap of the balloon VM's second GiB is reserved (out of MemTotal); the
        # device's is allocated. The rest of the difference is memblock's: the virtio-mem VM's
        # swiotlb (maxmem puts a hot-pluggable range in the SRAT: pci_swiotlb_detect) and the
        # smaller dentry/inode hash tables of a 1 GiB boot (alloc_large_system_hash)
        reserved = {name: plan_reservations(q35_layout(size), 1, 1, slabs).permanent_pages() * PAGE
                    for name, size, slabs in (("balloon", PARAMS.full_size, 0),
                                              (v, PARAMS.boot_memory, 32768))}
        boot_memmap = PARAMS.device_size * STRUCT_PAGE_SIZE // PAGE
        assert col(rows, v, "memtotal_full") - col(rows, "balloon", "memtotal_full") == (
            reserved["balloon"] - reserved[v] - boot_memmap + col(rows, v, "memmap_bytes"))
    assert col(rows, "balloon", "memmap_bytes") == 0


def test_reboot_unplugs_all_virtio_mem_memory_and_the_balloon_inflates_again(rows):
    # §5.2: virtio_mem_system_reset discards the whole memdev: size 0, usable region back to
    # requested + 256 MiB (0 when nothing is requested); what unplug could not take comes back
    for v in ("virtio_mem_movable", "virtio_mem_kernel"):
        assert col(rows, v, "reset_size_bytes") == 0
        assert col(rows, v, "reset_usable_bytes") == 0  # requested-size was 0
        assert col(rows, v, "boot_memtotal") == col(rows, "virtio_mem_movable", "memtotal_shrunk")
        assert col(rows, v, "restore_ms") == 0
    stuck = PARAMS.shrink - col(rows, "virtio_mem_kernel", "removed_bytes")
    assert 0 < col(rows, "virtio_mem_kernel", "reset_host_returned_bytes") <= stuck
    # the balloon's target survives the reset (UNCONFIRMED): the guest boots with all its RAM and
    # the new driver inflates again, 1 MiB a request
    for v in ("balloon", "balloon_doo"):
        assert col(rows, v, "boot_memtotal") == col(rows, v, "memtotal_full")
        assert col(rows, v, "restore_ms") == pytest.approx(col(rows, v, "shrink_ms"),
                                                           abs=PARAMS.resolution_ms)


def test_system_reset_with_memory_plugged_returns_it_to_the_host():
    # §5.2: everything unplugged at reset; usable region = requested + 256 MiB (shrinks only here)
    with labkit.open(memory="1G", memhp_default_state="online_movable", balloon=False,
                     virtio_mem=[{"id": "vm0", "size": "2G", "requested_size": "1G"}]) as vm:
        vm.advance(1000)
        h = vm.guest("alloc", size="512M")
        vm.guest("touch", handle=h)
        dev = vm.virtio_mem.devices[0]
        vm.qmp("qom-set", path="vm0", property="requested-size", value=512 * MiB)
        vm.advance(1000)
        assert dev.config.usable_region_size == GiB + VIRTIO_MEM_USABLE_EXTENT  # kept on shrink
        rss = vm.sample()["host_rss"]
        dev.system_reset()
        assert dev.size == 0 and vm.qmp("qom-get", path="vm0", property="size") == 0
        assert dev.requested_size == 512 * MiB
        assert dev.config.usable_region_size == 512 * MiB + VIRTIO_MEM_USABLE_EXTENT
        assert rss - vm.sample()["host_rss"] > 0
        assert vm.events()[-1]["event"] == "MEMORY_DEVICE_SIZE_CHANGE"


def test_shrinking_part_of_the_device_keeps_the_rest_across_reboot():
    params = ResizeParams(boot_memory="1G", device_size="512M", shrink="256M", app="128M",
                          slab="32M", probe_max=False)
    run = run_variant(params, "virtio_mem_movable")
    s = run.summary
    assert s["removed_bytes"] == 256 * MiB and s["reset_size_bytes"] == 0
    assert s["reset_usable_bytes"] == 256 * MiB + VIRTIO_MEM_USABLE_EXTENT
    assert s["reset_host_returned_bytes"] > 0  # the 256 MiB still plugged
    assert s["memtotal_rebooted"] - s["boot_memtotal"] == 256 * MiB  # plugged again on boot
    assert 0 < s["restore_ms"] < 100
    assert len(run) > 3 and run.variant == "virtio_mem_movable"


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"shrink": "5G"}, "shrink must be a multiple of 2 MiB in (0, device_size 4 GiB], got 5 GiB"),
    ({"shrink": "3M"}, "shrink must be a multiple of 2 MiB"),
    ({"device_size": "100M"}, "device_size must be a positive multiple of 128 MiB"),
    ({"boot_memory": "256M"}, "boot_memory must be a multiple of 128 MiB, at least 512 MiB"),
    ({"app": "3G"}, "app + slab (3.2 GiB) must fit in half of the full size (6 GiB)"),
    ({"variants": ("balloon", "ballon")}, "variants ['ballon']: accepted"),
    ({"settle_ms": 0}, "settle_ms must be > 0 ms, got 0"),
    ({"shrink": "lots"}, "shrink 'lots' is not a size"),
])
def test_bad_parameters_are_refused_with_the_value(kwargs, text):
    with pytest.raises(ValueError) as err:
        ResizeParams(**kwargs)
    assert text in str(err.value)
    with pytest.raises(ValueError, match="variant 'x' is not one of"):
        run_variant(PARAMS, "x")
