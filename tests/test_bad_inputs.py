"""Bad input everywhere (issue 12): one table of what a hostile user, a typo or a numpy array hands
labkit, over every surface, and one check for every row.

Surfaces: the API (``labkit.open`` keywords and ``qemu_args``), QMP (every command of the monitor's
table: wrong types, missing and unexpected arguments, out-of-range values), HMP, the guest ops,
time (``advance``, ``step``, ``advance_until``), the CLI (every subcommand) and the exercises.

For every row the test asserts

* the error class: the exception (``ValueError``, ``TypeError``), QEMU's QMP error class (with
  :class:`labkit.QMPError`), HMP's answer text, or the CLI's exit code (1: the input was refused,
  one line on stderr; 2: argparse's usage error) and never a traceback;
* the text: it names the value given and says what is accepted (QEMU's own text where QEMU has
  one: those rows are also run against a real qemu-system-x86_64 7.2, see
  :func:`test_qemu_7_2_gives_the_same_answer`);
* unchanged state: a fingerprint of the VM (``sample()``, the per-zone page-state counts and a
  digest of every page's state and flags, the clock, the events, the handles, what query-* say)
  before and after; for ``labkit.open``, a shared Host with nothing new attached.

Rows marked ``xfail(strict=True, reason=DEFECTS)`` need the fixes of the issue12-defects branch
(sizes beyond 2^64, numpy integers as sizes); they flip to passing when it merges.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import labkit
from labkit.backends import model as model_backend
from labkit.backends.base import CLOCK_LIMIT_MS
from labkit.model.host import Host
from labkit.units import GiB, MiB

DEFECTS = "lands with issue12-defects"
NAN, INF = float("nan"), float("inf")
HUGE = "1" + "0" * 400 + "T"


# --- the VM every QMP / HMP / guest / time row runs on ------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bad-inputs") / "disk.img"
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
    return str(path)


def machine_options(image: str) -> dict:
    """Every mechanism at once: balloon with reporting and hinting, virtio-mem, virtio-pmem."""
    return dict(memory="512M", seed=3, memhp_default_state="online_movable",
                qemu_args=["-object", "iothread,id=io0",
                           "-device", "virtio-balloon-pci,id=balloon0,iothread=io0,free-page-hint=on,"
                                      "free-page-reporting=on,deflate-on-oom=on"],
                virtio_mem=[{"id": "vm0", "size": "512M", "requested_size": "128M"}],
                virtio_pmem=[{"id": "vpmem0", "path": image, "size": "256M"}])


@pytest.fixture(scope="module")
def vm(image):
    """One VM for every row (bad input must leave it as it was, so rows can share it), with a
    little of everything going on: a handle of each kind, a disk, a pmem write, a plugged block."""
    with labkit.open(**machine_options(image)) as v:
        v.guest("alloc", size="32M", kind="anon")
        v.guest("alloc", size="16M", kind="file")
        v.qmp("blockdev-add", driver="file", filename=image, **{"node-name": "disk0"})
        v.qmp("device_add", driver="virtio-blk-pci", drive="disk0", id="blk0")
        v.guest("pmem_write", device="vpmem0", size="1M")
        v.qmp("balloon", value=448 * MiB)
        v.advance(3000)
        yield v


def fingerprint(vm) -> dict:
    """Everything bad input must leave alone, read without changing anything."""
    mem = vm.mem
    digest = hashlib.sha256(mem.state.tobytes() + mem.flags.tobytes()).hexdigest()
    queries = {name: vm.qmp(name) for name in (
        "query-balloon", "query-memory-devices", "query-memdev", "query-migrate", "query-status",
        "query-migrate-parameters", "query-migrate-capabilities")}
    return {"sample": vm.sample(), "counts": mem.counts.tolist(), "pages": digest, "now": vm.now_ms,
            "events": json.dumps(vm.events()), "handles": vm.guest("handles"), "queries": queries,
            "pmem": vm.guest("pmem_devices"), "blocks": vm.guest("memory_blocks"),
            "host": (vm.host.used_pages, vm.host.swap_used_pages), "closed": vm.closed}


def assert_same(before: dict, after: dict) -> None:
    changed = sorted(k for k in before
                     if json.dumps(before[k], default=str) != json.dumps(after[k], default=str))
    assert not changed, f"bad input changed {changed}"


# --- the table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One bad input: where it goes (``surface``), what it is, what must come back.

    ``error`` is an exception class (API, guest ops, time, exercises), a QMP error class name
    (QMP), ``"hmp"`` (the answer is text) or an exit code (CLI). ``text`` is a regular expression
    the message must match; ``exact`` is QEMU's text to the letter (QMP/HMP)."""

    surface: str
    what: Any
    error: Any
    text: str = ""
    exact: str | None = None
    qemu: bool = False  # checked against a real QEMU 7.2 too
    marks: tuple = ()
    label: str = ""

    def param(self):
        return pytest.param(self, id=f"{self.surface}:{self.label or _label(self.what)}", marks=self.marks)


