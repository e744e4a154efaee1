"""QEMU command lines: ``labkit.open(qemu_args=...)`` reads QEMU's syntax into the same VmOptions as
the keywords, and refuses what QEMU refuses with QEMU's text.

Every refusal text below is what qemu-system-x86_64 7.2 (Debian 12) printed for the same option on
this machine (``qemu-system-x86_64: <option>: <text>``); the sources are util/qemu-option.c
(QemuOpts), util/cutils.c (qemu_strtosz), qapi/qapi-util.c (qapi_bool_parse), util/id.c
(id_wellformed), hw/mem/memory-device.c (memory_device_check_addable), hw/virtio/virtio-mem.c
(virtio_mem_device_realize), hw/virtio/virtio-balloon.c (virtio_balloon_device_realize) and
hw/core/numa.c.
"""

from __future__ import annotations

import os

import pytest

import labkit
from labkit.backends.options import VmOptions, parse_options
from labkit.backends.qemu_cmdline import QemuOptionError, parse_opts, qemu_strtosz, split_args
from labkit.units import GiB, MiB

TALK_VIRTIO_MEM = ("-m 4G,maxmem=20G -object memory-backend-ram,id=mem0,size=16G "
                   "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0")
TALK_PMEM = ("-object memory-backend-file,id=mem0,share=on,mem-path=./disk.img,size=4G "
             "-device virtio-pmem-pci,id=vpmem0,memdev=mem0")
TALK_BALLOON = "-device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on"


@pytest.fixture
def in_image_dir(tmp_path, monkeypatch):
    """A directory holding the talk's ./disk.img (4 GiB, sparse), as the working directory."""
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(4 * GiB)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the value syntax ---------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "default", "value"), [
    ("16G", "B", 16 * GiB), ("4g", "B", 4 * GiB), ("1.5G", "B", 3 * GiB // 2), ("0x1000", "B", 4096),
    ("4096", "M", 4 * GiB), ("512k", "B", 512 * 1024),
])
def test_sizes_read_as_qemu_strtosz(text, default, value):
    # util/cutils.c do_strtosz: one suffix letter, fractions need a unit, -m counts in MiB
    assert qemu_strtosz(text, default) == value


@pytest.mark.parametrize("text", ["4GiB", "1.5", "-1", "abc", "0x1.5G", "16E"])
def test_sizes_qemu_refuses_are_refused(text):
    with pytest.raises(ValueError):
        qemu_strtosz(text)


def test_qemu_opts_escape_commas_take_the_implied_key_and_the_last_repeat():
    # util/qemu-option.c opts_do_parse: ",," is a comma in a value; the first bare item is the
    # implied key; a bare key means on, "no" + key off
    assert parse_opts("memory-backend-file,id=m,mem-path=/a,,b.img,size=1G,size=2G", "qom-type") == {
        "qom-type": "memory-backend-file", "id": "m", "mem-path": "/a,b.img", "size": "2G"}
    assert parse_opts("virtio-balloon-pci,nodeflate-on-oom,share", "driver") == {
        "driver": "virtio-balloon-pci", "deflate-on-oom": "off", "share": "on"}
    assert parse_opts('{"driver": "virtio-balloon-pci", "id": "b0"}', "driver")["id"] == "b0"
    assert split_args("-object 'memory-backend-file,id=m,mem-path=a b.img,size=1G'")[1].endswith("size=1G")


# --- the talk's lines, verbatim ----------------------------------------------------------------
def test_the_talks_virtio_mem_line_is_the_same_machine_as_the_keywords():
    line = parse_options("model", qemu_args=TALK_VIRTIO_MEM)
    assert (line.memory, line.maxmem) == (4 * GiB, 20 * GiB)
    (device,) = line.virtio_mem
    assert (device.id, device.memdev, device.size, device.node, device.block_size) == (
        "vm0", "mem0", 16 * GiB, 0, 2 * MiB)
    assert line.balloon is None  # a QEMU line without -device virtio-balloon-pci has no balloon
    keywords = parse_options("model", memory="4G", balloon=False,
                             virtio_mem=[{"id": "vm0", "size": "16G", "node": 0}])
    assert keywords.virtio_mem[0].spec() | {"memdev": "mem0"} == device.spec() | {"memdev": "mem0"}
    assert isinstance(line, VmOptions) and (keywords.memory, keywords.maxmem) == (line.memory, line.maxmem)


