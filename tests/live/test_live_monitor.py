"""The same monitor on the model and on a real QEMU: the talk's command lines boot a live guest
as given, its HMP lines answer with the same text, and one transcript driven by qemu.qmp's
QMPClient through ``labkit serve`` (the model) and through a live QEMU's own QMP socket (``-qmp``
passed in qemu_args) gives answers of the same shape and, where the machine fixes them, the same
values (addresses, sizes, ids, memdevs, the balloon's reached target, the events' data)."""

from __future__ import annotations

import os

import pytest

import labkit
from labkit.backends.qemu import open_qemu
from tests.test_serve import serve, stop
from tests.transcript import BALLOON_TARGET, PLUG, TALK_LINE, qmp_shell, run_transcript, shapes

pytestmark = pytest.mark.live
GiB = 1 << 30


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    d = tmp_path_factory.mktemp("monitor")
    os.chmod(d, 0o700)
    return d


@pytest.fixture(scope="module")
def live(private):
    """The talk's virtio-mem and balloon lines, verbatim, plus a QMP socket for outside clients."""
    qmp = private / "live-qmp.sock"
    with open_qemu(qemu_args=f"{TALK_LINE} -qmp unix:{qmp},server=on,wait=off") as vm:
        yield vm, str(qmp)


@pytest.fixture(scope="module")
def model():
    with labkit.open(qemu_args=TALK_LINE) as vm:
        yield vm


# lines whose answers depend only on the machine, not on the guest's progress
HMP_LINES = ("info status", "qom-get vm0 node", "qom-get vm0 block-size", "qom-get vm0 memdev",
             "qom-get vm0 requested-size", "qom-set vm0 block-size 4M", "qom-set vm0 requested-size 3M",
             "qom-set vm0 requested-size 100G", "qom-set vm0 requested-size abc", "qom-set vm0 node 1",
             "qom-get nope size", "qom-get vm0 nope", "balloon 0", "balloon -1", "balloon 1G", "nonsense",
             "info nonsense", "help balloon", "help qom-get", "info migrate",
             "qom-get balloon0 deflate-on-oom", "qom-get balloon0 guest-stats-polling-interval")


def test_the_talks_hmp_lines_answer_with_qemus_own_text(live, model):
    vm, _ = live
    different = {line: (model.hmp(line), vm.hmp(line)) for line in HMP_LINES
                 if model.hmp(line) != vm.hmp(line)}
    assert different == {}
    # info memory-devices before any plug: every field is the machine's
    assert model.hmp("info memory-devices") == vm.hmp("info memory-devices")
    assert sorted(model.hmp("info memdev").split("memory backend: ")) == \
        sorted(vm.hmp("info memdev").split("memory backend: "))


def test_one_transcript_through_qmpclient_agrees_with_a_live_qemu(live, tmp_path, figures):
    _, live_qmp = live
    served = serve(tmp_path, hmp=False)
    try:
        on_model = run_transcript(served.qmp)
    finally:
        assert stop(served) == 0
    on_live = run_transcript(live_qmp, timeout_s=300)
    figures["transcript"] = (f"plugged {on_live['plugged'] >> 20} MiB and ballooned to "
                             f"{on_live['balloon-reached'] >> 20} MiB on the live guest")
    for key in ("qom-set", "requested", "plugged", "qom-get size", "info memory-devices",
                "query-memory-devices", "balloon", "balloon-reached", "info balloon"):
        assert on_model[key] == on_live[key], key
    assert shapes(on_model["greeting"]) == shapes(on_live["greeting"])
    for name in ("MEMORY_DEVICE_SIZE_CHANGE", "BALLOON_CHANGE"):
        model_events = [e for e in on_model["events"] if e["event"] == name]
        live_events = [e for e in on_live["events"] if e["event"] == name]
        assert model_events and live_events, name
        assert shapes(model_events[-1]) == shapes(live_events[-1])
        assert model_events[-1]["data"] == live_events[-1]["data"], name  # where it ends agrees
    assert on_live["plugged"] == PLUG and on_live["balloon-reached"] == BALLOON_TARGET


def test_qmp_shell_talks_to_the_live_qemu_as_to_the_model(live):
    _, live_qmp = live
    answers = qmp_shell(live_qmp, [("qom-get vm0 block-size", 0.2), ("info status", 0.2)], hmp=True)
    assert [a.strip() for a in answers[:2]] == ["2097152", "VM status: running"]


def test_the_talks_pmem_line_boots_as_given(tmp_path, monkeypatch):
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(4 * GiB)
    monkeypatch.chdir(tmp_path)
    line = ("-object memory-backend-file,id=mem0,share=on,mem-path=./disk.img,size=4G "
            "-device virtio-pmem-pci,id=vpmem0,memdev=mem0")
    with labkit.open(qemu_args=line) as model_vm, open_qemu(qemu_args=line) as live_vm:
        assert model_vm.qmp("query-memory-devices") == live_vm.qmp("query-memory-devices")
        assert model_vm.hmp("info memory-devices") == live_vm.hmp("info memory-devices")
        assert live_vm.guest("pmem_devices")[0]["device"] == "vpmem0"
