"""A stateful fuzzer of the whole model VM (issue 12): every mechanism at once, random operations,
every invariant checked after every step.

A hypothesis ``RuleBasedStateMachine`` opens a VM with a random mix of devices (balloon with or
without deflate-on-oom, free page reporting, free page hinting; virtio-mem devices of several block
sizes under every online policy; a virtio-pmem device; a small host with swap, with or without RAM
discard) and drives it through public calls only (``vm.qmp``, ``vm.guest``, ``vm.advance``,
``vm.step``): workloads of every kind (and the background writer, a kernel build, virtio-blk
reads and writes), balloon targets, migrations started and cancelled (hinting),
virtio-mem plug and unplug, pmem reads, writes and flushes, drop_caches and sync, allocations big
enough for the OOM killer, and time advances from nothing to minutes. After each step
:func:`tests.machine_invariants.check_machine` checks every invariant (the one place that reads the
model's internals).

Profiles (``LABKIT_FUZZ``):

* ``fast`` (default, part of ``make test``): a few hundred operations, about a minute;
* ``long`` (``make fuzz``): at least ``LABKIT_FUZZ_OPS`` operations (default 50 000), printed with
  the result at the end.

Rounds are seeded (``LABKIT_FUZZ_SEED``, default 0; round ``i`` uses seed + i), so a run is
reproducible; hypothesis shrinks a failure to a minimal list of steps and prints it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import labkit
from labkit.devices.virtio_blk import add_disk
from labkit.errors import GuestError
from tests.machine_invariants import check_machine, is_panicked, watch

MiB = 1 << 20
PROFILES = {
    # (operations at least, machines per round, steps per machine at most)
    "fast": (int(os.environ.get("LABKIT_FUZZ_OPS", 800)), 8, 40),
    "long": (int(os.environ.get("LABKIT_FUZZ_OPS", 50_000)), 25, 80),
}
PROFILE = os.environ.get("LABKIT_FUZZ", "fast")
if PROFILE not in PROFILES:
    raise ValueError(f"LABKIT_FUZZ={PROFILE!r}: accepted 'fast' or 'long'")
SEED = int(os.environ.get("LABKIT_FUZZ_SEED", 0))
LOG = open(os.environ["LABKIT_FUZZ_LOG"], "a") if os.environ.get("LABKIT_FUZZ_LOG") else None  # noqa: SIM115

BLOCK_SIZES = {"2M": 2 * MiB, "4M": 4 * MiB, "128M": 128 * MiB, "256M": 256 * MiB}


@st.composite
def machines(draw) -> dict:
    """Options for ``labkit.open``: a random mix of every device, on a small guest."""
    memory = draw(st.sampled_from([256, 384, 512]))
    numa = draw(st.sampled_from([1, 1, 2])) if memory >= 256 else 1
    balloon = draw(st.one_of(st.just(False), st.fixed_dictionaries({
        "deflate_on_oom": st.booleans(),
        "free_page_reporting": st.booleans(),
        "free_page_hint": st.booleans(),
        "page_poison": st.booleans(),
    })))
    if balloon and balloon["free_page_hint"]:
        balloon["iothread"] = "io0"
    vmem = []
    for i in range(draw(st.integers(0, 2))):
        block = draw(st.sampled_from(sorted(BLOCK_SIZES)))
        size = draw(st.sampled_from([128, 256, 512])) * MiB
        size = max(size, BLOCK_SIZES[block])
        vmem.append({"id": f"vmem{i}", "size": size, "block_size": block,
                     "node": draw(st.integers(0, numa - 1))})
    guest_max = memory * MiB + sum(d["size"] for d in vmem)
    host_ram = draw(st.sampled_from([0.5, 0.8, 1.2, 3.0]))
    return {
        "memory": f"{memory}M",
        "seed": draw(st.integers(0, 2**16)),
        "numa_nodes": numa,
        "balloon": balloon,
        "virtio_mem": vmem or None,
        "memhp_default_state": draw(st.sampled_from(
            ["offline", "online", "online_kernel", "online_movable"])),
        "cmdline": {
            "memory_hotplug.online_policy": draw(st.sampled_from(["contig-zones", "auto-movable"])),
            "page_poison": draw(st.sampled_from([0, 0, 0, 1])),
            "page_reporting.page_reporting_order": draw(st.sampled_from([-1, -1, 5, 10])),
        },
        # a small host with swap: the host swaps under pressure, but never runs out
        "host": {"ram": max(64 * MiB, int(guest_max * host_ram)) // MiB * MiB,
                 "swap": 4 * guest_max, "discard": draw(st.sampled_from([True, True, False]))},
        "pmem": draw(st.sampled_from([None, None, (16, True), (16, False)])),
        "disk": draw(st.sampled_from([None, None, "writeback", "none", "writethrough", "unsafe"])),
        "max_bandwidth": draw(st.sampled_from([0, 32 * MiB, 1024 * MiB])),
    }


TIMES = st.one_of(
    st.just(0),
    st.floats(0.001, 1.0),  # inside one balloon request
    st.floats(1.0, 300.0),  # a few requests, an Out-of-puff sleep
    st.floats(300.0, 5000.0),  # reporting's 2 s delay, a balloon run
    st.floats(5000.0, 400_000.0),  # virtio-mem's 50 s - 300 s retry timer
)


class MachineFuzz(RuleBasedStateMachine):
    """One VM per example; rules are the public calls; the invariant is :func:`check_machine`."""

    operations = 0  # across all machines of the run (the figure make fuzz prints)
    machines_run = 0

    def __init__(self):
        super().__init__()
        self.vm = None
        self.dead = False
        self.tmp: str | None = None
        self.opts: dict = {}
        self.builds: list[int] = []
        self.writers: set[int] = set()

    # --- the machine ------------------------------------------------------------------------------
    @initialize(opts=machines())
    def open_vm(self, opts):
        self.opts = opts
        kw = {k: v for k, v in opts.items() if k not in ("pmem", "max_bandwidth", "disk")}
        if opts["pmem"] or opts["disk"]:
            self.tmp = tempfile.mkdtemp(prefix="labkit-fuzz-")
        if opts["pmem"]:
            mib, share = opts["pmem"]
            path = os.path.join(self.tmp, "pmem.img")
            with open(path, "xb") as f:
                f.truncate(mib * MiB)
            kw["virtio_pmem"] = [{"id": "pmem0", "path": path, "size": f"{mib}M", "share": share}]
        if LOG is not None:
            print(f"--- machine {MachineFuzz.machines_run + 1}: {opts}", file=LOG, flush=True)
        self.vm = labkit.open(**kw)
        if opts["disk"]:
            path = os.path.join(self.tmp, "disk.img")
            with open(path, "xb") as f:
                f.truncate(64 * MiB)
            add_disk(self.vm, path, cache=opts["disk"])  # blockdev-add + device_add over QMP
        self.watch = watch(self.vm)
        if opts["max_bandwidth"]:
            self.vm.qmp("migrate-set-parameters", **{"max-bandwidth": opts["max_bandwidth"]})
        MachineFuzz.machines_run += 1

    def teardown(self):
        if self.vm is not None:
            self.vm.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @invariant()
    def everything_holds(self):
        if self.vm is not None:
            check_machine(self.vm)

    def _op(self, fn, *args, **kwargs):
        """Run one public call; a guest kernel panic (Linux panics too: out of memory with nothing
        killable) ends the machine's operations, its state still checked."""
        MachineFuzz.operations += 1
        if LOG is not None:  # LABKIT_FUZZ_LOG: every call, flushed (to find a stall)
            print(f"{time.monotonic():.1f} {MachineFuzz.machines_run}.{MachineFuzz.operations} "
                  f"t={self.vm.now_ms:.1f} "
                  f"{getattr(fn, '__name__', fn)} {args} {kwargs}", file=LOG, flush=True)
        try:
            return fn(*args, **kwargs)
        except GuestError:
            assert is_panicked(self.vm), "GuestError without a kernel panic"
            self.dead = True
            return None

    def _handles(self, alive: bool = True) -> list[dict]:
        return [h for h in self.vm.guest("handles") if h["alive"] or not alive]

    def _pick(self, index: int) -> dict | None:
        hs = [h for h in self._handles() if h["name"] not in ("init", "kernel")]
        return hs[index % len(hs)] if hs else None

    # --- guest workloads -------------------------------------------------------------------------
    @precondition(lambda self: not self.dead)
    @rule(kind=st.sampled_from(["anon", "anon", "file", "shmem", "slab"]),
          share=st.floats(0.001, 0.9), dirty=st.booleans(), node=st.sampled_from([None, 0, 1]))
    def alloc(self, kind, share, dirty, node):
        memory = int(self.opts["memory"][:-1]) * MiB
        size = max(4096, int(memory * share * (0.2 if kind == "slab" else 1.0)) // 4096 * 4096)
        node = node if node is None or node < self.opts["numa_nodes"] else None
        self._op(self.vm.guest, "alloc", size=size, kind=kind, node=node,
                 dirty=dirty and kind == "file")

    @precondition(lambda self: not self.dead)
    @rule(index=st.integers(0, 50), write=st.booleans())
    def touch(self, index, write):
        h = self._pick(index)
        if h is not None:
            self._op(self.vm.guest, "touch" if write else "read", handle=h["handle"])

    @precondition(lambda self: not self.dead)
    @rule(index=st.integers(0, 50))
    def free(self, index):
        h = self._pick(index)
        if h is not None and h["name"] not in ("kernel", "init", "boot page cache"):
            self._op(self.vm.guest, "free", handle=h["handle"])

    @precondition(lambda self: not self.dead)
    @rule(which=st.sampled_from(["drop_caches", "sync"]))
    def caches(self, which):
        self._op(self.vm.guest, which)

    @precondition(lambda self: not self.dead)
    @rule()
    def out_of_memory(self):
        """An anonymous allocation of the whole guest: the OOM killer (or deflate-on-oom) runs."""
        memory = int(self.opts["memory"][:-1]) * MiB
        self._op(self.vm.guest, "alloc", size=memory, kind="anon")

    @precondition(lambda self: not self.dead)
    @rule(index=st.integers(0, 50), rate=st.sampled_from(["0", "4M", "256M"]))
    def writer(self, index, rate):
        """A process dirtying its memory in the background (migration's dirtying workload)."""
        hs = [h for h in self._handles() if h["kind"] in ("anon", "shmem") and h["name"] != "init"]
        if hs:
            handle = hs[index % len(hs)]["handle"]
            if self._op(self.vm.guest, "writer", handle=handle, rate=rate) is not None:
                (self.writers.discard if rate == "0" else self.writers.add)(handle)

    @precondition(lambda self: not self.dead)
    @rule(jobs=st.integers(1, 4), tree=st.sampled_from(["4M", "32M"]), stop=st.booleans())
    def kernel_build(self, jobs, tree, stop):
        """make -j: page cache read, compilers' anon memory, objects written back (or stop one)."""
        if stop and self.builds:
            self._op(self.vm.guest, "kernel_build_stop", build=self.builds.pop(0))
        elif not stop and len(self.builds) < 2:
            build = self._op(self.vm.guest, "kernel_build", jobs=jobs, tree=tree)
            if build is not None:
                self.builds.append(build)

    @precondition(lambda self: not self.dead and self.opts.get("disk"))
    @rule(write=st.booleans(), offset=st.integers(0, 63), size=st.integers(1, 64))
    def disk(self, write, offset, size):
        size = min(size, 64 - offset)
        self._op(self.vm.guest, "blk_write" if write else "blk_read", device="blk0",
                 offset=offset * MiB, size=size * MiB)

    # --- the balloon -----------------------------------------------------------------------------
    @precondition(lambda self: not self.dead and self.opts.get("balloon"))
    @rule(share=st.floats(0.02, 1.0))
    def balloon(self, share):
        memory = int(self.opts["memory"][:-1]) * MiB
        self._op(self.vm.qmp, "balloon", value=max(MiB, int(memory * share) // MiB * MiB))

    @precondition(lambda self: not self.dead and self.opts.get("balloon"))
    @rule(interval=st.sampled_from([0, 1, 5]))
    def stats_polling(self, interval):
        self._op(self.vm.qmp, "qom-set", path="/machine/peripheral/balloon0",
                 property="guest-stats-polling-interval", value=interval)

    @precondition(lambda self: not self.dead)
    @rule(max_ms=st.sampled_from([1.0, 250.0, 60_000.0]))
    def step(self, max_ms):
        self._op(self.vm.step, max_ms=max_ms)

    # --- migration (and free page hinting) ------------------------------------------------------
    # virtio-pmem blocks migration (QEMU registers no vmstate for it): no migration with one
    @precondition(lambda self: not self.dead and not self.opts.get("pmem"))
    @rule()
    def migrate(self):
        status = self.vm.qmp("query-migrate").get("status", "none")
        runstate = self.vm.qmp("query-status")["status"]
        if status in ("setup", "active", "cancelling") or runstate == "postmigrate":
            return
        self._op(self.vm.qmp, "migrate", uri="exec:cat > /dev/null")

    @precondition(lambda self: not self.dead)
    @rule()
    def migrate_cancel(self):
        self._op(self.vm.qmp, "migrate_cancel")

    # --- virtio-mem ------------------------------------------------------------------------------
    @precondition(lambda self: not self.dead and self.opts.get("virtio_mem"))
    @rule(index=st.integers(0, 1), share=st.floats(0.0, 1.0))
    def virtio_mem_resize(self, index, share):
        devs = self.opts["virtio_mem"]
        d = devs[index % len(devs)]
        block = BLOCK_SIZES[d["block_size"]]
        value = int(d["size"] * share) // block * block
        self._op(self.vm.qmp, "qom-set", path=d["id"], property="requested-size", value=value)

    @precondition(lambda self: not self.dead and self.opts.get("virtio_mem"))
    @rule(zone=st.sampled_from(["movable", "kernel"]))
    def online_memory(self, zone):
        offline = [b for b in self.vm.guest("memory_blocks") if b["zone"] is None
                   and b["state"] not in ("unused",)]
        if offline:
            self._op(self.vm.guest, "online_memory", block=offline[0]["block"], zone=zone)

    # --- virtio-pmem -----------------------------------------------------------------------------
    @precondition(lambda self: not self.dead and self.opts.get("pmem"))
    @rule(op=st.sampled_from(["pmem_read", "pmem_write", "pmem_write", "pmem_flush"]),
          offset=st.integers(0, 15), size=st.integers(1, 16), requests=st.integers(1, 4))
    def pmem(self, op, offset, size, requests):
        if op == "pmem_flush":
            self._op(self.vm.guest, op, device="pmem0", requests=requests)
        else:
            size = min(size, 16 - offset)
            self._op(self.vm.guest, op, device="pmem0", offset=offset * MiB, size=size * MiB)

    # --- looking -----------------------------------------------------------------------------------
    @rule()
    def observe(self):
        """What notebooks read (also after a panic, when nothing else may run)."""
        MachineFuzz.operations += 1
        self.vm.sample()
        self.vm.meminfo()
        if self.opts.get("virtio_mem"):
            self.vm.qmp("query-memory-devices")
        if self.opts.get("balloon"):
            self.vm.qmp("query-balloon")

    # --- time ------------------------------------------------------------------------------------
    @precondition(lambda self: not self.dead)
    @rule(ms=TIMES)
    def advance(self, ms):
        if self.builds or self.writers:  # simulated minutes of make -j or a writer cost real ones
            ms = min(ms, 30_000.0)
        self._op(self.vm.advance, ms)


def _run(profile: str) -> tuple[int, int, float]:
    target, examples, steps = PROFILES[profile]
    MachineFuzz.operations = MachineFuzz.machines_run = 0
    start = time.monotonic()
    round_ = 0
    while MachineFuzz.operations < target:
        seed(SEED + round_)(MachineFuzz)
        run_state_machine_as_test(MachineFuzz, settings=settings(
            max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
            suppress_health_check=list(HealthCheck), print_blob=True))
        round_ += 1
    return MachineFuzz.operations, MachineFuzz.machines_run, time.monotonic() - start


def test_whole_machine_fuzz(capsys):
    """Random mixes of every mechanism, every invariant after every step (profile: LABKIT_FUZZ)."""
    ops, machines_run, seconds = _run(PROFILE)
    with capsys.disabled():
        print(f"\nlabkit fuzz ({PROFILE}): {ops} operations on {machines_run} machines in "
              f"{seconds:.0f} s, seed {SEED}: 0 invariant violations")
    assert ops >= PROFILES[PROFILE][0]


if __name__ == "__main__":  # pragma: no cover - python -m tests.test_fuzz
    pytest.main([__file__, "-q", "-s"])
