"""A live VM boots, answers QMP and the guest shell, and leaves nothing behind however it ends."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import labkit
from labkit.backends import Backend
from labkit.backends.qemu import QemuError, open_qemu
from labkit.backends.qemu.process import STATE_DIR_PREFIX, sweep_stale

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
        figures["boot to shell (TCG, 512 MiB)"] = (
            f"{vm.boot_s:.1f} s, of which the guest's kernel + /init {vm.guest_boot_s:.1f} s "
            f"({vm.accel}: {vm.accel_reason})")
        assert isinstance(vm, Backend)
        assert vm.qmp("query-balloon") == {"actual": 512 * MiB}
        assert vm.qmp("query-status")["status"] == "running"
        info = vm.meminfo()
        assert 400 * 1024 < info["MemTotal"] < 512 * 1024 and info["MemFree"] < info["MemTotal"]
        sample = vm.sample()
        assert set(sample) >= {"t_ms", "memtotal", "memfree", "memavailable", "cached", "anon",
                               "balloon_actual", "balloon_target", "balloon_size", "host_rss",
                               "host_swap", "host_free", "oom_kills"}
        with labkit.open(memory="512M") as model:
            assert set(model.sample()) <= set(sample), "every key of the model's sample()"
        assert 0 < sample["host_rss"] <= 512 * MiB < sample["host_free"] + 512 * MiB
        assert sample["host_rss"] < sample["qemu_rss"], "QEMU holds more than the guest's RAM"
        with pytest.raises(labkit.QMPError) as e:
            vm.qmp("balloon", value="1G")
        assert e.value.error_class == "GenericError" and "value" in e.value.desc
        with pytest.raises(labkit.QMPError, match="has not been found"):
            vm.qmp("no-such-command")
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=1)
        for _ in range(300):  # the first report comes within ~1 s; poll, a busy host is slower
            vm.advance(100)
            stats = vm.qmp("qom-get", path="balloon0", property="guest-stats")
            if stats["last-update"] > 0 and stats["stats"]["stat-free-memory"] > 0:
                break
        stats = stats["stats"]
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
            os.kill(a.process.pid, signal.SIGTERM)  # QEMU says why on its stderr, and exits
            with pytest.raises(QemuError, match=r"(?s)exited with status 0.*terminating on signal 15"):
                a.meminfo()
            with pytest.raises(QemuError, match="terminating on signal 15"):
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


CHILD = """
import os, signal, sys
from labkit.backends.qemu import open_qemu
vm = open_qemu(memory="256M", qemu={"scratch_disk": False})
print(vm.process.pid, vm.process.state_dir, flush=True)
if sys.argv[1] == "kill":  # as a Jupyter kernel restart does
    os.kill(os.getpid(), signal.SIGKILL)
# "exit": leave without close(); the interpreter's exit must stop QEMU
"""


def wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def test_interpreter_exit_or_a_killed_python_leaves_no_qemu_and_no_socket():
    """Two Pythons boot a VM each (at once): one exits without close(), one is SIGKILLed. Both
    QEMUs die (the exit handler; PR_SET_PDEATHSIG), no socket is left, and the killed one's
    directory (its ``owner`` file only) goes with the next VM's sweep."""
    children = {mode: subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for mode in ("exit", "kill")}
    seen = {}
    for mode, child in children.items():
        out, err = child.communicate(timeout=300)
        assert out.split(), f"{mode}: the child did not boot a VM: {err[-2000:]}"
        pid, state_dir = out.split()[:2]
        seen[mode] = (int(pid), state_dir, child.returncode)
    assert seen["exit"][2] == 0 and seen["kill"][2] == -signal.SIGKILL
    for mode, (pid, state_dir, _) in seen.items():
        assert wait_gone(pid), f"{mode}: QEMU {pid} outlived its Python"
        assert not glob.glob(os.path.join(state_dir, "*.sock")), f"{mode}: a socket was left"
    assert not os.path.exists(seen["exit"][1])
    sweep_stale()
    assert not os.path.exists(seen["kill"][1])
