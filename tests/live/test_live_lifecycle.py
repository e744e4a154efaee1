"""A live VM boots, answers QMP and the guest shell, and leaves nothing behind however it ends."""

from __future__ import annotations

import glob
import os
import signal
import tempfile

import pytest

import labkit
from labkit.backends import Backend
from labkit.backends.qemu import QemuError, open_qemu
from labkit.backends.qemu.process import STATE_DIR_PREFIX

pytestmark = pytest.mark.live
MiB = 1 << 20


def state_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"{STATE_DIR_PREFIX}*")))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def vm():
    with open_qemu(memory="512M") as v:
        yield v


def test_guest_workloads_move_meminfo_as_on_the_model(vm):
    base = vm.meminfo()
    h = vm.guest("alloc", size="64M", kind="anon")
    anon = vm.meminfo()
    f = vm.guest("alloc", size="32M", kind="file")
    cached = vm.meminfo()
    assert vm.guest("drop_caches") >= 32 * MiB // 4096 - 256
    dropped = vm.meminfo()
    vm.guest("free", handle=h)
    freed = vm.meminfo()
    assert [x["handle"] for x in vm.guest("handles")] == [f]
    vm.guest("free", handle=f)
    kib = 1024
    assert abs(anon["AnonPages"] - base["AnonPages"] - 64 * kib) < 4 * kib
    assert abs(cached["Cached"] - anon["Cached"] - 32 * kib) < 4 * kib
    assert dropped["Cached"] < cached["Cached"] - 28 * kib
    assert freed["MemFree"] > dropped["MemFree"] + 60 * kib


def test_boot_qmp_guest_and_clean_close(vm, figures):
    before = state_dirs() - {vm.process.state_dir}
    try:
        figures["boot to shell (TCG, 512 MiB)"] = f"{vm.boot_s:.1f} s ({vm.accel}: {vm.accel_reason})"
        assert isinstance(vm, Backend)
        assert vm.qmp("query-balloon") == {"actual": 512 * MiB}
        assert vm.qmp("query-status")["status"] == "running"
        info = vm.meminfo()
        assert 400 * 1024 < info["MemTotal"] < 512 * 1024 and info["MemFree"] < info["MemTotal"]
        sample = vm.sample()
        assert set(sample) >= {"t_ms", "memtotal", "memfree", "memavailable", "cached", "anon",
                               "balloon_actual", "balloon_target", "balloon_size", "host_rss",
                               "host_swap", "host_free", "oom_kills"}
        assert 0 < sample["host_rss"] <= 512 * MiB < sample["host_free"] + 512 * MiB
        assert sample["host_rss"] < sample["qemu_rss"], "QEMU holds more than the guest's RAM"
        with pytest.raises(labkit.QMPError) as e:
            vm.qmp("balloon", value="1G")
        assert e.value.error_class == "GenericError" and "value" in e.value.desc
        with pytest.raises(labkit.QMPError, match="has not been found"):
            vm.qmp("no-such-command")
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=1)
        vm.advance(2500)
        stats = vm.qmp("qom-get", path="balloon0", property="guest-stats")["stats"]
        assert 0 < stats["stat-free-memory"] <= stats["stat-total-memory"] <= 512 * MiB
        with pytest.raises(NotImplementedError, match="no page map"):
            vm.snapshot()
        pid, state_dir = vm.process.pid, vm.process.state_dir
    finally:
        vm.close()
    assert gone(pid) and not os.path.exists(state_dir) and state_dirs() <= before
    with pytest.raises(RuntimeError, match="closed"):
        vm.meminfo()


def test_two_vms_at_once_one_dies_one_raises_and_nothing_is_left():
    before = state_dirs()
    a = open_qemu(memory="256M")
    try:
        with pytest.raises(ZeroDivisionError), open_qemu(memory="256M") as b:
            assert a.process.state_dir != b.process.state_dir and a.process.pid != b.process.pid
            assert a.qmp("query-balloon") == b.qmp("query-balloon") == {"actual": 256 * MiB}
            os.kill(a.process.pid, signal.SIGKILL)
            with pytest.raises(QemuError, match="killed by signal 9"):
                a.meminfo()
            with pytest.raises(QemuError, match="killed by signal 9"):
                a.qmp("query-balloon")
            assert b.meminfo()["MemTotal"] > 0, "the other VM is unaffected"
            pids = (a.process.pid, b.process.pid)
            1 / 0  # noqa: B018 - an exception inside `with` must still stop QEMU
    finally:
        a.close()
    assert all(gone(p) for p in pids) and state_dirs() <= before


def test_bad_device_options_give_qemus_own_message():
    before = state_dirs()
    with pytest.raises(QemuError, match="Property 'virtio-balloon-pci.bogus' not found"):
        open_qemu(memory="256M", qemu={"extra_args": ["-device", "virtio-balloon-pci,bogus=on"]})
    with pytest.raises(QemuError, match="Only one balloon device is supported"):
        open_qemu(memory="256M", qemu={"extra_args": ["-device", "virtio-balloon-pci,id=b2"]})
    assert state_dirs() <= before
