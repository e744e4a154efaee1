"""Layers point down, and the hallway between them is explicit (docs/architecture.md, "Layers and
what each may import"; issue 10): model/ and devices/ import nothing from backends/, viz/,
scenarios/ or the CLI (TYPE_CHECKING and function-level imports included), no module imports itself
in a circle, the wiring registries are gone, views and scenarios read a VM through the protocol (not
its parts), query-commands is the monitor's table, and sample() has the same keys everywhere it
should."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import labkit
from labkit.backends import monitor
from labkit.backends.base import LIVE_SAMPLE_KEYS, MECHANISM_SAMPLE_KEYS, SAMPLE_KEYS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "labkit"
UPPER = ("labkit.backends", "labkit.viz", "labkit.scenarios", "labkit.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every labkit module ``path`` imports, anywhere in the file (``from a import b`` names the
    submodule ``a.b`` when there is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("labkit")}
    return out


@pytest.mark.parametrize("name", sorted(m for m in MODULES
                                        if m.startswith(("labkit.model", "labkit.devices"))))
def test_model_and_devices_import_nothing_above_them(name):
    upward = sorted(i for i in imports_of(MODULES[name]) if i.startswith(UPPER))
    assert upward == [], f"{name} imports {upward}"


def test_no_module_imports_itself_in_a_circle():
    graph = {name: {i for i in imports_of(path) if i in MODULES and i != name}
             for name, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_wiring_registries_are_gone():
    pattern = re.compile(r"import_module|register_qmp|register_guest_op|sample_hooks|_chain\(")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in PACKAGE.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# the model's parts a ModelBackend holds; a view or scenario reads what they hold through
# vm.inspect(), vm.sample(), vm.snapshot() and QMP instead
MODEL_PARTS = {"balloon", "balloon_device", "kernel", "mem", "virtio_mem", "reporting", "hinting",
               "migration", "host", "env", "virtio_pmem", "writeback", "event_queue", "disks"}
# where one still acts on a part, and why the protocol has nothing to call instead
ACTS_ON_A_PART = {
    ("labkit/viz/pagecache.py", "host"): "a host crash (what the host page cache loses): no QMP "
                                         "command crashes the host",
    ("labkit/scenarios/resize.py", "virtio_mem"): "the device's system reset alone: the model has no "
                                                  "guest reboot, so it answers no QMP system_reset",
}


def parts_used(path: Path, root: Path = ROOT) -> set[tuple[str, str]]:
    """(file relative to ``root``, part) for every ``<something>vm.<part>`` and
    ``getattr(<x>, "<part>")`` in ``path``."""
    out = set()
    rel = str(path.relative_to(root))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in MODEL_PARTS:
            base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if "vm" in base.lower():
                out.add((rel, node.attr))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in MODEL_PARTS):
            out.add((rel, node.args[1].value))
    return out


def test_views_and_scenarios_read_a_vm_through_the_protocol():
    used = set().union(*(parts_used(p) for folder in ("viz", "scenarios")
                         for p in (PACKAGE / folder).rglob("*.py")))
    assert used == set(ACTS_ON_A_PART), sorted(used ^ set(ACTS_ON_A_PART))


def test_the_parts_check_finds_a_part_read(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(vm, self):\n    a = vm.kernel.hotplug\n    b = self.vm.reporting\n"
                     "    c = getattr(vm, 'virtio_mem', None)\n    d = vm.inspect('balloon')\n")
    assert parts_used(probe, tmp_path) == {("probe.py", "kernel"), ("probe.py", "reporting"),
                                           ("probe.py", "virtio_mem")}


def test_query_commands_equals_the_monitor_table():
    with labkit.open(memory="256M", seed=0) as vm:
        assert {c["name"] for c in vm.qmp("query-commands")} == set(monitor.COMMANDS)


def test_model_sample_keys_are_the_base_and_each_mechanisms(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    always = (set(SAMPLE_KEYS) | set(MECHANISM_SAMPLE_KEYS["migration"])
              | set(MECHANISM_SAMPLE_KEYS["virtio-pmem"]))
    with labkit.open(memory="512M", seed=0) as vm:
        assert set(vm.sample()) == always
    with labkit.open(memory="1G", seed=0, balloon={"free_page_reporting": True, "free_page_hint": True,
                                                    "iothread": "io0"},
                     virtio_mem=[{"id": "vm0", "size": "1G"}],
                     virtio_pmem=[{"id": "p", "path": str(image), "size": "64M"}]) as vm:
        assert set(vm.sample()) == always | {k for keys in MECHANISM_SAMPLE_KEYS.values() for k in keys}


RECORDED = sorted((ROOT / "data" / "recorded").glob("*.json"))
# a replayable run holds the calls it answered; a measurement (e.g. costs.resize_speed) holds runs
REPLAYABLE = [p for p in RECORDED if "calls" in json.loads(p.read_text())]


def test_every_recording_is_a_replay_or_a_measurement():
    for path in RECORDED:
        doc = json.loads(path.read_text())
        assert ("calls" in doc) != ("runs" in doc), f"{path.name}: neither a replay nor a measurement"


@pytest.mark.parametrize("recording", REPLAYABLE, ids=lambda p: p.stem)
def test_replayed_samples_have_the_protocols_keys(recording):
    from labkit.backends.qemu.record import ReplayBackend

    replay = ReplayBackend(recording)
    samples = [c for c in json.loads(recording.read_text())["calls"] if c["call"] == "sample"]
    assert samples, "a recorded run samples at least once"
    for position, call in enumerate(replay.recorded_calls):
        if call["call"] == "sample":
            replay._next = position  # answer this sample as the replay would
            row = replay.sample()
            assert set(SAMPLE_KEYS) | set(LIVE_SAMPLE_KEYS) <= set(row)
    assert isinstance(replay, labkit.Backend)