def _label(what: Any) -> str:
    text = repr(what) if not isinstance(what, str) else what
    text = text.replace(" ", "_")
    return text if len(text) <= 70 else text[:50] + "..." + text[-12:]


ROWS: list[Row] = []


def rows(surface: str, table: list[tuple], **common: Any) -> None:
    for entry in table:
        what, error, text, *rest = entry
        extra = rest[0] if rest else {}
        ROWS.append(Row(surface, what, error, text, **{**common, **extra}))


# --- time: advance, step, advance_until -----------------------------------------------------
ACCEPTED_MS = r"takes a finite number of milliseconds from 0 to "
rows("time", [
    (("advance", NAN), ValueError, ACCEPTED_MS + r".*got nan$"),
    (("advance", INF), ValueError, ACCEPTED_MS + r".*got inf$"),
    (("advance", -INF), ValueError, ACCEPTED_MS + r".*got -inf$"),
    (("advance", -1), ValueError, ACCEPTED_MS + r".*got -1$"),
    (("advance", -1e-9), ValueError, ACCEPTED_MS + r".*got -1e-09$"),
    (("advance", 2**70), ValueError, r"the simulated clock stops at 2\^40 ms.*got 1180591620717411303424$"),
    (("advance", 1e300), ValueError, r"clock stops at 2\^40 ms.*got 1e\+300$"),
    (("advance", CLOCK_LIMIT_MS), ValueError, r"clock stops at 2\^40 ms.*it reads"),
    (("advance", 10**400), ValueError, r"got 100000000000000000000000\.\.\.00000000 \(401 characters\)$"),
    (("advance", True), TypeError, ACCEPTED_MS + r".*got True \(bool\)$"),
    (("advance", np.bool_(True)), TypeError, r"got np.True_ \(bool\)$"),
    (("advance", "100"), TypeError, r"got '100' \(str\)$"),
    (("advance", None), TypeError, r"got None \(NoneType\)$"),
    (("advance", 1j), TypeError, r"got 1j \(complex\)$"),
    (("advance", [100]), TypeError, r"got \[100\] \(list\)$"),
    (("advance", np.float64(NAN)), ValueError, r"got np.float64\(nan\)$"),
    (("advance", np.array([1.0, 2.0])), TypeError, r"\(ndarray\)$"),
    (("step", NAN), ValueError, r"^step\(\) max_ms " + ACCEPTED_MS + r".*got nan$"),
    (("step", INF), ValueError, r"^step\(\) max_ms " + ACCEPTED_MS + r".*got inf$"),
    (("step", -5), ValueError, r"^step\(\) max_ms .*got -5$"),
    (("step", "1s"), TypeError, r"^step\(\) max_ms .*got '1s' \(str\)$"),
    (("step", 2**70), ValueError, r"^step\(\) max_ms .*clock stops at 2\^40 ms"),
    (("advance_until", "BALLOON_CHANGE", NAN), ValueError, r"^advance_until\(\) max_ms .*got nan$"),
    (("advance_until", "BALLOON_CHANGE", INF), ValueError, r"^advance_until\(\) max_ms .*got inf$"),
    (("advance_until", "BALLOON_CHANGE", -1), ValueError, r"^advance_until\(\) max_ms .*got -1$"),
    (("advance_until", "BALLOON_CHANGE", False), TypeError, r"^advance_until\(\) .*got False \(bool\)$"),
    (("advance_until", "BALLOON_CHANGE", 2**70), ValueError, r"clock stops at 2\^40 ms"),
    (("advance_until", "balloon_change", 10), ValueError, r"takes a QMP event name .* got 'balloon_change'"),
    (("advance_until", 5, 10), ValueError, r"takes a QMP event name .* got 5$"),
])


