"""virtio-pmem on the model, each behaviour checked against docs/mechanisms.md §4 (and
§8.10), plus the scenarios of labkit.scenarios.pmem."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import labkit
from labkit.devices.virtio_pmem import (
    STRUCT_PAGE_SIZE,
    THREAD_POOL_MAX_THREADS,
    VIRTIO_PMEM_QUEUE_SIZE,
    VIRTIO_PMEM_REQ_TYPE_FLUSH,
    VIRTIO_PMEM_RESP_FSYNC_FAILED,
    VIRTIO_PMEM_RESP_OK,
)
from labkit.model.host import Host
from labkit.model.hotplug import q35_device_memory_base
from labkit.model.pagecache import FSYNC_LATENCY_MS, host_crash
from labkit.model.pages import PageState
from labkit.scenarios.pmem import (
    DurabilityParams,
    SharedImageParams,
    durability,
    probe_cached,
    shared_image,
)
from tests.helpers import check_invariants

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


def pmem_vm(path, size="1G", memory="1G", **kw):
    spec = {"id": "vpmem0", "path": path, "size": size, **kw.pop("spec", {})}
    return labkit.open(memory=memory, seed=0, model={"boot": "minimal"}, virtio_pmem=[spec], **kw)


# --- options and the backing file ----------------------------------------------------------------
def test_constants_are_the_specs():
    assert VIRTIO_PMEM_QUEUE_SIZE == 128  # hw/virtio/virtio-pmem.c
    assert VIRTIO_PMEM_REQ_TYPE_FLUSH == 0  # include/uapi/linux/virtio_pmem.h
    assert (VIRTIO_PMEM_RESP_OK, VIRTIO_PMEM_RESP_FSYNC_FAILED) == (0, 1)  # worker_cb


def test_missing_file_fails_before_the_vm_exists_and_creates_nothing(tmp_path):
    host = Host(4 * GiB)
    missing = str(tmp_path / "nope.img")
    with pytest.raises(ValueError, match=r"can't open backing store .*nope.img for guest RAM: "
                                         r"No such file or directory"):
        pmem_vm(missing, host=host)
    assert not os.path.exists(missing)
    assert host.vms == [] and host.page_cache is None  # nothing was half-built


def test_file_smaller_than_size_is_qemus_error(image):
    with pytest.raises(ValueError, match=r"mem-vpmem0 backing store size 0x40000000 is too small "
                                         r"for 'size' option 0x80000000 plus 'offset' option 0x0"):
        pmem_vm(image, size="2G")


def test_qcow2_image_is_refused(tmp_path):
    path = tmp_path / "disk.qcow2"
    with open(path, "wb") as f:
        f.write(b"QFI\xfb\x00\x00\x00\x03")
        f.truncate(64 * MiB)
    with pytest.raises(ValueError, match=r"qcow2 image.*qemu-img convert -O raw"):
        pmem_vm(str(path), size="64M")


def test_directory_and_unwritable_files_are_refused(tmp_path, image):
    with pytest.raises(ValueError, match="Is a directory"):
        pmem_vm(str(tmp_path), size="4K")
    if os.geteuid() != 0:  # root may write anything
        os.chmod(image, 0o444)
        with pytest.raises(ValueError, match="Permission denied"):
            pmem_vm(image)


@pytest.mark.parametrize("spec, match", [
    ({"id": "vpmem0", "size": "1G"}, "needs 'path'"),
    ({"id": "vpmem0", "path": "x"}, "needs 'size'"),
    ({"path": "x", "size": "1G"}, "unique 'id'"),
    # QEMU's bool words (qapi_bool_parse: on/off, yes/no, true/false, y/n) are accepted since issue 12
    # D4; anything else is refused with QEMU's text, naming the value
    ({"id": "vpmem0", "path": "x", "size": "1G", "share": "maybe"},
     r"share='maybe': Parameter 'share' expects 'on' or 'off'"),
    ({"id": "vpmem0", "path": "x", "size": "1G", "readonly": True}, r"unknown .* \['readonly'\]"),
    ({"id": "vpmem0", "path": "x", "size": 12345}, "multiple of 4 KiB"),
])
def test_bad_options_name_the_value(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        labkit.open(memory="512M", virtio_pmem=[spec])


def test_ids_must_be_unique_across_virtio_mem_and_pmem(image):
    with pytest.raises(ValueError, match="unique 'id'"):
        labkit.open(memory="1G", virtio_mem=[{"id": "dev0", "size": "1G"}],
                    virtio_pmem=[{"id": "dev0", "path": image, "size": "1G"}])
    with pytest.raises(ValueError, match="unique 'id'"):
        labkit.open(memory="1G", virtio_pmem=[{"id": "a", "path": image, "size": "4M"}] * 2)


# --- config, guest side, QMP ---------------------------------------------------------------------
def test_region_is_outside_memtotal_and_its_memmap_costs_64_bytes_a_page(image):
    plain = labkit.open(memory="1G", seed=0, model={"boot": "minimal"})
    vm = pmem_vm(image)
    assert vm.meminfo()["MemTotal"] == plain.meminfo()["MemTotal"]  # not System RAM
    assert vm.mem.n_pages == plain.mem.n_pages  # not in the guest's page arrays either
    memmap = GiB // PAGE * STRUCT_PAGE_SIZE  # devm_memremap_pages: 16 MiB for 1 GiB
    assert vm.guest("pmem_devices")[0]["memmap_bytes"] == memmap == vm.sample()["pmem_memmap"]
    assert (plain.meminfo()["MemFree"] - vm.meminfo()["MemFree"]) * 1024 == memmap
    dev = vm.virtio_pmem.devices[0]
    assert dev.config.start == q35_device_memory_base(GiB) and dev.config.size == GiB
    assert dev.features == 0  # VIRTIO_PMEM_F_SHMEM_REGION is not offered
    assert vm.guest("pmem_devices")[0]["sync"] is False  # ND_REGION_ASYNC


def test_query_memory_devices_and_info_memory_devices(image):
    vm = pmem_vm(image)
    assert vm.qmp("query-memory-devices") == [{"type": "virtio-pmem", "data": {
        "memaddr": q35_device_memory_base(GiB), "size": GiB, "memdev": "/objects/mem-vpmem0",
        "id": "vpmem0"}}]
    text = vm.qmp("human-monitor-command", **{"command-line": "info memory-devices"})
    assert text.splitlines() == ['Memory device [virtio-pmem]: "vpmem0"',
                                 f"  memaddr: 0x{q35_device_memory_base(GiB):x}",
                                 f"  size: {GiB}", "  memdev: /objects/mem-vpmem0"]
    assert vm.qmp("qom-get", path="vpmem0", property="memdev") == "/objects/mem-vpmem0"
    assert vm.qmp("qom-get", path="/objects/mem-vpmem0", property="share") is True


def test_virtio_mem_entries_stay_and_pmem_goes_after_its_region(image):
    vm = labkit.open(memory="1G", seed=0, memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "2G"}],
                     virtio_pmem=[{"id": "vpmem0", "path": image, "size": "1G"}])
    devices = vm.qmp("query-memory-devices")
    assert [d["type"] for d in devices] == ["virtio-mem", "virtio-pmem"]
    vmem, pmem = devices[0]["data"], devices[1]["data"]
    assert pmem["memaddr"] >= vmem["memaddr"] + vmem["max-size"]
    text = vm.qmp("human-monitor-command", **{"command-line": "info memory-devices"})
    assert "[virtio-mem]" in text and "[virtio-pmem]" in text


def test_dax_reads_fill_the_host_page_cache_not_the_guests(image):
    vm = pmem_vm(image)
    cached, free = vm.meminfo()["Cached"], vm.meminfo()["MemFree"]
    r = vm.guest("pmem_read", device="vpmem0", size="256M")
    assert r["disk_reads"] == 65536 and r["guest_page_cache_pages"] == 0
    assert vm.meminfo()["Cached"] == cached and vm.meminfo()["MemFree"] == free
    assert vm.sample()["host_page_cache"] == 256 * MiB
    assert vm.guest("pmem_read", device="vpmem0", size="256M")["host_cache_hits"] == 65536
    check_invariants(vm.mem)


def test_two_vms_share_one_host_copy_and_see_each_others_pages(image):
    host = Host(8 * GiB)
    a = pmem_vm(image, host=host, vm_name="a")
    b = pmem_vm(image, host=host, vm_name="b")
    a.guest("pmem_read", device="vpmem0", offset=5 * MiB, size="1M")
    times = probe_cached(b, chunks=8)
    assert list(np.flatnonzero(times < times.max() / 4)) == [5]  # the side channel
    assert host.page_cache.cached_pages == 8 * 256  # one copy for both
    b.guest("pmem_write", device="vpmem0", offset=0, size="4M")
    assert a.guest("pmem_read", device="vpmem0", size="4M")["host_cache_hits"] == 1024


def test_flush_is_one_request_answered_after_fsync(image):
    vm = pmem_vm(image)
    vm.guest("pmem_write", device="vpmem0", size="64M")
    assert vm.sample()["host_page_cache_dirty"] == 64 * MiB
    t0 = vm.now_ms
    r = vm.guest("pmem_flush", device="vpmem0")
    cost = FSYNC_LATENCY_MS + 64 * MiB * 1000 / vm.host.page_cache.disk_write_bytes_per_s
    assert r["ret"] == 0 and r["elapsed_ms"] == pytest.approx(cost) == vm.now_ms - t0
    assert r["written_bytes"] == 64 * MiB and vm.sample()["host_page_cache_dirty"] == 0
    dev = vm.virtio_pmem.devices[0]
    assert dev.requests == 1 and dev.responses == {0: 1, 1: 0} and dev.in_flight == 0


def test_at_most_128_requests_in_flight_the_rest_wait(image):
    vm = pmem_vm(image)
    vm.guest("pmem_write", device="vpmem0", size="4M")
    r = vm.guest("pmem_flush", device="vpmem0", requests=300)
    assert r["ret"] == 0 and r["eio"] == 0
    assert r["max_in_flight"] == VIRTIO_PMEM_QUEUE_SIZE  # the ring; the others sleep on req_list
    dev = vm.virtio_pmem.devices[0]
    assert dev.requests == 300 and dev.in_flight == 0 and THREAD_POOL_MAX_THREADS == 64


def test_fsync_failure_reaches_the_guest_as_eio_and_the_data_is_lost(image):
    host = Host(4 * GiB)
    vm = pmem_vm(image, host=host)
    vm.guest("pmem_write", device="vpmem0", size="8M")
    vm.virtio_pmem.inject_fsync_error("vpmem0")
    r = vm.guest("pmem_flush", device="vpmem0")
    assert r["ret"] == -errno.EIO and r["error"] == "EIO"  # QEMU answered 1; nonzero -> -EIO
    assert vm.virtio_pmem.devices[0].responses[VIRTIO_PMEM_RESP_FSYNC_FAILED] == 1
    assert vm.guest("pmem_flush", device="vpmem0")["ret"] == 0  # reported once
    lost = host_crash(host, [vm])
    assert lost[os.path.realpath(image)] == 2048


def test_share_off_writes_private_copies_that_never_reach_the_file(image):
    vm = pmem_vm(image, spec={"share": False})
    free = vm.sample()["host_free"]
    w = vm.guest("pmem_write", device="vpmem0", size="16M")
    assert w["private_pages"] == 4096 and w["dirty_pages"] == 0
    # the page cache copy (read before the copy-on-write) and the private copy both cost the host
    assert free - vm.sample()["host_free"] == 32 * MiB
    r = vm.guest("pmem_flush", device="vpmem0")
    assert r["ret"] == 0 and r["written_bytes"] == 0  # fsync "succeeds": nothing was in the file
    assert vm.guest("pmem_read", device="vpmem0", size="16M")["private_pages"] == 4096


def test_map_sync_is_refused(image):
    vm = pmem_vm(image)
    assert vm.guest("pmem_mmap", device="vpmem0", map_sync=True)["ret"] == -errno.EOPNOTSUPP
    assert vm.guest("pmem_mmap", device="vpmem0")["ret"] == 0


def test_no_hot_unplug_and_no_migration(image):
    vm = pmem_vm(image)
    with pytest.raises(labkit.QMPError, match="this virtio based memory devices cannot be unplugged"):
        vm.qmp("device_del", id="vpmem0")
    assert vm.qmp("query-memory-devices")[0]["data"]["id"] == "vpmem0"  # still there
    with pytest.raises(labkit.QMPError, match="virtio-pmem device 'vpmem0' cannot be migrated"):
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
    assert vm.qmp("query-migrate").get("status") in (None, "none")
    plain = labkit.open(memory="256M", seed=0)
    assert plain.qmp("migrate", uri="tcp:127.0.0.1:4444") == {}  # the blocker is pmem's alone


def test_hot_plug_with_object_add_and_device_add(image, tmp_path):
    vm = labkit.open(memory="1G", seed=0, model={"boot": "minimal"})
    assert vm.qmp("query-memory-devices") == []
    free = vm.meminfo()["MemFree"]
    vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "mem1", "mem-path": image,
                            "size": 512 * MiB, "share": True})
    vm.qmp("device_add", driver="virtio-pmem-pci", memdev="mem1", id="pmem1")
    assert vm.qmp("query-memory-devices")[0]["data"]["memdev"] == "/objects/mem1"
    assert (free - vm.meminfo()["MemFree"]) * 1024 == 512 * MiB // 64  # the driver probed
    with pytest.raises(labkit.QMPError, match="can't use already busy memdev: mem1"):
        vm.qmp("device_add", driver="virtio-pmem-pci", memdev="mem1", id="pmem2")
    with pytest.raises(labkit.QMPError, match="Device 'mem9' not found"):
        vm.qmp("device_add", driver="virtio-pmem-pci", memdev="mem9", id="pmem2")
    with pytest.raises(labkit.QMPError, match="No such file"):
        vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "mem2",
                                "mem-path": str(tmp_path / "none.img"), "size": MiB})
    assert vm.guest("pmem_write", device="pmem1", size="1M")["dirty_pages"] == 256


def test_ops_on_a_device_that_was_never_attached_change_nothing(image):
    vm = pmem_vm(image)
    before = vm.sample()
    for op in ("pmem_flush", "pmem_read", "pmem_write"):
        with pytest.raises(ValueError, match=r"no virtio-pmem device 'vpmem9'.*\['vpmem0'\]"):
            vm.guest(op, device="vpmem9")
    with pytest.raises(ValueError, match="outside vpmem0's region"):
        vm.guest("pmem_write", device="vpmem0", offset=GiB - PAGE, size="8K")
    with pytest.raises(ValueError, match="requests must be an int"):
        vm.guest("pmem_flush", device="vpmem0", requests=0)
    assert vm.sample() == before
    assert vm.mem.count(PageState.FILE_DIRTY) == 0


# --- scenarios -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport, copies", [("blk-writeback", 4), ("blk-none", 3), ("pmem", 1)])
def test_n_vms_from_one_image_copies(transport, copies):
    run = shared_image(SharedImageParams(n_vms=3, transport=transport, boot_read="256M"))
    s = run.summary
    assert s["copies"] == copies  # N + 1, N, 1
    assert s["host_copy"] == (0 if transport == "blk-none" else 256 * MiB)
    assert s["guest_copies"] == (0 if transport == "pmem" else 3 * 256 * MiB)
    assert s["memmap"] == (3 * 2 * GiB // 64 if transport == "pmem" else 0)
    assert run.series["vms"].tolist() == [1.0, 2.0, 3.0]


def test_pmem_saves_host_memory_for_many_vms():
    blk = shared_image(SharedImageParams(n_vms=4, transport="blk-writeback"))
    pmem = shared_image(SharedImageParams(n_vms=4, transport="pmem"))
    saved = blk.summary["host_used"] - pmem.summary["host_used"]
    # four guest copies of 512 MiB, less the pmem struct pages (4 x 32 MiB)
    assert saved == pytest.approx(4 * 512 * MiB - 4 * 32 * MiB, abs=8 * MiB)
    assert pmem.summary["second_read_ms"] < blk.summary["first_read_ms"] / 4  # host cache hits


@pytest.mark.parametrize("transport, flush, after, lost_mib", [
    ("pmem", False, 1, 64), ("pmem", True, 1, 0), ("pmem", False, 40, 0),
    ("blk-writeback", False, 40, 64), ("blk-writeback", False, 70, 0), ("blk-writeback", True, 1, 0),
    ("blk-none", False, 1, 64), ("blk-none", False, 40, 0),
])
def test_durability_follows_the_writeback_timers(transport, flush, after, lost_mib):
    run = durability(DurabilityParams(transport=transport, flush=flush, crash_after_s=after))
    assert run.summary["lost"] == lost_mib * MiB
    assert run.summary["durable"] == (64 - lost_mib) * MiB
    at_risk = run.series["at_risk"]
    assert at_risk[0] == (0 if flush else 64 * MiB)
    assert (np.diff(at_risk) <= 0).all() or transport == "blk-writeback"


def test_durability_with_a_failing_disk():
    run = durability(DurabilityParams(transport="pmem", flush=True, fsync_error=True))
    assert run.summary["flush_ret"] == -errno.EIO and run.summary["lost"] == 64 * MiB


def test_a_region_whose_struct_pages_would_starve_the_guest_is_refused(tmp_path):
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(8 * GiB)  # 128 MiB of struct pages
    with pytest.raises(ValueError, match=r"128 MiB of struct pages .* more than 1/4 of the guest's 256 MiB"):
        labkit.open(memory="256M", virtio_pmem=[{"id": "p", "path": str(path), "size": "8G"}])
    vm = labkit.open(memory="256M", seed=0)
    vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "m", "mem-path": str(path),
                            "size": 8 * GiB})
    with pytest.raises(labkit.QMPError, match="cannot hold 128 MiB of struct pages"):
        vm.qmp("device_add", driver="virtio-pmem-pci", memdev="m", id="p")
    assert vm.qmp("query-memory-devices") == []


def test_guest_sync_also_flushes_the_pmem_region(image):
    # sync(2) -> sync_fs of the DAX filesystem -> REQ_PREFLUSH bio -> async_pmem_flush (§4.2)
    vm = pmem_vm(image)
    vm.guest("pmem_write", device="vpmem0", size="4M")
    t0 = vm.now_ms
    vm.guest("sync")
    assert vm.sample()["host_page_cache_dirty"] == 0 and vm.now_ms > t0
    assert vm.virtio_pmem.devices[0].requests == 1
