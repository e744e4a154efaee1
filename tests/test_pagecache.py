"""The guest page cache (writeback, reclaim, drop_caches), the host page cache, and virtio-blk's
double caching. Each test names the fact it checks (mm/page-writeback.c, fs/fs-writeback.c, QEMU's
-drive cache modes)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import labkit
from labkit.devices.virtio_blk import CACHE_MODES, add_disk
from labkit.model.host import Host
from labkit.model.pagecache import (
    DIRTY_EXPIRE_CENTISECS,
    DIRTY_WRITEBACK_CENTISECS,
    FilePage,
    host_crash,
    host_page_cache,
)
from labkit.model.pages import PageFlag, PageState
from tests.helpers import check_invariants, pcp_kb

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


def small_vm(**kw):
    kw.setdefault("memory", "1G")
    kw.setdefault("model", {"boot": "minimal"})
    return labkit.open(seed=0, **kw)


# --- guest writeback -----------------------------------------------------------------------------
def test_defaults_are_the_kernels():
    # mm/page-writeback.c: dirty_writeback_interval = 5 * 100, dirty_expire_interval = 30 * 100
    assert (DIRTY_WRITEBACK_CENTISECS, DIRTY_EXPIRE_CENTISECS) == (500, 3000)
    vm = small_vm()
    assert vm.guest("sysctl", name="vm.dirty_writeback_centisecs") == 500
    assert vm.guest("sysctl", name="vm.dirty_expire_centisecs") == 3000
    assert vm.guest("sysctl", name="vm.dirty_background_ratio") == 10


def test_dirty_file_is_written_back_after_expire_by_the_periodic_flusher():
    vm = small_vm()
    vm.advance(1200)  # dirtied at t = 1.2 s, off the flusher's 5 s grid
    vm.guest("alloc", size="16M", kind="file", dirty=True)
    vm.advance(30_000 - 1)  # 30 s have not passed since it was dirtied: nothing written
    assert vm.meminfo()["Dirty"] == 16 * 1024
    assert vm.kernel.vmstat.pgwriteback == 0
    vm.advance(5_000 + 2)  # the first flusher run at least 30 s later writes it all
    assert vm.meminfo()["Dirty"] == 0
    assert vm.kernel.vmstat.pgwriteback == 16 * MiB // PAGE
    wb = vm.virtio_pmem.writeback
    t, reason, pages = wb.history[-1]
    assert reason == "kupdate" and pages == 4096
    assert 31_200 <= t <= 36_200 and t % 5000 == 1200  # on the 5 s grid that started at the write
    assert not wb.armed  # nothing dirty left: the flusher sleeps until the next dirtying
    check_invariants(vm.mem)


def test_the_flusher_sleeps_while_nothing_is_dirty():
    # wb_wakeup_delayed arms it on the first dirtying; wb_workfn re-arms only while dirty IO remains
    vm = small_vm()
    wb = vm.virtio_pmem.writeback
    vm.advance(60_000)
    assert not wb.armed and wb.runs == 0
    vm.guest("alloc", size="4M", kind="file", dirty=True)
    assert wb.armed
    vm.advance(60_000)
    assert not wb.armed and wb.runs == 6  # woke at 5, 10, ... 30 s, wrote at 30 s, went to sleep


def test_rewrite_with_touch_dirties_again_and_is_written_back():
    vm = small_vm()
    h = vm.guest("alloc", size="8M", kind="file")  # read: clean
    assert vm.meminfo()["Dirty"] == 0
    vm.guest("touch", handle=h)  # write: dirty, flusher armed
    assert vm.meminfo()["Dirty"] == 8 * 1024 and vm.virtio_pmem.writeback.armed
    vm.advance(36_000)
    assert vm.meminfo()["Dirty"] == 0


def test_dirty_expire_sysctl_shortens_the_window():
    vm = small_vm()
    vm.guest("sysctl", name="vm.dirty_expire_centisecs", value=500)
    vm.guest("alloc", size="8M", kind="file", dirty=True)
    vm.advance(10_001)
    assert vm.meminfo()["Dirty"] == 0


def test_dirty_writeback_centisecs_zero_disables_periodic_writeback():
    vm = small_vm()
    vm.guest("sysctl", name="vm.dirty_writeback_centisecs", value=0)
    vm.guest("alloc", size="8M", kind="file", dirty=True)
    vm.advance(120_000)
    assert vm.meminfo()["Dirty"] == 8 * 1024  # "Setting this to zero disables periodic writeback"
    vm.guest("sysctl", name="vm.dirty_writeback_centisecs", value=500)  # re-armed
    vm.advance(5_001)
    assert vm.meminfo()["Dirty"] == 0


def test_background_ratio_starts_writeback_at_once(image):
    vm = small_vm()
    add_disk(vm, image)
    wb = vm.virtio_pmem.writeback
    threshold = wb.background_threshold()
    vm.guest("blk_write", device="blk0", offset=0, size=4 * MiB)  # well under 10 %
    assert vm.meminfo()["Dirty"] == 4096  # kB
    big = (threshold + 1) * PAGE
    vm.guest("blk_write", device="blk0", offset=64 * MiB, size=big)  # over it: written at once
    assert vm.mem.count(PageState.FILE_DIRTY) <= wb.background_threshold()
    assert wb.history[-1][1] == "background"
    assert vm.now_ms == 0  # no timer was needed


def test_sysctl_errors_name_the_value():
    vm = small_vm()
    with pytest.raises(ValueError, match="vm.swappiness"):
        vm.guest("sysctl", name="vm.swappiness", value=60)
    with pytest.raises(ValueError, match=r"vm.dirty_background_ratio = 101.*0..100"):
        vm.guest("sysctl", name="vm.dirty_background_ratio", value=101)
    assert vm.guest("sysctl", name="vm.dirty_background_ratio") == 10  # unchanged


def test_sync_writes_everything_and_drop_caches_then_frees_it():
    vm = small_vm()
    cached0 = vm.meminfo()["Cached"]
    vm.guest("alloc", size="32M", kind="file", dirty=True)
    vm.guest("drop_caches")  # echo 3 > drop_caches frees clean page cache only
    assert vm.meminfo()["Dirty"] == 32 * 1024
    assert vm.guest("sync") == 32 * MiB // PAGE
    vm.guest("drop_caches")
    # the file is gone; what stays is the busybox guest's root, a tmpfs (shmem: not page cache)
    assert vm.meminfo()["Cached"] == cached0 == vm.meminfo()["Shmem"]
    check_invariants(vm.mem)


def test_balloon_inflation_shrinks_the_page_cache_before_anything_else():
    # balloon pages are __GFP_NORETRY allocations: kswapd and direct reclaim free page cache for
    # them; anonymous memory (no guest swap) is never taken and nothing is OOM-killed
    vm = labkit.open(memory="1G", seed=0)
    app = vm.guest("alloc", size="256M", kind="anon")
    vm.guest("alloc", size="384M", kind="file")
    before = vm.meminfo()
    vm.qmp("balloon", value=GiB - before["MemFree"] * 1024 - 128 * MiB)  # 128 MiB more than free
    vm.advance(3000)
    after = vm.meminfo()
    assert vm.sample()["balloon_size"] >= before["MemFree"] * 1024 + 100 * MiB
    assert before["Cached"] - after["Cached"] >= 100 * 1024  # the page cache paid
    assert after["AnonPages"] == before["AnonPages"]
    assert vm.sample()["oom_kills"] == 0 and vm.kernel.handles[app].alive


# --- host page cache and virtio-blk --------------------------------------------------------------
def test_blk_writeback_caches_twice_and_none_once(image):
    host = Host(8 * GiB)
    a = small_vm(host=host, vm_name="a")
    add_disk(a, image, cache="writeback")
    cached0 = a.meminfo()["Cached"]
    r = a.guest("blk_read", device="blk0", size="256M")
    assert r["disk_reads"] == 65536 and r["guest_hits"] == 0
    assert a.sample()["host_page_cache"] == 256 * MiB  # the host's copy
    assert a.meminfo()["Cached"] - cached0 == 256 * 1024  # the guest's copy, in guest RAM...
    pages = a.kernel.handles[max(a.kernel.handles)].pages
    assert a.mem.has_flag(pages, PageFlag.BACKED).all()  # ...which the host backs
    assert a.guest("blk_read", device="blk0", size="256M")["guest_hits"] == 65536
    b = small_vm(host=host, vm_name="b")
    add_disk(b, image, cache="none")
    r = b.guest("blk_read", device="blk0", size="256M")
    assert r["host_hits"] == 0 and r["disk_reads"] == 65536  # O_DIRECT: the host cache is bypassed
    assert b.sample()["host_page_cache"] == 256 * MiB  # still only a's copy
    c = small_vm(host=host, vm_name="c")
    add_disk(c, image, cache="writeback")
    assert c.guest("blk_read", device="blk0", size="256M")["host_hits"] == 65536  # shared
    for vm in (a, b, c):
        check_invariants(vm.mem)


def test_host_page_cache_counts_in_host_free_and_host_drop_caches_frees_it(image):
    vm = small_vm()
    add_disk(vm, image)
    s0, pcp0 = vm.sample(), pcp_kb(vm) * 1024
    vm.guest("blk_read", device="blk0", size="128M")
    s1 = vm.sample()
    # the guest's copy (backed FILE pages) and the host's copy both come out of host memory; the
    # guest's copy only where its pages were not backed yet: the first come off the per-CPU
    # lists, pages freed at boot (initramfs, __init) that the host already backs
    assert s0["host_free"] - s1["host_free"] == 128 * MiB + (s1["host_rss"] - s0["host_rss"])
    assert 128 * MiB - pcp0 <= s1["host_rss"] - s0["host_rss"] <= 128 * MiB
    assert vm.host.page_cache.drop_caches() == 32768
    assert vm.sample()["host_page_cache"] == 0


def test_host_pressure_drops_clean_host_cache_before_swapping(image):
    # room for the guest's boot RSS (measured on the live 1 GiB guest: ~91 MiB), its 512 MiB copy
    # and the host's 512 MiB copy; the 700 MiB allocation then needs what the host cache holds
    host = Host(1200 * MiB, swap=GiB)
    vm = small_vm(host=host)
    add_disk(vm, image)
    vm.guest("blk_read", device="blk0", size="512M")
    vm.guest("drop_caches")  # the guest forgets; the host still caches 512 MiB
    cached = host.page_cache.cached_pages
    vm.guest("alloc", size="700M", kind="anon")  # the host needs RAM for it
    assert host.page_cache.cached_pages < cached
    assert vm.sample()["host_swap"] == 0
    assert host.free_pages >= 0


def test_guest_then_host_writeback_chain(image):
    # blk with cache=writeback: guest flusher (30-35 s) moves the data to the host page cache,
    # the host flusher (another 30-35 s) to the disk
    vm = small_vm()
    add_disk(vm, image)
    vm.guest("blk_write", device="blk0", size="16M")
    f = vm.host.page_cache.open(image)
    vm.advance(29_000)
    assert vm.sample()["guest_dirty"] == 16 * MiB and vm.sample()["host_page_cache_dirty"] == 0
    vm.advance(7_000)
    assert vm.sample()["guest_dirty"] == 0 and vm.sample()["host_page_cache_dirty"] == 16 * MiB
    assert f.counts()["dirty"] == 4096
    vm.advance(22_000)  # t = 58 s: the host dirtied it at 30 s
    assert vm.sample()["host_page_cache_dirty"] == 16 * MiB
    vm.advance(8_000)
    assert vm.sample()["host_page_cache_dirty"] == 0 and f.stats["written_back"] == 4096


def test_guest_sync_flushes_through_to_the_disk(image):
    vm = small_vm()
    add_disk(vm, image)
    vm.guest("blk_write", device="blk0", size="16M")
    vm.guest("sync")  # writeback + VIRTIO_BLK_T_FLUSH -> fdatasync on the host
    f = vm.host.page_cache.open(image)
    assert f.counts()["dirty"] == 0 and f.counts()["clean"] == 4096


@pytest.mark.parametrize("mode", sorted(CACHE_MODES))
def test_cache_modes_decide_where_written_data_waits(image, mode):
    direct, no_flush, write_cache = CACHE_MODES[mode]
    vm = small_vm()
    add_disk(vm, image, cache=mode)
    vm.guest("blk_write", device="blk0", size="4M")
    vm.virtio_pmem.writeback.write_back(vm.kernel.handles[max(vm.kernel.handles)])
    f = vm.host.page_cache.open(image)
    host_dirty = f.counts()["dirty"]
    if direct or not write_cache:  # O_DIRECT, or writethrough: on the disk already
        assert host_dirty == 0
    else:
        assert host_dirty == 1024
    vm.guest("sync")
    assert f.counts()["dirty"] == (1024 if no_flush and not direct else 0)  # unsafe ignores flushes


def test_host_crash_loses_dirty_data_only(image):
    host = Host(4 * GiB)
    cache = host_page_cache(host)
    f = cache.open(image)
    cache.read(f, 0, 100, now=0.0)
    cache.write(f, 100, 50, now=0.0)
    cache.fsync(f)
    cache.write(f, 200, 30, now=1.0)
    assert cache.crash() == {f.path: 30}
    assert f.lost.sum() == 30 and f.lost[200:230].all()
    assert f.cached_pages() == 0
    cache.write(f, 200, 30, now=2.0)  # written again and flushed: no longer stale
    assert cache.fsync(f) == 0 and f.lost.sum() == 0


def test_failed_writeback_marks_pages_clean_and_the_error_is_reported_once(image):
    cache = host_page_cache(Host(4 * GiB))
    f = cache.open(image)
    cache.write(f, 0, 10, now=0.0)
    f.inject_fsync_error(1)
    assert cache.fsync(f) == -errno.EIO
    assert f.counts() == {"not_cached": f.n_pages - 10, "clean": 0, "dirty": 0, "wb_error": 10}
    assert cache.fsync(f) == 0  # nothing dirty: the retry "succeeds"
    assert cache.crash() == {f.path: 10}  # and the data is gone


def test_blockdev_and_device_add_errors_are_qemus(image, tmp_path):
    vm = small_vm()
    missing = str(tmp_path / "nope.img")
    with pytest.raises(labkit.QMPError, match="Could not open .*nope.img.*No such file"):
        vm.qmp("blockdev-add", driver="file", filename=missing, **{"node-name": "d0"})
    assert not os.path.exists(missing)
    vm.qmp("blockdev-add", driver="file", filename=image, **{"node-name": "d0"})
    with pytest.raises(labkit.QMPError, match="Duplicate nodes with node-name='d0'"):
        vm.qmp("blockdev-add", driver="file", filename=image, **{"node-name": "d0"})
    with pytest.raises(labkit.QMPError, match="can't find value 'd1'"):
        vm.qmp("device_add", driver="virtio-blk-pci", drive="d1", id="blk0")
    vm.qmp("device_add", driver="virtio-blk-pci", drive="d0", id="blk0")
    with pytest.raises(labkit.QMPError, match="Duplicate device ID 'blk0'"):
        vm.qmp("device_add", driver="virtio-blk-pci", drive="d0", id="blk0")
    with pytest.raises(ValueError, match="no virtio-blk disk 'blk9'"):
        vm.guest("blk_read", device="blk9")
    with pytest.raises(ValueError, match="outside disk 'blk0'"):
        vm.guest("blk_read", device="blk0", offset=GiB - PAGE, size="1M")


def test_blk_device_del_frees_the_guest_cache_and_sends_device_deleted(image):
    vm = small_vm()
    add_disk(vm, image)
    cached = vm.meminfo()["Cached"]
    vm.guest("blk_read", device="blk0", size="64M")
    assert vm.meminfo()["Cached"] == cached + 64 * 1024
    assert vm.qmp("device_del", id="blk0") == {}
    assert vm.meminfo()["Cached"] == cached
    assert vm.events()[-1]["event"] == "DEVICE_DELETED"
    with pytest.raises(labkit.QMPError, match="Device 'blk0' not found"):
        vm.qmp("device_del", id="blk0")


def test_host_crash_loses_unwritten_guest_blk_pages_and_closes_the_vms(image):
    host = Host(4 * GiB)
    vm = small_vm(host=host)
    add_disk(vm, image)
    vm.guest("blk_write", device="blk0", size="8M")
    lost = host_crash(host, [vm])
    assert lost[os.path.realpath(image)] == 2048
    assert vm.closed


def test_file_page_states_are_few_and_stable():
    assert [int(s) for s in FilePage] == [0, 1, 2, 3]
    assert np.dtype(np.uint8).itemsize == 1


# --- views -----------------------------------------------------------------------------------------
def test_file_map_cells_keep_the_worst_state_and_show_lost_pages(image):
    from labkit.viz.pagecache import FILE_NAMES, file_cells

    cache = host_page_cache(Host(4 * GiB))
    f = cache.open(image)
    cache.read(f, 0, 1024, now=0.0)
    cache.write(f, 1000, 1, now=0.0)  # one dirty page in the first cell's range
    cells = file_cells(f, cells=4, pages=4096)  # 1024 pages a cell
    assert [FILE_NAMES[c] for c in cells] == ["dirty (not on disk)", "not cached", "not cached",
                                              "not cached"]
    cache.crash()
    assert FILE_NAMES[file_cells(f, cells=4, pages=4096)[0]] == "lost in crash"


def test_copies_explorer_slider_reruns_and_patches_the_bars():
    from labkit.scenarios.pmem import SharedImageParams, shared_image, shared_image_table
    from labkit.viz.pagecache import CopiesExplorer, source_of

    def compare(n):
        return shared_image_table([shared_image(SharedImageParams(n_vms=n, transport=t,
                                                                  boot_read="64M"))
                                   for t in ("blk-writeback", "pmem")])

    explorer = CopiesExplorer(compare, n=1)
    source = source_of(explorer.figure)
    assert source.data["guest_copies"] == [64.0, 0.0]
    explorer.slider.value = 3  # what dragging the slider does
    assert source_of(explorer.figure) is source and source.data["guest_copies"] == [192.0, 0.0]
    assert source.data["host_copy"] == [64.0, 64.0]


def test_writeback_stepper_buttons_step_and_crash(image):
    from labkit.viz.pagecache import WritebackStepper

    host = Host(4 * GiB)
    vm = labkit.open(memory="512M", seed=0, host=host, model={"boot": "minimal"},
                     virtio_pmem=[{"id": "vpmem0", "path": image, "size": "1G"}])
    vm.guest("pmem_write", device="vpmem0", size="8M")
    stepper = WritebackStepper(vm, vm.virtio_pmem.devices[0].file, pages=4096)
    stepper.widget()
    for _ in range(7):
        stepper.step_button.click()
    assert vm.now_ms == 35_000 and stepper.bars.data["mib"] == [0.0, 0.0]  # written at 30 s
    vm.guest("pmem_write", device="vpmem0", size="4M")
    stepper.refresh()
    assert stepper.bars.data["mib"] == [0.0, 4.0]
    stepper.crash_button.click()
    assert stepper.crashed and vm.closed and "4 MiB" in stepper.status()