def run_time(vm, what: tuple) -> Any:
    method, *args = what
    if method == "advance_until":
        return vm.advance_until(args[0], max_ms=args[1])
    if method == "step":
        return vm.step(max_ms=args[0])
    return vm.advance(*args)


def test_numpy_times_are_times(vm):
    """numpy's numbers are numbers: np.int64 / np.float32 milliseconds move the clock as ints and
    floats do (a row of an array is a natural argument)."""
    with labkit.open(memory="256M", seed=0) as v:
        v.advance(np.int64(250))
        v.advance(np.float32(0.5))
        v.advance(np.array([1.5])[0])
        assert v.now_ms == 252.0
        assert v.step(max_ms=np.int32(10)) is False  # nothing to do: no time passes
        assert v.advance_until("BALLOON_CHANGE", max_ms=np.float64(5)) is None and v.now_ms == 257.0


# --- the one test over the table --------------------------------------------------------------
RUNNERS: dict[str, Callable[[Any, Any], Any]] = {"time": run_time}
VM_SURFACES = ("time",)


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_bad_input_is_refused_clearly_and_changes_nothing(row: Row, request):
    vm = request.getfixturevalue("vm")
    before = fingerprint(vm)
    run = RUNNERS[row.surface]
    with pytest.raises(row.error) as err:
        run(vm, row.what)
    message = str(err.value)
    assert "Traceback" not in message
    assert _matches(row.text, message), f"{message!r} does not match {row.text!r}"
    assert_same(before, fingerprint(vm))


def _matches(pattern: str, message: str) -> bool:
    return re.search(pattern, message, flags=re.DOTALL) is not None


# --- D7: a failed labkit.open on a shared host leaves nothing behind ---------------------------
def host_state(host: Host) -> dict:
    cache = host.page_cache
    return {"vms": [vm.name for vm in host.vms], "rss": [vm.rss_pages for vm in host.vms],
            "swap": [vm.swap_pages for vm in host.vms], "used": host.used_pages,
            "cache": None if cache is None else (sorted(cache.files), sorted(cache.private),
                                                  cache.cached_pages)}


# every step of ModelBackend._assemble, in QEMU's order (the names it builds the machine with)
ASSEMBLY = ("GuestMemory", "Kernel", "MemoryHotplug", "boot", "GuestOps", "BalloonDevice", "BalloonDriver",
            "FreePageReporting", "HintTiming", "FreePageHintDevice", "FreePageHintDriver",
            "FreePageHinting", "VirtioMem", "GuestWriteback", "VirtioBlk", "VirtioPmem",
            "MigrationState", "Workloads", "Monitor")


@pytest.fixture
def shared_host(image):
    """A host with a VM already on it (its RSS, a share=off pmem mapping with private copies)."""
    host = Host(4 * GiB)
    other = labkit.open(memory="256M", seed=1, host=host, vm_name="other",
                        virtio_pmem=[{"id": "p", "path": image, "size": "64M", "share": False}])
    other.guest("pmem_write", device="p", size="1M")
    yield host
    other.close()


