"""What the guests of the overcommit scenario do, second by second, through ``vm.guest(...)`` only.

Every workload keeps an anonymous **working set** in chunks (``chunk`` bytes each, a process's
mapping), and *uses* it: each chunk is written once per ``access_period_s``, staggered, so every
second touches ``1 / access_period_s`` of the working set. That is what the host's clock (its
second-chance LRU) sees: pages the guest keeps using carry the REFERENCED bit, pages it freed or
stopped using do not, and those are what the host swaps out first. Touching a page the host swapped
costs a swap-in; touching one it discarded (balloon, free page reporting) costs a zero-fill fault.

Workloads (one seeded generator per VM):

* ``idle``: a small working set (5-15 % of memory) and nothing else.
* ``burst-idle``: a job takes ``burst_share`` (60 %) of memory at t = 0, runs for 60 s, exits, and
  the guest idles on a small working set: the freed memory stays backed on the host unless something
  (the balloon, free page reporting) returns it.
* ``ramp``: the working set grows steadily from 10 % to 70 % of memory over the run.
* ``memory-intensive``: will-it-scale ``page_fault1``-like: a resident working set (25 %) plus, every
  second, ``churn_share`` (25 %) of memory allocated, written, and freed again the next second.
* ``bursty``: the same loop, but each second's job takes a seeded random amount (uniform, 0 to 50 % of
  memory): memory a big job freed can sit unused for seconds before a bigger job takes it again.
* ``phases``: a seeded sequence of 1-10 minute phases: idle, ramp (to 20-70 %), burst (transient
  allocations of 64-512 MiB living 5-60 s, and a file read into the page cache), shrink (to 5-20 %).
* ``trace``: replays a GWA-T-12 trace's memory usage as the working set (see
  :meth:`labkit.model.traces.Trace.working_set_bytes` for the scaling).

Page cache is bounded at ``CACHE_SHARE`` of memory: beyond it the oldest file is deleted.

>>> import labkit, numpy as np
>>> vm = labkit.open(memory="1G", seed=0)
>>> w = make_workload("ramp", vm, np.random.default_rng(0), memory=1 << 30, duration_s=100)
>>> for t in range(100):
...     w.step(float(t))
>>> round(w.working_set / (1 << 30), 1)
0.7
"""

from __future__ import annotations

import numpy as np

from labkit.backends.base import Backend
from labkit.model.traces import Trace
from labkit.units import MiB, PAGE_SIZE

WORKLOADS = ("idle", "burst-idle", "ramp", "memory-intensive", "bursty", "phases", "trace")
CACHE_SHARE = 0.25  # page cache the synthetic workloads keep at most, as a share of memory