def test_the_talks_lines_open_verbatim_on_the_model(in_image_dir):
    with labkit.open(qemu_args=TALK_VIRTIO_MEM) as vm:
        assert vm.qmp("query-memory-devices")[0]["data"] | {} == {
            "memaddr": 0x180000000, "node": 0, "requested-size": 0, "size": 0,
            "max-size": 16 * GiB, "block-size": 2 * MiB, "memdev": "/objects/mem0", "id": "vm0"}
    with labkit.open(qemu_args=TALK_PMEM) as vm:  # no -m: labkit's 4 GiB, maxmem covering the region
        (pmem,) = vm.qmp("query-memory-devices")
        assert pmem == {"type": "virtio-pmem", "data": {"memaddr": 0x180000000, "size": 4 * GiB,
                                                       "memdev": "/objects/mem0", "id": "vpmem0"}}
        assert os.path.samefile(vm.virtio_pmem.devices[0].path, in_image_dir / "disk.img")
    with labkit.open(qemu_args=TALK_BALLOON) as vm:
        assert vm.qmp("qom-get", path="balloon0", property="deflate-on-oom") is True
        assert vm.reporting is not None and vm.reporting.negotiated


def test_memaddr_of_the_first_memory_device_is_qemus():
    # hw/i386/pc.c: with 4 GiB on q35, 2 GiB sit below 4 GiB and 2 GiB above: the device-memory
    # region starts at 6 GiB (0x180000000), which is where QEMU 7.2 put vm0 here
    with labkit.open(qemu_args=TALK_VIRTIO_MEM) as vm:
        assert vm.qmp("qom-get", path="vm0", property="memaddr") == 0x180000000


def test_a_line_and_keywords_combine_when_they_do_not_overlap():
    with labkit.open(memory="1G", seed=3, qemu_args=TALK_BALLOON) as vm:
        assert vm.memory == GiB and vm.seed == 3 and vm.balloon is not None
    with pytest.raises(ValueError, match="memory= and -m in qemu_args both say the same thing"):
        labkit.open(memory="1G", qemu_args="-m 2G")
    with pytest.raises(ValueError, match="balloon= and a -device in qemu_args both give"):
        labkit.open(balloon={}, qemu_args=TALK_BALLOON)


def test_append_gives_the_guest_kernel_its_parameters():
    with labkit.open(qemu_args=["-m", "1G,maxmem=2G", "-object", "memory-backend-ram,id=m0,size=1G",
                                "-device", "virtio-mem-pci,id=vm0,memdev=m0,requested-size=256M",
                                "-append", "memhp_default_state=online_movable init_on_free=1"]) as vm:
        assert vm.options.memhp_default_state == "online_movable" and vm.cmdline["init_on_free"] == 1
        vm.advance(2000)
        assert vm.qmp("qom-get", path="vm0", property="size") == 256 * MiB
        assert set(vm.kernel.hotplug.online_blocks.values()) == {"Movable"}
    with pytest.raises(QemuOptionError, match="honours the kernel parameters"):
        labkit.open(qemu_args="-append quiet")


# --- what QEMU refuses, with its text ---------------------------------------------------------
SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


