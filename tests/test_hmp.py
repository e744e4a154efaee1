"""HMP on the model: ``human-monitor-command`` answers with QEMU's own text.

The expected texts are what qemu-system-x86_64 7.2 answered on this machine, through
``human-monitor-command``, for the same machine (``-m 4G,maxmem=24G``, the talk's virtio-mem and
virtio-pmem devices, its balloon line), before any guest ran: monitor/hmp.c (parsing, "unknown
command", "Try help"), monitor/hmp-cmds.c (hmp_info_balloon, hmp_balloon, hmp_info_memory_devices,
hmp_info_memdev, hmp_info_migrate, hmp_info_status, hmp_migrate_set_parameter), qom/qom-hmp-cmds.c
(hmp_qom_get, hmp_qom_set). QEMU's monitor ends every line in \\r\\n.
"""

from __future__ import annotations

import pytest

import labkit
from labkit.units import GiB, MiB

LINE = ("-m 4G,maxmem=24G -object memory-backend-ram,id=mem0,size=16G "
        "-device virtio-mem-pci,id=vm0,memdev=mem0,node=0 "
        "-object memory-backend-file,id=mem1,share=on,mem-path={image},size=4G "
        "-device virtio-pmem-pci,id=vpmem0,memdev=mem1 "
        "-device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on")
SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\r\n"
             "and exabytes, respectively.\r\n")


@pytest.fixture
def vm(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 * GiB)
    with labkit.open(qemu_args=LINE.format(image=image)) as v:
        yield v


def hmp(vm, line: str) -> str:
    return vm.qmp("human-monitor-command", **{"command-line": line})


def test_info_memory_devices_is_qemus_text(vm):
    assert hmp(vm, "info memory-devices") == (
        'Memory device [virtio-mem]: "vm0"\r\n  memaddr: 0x180000000\r\n  node: 0\r\n'
        "  requested-size: 0\r\n  size: 0\r\n  max-size: 17179869184\r\n  block-size: 2097152\r\n"
        '  memdev: /objects/mem0\r\nMemory device [virtio-pmem]: "vpmem0"\r\n  memaddr: 0x580000000\r\n'
        "  size: 4294967296\r\n  memdev: /objects/mem1\r\n")


def test_info_memdev_lists_every_backend_as_qemu_does(vm):
    text = hmp(vm, "info memdev")
    assert text.endswith("host nodes: \r\n\r\n")  # hmp_info_memdev ends with an empty line
    blocks = text[:-2].split("memory backend: ")[1:]
    assert sorted(b.split("\r\n")[0] for b in blocks) == ["mem0", "mem1", "pc.ram"]
    assert ("mem1\r\n  size:  4294967296\r\n  merge: true\r\n  dump: true\r\n  prealloc: false\r\n"
            "  share: true\r\n  reserve: true\r\n  policy: default\r\n  host nodes: \r\n") in blocks


def test_the_talks_qom_lines(vm):
    assert hmp(vm, "qom-get vm0 size") == "0\r\n"
    assert hmp(vm, "qom-set vm0 requested-size 4G") == ""
    assert hmp(vm, "qom-get vm0 requested-size") == "4294967296\r\n"
    assert vm.qmp("qom-get", path="vm0", property="requested-size") == 4 * GiB
    assert hmp(vm, 'qom-get "vm0" size') == "0\r\n"  # get_str takes a "quoted string"
    assert hmp(vm, "qom-get /machine/peripheral/vm0 memdev") == '"/objects/mem0"\r\n'  # pretty JSON
    assert hmp(vm, "qom-get /objects/mem1 share") == "true\r\n"
    assert hmp(vm, "qom-set -j vm0 requested-size 2147483648") == ""
    assert vm.qmp("qom-get", path="vm0", property="requested-size") == 2 * GiB


