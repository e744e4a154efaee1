"""The live backend's parts that need no QEMU: command lines, options, framing, parsers, the image."""

from __future__ import annotations

import json
import lzma
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.backends.qemu import accel, image, kernel, pvh
from labkit.backends.qemu.backend import QemuBackend
from labkit.backends.qemu.cpio import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, Entry, read_newc, write_newc
from labkit.backends.qemu.guest import LiveGuestOps, parse_meminfo, parse_vmstat, write_zeros
from labkit.backends.qemu.guestfiles import INIT_SCRIPT, READY_MARKER
from labkit.backends.qemu.hostmem import file_mapping_usage, guest_ram_usage, process_status, resident_pages
from labkit.backends.qemu.pmem import LivePmem, dd_blocks, parse_probe
from labkit.backends.qemu.process import (
    QemuConfig,
    balloon_properties,
    describe_exit,
    node_sizes,
    qemu_command,
    sweep_stale,
)
from labkit.backends.qemu.serial import SerialShell, frame, parse_framed
from labkit.errors import GuestError

MiB = 1 << 20


# --- command line --------------------------------------------------------------------------------
def arg_after(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_command_line_carries_memory_balloon_properties_and_private_sockets():
    config = QemuConfig(memory=768 * MiB, balloon={"deflate_on_oom": True, "free_page_reporting": True})
    args = qemu_command(config, "/tmp/labkit-qemu-x", "/k/vmlinuz", "/k/initrd")
    assert all(isinstance(a, str) for a in args), "an argument list, never a shell string"
    assert args[0] == "qemu-system-x86_64"
    assert arg_after(args, "-m") == ["768M"]
    balloon = [d for d in arg_after(args, "-device") if d.startswith("virtio-balloon-pci")]
    assert balloon == ["virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-hint=off,"
                       "free-page-reporting=on,page-poison=on"]
    chardevs = arg_after(args, "-chardev")
    assert any("path=/tmp/labkit-qemu-x/qmp.sock,server=on" in c for c in chardevs)
    assert any("path=/tmp/labkit-qemu-x/serial.sock,server=on,wait=on" in c for c in chardevs)
    assert arg_after(args, "-kernel") == ["/k/vmlinuz"] and arg_after(args, "-initrd") == ["/k/initrd"]
    assert "memory-backend-ram,id=ram0,size=768M" in arg_after(args, "-object")


def test_free_page_hint_brings_its_iothread_object():
    config = QemuConfig(memory=512 * MiB, balloon={"free_page_hint": True, "iothread": "io0"})
    args = qemu_command(config, "/d", "k", "i")
    assert "iothread,id=io0" in arg_after(args, "-object")
    assert any(d.endswith("free-page-hint=on,free-page-reporting=off,page-poison=on,iothread=io0")
               for d in arg_after(args, "-device"))


def test_no_balloon_and_no_scratch_disk_mean_no_such_devices():
    args = qemu_command(QemuConfig(memory=512 * MiB, balloon=None, scratch_disk=False), "/d", "k", "i")
    devices = arg_after(args, "-device")
    assert not any(d.startswith(("virtio-balloon", "virtio-blk")) for d in devices)
    assert "-drive" not in args


def test_numa_nodes_get_one_memory_backend_each_and_add_up():
    sizes = node_sizes(1024 * MiB + 64 * MiB, 2)
    assert sum(sizes) == 1088 * MiB and sizes[0] % (128 * MiB) == 0
    args = qemu_command(QemuConfig(memory=1088 * MiB, numa_nodes=2), "/d", "k", "i")
    assert arg_after(args, "-numa") == ["node,nodeid=0,memdev=ram0", "node,nodeid=1,memdev=ram1"]
    assert "memory-backend-ram,id=ram1,size=576M" in arg_after(args, "-object")


def test_virtio_mem_devices_get_maxmem_a_backend_and_the_online_policy():
    spec = {"id": "vm0", "size": 1024 * MiB, "node": 0, "requested_size": 256 * MiB,
            "block_size": 2 * MiB, "prealloc": False, "unplugged_inaccessible": "on",
            "dynamic_memslots": False, "memaddr": None}
    config = QemuConfig(memory=512 * MiB, virtio_mem=(spec,), memhp_default_state="online_movable")
    args = qemu_command(config, "/d", "k", "i")
    assert arg_after(args, "-m") == ["512M,maxmem=1536M"]
    assert "memory-backend-ram,id=mem-vm0,size=1024M" in arg_after(args, "-object")
    assert ("virtio-mem-pci,id=vm0,memdev=mem-vm0,node=0,requested-size=256M,block-size=2048K,"
            "prealloc=off,unplugged-inaccessible=on") in arg_after(args, "-device")
    assert "memhp_default_state=online_movable" in arg_after(args, "-append")[0]


def test_virtio_pmem_is_a_shared_file_backend_and_a_device_within_maxmem():
    pmem = ({"id": "pm0", "path": "/data/a,b.img", "size": 64 * MiB + 4096, "share": True},
            {"id": "pm1", "path": "rel.img", "size": 32 * MiB, "share": False})
    args = qemu_command(QemuConfig(memory=512 * MiB, virtio_pmem=pmem), "/d", "k", "i")
    assert arg_after(args, "-m") == [f"512M,maxmem={(608 * MiB + 4096) // 1024}K"]
    objects = arg_after(args, "-object")
    assert (f"memory-backend-file,id=mem-pm0,share=on,mem-path=/data/a,,b.img,"
            f"size={64 * MiB + 4096}") in objects
    assert (f"memory-backend-file,id=mem-pm1,share=off,mem-path={os.path.abspath('rel.img')},"
            f"size={32 * MiB}") in objects
    devices = arg_after(args, "-device")
    assert {"virtio-pmem-pci,memdev=mem-pm0,id=pm0", "virtio-pmem-pci,memdev=mem-pm1,id=pm1"} <= set(devices)


class DeadQemu:
    def __init__(self, returncode, stderr, console=""):
        self.pid, self.returncode, self._stderr, self._console = 4242, returncode, stderr, console

    def stderr_tail(self, chars=2000):
        return self._stderr[-chars:]

    def console_tail(self, chars=2000):
        return self._console[-chars:]


def test_a_dead_qemu_is_described_by_its_exit_and_the_tail_of_its_stderr():
    waiting = "QEMU waiting for connection on: disconnected:unix:/d/serial.sock,server=on\n"
    text = describe_exit(DeadQemu(0, waiting + "qemu-system-x86_64: terminating on signal 15 from pid 7\n"))
    assert text.startswith("QEMU (pid 4242) exited with status 0; its stderr ends:\n")
    assert text.endswith("terminating on signal 15 from pid 7") and "waiting for connection" not in text
    killed = describe_exit(DeadQemu(-9, "", "[ 1.0] Kernel panic - not syncing: Out of memory"), "at boot")
    assert killed.startswith("QEMU (pid 4242) was killed by signal 9 at boot (nothing on its stderr)")
    assert killed.endswith("the guest console ends:\n[ 1.0] Kernel panic - not syncing: Out of memory")


def test_balloon_properties_use_dashes_and_on_off():
    text = balloon_properties({"deflate_on_oom": False, "page_poison": False, "id": "b1"})
    assert text.startswith("virtio-balloon-pci,id=b1,")
    assert "deflate-on-oom=off" in text and "page-poison=off" in text and "_" not in text


def test_kernel_parameters_from_the_model_cmdline_option():
    assert QemuBackend._kernel_params({"init_on_free": 1}) == "init_on_free=1"
    with pytest.raises(ValueError, match="init_on_free=2"):
        QemuBackend._kernel_params({"init_on_free": 2})


# --- option validation (all before anything is built or started) ------------------------------
@pytest.mark.parametrize(("options", "error", "text"), [
    ({"memory": "64M"}, ValueError, "from 128 MiB"),
    ({"memory": "1.5K"}, ValueError, "memory"),
    ({"memory": "1G", "numa_nodes": 0}, ValueError, "numa_nodes must be an int from 1 to 8"),
    ({"memory": "256M", "numa_nodes": 4}, ValueError, "at least 128 MiB per node"),
    ({"seed": "x"}, TypeError, "seed must be an int"),
    ({"balloon": {"deflate-on-oom": True}}, ValueError, r"unknown balloon option\(s\) \['deflate-on-oom'\]"),
    ({"balloon": {"free_page_hint": True}}, ValueError, "'free-page-hint' requires 'iothread'"),
    ({"qemu": {"accel": "hvf"}}, ValueError, r"accel 'hvf' is not one of \['auto', 'kvm', 'tcg'\]"),
    ({"qemu": {"turbo": 1}}, ValueError, r"unknown qemu option\(s\) \['turbo'\]"),
    ({"host": {"nope": 1}}, ValueError, r"unknown host option\(s\) \['nope'\]"),
    ({"cmdline": {"quiet": 1}}, ValueError, r"unknown cmdline option\(s\) \['quiet'\]"),
    ({"memhp_default_state": "online_fast"}, ValueError, "memhp_default_state 'online_fast' is not one"),
    ({"virtio_mem": [{"id": "vm0"}]}, ValueError, "needs 'size'"),
    ({"virtio_pmem": [{"id": "p", "path": "/nonexistent/x", "size": "1G"}]}, ValueError,
     "can't open backing store /nonexistent/x for guest RAM: No such file or directory"),
    ({"virtio_pmem": [{"id": "p", "path": "/dev/null", "size": "1G", "dax": True}]}, ValueError,
     r"unknown virtio_pmem\[0\] option\(s\) \['dax'\]"),
])
def test_bad_options_are_refused_before_anything_starts(monkeypatch, options, error, text):
    def no_build(*a, **k):
        raise AssertionError("validation must come before the image is built")
    monkeypatch.setattr("labkit.backends.qemu.backend.build_guest_image", no_build)
    with pytest.raises(error, match=text):
        QemuBackend(**options)


def test_model_host_options_warn_that_they_are_ignored(monkeypatch):
    monkeypatch.setattr("labkit.backends.qemu.backend.build_guest_image",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.warns(UserWarning, match="ignored"), pytest.raises(RuntimeError, match="stop here"):
        QemuBackend(memory="512M", host={"ram": "16G"})


# --- framing --------------------------------------------------------------------------------
def test_parse_framed_needs_both_markers_and_ignores_other_tokens():
    stale = "@@Bold@@\nlate answer\n\n@@Eold:0@@\n"
    assert parse_framed(stale + "@@Bnew@@\nhalf", "new") is None
    out, status, rest = parse_framed(stale + "@@Bnew@@\r\nfine\r\n\r\n@@Enew:3@@\r\nnext", "new")
    assert (out, status, rest) == ("fine\n", 3, "next")
    assert parse_framed("@@Bt@@\nno newline at end\n@@Et:0@@\n", "t")[0] == "no newline at end"


def test_frame_runs_under_a_posix_shell_and_parses_back():
    text = frame("tok9", "echo one; echo two >&2; false")
    result = subprocess.run(["sh"], input=text, capture_output=True, text=True, timeout=10)
    assert "tok9" not in text.replace("'@@B%s@@\\n' tok9", "").replace("'\\n@@E%s:%d@@\\n' tok9", "")
    assert parse_framed(result.stdout, "tok9") == ("one\ntwo\n", 1, "")


def test_frame_allows_a_trailing_ampersand():
    result = subprocess.run(["sh"], input=frame("t", "sleep 0 &"), capture_output=True, text=True,
                            timeout=10)
    assert parse_framed(result.stdout, "t")[1] == 0


@pytest.fixture
def shell_pair():
    """A SerialShell talking to a real host `sh` through a socketpair (the guest's role)."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(["sh"], stdin=theirs.fileno(), stdout=theirs.fileno(),
                            stderr=subprocess.STDOUT)
    theirs.close()
    shell = SerialShell(ours, alive=lambda: proc.poll() is None)
    yield shell, proc
    shell.close()
    proc.kill()
    proc.wait()


def test_serial_shell_runs_commands_in_order_with_status(shell_pair):
    shell, _ = shell_pair
    assert shell.run("echo $((6 * 7))") == ("42\n", 0)
    assert shell.run("exit_status() { return 5; }; exit_status", check=False)[1] == 5
    with pytest.raises(GuestError, match="failed with status 3"):
        shell.run("echo oops; (exit 3)")
    outputs = [shell.run(f"echo {i}")[0] for i in range(20)]
    assert outputs == [f"{i}\n" for i in range(20)]


def test_serial_shell_reports_a_dead_guest_and_a_timeout(shell_pair):
    from labkit.backends.qemu.serial import GuestDied, GuestTimeout

    shell, proc = shell_pair
    with pytest.raises(GuestTimeout, match="no answer from the guest after 0.3 s"):
        shell.run("sleep 2", timeout=0.3)
    proc.kill()
    proc.wait()
    with pytest.raises(GuestDied, match="serial console closed"):
        shell.run("echo hi", timeout=5)


# --- parsers --------------------------------------------------------------------------------
MEMINFO = """MemTotal:        1000000 kB
MemFree:          900000 kB
MemAvailable:     850000 kB
Cached:             3000 kB
AnonPages:           200 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def test_meminfo_and_vmstat_parsers():
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 1_000_000 and info["HugePages_Total"] == 0 and len(info) == 7
    assert parse_vmstat("oom_kill 3\nballoon_inflate 256\nnr_zone_x -1\n") == {
        "oom_kill": 3, "balloon_inflate": 256, "nr_zone_x": -1}


def test_guest_ram_usage_takes_one_mapping_per_node():
    def mapping(start, size_kib, rss_kib, perms="rw-p", inode="0", path=""):
        end = start + size_kib * 1024
        return (f"{start:x}-{end:x} {perms} 00000000 00:00 {inode} {path}\nSize: {size_kib} kB\n"
                f"Rss: {rss_kib} kB\nSwap: 1 kB\n")
    smaps = (mapping(0x10000000, 512 * 1024 + 2048, 1000)        # node 0 (with alignment slack)
             + mapping(0x80000000, 512 * 1024, 3000)              # node 1
             + mapping(0x100000000, 512 * 1024, 7000)             # a third same-size region: not claimed
             + mapping(0x180000000, 1024 * 1024, 9, perms="rwxp")  # TCG code buffer: executable
             + mapping(0x200000000, 64, 64, inode="42", path="/usr/bin/qemu"))
    usage = guest_ram_usage(smaps, [512 * MiB, 512 * MiB])
    assert usage["mappings"] == 2 and usage["swap"] == 2 * 1024
    assert usage["rss"] in ((1000 + 3000) * 1024, (1000 + 7000) * 1024, (3000 + 7000) * 1024)
    assert guest_ram_usage(smaps, [2048 * MiB])["mappings"] == 0
    assert process_status("VmRSS:\t  100 kB\nRssAnon:\t 60 kB\nName: qemu\n") == {
        "VmRSS": 102400, "RssAnon": 61440}


# --- guest ops over a fake channel ---------------------------------------------------------
class FakeGuest:
    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def run(self, command, timeout=30.0, check=True):
        self.sent.append(command)
        for prefix, answer in self.answers:
            if command.startswith(prefix):
                if check and answer[1]:
                    raise GuestError(f"status {answer[1]}")
                return answer
        return "", 0


def test_guest_ops_alloc_touch_free_with_memhold():
    fake = FakeGuest([("memhold alloc", ("4242\n", 0)), ("awk", ("1024\n", 0))])
    ops = LiveGuestOps(fake.run, 1 << 30, "memhold", scratch=True)
    h = ops.call("alloc", {"size": "4M", "kind": "anon"})
    assert fake.sent[-1] == "memhold alloc 4096" and ops.table[h].pid == 4242
    ops.call("touch", {"handle": h})
    assert fake.sent[-1] == "memhold touch 4242"
    assert ops.call("handles", {})[0] | {} == {"handle": h, "kind": "anon", "name": "anon-4194304",
                                              "alive": True, "size": 4 * MiB, "resident": 1024 * 1024}
    ops.call("free", {"handle": h})
    assert fake.sent[-1].startswith("memhold free 4242") and ops.table == {}
    with pytest.raises(ValueError, match=r"handle 1 does not exist; live handles are \[\]"):
        ops.call("free", {"handle": h})


def test_an_oom_killed_alloc_returns_a_dead_handle_as_on_the_model():
    fake = FakeGuest([("memhold alloc", ("memhold: holder 77 killed by signal 9\n", 1))])
    ops = LiveGuestOps(fake.run, 1 << 30, "memhold", scratch=True)
    h = ops.call("alloc", {"size": 8 * MiB})
    assert ops.table[h].alive is False
    with pytest.raises(ValueError, match="killed by the OOM killer"):
        ops.call("touch", {"handle": h})


@pytest.mark.parametrize(("op", "args", "error", "text"), [
    ("alloc", {"size": "4M", "kind": "slab"}, ValueError, "kind 'slab' is not one of"),
    ("alloc", {"size": 4097}, ValueError, "positive multiple of 4 KiB"),
    ("alloc", {"size": "2G"}, ValueError, "up to the guest's 1 GiB"),
    ("alloc", {"size": "4M", "node": 1}, ValueError, "node= is not supported"),
    ("alloc", {}, TypeError, "needs argument 'size'"),
    ("compact", {}, ValueError, "guest op 'compact' is not one of"),
    ("touch", {"handle": True}, ValueError, "handle True does not exist"),
])
def test_guest_ops_refuse_bad_input_without_touching_the_guest(op, args, error, text):
    fake = FakeGuest([])
    ops = LiveGuestOps(fake.run, 1 << 30, "memhold", scratch=True)
    with pytest.raises(error, match=text):
        ops.call(op, args)
    assert fake.sent == []


def test_the_dd_fallback_waits_for_its_whole_read_not_for_rss():
    """Linux < 6.2 syncs a task's RSS counters every 64 faults: a dd asleep in pipe_write showed
    RssAnon 65352 kB of a 65536 kB buffer for good, and the old wait never ended (seen here)."""
    script = LiveGuestOps._dd_alloc_script(3, 64 * MiB)
    assert "awk '/^rchar/{print $2}' /proc/$p/io) -lt 67108864 ]" in script and "RssAnon" not in script
    assert "dd if=/dev/zero bs=65536k count=1" in script


def test_file_writes_use_big_blocks_and_the_page_remainder():
    assert write_zeros("/f", 3 * MiB + 8192) == (
        "dd if=/dev/zero of=/f bs=1M count=3 2>/dev/null && "
        "dd if=/dev/zero of=/f bs=4k count=2 seek=768 conv=notrunc 2>/dev/null")
    fake = FakeGuest([("grep '^Cached:'", ("Cached: 5000 kB\nCached: 1000 kB\n", 0))])
    assert LiveGuestOps(fake.run, 1 << 30, "dd", scratch=False).call("drop_caches", {}) == 1000


# --- virtio-pmem over a fake channel ----------------------------------------------------------
PROBE_OUTPUT = ("FREE 95870\nFREE 94846\n"
                "region 0x100000000 memory pmem0\nregion 0x110000000 memory pmem1\n")


def fake_pmem(tmp_path, answers):
    paths = []
    for name in ("a.img", "b.img"):
        paths.append(tmp_path / name)
        with open(paths[-1], "wb") as f:
            f.truncate(64 * MiB)
    specs = [{"id": "pa", "path": str(paths[0]), "size": 64 * MiB, "share": True},
             {"id": "pb", "path": str(paths[1]), "size": 32 * MiB, "share": False}]
    fake = FakeGuest([("insmod", (PROBE_OUTPUT, 0)), *answers])
    devices = [{"type": "virtio-mem", "data": {"id": "vm0", "memaddr": 0xF0000000}},
               {"type": "virtio-pmem", "data": {"id": "pa", "memaddr": 0x100000000}},
               {"type": "virtio-pmem", "data": {"id": "pb", "memaddr": 0x110000000}}]
    modules = ["virtio", "libnvdimm", "nd_virtio", "virtio_pmem", "nd_btt", "nd_pmem", "virtio_blk"]
    return LivePmem(specs, fake.run, lambda: devices, lambda: 1, modules), fake


def test_pmem_probe_loads_the_modules_in_order_and_maps_regions_to_disks(tmp_path):
    pmem, fake = fake_pmem(tmp_path, [])
    probe = fake.sent[0]
    order = [line.split("insmod /lib/modules/")[1].split(".ko")[0] for line in probe.splitlines()
             if "insmod" in line]
    assert order == ["libnvdimm", "nd_virtio", "virtio_pmem", "nd_btt", "nd_pmem"]
    assert pmem.disks == {"pa": "pmem0", "pb": "pmem1"} and pmem.modes["pb"] == "memory"
    assert pmem.memmap_total == 4096 * 1024
    assert parse_probe("region 0x1000 raw pmem3\n") == (0, {0x1000: ("raw", "pmem3")})


def test_pmem_ops_send_direct_io_of_whole_pages_and_read_the_host_side(tmp_path, monkeypatch):
    pmem, fake = fake_pmem(tmp_path, [("sync /dev/pmem0", ("rc=0\n", 0)),
                                      ("for i in", ("rc=0\nrc=1\nrc=0\n", 0))])
    usage = iter([{"rss": 0, "dirty": 8 * MiB, "anonymous": 0, "mappings": 1},
                  {"rss": 0, "dirty": 8 * MiB, "anonymous": 0, "mappings": 1},
                  {"rss": 0, "dirty": 0, "anonymous": 0, "mappings": 1}])
    monkeypatch.setattr(pmem, "host_usage", lambda device: next(usage))
    assert pmem.call("pmem_write", {"device": "pa", "offset": 4196, "size": 8 * MiB})["pages"] == 2049
    assert "bs=4096 seek=1 count=2049" in fake.sent[-1] and "oflag=direct" in fake.sent[-1]
    assert "tr '\\000' '\\114'" in fake.sent[-1], "the fill byte 'L' in octal"
    flushed = pmem.call("pmem_flush", {"device": "pmem0"})
    assert flushed | {"elapsed_ms": 0} == {"ret": 0, "error": None, "eio": 0, "elapsed_ms": 0,
                                           "written_bytes": 8 * MiB, "max_in_flight": None,
                                           "dirty_pages": 0}
    monkeypatch.setattr(pmem, "host_usage", lambda device: {"rss": 0, "dirty": 0, "anonymous": 0})
    assert pmem.call("pmem_flush", {"device": "pb", "requests": 3})["ret"] == -5  # -EIO: one failed
    assert pmem.eio == {"pa": 0, "pb": 1} and pmem.flushes == {"pa": 1, "pb": 3}
    assert pmem.sync_command() == "; sync /dev/pmem0; sync /dev/pmem1"
    assert dd_blocks(256, 512) == (MiB, 1, 2) and dd_blocks(3, 5) == (4096, 3, 5)


@pytest.mark.parametrize(("op", "args", "error", "text"), [
    ("pmem_write", {"device": "pz"}, ValueError, r"no virtio-pmem device 'pz'.*\['pa', 'pb'\]"),
    ("pmem_read", {"device": "pb", "offset": "31M", "size": "2M"}, ValueError, "outside pb's region"),
    ("pmem_flush", {"device": "pa", "requests": 0}, ValueError, "requests must be an int from 1"),
    ("pmem_mmap", {"device": "pa", "map_sync": True}, NotImplementedError, "MAP_SYNC"),
])
def test_pmem_ops_refuse_bad_input_without_touching_the_guest(tmp_path, op, args, error, text):
    pmem, fake = fake_pmem(tmp_path, [])
    sent = len(fake.sent)
    with pytest.raises(error, match=text):
        pmem.call(op, args)
    assert len(fake.sent) == sent


def test_file_mapping_usage_and_resident_pages(tmp_path):
    smaps = ("7f00-7f10 rw-p 00000000 fe:00 12    /x/p.img (deleted)\nRss:  64 kB\nPrivate_Dirty:  64 kB\n"
             "Anonymous:  48 kB\n7f20-7f30 rw-s 00000000 fe:00 13    /x/q.img\nRss:  8 kB\n")
    assert file_mapping_usage(smaps, "/x/p.img") == {"rss": 65536, "dirty": 65536, "anonymous": 49152,
                                                    "mappings": 1}
    path = tmp_path / "f"
    path.write_bytes(b"x" * (10 * 4096))
    assert resident_pages(str(path)) == 10 and resident_pages(str(path), 8, 100) == 2
    assert resident_pages(str(path), 10) == 0


# --- image: kernel, modules, initramfs ---------------------------------------------------------
def fake_module(name: str, depends: list[str]) -> bytes:
    modinfo = f"license=GPL\x00depends={','.join(depends)}\x00name={name}\x00"
    return b"\x7fELF" + b"\x00" * 60 + modinfo.encode()


DEPS = {"virtio_ring": [], "virtio": ["virtio_ring"], "virtio_pci_legacy_dev": [],
        "virtio_pci_modern_dev": [], "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev",
                                                    "virtio_pci_legacy_dev", "virtio"],
        "virtio_balloon": ["virtio", "virtio_ring"], "virtio_console": ["virtio", "virtio_ring"],
        "nd_virtio": ["virtio_ring"], "virtio_pmem": ["virtio", "libnvdimm", "nd_virtio"],
        "nd_btt": ["libnvdimm"], "nd_pmem": ["libnvdimm", "nd_btt"]}


def fake_kernel_tree(root: Path, version: str = "6.1.0-test") -> Path:
    """A /boot/vmlinuz with a bzImage header and /lib/modules/<version> with fake modules: some
    compressed, libnvdimm built in, virtio_mem and virtio_blk absent, no modules.dep."""
    (root / "boot").mkdir(parents=True)
    head = bytearray(0x4000)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")
    head[0x1000:0x1000 + 40] = f"{version} (test@example) #1 SMP".encode().ljust(40, b"\0")
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    vmlinuz.write_bytes(bytes(head))
    mods = root / "lib" / "modules" / version
    (mods / "kernel" / "drivers").mkdir(parents=True)
    for i, (name, deps) in enumerate(DEPS.items()):
        data = fake_module(name, deps)
        if i % 2:
            (mods / "kernel" / "drivers" / f"{name}.ko.xz").write_bytes(lzma.compress(data))
        else:
            (mods / "kernel" / "drivers" / f"{name.replace('_', '-')}.ko").write_bytes(data)
    (mods / "modules.builtin").write_text("kernel/drivers/nvdimm/libnvdimm.ko\n")
    return vmlinuz


def test_kernel_version_and_module_plan_from_a_fake_tree(tmp_path):
    vmlinuz = fake_kernel_tree(tmp_path)
    assert kernel.kernel_version(vmlinuz) == "6.1.0-test"
    source = kernel.find_kernel(vmlinuz)
    assert source.modules_dir == tmp_path / "lib" / "modules" / "6.1.0-test"
    plan = kernel.plan_modules(source.modules_dir)
    names = [n for n, _ in plan.load]
    for name, deps in DEPS.items():
        for dep in deps:
            if dep in names:
                assert names.index(dep) < names.index(name), f"{dep} must load before {name}"
    assert plan.builtin == ["libnvdimm"] and "libnvdimm" not in names
    assert sorted(plan.missing) == ["virtio_blk", "virtio_mem"]


def test_find_kernel_names_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_KERNEL", raising=False)
    with pytest.raises(kernel.KernelNotFound, match="not a readable file"):
        kernel.find_kernel(tmp_path / "nope")


def fake_static_elf(path: Path) -> Path:
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    path.write_bytes(bytes(header))  # no program headers at all: no PT_INTERP
    path.chmod(0o755)
    return path


def test_build_guest_image_lays_out_the_initramfs_and_caches_it(tmp_path, monkeypatch):
    vmlinuz = fake_kernel_tree(tmp_path / "k")
    monkeypatch.setenv("LABKIT_BUSYBOX", str(fake_static_elf(tmp_path / "busybox")))
    monkeypatch.setattr(image, "busybox_applets", lambda bb: ["cat", "mount", "sh"])
    built = image.build_guest_image(vmlinuz, cache_dir=tmp_path / "cache", helper="dd")
    assert built.directory == tmp_path / "cache" / "guest" / "6.1.0-test" and built.helper == "dd"
    entries = {e.name: e for e in read_newc(built.initramfs.read_bytes())}
    assert entries["init"].data.decode() == INIT_SCRIPT and READY_MARKER in INIT_SCRIPT
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    assert stat.S_ISLNK(entries["bin/mount"].mode) and entries["bin/mount"].data == b"busybox"
    order = [line.split()[0] for line in entries["etc/labkit/modules"].data.decode().splitlines()]
    assert order == list(built.modules) and order.index("virtio") < order.index("virtio_balloon")
    assert entries["lib/modules/virtio_ring.ko"].data == fake_module("virtio_ring", [])  # decompressed
    assert entries["lib/modules/virtio.ko"].data == fake_module("virtio", ["virtio_ring"])
    assert entries["etc/labkit/helper"].data == b"dd" and "bin/memhold" not in entries
    meta = json.loads((built.directory / "image.json").read_text())
    assert meta["missing"] == ["virtio_mem", "virtio_blk"] and meta["builtin"] == ["libnvdimm"]
    mtime = built.initramfs.stat().st_mtime_ns
    assert image.build_guest_image(vmlinuz, cache_dir=tmp_path / "cache", helper="dd") == built
    assert built.initramfs.stat().st_mtime_ns == mtime, "the second call reuses the cache"
    image.build_guest_image(vmlinuz, cache_dir=tmp_path / "cache", helper="dd", rebuild=True)
    assert built.initramfs.stat().st_mtime_ns != mtime


def test_a_kernel_without_the_balloon_module_is_refused(tmp_path, monkeypatch):
    vmlinuz = fake_kernel_tree(tmp_path / "k")
    for f in (tmp_path / "k").rglob("virtio_balloon.ko*"):
        f.unlink()
    monkeypatch.setenv("LABKIT_BUSYBOX", str(fake_static_elf(tmp_path / "busybox")))
    with pytest.raises(kernel.KernelNotFound, match=r"lacks \['virtio_balloon'\]"):
        image.build_guest_image(vmlinuz, cache_dir=tmp_path / "cache", helper="dd")


PVH_NOTE = (4).to_bytes(4, "little") + (8).to_bytes(4, "little") + (18).to_bytes(4, "little") + b"Xen\0"


def fake_bzimage(payload: bytes) -> bytes:
    """Boot protocol 2.15 header, one setup sector, the payload 16 bytes into the protected-mode part."""
    head = bytearray(1024)
    head[0x1F1] = 1
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = (0x20F).to_bytes(2, "little")
    head[0x248:0x24C] = (16).to_bytes(4, "little")
    head[0x24C:0x250] = len(payload).to_bytes(4, "little")
    return bytes(head) + bytes(16) + payload + b"tail"


def test_pvh_vmlinux_comes_out_of_gzip_xz_and_lz4_bzimages(tmp_path):
    import ctypes
    import gzip as gz

    elf = b"\x7fELF" + bytes(60) + PVH_NOTE + bytes(8) + b"kernel" * 1000
    size = len(elf).to_bytes(4, "little")  # the kernel build appends the inflated size
    payloads = {"gzip": gz.compress(elf) + size, "xz": lzma.compress(elf, check=lzma.CHECK_CRC32) + size}
    try:
        lib = ctypes.CDLL("liblz4.so.1")
        out = ctypes.create_string_buffer(len(elf) * 2)
        n = lib.LZ4_compress_default(elf, out, len(elf), len(out))
        magic = pvh.LZ4_LEGACY_MAGIC.to_bytes(4, "little")
        payloads["lz4"] = magic + n.to_bytes(4, "little") + out.raw[:n] + size
    except OSError:
        pass  # no liblz4 here: the LZ4 path can't be checked
    for kind, payload in payloads.items():
        (tmp_path / kind).write_bytes(fake_bzimage(payload))
        assert pvh.extract_pvh_vmlinux(tmp_path / kind) == elf, kind
    (tmp_path / "nopvh").write_bytes(fake_bzimage(gz.compress(b"\x7fELF" + bytes(100))))
    (tmp_path / "old").write_bytes(fake_bzimage(payloads["gzip"])[:0x206] + bytes(2) + bytes(2000))
    assert pvh.extract_pvh_vmlinux(tmp_path / "nopvh") is None, "no PHYS32_ENTRY note"
    assert pvh.extract_pvh_vmlinux(tmp_path / "old") is None, "boot protocol before 2.08"
    assert pvh.inflate(b"BZh9garbage") is None and pvh.inflate(b"\x1f\x8bnot gzip") is None


def test_static_elf_check(tmp_path):
    assert image.is_static_elf(fake_static_elf(tmp_path / "static"))
    assert not image.is_static_elf(Path(sys.executable).resolve()), "python is dynamically linked"
    (tmp_path / "text").write_text("#!/bin/sh\n")
    assert not image.is_static_elf(tmp_path / "text")


def test_cpio_round_trip_with_nodes_links_and_odd_sizes():
    import io

    entries = [Entry("d", S_IFDIR | 0o755), Entry("d/f", S_IFREG | 0o644, b"x" * 5),
               Entry("d/l", S_IFLNK | 0o777, b"f"), Entry("dev/null", S_IFCHR | 0o666, rdev=(1, 3))]
    buf = io.BytesIO()
    write_newc(entries, buf)
    assert len(buf.getvalue()) % 4 == 0
    assert read_newc(buf.getvalue()) == entries


# --- accelerator and leftovers ------------------------------------------------------------------
def test_accel_choice_tcg_and_kvm_probe_answers():
    assert accel.choose("tcg") == ("tcg", "asked for TCG")
    reason = accel.kvm_unusable_reason()
    assert reason is None or reason.startswith("/dev/kvm")


def test_sweep_stale_removes_dirs_of_dead_owners_only(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / "labkit-qemu-dead"
    gone.mkdir(mode=0o700)  # what mkdtemp makes: only this user's private directories are swept
    (gone / "owner").write_text(f"{dead.pid} {dead.pid}\n")
    (gone / "qmp.sock").write_text("")
    kept = tmp_path / "labkit-qemu-live"
    kept.mkdir(mode=0o700)
    (kept / "owner").write_text(f"{os.getpid()} 1\n")
    assert sweep_stale(str(tmp_path)) == [str(gone)]
    assert not gone.exists() and kept.exists()


# --- recorded live runs replay without QEMU ----------------------------------------------------
def test_every_recorded_run_replays_its_demo_and_shows_the_real_behaviour():
    from labkit.backends.qemu.demos import DEMOS, recording_path, run_demo
    from labkit.backends.qemu.record import ReplayBackend

    rows = {}
    for name in DEMOS:
        with ReplayBackend(recording_path(name)) as vm:
            rows[name] = run_demo(name, vm)
            assert vm.facts["backend"] == "qemu" and vm.facts["kernel"]
            # the pmem and zoneinfo demos never advance (no trace) and change no balloon; reporting's
            # balloon keeps its size (no BALLOON_CHANGE); migrations send MIGRATION events
            still = name == "pmem" or name.startswith("zoneinfo_")
            assert bool(vm.trace) == (not still), "a ~50 ms trace of actual and host RSS (advance)"
            assert bool(vm.recorded_events) == (not still and not name.startswith("reporting")), \
                "BALLOON_CHANGE / MIGRATION events"
    inflated = rows["balloon"][1]
    assert rows["balloon"][0]["memtotal"] - inflated["memtotal"] == 256 * MiB
    assert rows["balloon_deflate_on_oom"][0]["memtotal"] == rows["balloon_deflate_on_oom"][1]["memtotal"]
    oom = rows["oom_deflate"]
    assert oom[-1]["balloon_actual"] > oom[1]["balloon_actual"] and oom[-1]["oom_kills"] == 0
    reporting = rows["reporting"]
    assert reporting[-1]["host_rss"] < max(r["host_rss"] for r in reporting) - 200 * MiB
    boot, wrote, flushed, more, synced = rows["pmem"]
    assert wrote["host_page_cache_dirty"] == wrote["dirty_pages"] * 4096 >= 15 * MiB
    assert flushed["host_page_cache_dirty"] == 0
    assert flushed["written_bytes"] == wrote["host_page_cache_dirty"]
    assert more["host_page_cache_dirty"] > 0 == synced["host_page_cache_dirty"]
    assert abs(wrote["cached"] - boot["cached"]) <= MiB, "no guest page cache: DAX"


def test_replay_refuses_a_different_call_and_says_what_was_recorded():
    from labkit.backends.qemu.demos import recording_path
    from labkit.backends.qemu.record import ReplayBackend, ReplayMismatch

    vm = ReplayBackend(recording_path("balloon"))
    with pytest.raises(ReplayMismatch, match=r"call 0 is meminfo\(\) but the recording has sample\(\)"):
        vm.meminfo()
    with pytest.raises(NotImplementedError, match="no page map"):
        vm.snapshot()


@pytest.mark.parametrize(("argv", "text"), [
    (["record", "nope"], "labkit record: error: demo 'nope' is not one of ['balloon'"),
    (["guest", "build", "--kernel", "/nonexistent/vmlinuz"],
     "labkit guest build: error: kernel argument: /nonexistent/vmlinuz is not a readable file"),
])
def test_live_commands_fail_in_one_line(argv, text):
    """In a subprocess, as a user runs them: a bad argument is one line on stderr, no traceback."""
    code = f"import sys, labkit.cli as cli; sys.exit(cli.main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and text in result.stderr and "Traceback" not in result.stderr