@pytest.mark.parametrize("step", ASSEMBLY)
def test_a_failure_at_any_step_of_assembly_leaves_a_shared_host_as_it_was(step, shared_host, image,
                                                                        monkeypatch):
    """D7: whatever step of the machine fails, the VM is not left attached to the host, holds no
    host RAM, and adds no private copies or cache entries (before: it stayed attached, its boot
    RAM counted on the host)."""
    before = host_state(shared_host)
    real = getattr(model_backend, step)

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {step}")

    if step == "VirtioPmem":  # fail in plug, after the device's file and private copy exist
        class Failing(real):
            def plug(self, spec, memdev):
                super().plug(spec, memdev)
                fail()
        monkeypatch.setattr(model_backend, step, Failing)
    else:
        monkeypatch.setattr(model_backend, step, fail)
    options = machine_options(image) | {"host": shared_host, "vm_name": "new"}
    options["virtio_pmem"] = [{"id": "q", "path": image, "size": "64M", "share": False}]
    with pytest.raises(RuntimeError, match=f"injected failure in {step}"):
        labkit.open(**options)
    assert host_state(shared_host) == before


def test_a_guest_the_shared_host_cannot_hold_is_not_left_on_it(image):
    """A real failure: the new VM's boot runs the host out of RAM (HostOutOfMemory). The host may
    have dropped clean page cache trying to make room, as a real one does; the VM is gone."""
    host = Host(200 * MiB)
    other = labkit.open(memory="256M", seed=1, host=host, vm_name="other",
                        virtio_pmem=[{"id": "p", "path": image, "size": "64M", "share": False}])
    other.guest("pmem_write", device="p", size="1M")
    before = host_state(host)
    with pytest.raises(labkit.HostOutOfMemory, match="host out of memory"):
        labkit.open(memory="512M", seed=0, host=host, vm_name="big")
    after = host_state(host)
    assert (after["vms"], after["rss"], after["swap"]) == (before["vms"], before["rss"], before["swap"])
    assert after["used"] <= before["used"] and after["cache"][:2] == before["cache"][:2]


def test_a_virtio_mem_spec_the_device_refuses_after_the_kernel_attached(shared_host):
    """Options built by hand (not through labkit.open's checks): virtio-mem refuses its spec only
    once the kernel is on the host; the host gets it back."""
    import dataclasses

    from labkit.backends.options import parse_options

    options = parse_options("model", memory="256M", seed=0, host=shared_host, vm_name="late",
                            virtio_mem=[{"id": "v", "size": "256M"}])
    bad = dataclasses.replace(options.virtio_mem[0], requested_size=3 * MiB)  # not a block multiple
    before = host_state(shared_host)
    with pytest.raises(ValueError):
        model_backend.ModelBackend(dataclasses.replace(options, virtio_mem=(bad,)))
    assert host_state(shared_host) == before


def test_a_shared_host_refuses_a_second_vm_of_the_same_name(shared_host):
    """Each VM on a host needs its own name: it keys its private copies of share=off files."""
    before = host_state(shared_host)
    with pytest.raises(ValueError, match=r"vm_name 'other' is already a VM on this host \(its VMs: "
                                         r"\['other'\]\); give each VM on a shared Host its own vm_name"):
        labkit.open(memory="256M", host=shared_host, vm_name="other")
    assert host_state(shared_host) == before


def test_closing_a_vm_gives_its_private_copies_back_to_the_host(shared_host, image):
    """QEMU's MAP_PRIVATE copies of a share=off file are its anonymous memory: they go with it."""
    before = host_state(shared_host)
    vm = labkit.open(memory="256M", seed=2, host=shared_host, vm_name="writer",
                     virtio_pmem=[{"id": "w", "path": image, "size": "64M", "share": False}])
    vm.guest("pmem_write", device="w", size="8M")
    assert shared_host.page_cache.private_pages > 256  # the other VM's 1 MiB and now these 8 MiB
    vm.close()
    after = host_state(shared_host)
    assert after["vms"] == before["vms"] and after["cache"][1] == before["cache"][1]