@pytest.mark.parametrize(("line", "answer"), [
    ("qom-get vm0 nope", "Error: Property 'virtio-mem-pci.nope' not found\r\n"),
    ("qom-get nope size", "Error: Device 'nope' not found\r\n"),
    ("qom-set vm0 requested-size 3M",
     "Error: 'requested-size' has to be multiples of 'block-size' (0x200000)\r\n"),
    ("qom-set vm0 requested-size 100G", "Error: 'requested-size' cannot exceed the memory backend "
                                        "size(0x400000000)\r\n"),
    ("qom-set vm0 requested-size abc", "Error: Parameter 'requested-size' expects a non-negative number "
                                       f"below 2^64\r\n{SIZE_HINT}"),
    ("qom-set vm0 requested-size -1", "Error: Parameter 'requested-size' expects a non-negative number "
                                      f"below 2^64\r\n{SIZE_HINT}"),
    ("qom-set vm0 block-size 4M", "Error: 'block-size' cannot be changed\r\n"),
    ("qom-set vm0 node 1", "Error: Attempt to set property 'node' on anonymous device (type 'virtio-mem') "
                           "after it was realized\r\n"),
    ("qom-set vm0 memdev mem1", "Error: Attempt to set link property 'memdev' on device '(null)' (type "
                                "'virtio-mem') after it was realized\r\n"),
    ("qom-set vpmem0 memaddr 0", "Error: Attempt to set property 'memaddr' on anonymous device (type "
                                 "'virtio-pmem') after it was realized\r\n"),
    ("qom-set balloon0 deflate-on-oom off",
     "Error: Attempt to set property 'deflate-on-oom' on anonymous device (type 'virtio-balloon-device') "
     "after it was realized\r\n"),
    ("qom-set balloon0 guest-stats-polling-interval -1", "Error: timer value must be greater than zero\r\n"),
    ("qom-set balloon0 guest-stats-polling-interval abc",
     "Error: Parameter 'guest-stats-polling-interval' expects int64\r\n"),
    ("qom-set /objects/mem0 size 1", "Error: cannot change property size of memory-backend-ram \r\n"),
    ("qom-set /objects/mem1 share off", "Error: cannot change property value\r\n"),
    ("qom-set vm0", 'qom-set: string expected\r\nTry "help qom-set" for more information\r\n'),
    ("qom-get vm0", 'qom-get: string expected\r\nTry "help qom-get" for more information\r\n'),
    ('qom-get "vm0" size x', 'qom-get: extraneous characters at the end of line\r\n'
                             'Try "help qom-get" for more information\r\n'),
])
def test_qom_errors_are_qemus(vm, line, answer):
    assert hmp(vm, line) == answer
    assert vm.qmp("qom-get", path="vm0", property="requested-size") == 0  # nothing changed


@pytest.mark.parametrize(("line", "answer"), [
    ("balloon", 'unexpected end of expression\r\nTry "help balloon" for more information\r\n'),
    ("balloon -1", 'enter a positive value\r\nTry "help balloon" for more information\r\n'),
    ("balloon abc", "invalid char 'a' in expression\r\nTry \"help balloon\" for more information\r\n"),
    ("balloon 1G", 'balloon: extraneous characters at the end of line\r\nTry "help balloon" for more '
                   "information\r\n"),
    ("balloon 0x", 'balloon: extraneous characters at the end of line\r\nTry "help balloon" for more '
                   "information\r\n"),
    ("balloon 10/0", 'division by zero\r\nTry "help balloon" for more information\r\n'),
    ("balloon -", 'unexpected end of expression\r\nTry "help balloon" for more information\r\n'),
    ("balloon 0", "Error: Parameter 'target' expects a size\r\n"),
    ("info balloon extra", 'balloon: extraneous characters at the end of line\r\nTry "help info balloon" '
                           "for more information\r\n"),
    ("nonsense", "unknown command: 'nonsense'\r\n"),
    ("info nonsense", "unknown command: 'info nonsense'\r\n"),
    ("help nonsense", "unknown command: 'nonsense'\r\n"),
])
def test_parsing_errors_are_qemus(vm, line, answer):
    assert hmp(vm, line) == answer


def test_balloon_in_mib_and_info_balloon(vm):
    assert hmp(vm, "info balloon") == "balloon: actual=4096\r\n"
    assert hmp(vm, "balloon (1+2)*1024") == ""  # get_expr: an expression, in MiB
    vm.advance(5000)
    assert hmp(vm, "info balloon") == "balloon: actual=3072\r\n"
    assert vm.qmp("query-balloon")["actual"] == 3072 * MiB


def test_without_a_balloon_it_is_qemus_device_not_active_text():
    with labkit.open(memory="1G", balloon=False) as vm:
        assert hmp(vm, "info balloon") == "Error: No balloon device has been activated\r\n"


def test_info_status_follows_the_run_state(vm):
    assert hmp(vm, "  info   status  ") == "VM status: running\r\n"
    with labkit.open(memory="256M", seed=0) as small:
        small.qmp("migrate", uri="exec:cat > /dev/null")
        small.advance(5000)
        assert hmp(small, "info status") == "VM status: paused (postmigrate)\r\n"


