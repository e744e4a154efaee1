"""virtio-mem on the model, each behaviour checked against docs/mechanisms.md §5."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.devices.virtio_mem import (
    VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
    VIRTIO_MEM_MIN_BLOCK_SIZE,
    VIRTIO_MEM_USABLE_EXTENT,
    BlockState,
    Request,
    Response,
)
from labkit.devices.virtio_mem_driver import (
    VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD,
    VIRTIO_MEM_RETRY_TIMER_MAX_MS,
    VIRTIO_MEM_RETRY_TIMER_MIN_MS,
    SbmState,
)
from labkit.model.hotplug import MEMMAP_PAGES_PER_BLOCK
from labkit.model.pages import PAGES_PER_MEMORY_BLOCK, PageState
from tests.helpers import check_invariants, free_kb

MiB, GiB = 1 << 20, 1 << 30


def open_vm(memory="2G", size="4G", state="online_movable", **kw):
    spec = {"id": "vm0", "size": size, "requested_size": kw.pop("requested_size", 0)}
    spec.update(kw.pop("spec", {}))
    return labkit.open(memory=memory, seed=0, memhp_default_state=state, virtio_mem=[spec], **kw)


def resize(vm, value, ms=2000, path="vm0"):
    vm.qmp("qom-set", path=path, property="requested-size", value=value)
    vm.advance(ms)
    return vm.qmp("qom-get", path=path, property="size")


def test_constants():
    # §5.2: minimum block 1 MiB, default 2 MiB on x86-64, usable extent 256 MiB; §5.6 / §5.3
    assert VIRTIO_MEM_MIN_BLOCK_SIZE == 1 * MiB and VIRTIO_MEM_DEFAULT_BLOCK_SIZE == 2 * MiB
    assert VIRTIO_MEM_USABLE_EXTENT == 256 * MiB
    assert (VIRTIO_MEM_RETRY_TIMER_MIN_MS, VIRTIO_MEM_RETRY_TIMER_MAX_MS) == (50_000, 300_000)
    assert VIRTIO_MEM_DEFAULT_OFFLINE_THRESHOLD == GiB
    assert MEMMAP_PAGES_PER_BLOCK * 4096 == 2 * MiB  # 64 B of memmap per 4 KiB page


def test_sbm_has_64_subblocks_of_2mib_per_memory_block_and_bbm_at_128mib_blocks():
    # §5.3: SBM when the subblock is smaller than the 128 MiB memory block, BBM otherwise
    with open_vm() as vm:
        drv = vm.virtio_mem.drivers[0]
        assert not drv.bbm and drv.sb_size == 2 * MiB and drv.units_per_mb == 64
    with open_vm(spec={"block_size": "128M"}) as vm:
        assert vm.virtio_mem.drivers[0].bbm
        assert resize(vm, 512 * MiB) == 512 * MiB


def test_usable_region_grows_with_requests_and_shrinks_only_on_unplug_all():
    # §5.2: usable = ALIGN_UP(min(region, requested + 256 MiB), block); 0 when nothing requested
    with open_vm(state="offline") as vm:
        dev = vm.virtio_mem.devices[0]
        assert dev.config.usable_region_size == 0
        vm.qmp("qom-set", path="vm0", property="requested-size", value=GiB)
        assert dev.config.usable_region_size == GiB + 256 * MiB
        vm.qmp("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        assert dev.config.usable_region_size == GiB + 256 * MiB  # never shrinks on a request
        vm.qmp("qom-set", path="vm0", property="requested-size", value=4 * GiB)
        assert dev.config.usable_region_size == 4 * GiB  # capped at the region


def test_device_requests_answer_like_qemu():
    # §5.1/§5.2: ERROR (alignment, outside usable, wrong state), NACK (beyond requested), BUSY
    with open_vm(state="offline") as vm:
        dev = vm.virtio_mem.devices[0]
        base = dev.config.addr
        vm.qmp("qom-set", path="vm0", property="requested-size", value=4 * MiB)
        vm.advance(100)
        assert dev.size == 4 * MiB
        assert dev.request(Request.PLUG, base + 4096, 1)[0] == Response.ERROR  # unaligned
        assert dev.request(Request.PLUG, base + 300 * MiB, 1)[0] == Response.ERROR  # not usable
        assert dev.request(Request.PLUG, base + 8 * MiB, 1)[0] == Response.NACK  # > requested
        assert dev.request(Request.UNPLUG, base + 8 * MiB, 1)[0] == Response.ERROR  # not plugged
        assert dev.request(Request.STATE, base, 2) == (Response.ACK, BlockState.PLUGGED)
        assert dev.request(Request.STATE, base, 3) == (Response.ACK, BlockState.MIXED)
        assert dev.request(Request.STATE, base + 4 * MiB, 3) == (Response.ACK, BlockState.UNPLUGGED)
        dev._busy = lambda: True  # a migration is running: virtio_mem_is_busy()
        assert dev.request(Request.UNPLUG, base, 1)[0] == Response.BUSY
        assert dev.size == 4 * MiB


@pytest.mark.parametrize(("prop", "value", "text"), [
    ("requested-size", 3 * MiB, "'requested-size' has to be multiples of 'block-size' (0x200000)"),
    ("requested-size", 8 * GiB, "'requested-size' cannot exceed the memory backend size"
                                "(0x100000000)"),
    # qapi/qobject-input-visitor.c qobject_input_type_uint64 takes a negative number modulo 2^64
    # ("for backward compatibility"): -2 MiB is a block multiple beyond the backend
    ("requested-size", -2 * MiB, "'requested-size' cannot exceed the memory backend size(0x100000000)"),
    ("requested-size", "2M", "Parameter 'requested-size' expects uint64"),  # no JSON number
    ("block-size", 4 * MiB, "'block-size' cannot be changed"),
    # qom/object.c: size is virtio-mem-pci's alias of the virtio-mem device's property, so QEMU 7.2
    # names virtio-mem (qemu-system-x86_64 7.2: "Property 'virtio-mem.size' is not writable")
    ("size", 2 * MiB, "Property 'virtio-mem.size' is not writable"),
])
def test_qom_set_errors_are_qemus_and_change_nothing(prop, value, text):
    with open_vm() as vm:
        with pytest.raises(labkit.QMPError) as err:
            vm.qmp("qom-set", path="vm0", property=prop, value=value)
        assert err.value.desc == text
        assert vm.virtio_mem.devices[0].requested_size == 0


@pytest.mark.parametrize(("spec", "text"), [
    ({"block_size": "3M"}, "'block-size' property has to be a power of two"),
    ({"block_size": "512K"}, "'block-size' property has to be at least 0x100000"),
    ({"requested_size": "3M"}, "'requested-size' property has to be multiples of 'block-size'"),
    ({"node": 1}, "'node' property has value '1', which exceedsthe number of numa nodes: 1"),
    ({"sizee": "1G"}, "unknown virtio_mem[0] option(s) ['sizee']"),
])
def test_bad_device_options_are_refused(spec, text):
    with pytest.raises((ValueError, TypeError)) as err:
        labkit.open(memory="1G", virtio_mem=[{"id": "vm0", "size": "4G", **spec}])
    assert text in str(err.value)


def test_plug_online_movable_grows_memtotal_and_pays_memmap_in_zone_normal():
    # §5.4 + Firecracker's figure: hot-plugged memory costs 64 B of struct page per 4 KiB page
    with open_vm() as vm:
        before = vm.meminfo()
        kernel_before = vm.mem.count(PageState.KERNEL)
        assert resize(vm, GiB) == GiB
        after = vm.meminfo()
        assert after["MemTotal"] - before["MemTotal"] == GiB // 1024
        assert vm.mem.count(PageState.KERNEL) - kernel_before == 8 * MEMMAP_PAGES_PER_BLOCK
        zones = {b["zone"] for b in vm.guest("memory_blocks")}
        assert zones == {"Movable"}
        assert vm.qmp("query-memory-devices")[0]["data"]["size"] == GiB
        check_invariants(vm.mem)


def test_plug_without_auto_online_stalls_at_one_gib_offline_until_onlined():
    # §5.3/§8.7: offline_threshold 1 GiB; -ENOSPC, no retry timer; MEM_ONLINE re-triggers
    with open_vm(state="offline") as vm:
        size = resize(vm, 3 * GiB, ms=60_000)
        assert size == GiB
        drv = vm.virtio_mem.drivers[0]
        assert drv.history[-1][2] == -28  # -ENOSPC
        assert drv._retry_timer is None
        # added-but-offline memory is not in MemTotal; its memmap is ordinary kernel memory. (The
        # same guest without the device: QEMU's SRAT lists a hot-pluggable range once maxmem is
        # set, so the guest has a swiotlb bounce buffer (pci_swiotlb_detect); force one here.)
        plain = labkit.open(memory="2G", seed=0, cmdline={"swiotlb": "force"})
        assert vm.meminfo()["MemTotal"] == plain.meminfo()["MemTotal"]
        # free pages (MemFree and the per-CPU lists, where the first ones came from)
        assert free_kb(plain) - free_kb(vm) == 8 * MEMMAP_PAGES_PER_BLOCK * 4
        onlined = vm.guest("online_memory", block="all", zone="movable")
        assert onlined == 8
        vm.advance(2000)
        assert vm.qmp("qom-get", path="vm0", property="size") == 2 * GiB


def test_unplug_from_zone_movable_migrates_pages_and_succeeds():
    # §5.5: ZONE_MOVABLE holds only movable pages: unplug is reliable
    with open_vm() as vm:
        resize(vm, 2 * GiB)
        h = vm.guest("alloc", size="1G")  # movable allocations prefer ZONE_MOVABLE
        zone_of = vm.mem.zone_index_of(vm.kernel.handles[h].pages)
        movable = next(i for i, z in enumerate(vm.mem.zones) if z.movable)
        assert (zone_of == movable).mean() > 0.9
        assert resize(vm, 0, ms=5000) == 0
        assert vm.meminfo()["AnonPages"] >= 1 << 20  # the process still has its memory
        assert vm.kernel.hotplug.migrated_pages >= 200_000
        assert vm.guest("memory_blocks") == [] or all(
            b["state"] == "unused" for b in vm.guest("memory_blocks"))
        check_invariants(vm.mem)


def test_unplug_from_zone_normal_fails_on_kernel_pages_and_backs_off_50s_to_300s():
    # §5.5: kernel pages in ZONE_NORMAL hot-plugged memory make alloc_contig_range -EBUSY;
    # §5.6: the retry timer starts at 50 s and doubles up to 300 s
    with open_vm(memory="1G", state="online_kernel") as vm:
        resize(vm, 2 * GiB)
        big = vm.guest("alloc", size="2400M")  # fills boot memory, then the hot-plugged blocks
        vm.guest("free", handle=big)  # freed pages go to the head of the free lists...
        vm.guest("alloc", size="64M", kind="slab")  # ...where the kernel's slab finds them
        assert resize(vm, 0, ms=1000) > 0  # some subblocks are pinned by kernel pages
        drv = vm.virtio_mem.drivers[0]
        assert drv.history[-1][2] == -16  # -EBUSY
        vm.advance(1_000_000)
        retries = [t for t, what, rc in drv.history if what == "unplug"]
        gaps = np.diff(retries) / 1000
        assert list(np.round(gaps[:5])) == [50, 100, 200, 300, 300]
        assert vm.qmp("qom-get", path="vm0", property="size") > 0
        check_invariants(vm.mem)


def test_unplug_order_takes_offline_blocks_first_and_the_highest_block_first():
    # §5.5: OFFLINE_PARTIAL, OFFLINE, ... ; highest memory block first
    with open_vm(state="offline") as vm:
        resize(vm, 512 * MiB)
        vm.guest("online_memory", block=vm.virtio_mem.drivers[0].first_mb, zone="movable")
        resize(vm, 256 * MiB)
        states = {b["block"]: b["state"] for b in vm.guest("memory_blocks")}
        first = vm.virtio_mem.drivers[0].first_mb
        assert states[first] == "movable"  # the online block was kept
        assert states[first + 1] == "offline"
        assert states[first + 3] == "unused" and states[first + 2] == "unused"


def test_requested_size_above_the_memdev_is_accepted_at_start_and_refused_by_qom_set():
    # QEMU hw/virtio/virtio-mem.c: virtio_mem_device_realize checks only the alignment of
    # requested-size; the usable region min(memdev, requested + 256 MiB) stops the guest at the
    # memdev. virtio_mem_set_requested_size (qom-set on a realized device) refuses it.
    with open_vm(size="1G", requested_size=2 * GiB) as vm:
        vm.advance(2000)
        assert vm.qmp("qom-get", path="vm0", property="requested-size") == 2 * GiB
        assert vm.qmp("qom-get", path="vm0", property="size") == GiB
        with pytest.raises(labkit.QMPError, match=r"cannot exceed the memory backend size\(0x40000000\)"):
            vm.qmp("qom-set", path="vm0", property="requested-size", value=3 * GiB)


def test_a_config_change_mid_run_restarts_it_with_the_new_target():
    # drivers/virtio/virtio_mem.c: virtio_mem_send_plug_request returns -EAGAIN when
    # vm->config_changed is set; virtio_mem_run_wq then "goto retry"s with the new requested size
    with open_vm() as vm:
        vm.qmp("qom-set", path="vm0", property="requested-size", value=2 * GiB)
        vm.advance(5)  # the run is plugging block by block (each add_memory takes model time)
        drv = vm.virtio_mem.drivers[0]
        assert 0 < drv.plugged_size < 2 * GiB
        vm.qmp("qom-set", path="vm0", property="requested-size", value=256 * MiB)
        vm.advance(2000)
        assert drv.eagain_restarts >= 1
        assert vm.qmp("qom-get", path="vm0", property="size") == 256 * MiB
        assert [rc for _, what, rc in drv.history if what == "plug"][-1] == -11  # -EAGAIN


def test_each_run_cancels_the_retry_timer():
    # virtio_mem_run_wq starts with hrtimer_cancel(&vm->retry_timer): a run queued by a config
    # change drops the pending retry; a failure arms it anew at the current delay
    with open_vm() as vm:
        dev = vm.virtio_mem.devices[0]
        dev._busy = lambda: True
        resize(vm, GiB, ms=1000)
        drv = vm.virtio_mem.drivers[0]
        assert drv._retry_timer is not None and drv._retry_timer.is_alive
        first = drv._retry_timer
        resize(vm, GiB, ms=1000)  # a config change: the run cancels the timer, fails, re-arms
        assert not first.is_alive and drv._retry_timer is not first
        runs = [t for t, what, _ in drv.history if what == "plug"]
        vm.advance(runs[-1] + VIRTIO_MEM_RETRY_TIMER_MIN_MS - 100 - vm.now_ms)
        assert len([t for t, what, _ in drv.history if what == "plug"]) == len(runs)  # not early
        vm.advance(200)  # 50 s after the last failed run, not after the first
        assert len([t for t, what, _ in drv.history if what == "plug"]) == len(runs) + 1


def test_busy_while_migrating_is_retried_on_the_timer():
    with open_vm() as vm:
        dev = vm.virtio_mem.devices[0]
        dev._busy = lambda: True
        resize(vm, GiB, ms=1000)
        assert dev.size == 0 and vm.virtio_mem.drivers[0].history[-1][2] == -26  # -ETXTBSY
        dev._busy = lambda: False
        vm.advance(VIRTIO_MEM_RETRY_TIMER_MIN_MS + 1000)
        assert dev.size == GiB


def test_auto_movable_keeps_movable_within_301_percent_of_kernel_memory():
    # §5.7: online_policy=auto-movable, auto_movable_ratio 301: mm/memory_hotplug.c
    # auto_movable_can_online_movable counts the *early* (boot-time present) kernel pages, and the
    # group's own kernel blocks, against every MOVABLE page (present pages, not managed)
    with labkit.open(memory="1G", memhp_default_state="online",
                     cmdline={"memory_hotplug.online_policy": "auto-movable"},
                     virtio_mem=[{"id": "vm0", "size": "8G"}]) as vm:
        resize(vm, 6 * GiB, ms=5000)
        zones = [b["zone"] for b in vm.guest("memory_blocks")]
        assert "Movable" in zones and "Normal" in zones
        assert zones.index("Normal") > zones.index("Movable")
        block = PAGES_PER_MEMORY_BLOCK
        early = sum(z.end - z.start for z in vm.mem.zones[:vm.mem.n_boot_zones]) - 98  # e820 holes
        movable = zones.count("Movable") * block
        kernel_hot = zones.count("Normal") * block
        assert movable * 100 <= 301 * (early + kernel_hot)
        # the first block onlined to ZONE_NORMAL is the one that would have broken the ratio
        first_normal = zones.index("Normal")
        assert (first_normal + 1) * block * 100 > 301 * early


def test_two_devices_on_two_nodes():
    with labkit.open(memory="2G", numa_nodes=2, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "2G", "node": 0},
                                 {"id": "vm1", "size": "2G", "node": 1}]) as vm:
        resize(vm, GiB, path="vm0")
        resize(vm, 512 * MiB, path="vm1")
        devices = vm.qmp("query-memory-devices")
        assert [(d["data"]["node"], d["data"]["size"]) for d in devices] == [(0, GiB), (1, 512 * MiB)]
        nodes = {z.node for z in vm.mem.zones if z.movable}
        assert nodes == {0, 1}
        h = vm.guest("alloc", size="256M", node=1)
        pages = vm.kernel.handles[h].pages
        assert {vm.mem.zones[z].node for z in np.unique(vm.mem.zone_index_of(pages))} == {1}
        check_invariants(vm.mem)


def test_size_change_events_at_most_one_per_second_per_device():
    # §5.2: MEMORY_DEVICE_SIZE_CHANGE {id, size, qom-path}, throttled 1/s per qom-path
    with open_vm() as vm:
        resize(vm, 2 * GiB, ms=5000)
        events = [e for e in vm.events() if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]
        assert 1 <= len(events) <= 2
        assert events[-1]["data"] == {"id": "vm0", "size": 2 * GiB,
                                      "qom-path": "/machine/peripheral/vm0"}


def test_info_memory_devices_text():
    with open_vm() as vm:
        resize(vm, 128 * MiB)
        text = vm.qmp("human-monitor-command", **{"command-line": "info memory-devices"})
        assert text.splitlines()[0] == 'Memory device [virtio-mem]: "vm0"'
        assert "  size: 134217728" in text and "  block-size: 2097152" in text


def test_plugged_size_stays_a_multiple_of_the_block_size_within_requested():
    # docs/architecture.md invariant, through a series of resizes
    with open_vm(state="online_kernel") as vm:
        dev = vm.virtio_mem.devices[0]
        for target in (300, 0, 1000, 64, 2048, 130):
            vm.qmp("qom-set", path="vm0", property="requested-size", value=target * MiB)
            for _ in range(5):
                vm.advance(20)
                assert dev.size % dev.block_size == 0
                assert dev.size <= max(dev.requested_size, dev.size if target * MiB < dev.size
                                       else dev.requested_size)
                assert dev.size <= dev.config.usable_region_size
            check_invariants(vm.mem)
        assert SbmState.UNUSED == 0 and PAGES_PER_MEMORY_BLOCK == 32768


def test_plug_during_a_live_migration_is_busy_then_retried():
    # §5.2: every plug and unplug returns BUSY while a migration runs; §5.6: -ETXTBSY arms the timer
    with open_vm() as vm:
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # a slow link: long migration
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance(50)
        assert vm.qmp("query-migrate")["status"] == "active"
        assert resize(vm, 512 * MiB, ms=500) == 0
        assert vm.virtio_mem.drivers[0].history[-1][2] == -26  # -ETXTBSY: device BUSY
        vm.qmp("migrate_cancel")
        vm.advance(VIRTIO_MEM_RETRY_TIMER_MIN_MS + 1000)
        assert vm.qmp("qom-get", path="vm0", property="size") == 512 * MiB