@pytest.mark.parametrize(("args", "text"), [
    ("-device virtio-balloon-pci,deflate-on-oom=maybe",
     "-device virtio-balloon-pci,deflate-on-oom=maybe: Parameter 'deflate-on-oom' expects 'on' or 'off'"),
    ("-device virtio-balloon-pci,id=1b", "-device virtio-balloon-pci,id=1b: Parameter 'id' expects an "
     "identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."),
    ("-device virtio-balloon-pci,id=b0,,x=1", "Parameter 'id' expects an identifier"),
    ("-device virtio-balloon-pci,free-page-hint=on",
     "-device virtio-balloon-pci,free-page-hint=on: 'free-page-hint' requires 'iothread' to be set"),
    ("-device virtio-balloon-pci,bogus=on",
     "-device virtio-balloon-pci,bogus=on: Property 'virtio-balloon-pci.bogus' not found"),
    ("-device virtio-balloon-pci,iothread=io9",
     "-device virtio-balloon-pci,iothread=io9: Device 'io9' not found"),
    ("-device virtio-balloon-pci -device virtio-balloon-pci",
     "-device virtio-balloon-pci: Only one balloon device is supported"),
    ("-device virtio-balloon-pci,id=b0 -device virtio-balloon-pci,id=b0",
     "-device virtio-balloon-pci,id=b0: Duplicate ID 'b0' for device"),
    (TALK_VIRTIO_MEM.replace("node=0", "node=1"), "-device virtio-mem-pci,id=vm0,memdev=mem0,node=1: 'node' "
     "property has value '1', which exceedsthe number of numa nodes: 1"),
    (TALK_VIRTIO_MEM.replace("16G", "17G"), "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0: not enough "
     "space, currently 0x0 in use of total space for memory devices 0x400000000"),
    (TALK_VIRTIO_MEM.replace(",maxmem=20G", ""), "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0: memory "
     "devices (e.g. for memory hotplug) are not enabled, please specify the maxmem option"),
    ("-m 4G,maxmem=20G -device virtio-mem-pci,id=vm0,memdev=mem9",
     "-device virtio-mem-pci,id=vm0,memdev=mem9: Device 'mem9' not found"),
    ("-m 4G,maxmem=20G -device virtio-mem-pci,id=vm0", "-device virtio-mem-pci,id=vm0: 'memdev' property "
     "must be set"),
    (TALK_VIRTIO_MEM + ",requested-size=3M", "'requested-size' property has to be multiples of 'block-size' "
     "(0x200000)"),
    (TALK_VIRTIO_MEM + ",block-size=3M", "'block-size' property has to be a power of two"),
    (TALK_VIRTIO_MEM + ",requested-size=abc", "Parameter 'requested-size' expects size"),
    (TALK_VIRTIO_MEM + ",memaddr=0x1000", "address must be aligned to 0x200000 bytes"),
    (TALK_VIRTIO_MEM + ",unplugged-inaccessible=maybe",
     "Parameter 'unplugged-inaccessible' does not accept value 'maybe'"),
    (TALK_VIRTIO_MEM + " -device virtio-pmem-pci,id=p,memdev=mem0",
     "-device virtio-pmem-pci,id=p,memdev=mem0: not enough space, currently 0x400000000 in use of "
     "total space for memory devices 0x400000000"),
    ("-m 4G,maxmem=20G -object memory-backend-ram,id=mem0,size=1G -device virtio-mem-pci,id=vm0,memdev=mem0 "
     "-device virtio-pmem-pci,id=p,memdev=mem0", "can't use already busy memdev: mem0"),
    ("-m 4X", f"-m 4X: Parameter 'size' expects a non-negative number below 2^64\n{SIZE_HINT}"),
    ("-m 4G,maxmem=2G", "invalid value of maxmem: maximum memory size (0x80000000) must be at least the "
     "initial memory size (0x100000000)"),
    ("-m 4G,slots=300,maxmem=8G", "unsupported amount of memory slots: 300"),
    ("-m 4G,foo=1", "-m 4G,foo=1: Invalid parameter 'foo'"),
    ("-object memory-backend-ram,id=mem0", "-object memory-backend-ram,id=mem0: Parameter 'size' is missing"),
    ("-object memory-backend-ram,size=1G", "Parameter 'id' is missing"),
    ("-object memory-backend-ram,id=m,size=1.5", "Parameter 'size' expects a size value"),
    ("-object memory-backend-ram,id=m,size=1G,bogus=1", "Invalid parameter 'bogus'"),
    ("-object memory-backend-ram,id=m,size=0",
     "property 'size' of memory-backend-ram doesn't take value '0'"),
    ("-object memory-backend-file,id=m,size=1G", "Parameter 'mem-path' is missing"),
    ("-object iothread,id=io0 -object iothread,id=io0",
     "-object iothread,id=io0: Duplicate ID 'io0' for object"),
    ("-object iothread,id=9x", "-object iothread,id=9x: Parameter 'id' expects an identifier"),
    ("-m 2G -numa node -numa node", "total memory for NUMA nodes (0x0) should equal RAM size (0x80000000)"),
    ("-m 2G -numa node,mem=1G", "Parameter -numa node,mem is not supported by this machine type\n"
     "Use -numa node,memdev instead"),
    ("-m 2G -object memory-backend-ram,id=r0,size=1G -numa node,memdev=r0,nodeid=3",
     "numa: Node ID missing: 2"),
    ("-m 2G -numa node,nodeid=0 -numa node,nodeid=0", "Duplicate NUMA nodeid: 0"),
    ("-m 2G -object memory-backend-ram,id=r0,size=1G -machine memory-backend=r0",
     "Machine memory size does not match the size of the memory backend"),
])
def test_what_qemu_refuses_is_refused_with_qemus_text(args, text):
    with pytest.raises(QemuOptionError) as err:
        labkit.open(qemu_args=args)
    assert text in str(err.value)


def test_a_pmem_file_that_is_missing_is_qemus_backing_store_error():
    # backends/hostmem-file.c: QEMU would create the file; labkit refuses to (its own rule)
    with pytest.raises(QemuOptionError, match="can't open backing store /nonexistent/x for guest RAM"):
        labkit.open(qemu_args="-object memory-backend-file,id=m,size=1G,mem-path=/nonexistent/x "
                              "-device virtio-pmem-pci,id=p,memdev=m")