def test_info_migrate_is_qemu_7_2s_layout():
    globals_ = ("globals:\r\nstore-global-state: on\r\nonly-migratable: off\r\nsend-configuration: on\r\n"
                "send-section-footer: on\r\ndecompress-error-check: on\r\nclear-bitmap-shift: 18\r\n")
    with labkit.open(memory="256M", seed=0) as vm:
        assert hmp(vm, "info migrate") == globals_
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        vm.advance(5000)
        info = vm.qmp("query-migrate")
        lines = hmp(vm, "info migrate").removeprefix(globals_).split("\r\n")
    labels = [line.split(":")[0] for line in lines if line]
    assert labels[:17] == ["Migration status", "total time", "downtime", "setup", "transferred ram",
                           "throughput", "remaining ram", "total ram", "duplicate", "skipped", "normal",
                           "normal bytes", "dirty sync count", "page size", "multifd bytes",
                           "pages-per-second", "precopy ram"]
    assert lines[0] == "Migration status: completed"
    assert f"transferred ram: {info['ram']['transferred'] >> 10} kbytes" in lines
    assert f"throughput: {info['ram']['mbps']:.2f} mbps" in lines


def test_migrate_set_parameter_reads_each_type_as_qemu(vm):
    assert hmp(vm, "migrate_set_parameter downtime-limit 500") == ""
    assert hmp(vm, "migrate_set_parameter max-bandwidth 100") == ""  # MiB/s by default
    params = vm.qmp("query-migrate-parameters")
    assert params["downtime-limit"] == 500 and params["max-bandwidth"] == 100 * MiB
    text = hmp(vm, "info migrate_parameters")
    assert "max-bandwidth: 104857600 bytes/second\r\n" in text and "downtime-limit: 500 ms\r\n" in text
    for line, answer in [
        ("migrate_set_parameter nope 1", "Error: invalid parameter value: nope\r\n"),
        ("migrate_set_parameter cpu-throttle-initial abc", "Error: Parameter 'cpu-throttle-initial' expects "
                                                           "uint64\r\n"),
        ("migrate_set_parameter cpu-throttle-initial 300", "Error: Parameter 'cpu-throttle-initial' expects "
                                                           "uint8_t\r\n"),
        ("migrate_set_parameter cpu-throttle-initial 0", "Error: Parameter 'cpu_throttle_initial' expects an "
                                                         "integer in the range of 1 to 99\r\n"),
        ("migrate_set_parameter cpu-throttle-tailslow maybe", "Error: Parameter 'cpu-throttle-tailslow' "
                                                              "expects 'on' or 'off'\r\n"),
        ("migrate_set_parameter max-bandwidth abc", "Error: Invalid size abc\r\n"),
        ("migrate_set_parameter downtime-limit 3000000", "Error: Parameter 'downtime_limit' expects an "
                                                         "integer in the range of 0 to (2000 * 1000) ms\r\n"),
        ("migrate_set_parameter xbzrle-cache-size 1000",
         "Error: Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size\r\n"),
        ("migrate_set_parameter", 'migrate_set_parameter: string expected\r\nTry "help '
                                  'migrate_set_parameter" for more information\r\n'),
        ("migrate_set_capability nope on", "Error: invalid parameter value: nope\r\n"),
        ("migrate_set_capability events maybe",
         "Expected 'on' or 'off'\r\nTry \"help migrate_set_capability\" for more information\r\n"),
    ]:
        assert hmp(vm, line) == answer
    assert hmp(vm, "migrate_set_capability events on") == ""
    assert "events: on\r\n" in hmp(vm, "info migrate_capabilities")


def test_help_lines_are_qemus(vm):
    assert hmp(vm, "help balloon") == \
        "balloon target -- request VM to change its memory allocation (in MB)\r\n"
    assert hmp(vm, "help qom-set") == ("qom-set [-j] path property value -- set QOM property.\r\n"
                                       "\t\t\t-j: the value is specified in json format.\r\n")
    assert hmp(vm, "help migrate_set_parameter") == ("migrate_set_parameter parameter value -- Set the "
                                                     "parameter for migration\r\n")
    assert "info memory-devices  -- show memory devices\r\n" in hmp(vm, "info")


def test_hmp_is_one_table_over_the_qmp_commands(vm):
    """Every HMP command runs QMP commands of the monitor (as hmp-cmds.c calls qmp_*): the table
    names only commands that exist, and hmp() on the backend is the same call."""
    from labkit.backends import hmp as hmp_module

    assert set(hmp_module.INFO_COMMANDS) >= {"balloon", "memory-devices", "memdev", "migrate", "status"}
    assert vm.hmp("info balloon") == hmp(vm, "info balloon")
