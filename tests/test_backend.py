"""ModelBackend's QMP surface and bad input: QEMU's classes and texts, and nothing changed."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.backends import Backend
from labkit.model.pages import PageState

MiB = 1 << 20


@pytest.fixture
def vm():
    with labkit.open(memory="512M", seed=0) as v:
        yield v


def unchanged(vm):
    """A fingerprint of everything bad input must leave alone."""
    return (vm.mem.state.copy(), vm.mem.flags.copy(), vm.now_ms, dict(vm.meminfo()),
            vm.balloon_device.config.num_pages, len(vm.events()))


def same(a, b):
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(a, b, strict=True))


def test_model_backend_satisfies_the_backend_protocol(vm):
    assert isinstance(vm, Backend)


@pytest.mark.parametrize(("command", "args", "error_class", "text"), [
    ("nope", {}, "CommandNotFound", "The command nope has not been found"),
    ("balloon", {}, "GenericError", "Parameter 'value' is missing"),
    ("balloon", {"value": 1 << 28, "x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("balloon", {"value": "1G"}, "GenericError",
     "Invalid parameter type for 'value', expected: integer"),
    ("balloon", {"value": 0}, "GenericError", "Parameter 'target' expects a size"),
    ("balloon", {"value": -4096}, "GenericError", "Parameter 'target' expects a size"),
    ("query-balloon", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("qom-get", {"path": "nope", "property": "guest-stats"}, "DeviceNotFound",
     "Device 'nope' not found"),
    ("qom-get", {"path": "balloon0", "property": "nope"}, "GenericError",
     "Property 'virtio-balloon-pci.nope' not found"),
    ("qom-set", {"path": "balloon0", "property": "guest-stats", "value": 1}, "GenericError",
     "Property 'virtio-balloon-pci.guest-stats' is not writable"),
    ("qom-set", {"path": "balloon0", "property": "guest-stats-polling-interval", "value": "2"},
     "GenericError", "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"),
])
def test_qmp_errors_carry_qemus_class_and_text_and_change_nothing(vm, command, args, error_class,
                                                                  text):
    before = unchanged(vm)
    with pytest.raises(labkit.QMPError) as err:
        vm.qmp(command, **args)
    assert err.value.error_class == error_class
    assert err.value.desc == text
    assert err.value.as_qmp() == {"error": {"class": error_class, "desc": text}}
    assert same(before, unchanged(vm))


def test_no_balloon_device_is_device_not_active():
    # docs/mechanisms.md §1.7: DeviceNotActive if there is no balloon
    with labkit.open(memory="256M", balloon=False) as vm:
        with pytest.raises(labkit.QMPError) as err:
            vm.qmp("balloon", value=128 * MiB)
        assert err.value.error_class == "DeviceNotActive"
        assert vm.sample()["balloon_actual"] == 256 * MiB


def test_query_status_and_commands(vm):
    assert vm.qmp("query-status")["status"] == "running"
    names = {c["name"] for c in vm.qmp("query-commands")}
    assert {"balloon", "query-balloon", "qom-get", "qom-set"} <= names


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), [
    ({"memory": "3X"}, ValueError, "'3X' is not a size"),
    ({"memory": 0}, ValueError, "at least 64 MiB"),
    ({"memory": -1}, ValueError, "at least 64 MiB"),
    ({"memory": "100000K"}, ValueError, "whole number of MiB"),
    ({"memory": 1.5}, TypeError, "memory must be an int"),
    ({"memory": "32T"}, ValueError, "at most 16 TiB"),
    ({"memory": "1G", "balloon": {"deflate-on-oom": True}}, ValueError,
     "unknown balloon option(s) ['deflate-on-oom']"),
    ({"memory": "1G", "host": {"rm": "2G"}}, ValueError, "unknown host option(s) ['rm']"),
    ({"memory": "1G", "host": {"ram": "-2G"}}, ValueError, "is not a size"),
    ({"memory": "1G", "model": {"boot": "windows"}}, ValueError, "model boot 'windows'"),
    ({"memory": "1G", "numa_nodes": 0}, ValueError, "numa_nodes must be an int from 1 to 64"),
    ({"memory": "256M", "numa_nodes": 4}, ValueError, "at least 128 MiB per node"),
    ({"memory": "1G", "sed": 1}, TypeError, "unknown option 'sed'"),
    ({"memory": "1G", "balloon": {"free_page_hint": True}}, ValueError,
     "'free-page-hint' requires 'iothread' to be set"),
])
def test_bad_options_are_refused_with_the_value_named(kwargs, exc, fragment):
    with pytest.raises(exc) as err:
        labkit.open(**kwargs)
    assert fragment in str(err.value)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError,
                       match=r"backend 'xen' is not available; accepted: \['model', 'qemu'\]"):
        labkit.open(backend="xen")


def test_guest_too_large_for_this_machine_is_refused_before_allocating(monkeypatch):
    import labkit.backends.model as model
    import labkit.backends.options_keywords as options

    class Tiny:
        available = 64 << 20

    monkeypatch.setattr(options.psutil, "virtual_memory", lambda: Tiny)
    allocated = []
    monkeypatch.setattr(model.GuestMemory, "__init__", lambda *a, **k: allocated.append(a))
    with pytest.raises(ValueError, match="only 64 MiB is available"):
        labkit.open(memory="64G")
    assert allocated == []


@pytest.mark.parametrize(("op", "args", "exc", "fragment"), [
    ("dance", {}, ValueError, "guest op 'dance' is not one of"),
    ("alloc", {"size": "1M", "kind": "gpu"}, ValueError, "kind 'gpu' is not one of"),
    ("alloc", {"size": 1000}, ValueError, "multiple of 4 KiB"),
    ("alloc", {"size": 0}, ValueError, "positive multiple of 4 KiB"),
    ("alloc", {"size": "1T"}, ValueError, "up to the guest's 512 MiB"),
    ("alloc", {"size": "1M", "node": 3}, ValueError, "node 3 does not exist"),
    ("alloc", {}, TypeError, "needs argument 'size'"),
    ("touch", {"handle": 999}, ValueError, "handle 999 does not exist"),
    ("free", {"handle": "x"}, ValueError, "handle 'x' does not exist"),
    ("free", {"handle": 3}, ValueError, "not freeable"),
])
def test_bad_guest_ops_change_nothing(vm, op, args, exc, fragment):
    before = unchanged(vm)
    with pytest.raises(exc) as err:
        vm.guest(op, **args)
    assert fragment in str(err.value)
    assert same(before, unchanged(vm))


def test_advance_rejects_negative_time_and_closed_vm_refuses_calls():
    vm = labkit.open(memory="256M")
    with pytest.raises(ValueError, match="advance\\(\\) takes milliseconds >= 0, got -5"):
        vm.advance(-5)
    vm.close()
    with pytest.raises(RuntimeError, match="closed"):
        vm.qmp("query-balloon")


def test_sample_keys_and_units(vm):
    row = vm.sample()
    for key in ("t_ms", "memtotal", "memfree", "memavailable", "cached", "balloon_actual",
                "balloon_target", "host_rss", "host_swap"):
        assert key in row
    info = vm.meminfo()
    assert row["memtotal"] == info["MemTotal"] * 1024
    assert row["host_rss"] == vm.mem.backed_pages * 4096
    assert row["balloon_actual"] == 512 * MiB


def test_guest_ops_mean_what_they_say(vm):
    before = vm.meminfo()
    h = vm.guest("alloc", size="64M", kind="anon")
    assert vm.meminfo()["AnonPages"] - before["AnonPages"] == 64 * 1024
    f = vm.guest("alloc", size="32M", kind="file", dirty=True)
    assert vm.meminfo()["Dirty"] == 32 * 1024
    assert vm.guest("sync") == 32 * 256
    assert vm.meminfo()["Dirty"] == 0
    s = vm.guest("alloc", size="16M", kind="shmem")
    assert vm.meminfo()["Shmem"] == 16 * 1024
    cached = vm.meminfo()["Cached"]
    vm.guest("drop_caches")
    assert vm.meminfo()["Cached"] == 16 * 1024  # only shmem is left: it is not droppable
    assert cached > 16 * 1024
    vm.guest("read", handle=f)  # re-read: back in the cache
    assert vm.meminfo()["Cached"] == 48 * 1024
    for handle in (h, f, s):
        vm.guest("free", handle=handle)
    assert vm.mem.count(PageState.ANON) * 4 == before["AnonPages"]