class Workload:
    """A working set of anonymous chunks, resized toward a target and touched on a rotation."""

    def __init__(self, vm: Backend, rng: np.random.Generator, *, memory: int, chunk: int = 32 * MiB,
                 access_period_s: float = 30.0, step_s: float = 1.0, max_share: float = 0.8):
        self.vm = vm
        self.rng = rng
        self.memory = memory
        self.limit = int(max_share * memory)  # anonymous memory the workload holds at most
        self.chunk = chunk
        self.period_steps = max(1, int(round(access_period_s / step_s)))
        self.step_s = step_s
        self.chunks: list[int] = []  # live anonymous chunks, in allocation order
        self.transient: list[tuple[float, int]] = []  # (free at t_s, handle)
        self.files: list[tuple[int, int]] = []  # (handle, bytes), oldest first
        self.allocated_bytes = 0  # anonymous bytes this workload allocated (and so wrote) in all
        self.killed_chunks = 0  # chunks the guest's OOM killer took
        self._step = 0

    @property
    def working_set(self) -> int:
        """Bytes of anonymous memory the workload holds now (resident chunks plus transient ones)."""
        return (len(self.chunks) + len(self.transient)) * self.chunk

    # --- helpers ------------------------------------------------------------------------------
    def _alloc(self) -> int | None:
        handle = self.vm.guest("alloc", size=self.chunk, kind="anon")
        self.allocated_bytes += self.chunk
        return handle

    def _free(self, handle: int) -> None:
        try:
            self.vm.guest("free", handle=handle)
        except ValueError:  # the OOM killer got there first
            self.killed_chunks += 1

    def resize(self, target: int) -> None:
        """Allocate or free whole chunks until the resident working set is ``target`` bytes."""
        want = max(0, int(round(target / self.chunk)))
        if want > len(self.chunks):  # grow only up to the limit, counting the transient jobs
            cap = self.limit // self.chunk - len(self.transient)
            want = max(len(self.chunks), min(want, cap))
        while len(self.chunks) < want:
            self.chunks.append(self._alloc())
        if len(self.chunks) > want:
            # a process exiting frees memory scattered over the guest: free seeded-random chunks
            order = self.rng.permutation(len(self.chunks))
            drop = set(order[:len(self.chunks) - want].tolist())
            for i in sorted(drop):
                self._free(self.chunks[i])
            self.chunks = [h for i, h in enumerate(self.chunks) if i not in drop]

    def transient_alloc(self, size: int, lifetime_s: float, now_s: float) -> None:
        """A short job: ``size`` bytes written now and freed ``lifetime_s`` later (as much of it as
        fits under the workload's limit)."""
        room = (self.limit - self.working_set) // self.chunk
        for _ in range(min(room, max(1, int(round(size / self.chunk))))):
            self.transient.append((now_s + lifetime_s, self._alloc()))

    def read_file(self, size: int) -> None:
        """Read a file into the page cache, deleting the oldest files beyond CACHE_SHARE."""
        size = max(PAGE_SIZE, size // PAGE_SIZE * PAGE_SIZE)
        handle = self.vm.guest("alloc", size=size, kind="file")
        self.files.append((handle, size))
        while sum(s for _, s in self.files) > CACHE_SHARE * self.memory and len(self.files) > 1:
            old, _ = self.files.pop(0)
            self._free(old)

    def _expire(self, now_s: float) -> None:
        if self.transient and min(t for t, _ in self.transient) <= now_s:
            for _, handle in [x for x in self.transient if x[0] <= now_s]:
                self._free(handle)
            self.transient = [x for x in self.transient if x[0] > now_s]

    def _access(self) -> None:
        """Write the chunks due this second: each chunk once per access period, staggered."""
        phase = self._step % self.period_steps
        for i in range(phase, len(self.chunks), self.period_steps):
            try:
                self.vm.guest("touch", handle=self.chunks[i])
            except ValueError:  # killed by the guest's OOM killer: the process is gone
                self.killed_chunks += 1
                self.chunks[i] = -1
        if -1 in self.chunks:
            self.chunks = [h for h in self.chunks if h != -1]

    # --- the step -----------------------------------------------------------------------------
    def plan(self, now_s: float) -> None:
        """What the workload does at ``now_s`` besides using its working set (subclasses)."""

    def step(self, now_s: float) -> None:
        """One step: expire transient jobs, act, use the working set."""
        self._expire(now_s)
        self.plan(now_s)
        self._access()
        self._step += 1


class Idle(Workload):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.level = self.rng.uniform(0.05, 0.15)

    def plan(self, now_s: float) -> None:
        if self._step == 0:
            self.resize(int(self.level * self.memory))


class BurstIdle(Idle):
    def __init__(self, *args, burst_share: float = 0.6, burst_s: float = 60.0, **kw):
        super().__init__(*args, **kw)
        self.burst_share = burst_share
        self.burst_s = burst_s

    def plan(self, now_s: float) -> None:
        super().plan(now_s)
        if self._step == 0:
            self.transient_alloc(int(self.burst_share * self.memory), self.burst_s, now_s)


class Ramp(Workload):
    def __init__(self, *args, duration_s: float, low: float = 0.1, high: float = 0.7, **kw):
        super().__init__(*args, **kw)
        self.duration_s = max(duration_s, self.step_s)
        self.low, self.high = low, high

    def plan(self, now_s: float) -> None:
        share = self.low + (self.high - self.low) * min(1.0, (now_s + self.step_s) / self.duration_s)
        self.resize(int(share * self.memory))


class MemoryIntensive(Workload):
    def __init__(self, *args, resident_share: float = 0.25, churn_share: float = 0.25, **kw):
        super().__init__(*args, **kw)
        self.resident_share = resident_share
        self.churn_share = churn_share

    def plan(self, now_s: float) -> None:
        if self._step == 0:
            self.resize(int(self.resident_share * self.memory))
        # allocate, write, and free again at the next step: the page_fault1 loop
        self.transient_alloc(self.job_size(), self.step_s * 0.5, now_s)

    def job_size(self) -> int:
        return int(self.churn_share * self.memory)


class Bursty(MemoryIntensive):
    def job_size(self) -> int:
        # the same loop with a size that varies from second to second (uniform, mean churn_share):
        # what a big job frees can sit idle for seconds before a bigger one takes it again
        return int(self.rng.uniform(0.0, 2.0 * self.churn_share) * self.memory)


class Phases(Workload):
    KINDS = ("idle", "ramp", "burst", "shrink")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.phase_end = -1.0
        self.kind = "idle"
        self.start_share = self.target_share = self.rng.uniform(0.1, 0.3)
        self.phase_start = 0.0

    def _next_phase(self, now_s: float) -> None:
        self.kind = self.KINDS[int(self.rng.integers(len(self.KINDS)))]
        self.phase_start = now_s
        self.phase_end = now_s + float(self.rng.uniform(60, 600))
        self.start_share = len(self.chunks) * self.chunk / self.memory
        if self.kind == "ramp":
            self.target_share = float(self.rng.uniform(0.2, 0.7))
        elif self.kind == "shrink":
            self.target_share = float(self.rng.uniform(0.05, 0.2))
        else:
            self.target_share = self.start_share
        if self.kind == "burst":
            self.read_file(int(self.rng.uniform(64, 256)) * MiB)

    def plan(self, now_s: float) -> None:
        if now_s >= self.phase_end:
            self._next_phase(now_s)
        if self.kind == "ramp":
            done = min(1.0, (now_s - self.phase_start + self.step_s) / (self.phase_end - self.phase_start))
            share = self.start_share + (self.target_share - self.start_share) * done
        else:
            share = self.target_share
        self.resize(int(share * self.memory))
        if self.kind == "burst" and self.rng.random() < 0.3:
            self.transient_alloc(int(self.rng.uniform(64, 512)) * MiB, float(self.rng.uniform(5, 60)),
                                 now_s)


class TraceReplay(Workload):
    def __init__(self, *args, trace: Trace, speed: float = 1.0, duration_s: float = 3600.0, **kw):
        super().__init__(*args, **kw)
        self.trace = trace
        self.speed = speed
        # the whole run's targets at once: one np.interp instead of one per step
        steps = np.arange(int(np.ceil(duration_s / self.step_s)) + 1) * self.step_s
        self.targets = trace.working_set_bytes(steps, self.memory, self.limit / self.memory, speed)

    def plan(self, now_s: float) -> None:
        i = min(int(round(now_s / self.step_s)), len(self.targets) - 1)
        self.resize(int(self.targets[i]))


def make_workload(name: str, vm: Backend, rng: np.random.Generator, *, memory: int,
                  duration_s: float = 600.0, trace: Trace | None = None, trace_speed: float = 1.0,
                  max_share: float = 0.8, chunk: int = 32 * MiB, access_period_s: float = 30.0,
                  step_s: float = 1.0) -> Workload:
    """The workload ``name`` (one of :data:`WORKLOADS`) for ``vm``, a VM of ``memory`` bytes."""
    common = dict(memory=memory, chunk=chunk, access_period_s=access_period_s, step_s=step_s,
                  max_share=max_share)
    if name == "idle":
        return Idle(vm, rng, **common)
    if name == "burst-idle":
        return BurstIdle(vm, rng, **common)
    if name == "ramp":
        return Ramp(vm, rng, duration_s=duration_s, **common)
    if name == "memory-intensive":
        return MemoryIntensive(vm, rng, **common)
    if name == "bursty":
        return Bursty(vm, rng, **common)
    if name == "phases":
        return Phases(vm, rng, **common)
    if name == "trace":
        if trace is None:
            raise ValueError("workload 'trace' needs a trace (a GWA-T-12 file or directory)")
        return TraceReplay(vm, rng, trace=trace, speed=trace_speed, duration_s=duration_s, **common)
    raise ValueError(f"workload {name!r} is not one of {list(WORKLOADS)}")
