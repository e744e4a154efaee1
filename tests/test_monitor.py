"""The model's monitor: one command table, the QOM tree built from the devices' declarations, one
loop over memory devices, and QEMU's texts for what it refuses (qapi/qmp-dispatch.c,
qom/qom-qmp-cmds.c, hw/mem/memory-device.c qmp_memory_device_list, backends/hostmem.c)."""

from __future__ import annotations

import pytest

import labkit
from labkit.backends import monitor
from labkit.devices import balloon, virtio_mem, virtio_pmem
from labkit.units import GiB, MiB


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
    return str(path)


def test_query_commands_is_the_table_and_every_entry_runs_through_it():
    with labkit.open(memory="512M", seed=0) as vm:
        names = [c["name"] for c in vm.qmp("query-commands")]
        assert names == sorted(monitor.COMMANDS)
        for name, command in monitor.COMMANDS.items():  # the schema's required arguments are checked
            if command.args:
                first = next(iter(command.args))
                with pytest.raises(labkit.QMPError, match=f"Parameter '{first}' is missing"):
                    vm.qmp(name)


def test_qom_objects_and_properties_come_from_the_device_declarations(image):
    with labkit.open(memory="1G", memhp_default_state="online_movable",
                     virtio_mem=[{"id": "vm0", "size": "1G"}],
                     virtio_pmem=[{"id": "vpmem0", "path": image, "size": "256M"}]) as vm:
        for path, module in (("balloon0", balloon), ("vm0", virtio_mem), ("vpmem0", virtio_pmem)):
            listed = vm.qmp("qom-list", path=path)
            assert listed == [{"name": p.name, "type": p.type} for p in module.QOM_PROPERTIES]
        assert vm.qmp("qom-get", path="/machine/peripheral/balloon0/virtio-backend",
                      property="guest-stats-polling-interval") == 0
        assert vm.qmp("qom-get", path="mem-vm0", property="size") == GiB  # /objects/<id>, by its id


def test_a_device_without_id_is_anonymous_as_in_qemu():
    # qdev: a device without id= lives at /machine/peripheral-anon/device[N], with no id in QMP
    with labkit.open(qemu_args="-m 1G,maxmem=2G -object memory-backend-ram,id=m,size=1G "
                               "-device virtio-mem-pci,memdev=m -device virtio-balloon-pci") as vm:
        (info,) = vm.qmp("query-memory-devices")
        assert "id" not in info["data"]
        paths = [o.path for o in vm.monitor.qom.objects]
        assert "/machine/peripheral-anon/device[0]" in paths and "/machine/peripheral-anon/device[1]" in paths
        assert vm.qmp("query-balloon")["actual"] == GiB


def test_query_memory_devices_is_one_loop_in_address_order(image):
    with labkit.open(memory="1G", virtio_mem=[{"id": "a", "size": "1G"}, {"id": "b", "size": "512M"}],
                     virtio_pmem=[{"id": "p", "path": image, "size": "256M"}]) as vm:
        devices = vm.qmp("query-memory-devices")
        addrs = [d["data"]["memaddr"] for d in devices]
        assert [d["data"]["id"] for d in devices] == ["a", "b", "p"] and addrs == sorted(addrs)
        text = vm.hmp("info memory-devices")
        assert [line.split('"')[1] for line in text.splitlines() if line.startswith("Memory device")] == \
            ["a", "b", "p"]


def test_query_memdev_has_every_backend_with_qemus_fields(image):
    with labkit.open(memory="1G", numa_nodes=2, virtio_mem=[{"id": "vm0", "size": "1G"}],
                     virtio_pmem=[{"id": "p", "path": image, "size": "256M", "share": False}]) as vm:
        memdevs = {m["id"]: m for m in vm.qmp("query-memdev")}
    assert set(memdevs) == {"ram0", "ram1", "mem-vm0", "mem-p"}  # the live backend's names
    assert memdevs["mem-p"] == {"id": "mem-p", "size": 256 * MiB, "merge": True, "dump": True,
                                "prealloc": False, "share": False, "reserve": True, "host-nodes": [],
                                "policy": "default"}
    assert memdevs["ram0"]["size"] + memdevs["ram1"]["size"] == GiB


def test_query_status_reads_the_run_state_the_migration_sets():
    with labkit.open(memory="256M", seed=0) as vm:
        assert vm.qmp("query-status") == {"status": "running", "singlestep": False, "running": True}
        vm.qmp("migrate", uri="exec:cat > /dev/null")
        seen = set()
        for _ in range(200):
            vm.advance(20)
            seen.add(vm.qmp("query-status")["status"])
        assert "postmigrate" in seen and vm.run_state.state == "postmigrate"


def test_qmp_capabilities_after_negotiation_and_quit_are_qemus():
    vm = labkit.open(memory="256M", seed=0)
    with pytest.raises(labkit.QMPError) as err:
        vm.qmp("qmp_capabilities")
    assert (err.value.error_class, err.value.desc) == (
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
    assert vm.qmp("quit") == {} and vm.closed
    assert vm.events()[-1]["event"] == "SHUTDOWN"
    assert vm.events()[-1]["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_memory_backends_refuse_changes_as_hostmem_does():
    with labkit.open(qemu_args="-m 1G,maxmem=2G -object memory-backend-ram,id=m,size=1G "
                               "-device virtio-mem-pci,id=vm0,memdev=m") as vm:
        with pytest.raises(labkit.QMPError, match="cannot change property size of memory-backend-ram "):
            vm.qmp("qom-set", path="m", property="size", value=2 * GiB)
        with pytest.raises(labkit.QMPError, match="cannot change property value"):
            vm.qmp("qom-set", path="/objects/m", property="share", value=True)


def test_a_hot_added_pmem_device_joins_the_qom_tree_and_its_memdev_is_busy(image):
    with labkit.open(memory="1G", seed=0) as vm:
        vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "m1", "mem-path": image,
                                "size": 256 * MiB, "share": True})
        vm.qmp("device_add", driver="virtio-pmem-pci", memdev="m1", id="p1")
        assert vm.qmp("qom-get", path="p1", property="memdev") == "/objects/m1"
        with pytest.raises(labkit.QMPError, match="can't use already busy memdev: m1"):
            vm.qmp("device_add", driver="virtio-pmem-pci", memdev="m1", id="p2")
        with pytest.raises(labkit.QMPError, match="Duplicate device ID 'balloon0'"):
            vm.qmp("device_add", driver="virtio-pmem-pci", memdev="m1", id="balloon0")