def test_objects_come_before_devices_whatever_the_order_on_the_line():
    # softmmu/vl.c: -object is created before -device (qemu_create_late_backends)
    opts = parse_options("model", qemu_args="-device virtio-balloon-pci,iothread=io0,free-page-hint=on "
                                            "-object iothread,id=io0")
    assert opts.balloon.iothread == "io0" and opts.iothreads == ("io0",)


def test_numa_nodes_take_their_memory_backends():
    opts = parse_options("model", qemu_args="-m 2G -object memory-backend-ram,id=r0,size=1G "
                                            "-object memory-backend-ram,id=r1,size=1G "
                                            "-numa node,memdev=r0 -numa node,memdev=r1")
    assert opts.node_sizes == (GiB, GiB) and opts.node_memdevs == ("r0", "r1")
    with labkit.open(qemu_args=opts.qemu_args) as vm:
        assert {b["id"] for b in vm.qmp("query-memdev")} == {"r0", "r1"}
        assert [z.node for z in vm.mem.zones] == [0, 1]


def test_the_model_refuses_what_it_does_not_model_and_the_live_backend_passes_it_on():
    with pytest.raises(QemuOptionError, match="labkit's model does not take QEMU option -foo"):
        parse_options("model", qemu_args="-foo")
    with pytest.raises(QemuOptionError, match="labkit's model has no device 'virtio-net-pci'"):
        parse_options("model", qemu_args="-device virtio-net-pci")
    live = parse_options("qemu", qemu_args="-device virtio-net-pci,netdev=n0 -netdev user,id=n0 "
                                           "-device virtio-balloon-pci,indirect_desc=off")
    assert live.passthrough == (("-netdev", "user,id=n0"),) and live.balloon is not None
    with pytest.raises(QemuOptionError, match="labkit's live backend sets -kernel itself"):
        parse_options("qemu", qemu_args="-kernel /boot/vmlinuz")


def test_the_live_command_line_passes_the_users_args_as_given():
    from labkit.backends.qemu.process import QemuConfig, qemu_command

    opts = parse_options("qemu", qemu_args=TALK_VIRTIO_MEM + " " + TALK_BALLOON)
    config = QemuConfig(memory=opts.memory, balloon=opts.balloon.properties(), maxmem=opts.maxmem,
                        qemu_args=opts.qemu_args, from_line=opts.from_line,
                        virtio_mem=tuple(d.spec() for d in opts.virtio_mem))
    args = qemu_command(config, "/d", "k", "i")
    assert args[-len(opts.qemu_args):] == list(opts.qemu_args)  # verbatim, at the end
    assert args.count("-m") == 1 and sum(a.startswith("virtio-balloon-pci") for a in args) == 1
    assert "memory-backend-ram,id=ram0" not in " ".join(args)  # the line's -m makes QEMU's pc.ram


@pytest.mark.parametrize(("balloon", "on"), [
    ({"deflate_on_oom": "no"}, False), ({"deflate_on_oom": "yes"}, True), ({"deflate_on_oom": "off"}, False),
    ({"deflate_on_oom": "true"}, True), ({"deflate_on_oom": "n"}, False), ({"deflate_on_oom": True}, True),
])
def test_keyword_booleans_are_qemus_on_both_backends(balloon, on):
    # issue 12 D4: qapi_bool_parse's words, identically on the model and the live backend
    for backend in ("model", "qemu"):
        assert parse_options(backend, balloon=balloon).balloon.deflate_on_oom is on
    with pytest.raises(ValueError, match="balloon deflate_on_oom='nope': Parameter 'deflate-on-oom' "
                                         "expects 'on' or 'off'"):
        parse_options("model", balloon={"deflate_on_oom": "nope"})


@pytest.mark.parametrize("bad", ["b0,guest-stats-polling-interval=1", "0b", "", "b 0"])
def test_keyword_ids_are_qemus_identifiers(bad):
    # issue 12 D10: an id with a comma would inject a property into the live command line
    with pytest.raises(ValueError, match="expects an identifier"):
        parse_options("qemu", balloon={"id": bad})
    with pytest.raises(ValueError):
        parse_options("model", virtio_mem=[{"id": bad, "size": "1G"}])


def test_bad_options_leave_no_vm_behind():
    from labkit.model.host import Host

    host = Host(8 * GiB)
    with pytest.raises(QemuOptionError):
        labkit.open(host=host, qemu_args="-device virtio-balloon-pci,bogus=1")
    assert host.vms == []


def test_the_readmes_command_line_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "qemu_args" in b]
    exec(compile("import labkit\n" + block, "README.md", "exec"), {})  # noqa: S102 - our own README
    assert "  size: 4294967296\n" in capsys.readouterr().out.replace("\r\n", "\n")
