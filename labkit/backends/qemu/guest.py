"""Workload steps in the real guest, with the meaning they have on the model
(:mod:`labkit.model.workloads`):

* ``alloc(size, kind)``: ``anon`` starts a holder process that maps and writes every page
  (``memhold``; busybox ``dd`` holding its buffer when the image has no memhold); ``shmem`` writes a
  file in ``/dev/shm`` (tmpfs); ``file`` writes a file on the scratch disk (ext2 on virtio-blk) and
  syncs it, leaving clean page cache (``dirty=True``: left dirty). Returns a handle (an int).
* ``touch(handle)``: write every page again; ``read(handle)``: read it (a file re-enters the cache).
* ``free(handle)``: the holder exits / the file is removed.
* ``drop_caches``: ``echo 3 > /proc/sys/vm/drop_caches``, returns the pages of cache it freed.
* ``sync``: writes back dirty page cache, returns the pages that were dirty.
* ``handles``: ``[{"handle", "kind", "name", "alive", "size", "resident"}]`` as on the model.

If the OOM killer chooses an anon holder while it allocates, ``alloc`` still returns its handle, with
``alive`` False, as the model does.

>>> parse_meminfo("MemTotal:        1000 kB\\nHugePages_Total:       0\\n")
{'MemTotal': 1000, 'HugePages_Total': 0}
>>> parse_vmstat("nr_free_pages 12\\noom_kill 1\\n")["oom_kill"]
1
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from labkit.backends.qemu.guestfiles import RUN_DIR, SCRATCH_MOUNT, SCRATCH_SETUP, SHM_DIR
from labkit.errors import GuestError
from labkit.units import MiB, PAGE_SIZE, format_size, parse_size

KINDS = ("anon", "shmem", "file")
OPS = ("alloc", "touch", "read", "free", "drop_caches", "sync", "handles", "memory_blocks",
       "online_memory", "writer", "writer_stop")
MEMORY_BLOCK_SIZE = 128 * MiB  # x86-64 with < 64 GiB of boot memory


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as ``{field: value}``; values in kB (counts for HugePages_*)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.split():
            out[key.strip()] = int(value.split()[0])
    return out


def parse_vmstat(text: str) -> dict[str, int]:
    """``/proc/vmstat`` as ``{counter: value}``."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class LiveHandle:
    id: int
    kind: str
    size: int
    name: str
    pid: int = 0  # anon holder (memhold) or dd
    extra_pid: int = 0  # dd fallback: the "sleep" that never reads dd's output
    path: str = ""  # shmem / file
    alive: bool = True
    writer_pid: int = 0  # memhold write: a background writer into this holder's memory


def write_zeros(path: str, size: int, overwrite: bool = False) -> str:
    """Shell text writing ``size`` bytes (a multiple of 4 KiB) to ``path`` in 1 MiB blocks (small
    writes cost a TCG guest ~10x more); ``overwrite`` rewrites in place instead of truncating."""
    mib, rest = divmod(size, MiB)
    keep = " conv=notrunc" if overwrite else ""
    parts = [f"dd if=/dev/zero of={path} bs=1M count={mib}{keep} 2>/dev/null"] if mib else []
    if rest:
        parts.append(f"dd if=/dev/zero of={path} bs=4k count={rest // PAGE_SIZE} seek={mib * 256} "
                     "conv=notrunc 2>/dev/null")
    return " && ".join(parts)


def work_timeout(size: int) -> float:
    """Seconds allowed for writing ``size`` bytes in the guest (TCG writes ~100+ MiB/s here)."""
    return 30.0 + size / (16 * MiB)


class LiveGuestOps:
    """The workload steps over a ``run(command, timeout=, check=) -> (output, status)`` channel."""

    def __init__(self, run: Callable[..., tuple[str, int]], memory: int, helper: str,
                 scratch: bool, memory_devices: Callable[[], list[dict]] = list):
        self.run = run
        self.memory = memory
        self.helper = helper
        self.scratch = scratch
        self.table: dict[int, LiveHandle] = {}
        self._scratch_ready = False
        self.memory_devices = memory_devices
        self._next = 1
        self.extra_ops: dict[str, Callable[[dict], object]] = {}  # e.g. the pmem_* ops
        self.sync_extra: Callable[[], str] = str  # shell text appended to sync (fsync of /dev/pmemN)

    def _handle(self, handle: object) -> LiveHandle:
        h = self.table.get(handle) if isinstance(handle, int) and not isinstance(handle, bool) else None
        if h is None:
            raise ValueError(f"handle {handle!r} does not exist; live handles are {sorted(self.table)}")
        return h

    def call(self, op: str, arguments: dict) -> object:
        if op not in OPS and op not in self.extra_ops:
            raise ValueError(f"guest op {op!r} is not one of {list(OPS) + list(self.extra_ops)}")
        try:
            if op in self.extra_ops:
                return self.extra_ops[op](arguments)
            if op == "alloc":
                return self.alloc(parse_size(arguments.pop("size"), name="size"), **arguments)
            if op in ("touch", "read"):
                return self.touch(arguments.pop("handle"), write=op == "touch", **arguments)
            if op == "free":
                return self.free(**arguments)
            return getattr(self, op)(**arguments)
        except KeyError as e:
            raise TypeError(f"guest op {op!r} needs argument {e.args[0]!r}") from None

    # --- ops ----------------------------------------------------------------------------------
    def alloc(self, size: int, kind: str = "anon", *, node: int | None = None, dirty: bool = False) -> int:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {sorted(KINDS)}")
        if node is not None:
            raise ValueError("node= is not supported on the live backend (busybox has no numactl)")
        if size <= 0 or size % PAGE_SIZE or size > self.memory:
            raise ValueError(f"size must be a positive multiple of 4 KiB up to the guest's "
                             f"{format_size(self.memory)}, got {size}")
        if kind == "file" and not self.scratch:
            raise ValueError("kind='file' needs the scratch disk (qemu={'scratch_disk': True})")
        h = LiveHandle(self._next, kind, size, f"{kind}-{size}")
        self._next += 1
        timeout = work_timeout(size)
        if kind == "anon" and self.helper == "memhold":
            out, status = self.run(f"memhold alloc {size // 1024}", timeout=timeout, check=False)
            if status == 0:
                h.pid = int(out.split()[-1])
            elif "killed by signal" in out:
                h.alive = False
            else:
                raise GuestError(f"anon alloc of {format_size(size)} failed: {out.strip()}")
        elif kind == "anon":
            out, status = self.run(self._dd_alloc_script(h.id, size), timeout=timeout, check=False)
            if status == 0:
                h.pid, h.extra_pid = (int(x) for x in out.split()[-2:])
            else:
                h.alive = False
        else:
            if kind == "file" and not self._scratch_ready:
                self.run(SCRATCH_SETUP, timeout=120)
                self._scratch_ready = True
            h.path = f"{SHM_DIR}/h{h.id}" if kind == "shmem" else f"{SCRATCH_MOUNT}/h{h.id}"
            write = write_zeros(h.path, size)
            self.run(write + ("" if kind == "shmem" or dirty else " && sync"), timeout=timeout)
        self.table[h.id] = h
        return h.id

    @staticmethod
    def _dd_alloc_script(hid: int, size: int) -> str:
        """dd reads ``size`` bytes of /dev/zero into one buffer (faulting in every page), then blocks
        writing it to a pipe nobody reads. Done is when its ``rchar`` (/proc/PID/io) reaches
        ``size``: RssAnon is no sign, since Linux before 6.2 caches RSS counts per task and syncs
        them every 64 faults, so a dd asleep in pipe_write can show up to 63 pages short forever."""
        pidfile = f"{RUN_DIR}/h{hid}.pid"
        inner = (f"echo $$ > {pidfile}; echo 0 > /proc/self/oom_score_adj; "
                 f"exec dd if=/dev/zero bs={size // 1024}k count=1 2>/dev/null")
        return (f"sh -c {shlex.quote(inner)} | sleep 2147483647 & s=$!; "
                f"while [ ! -s {pidfile} ]; do usleep 10000; done; p=$(cat {pidfile}); "
                f"while [ -d /proc/$p ] && [ $(awk '/^rchar/{{print $2}}' /proc/$p/io) -lt "
                f"{size} ]; do usleep 20000; done; [ -d /proc/$p ] && echo $p $s")

    def touch(self, handle: int, *, write: bool = True) -> None:
        h = self._handle(handle)
        if not h.alive:
            raise ValueError(f"handle {handle} was killed by the OOM killer or freed")
        timeout = work_timeout(h.size)
        if h.kind == "anon":
            if self.helper != "memhold":
                raise GuestError("touching anon memory needs the memhold helper (this image uses "
                                 "busybox dd: install gcc and rebuild with labkit guest build)")
            out, status = self.run(f"memhold touch {h.pid}", timeout=timeout, check=False)
            if status != 0:
                h.alive = False
                raise ValueError(f"handle {handle} was killed by the OOM killer: {out.strip()}")
        elif write:
            self.run(write_zeros(h.path, h.size, overwrite=True), timeout=timeout)
        else:
            self.run(f"cat {h.path} > /dev/null", timeout=timeout)

    def writer(self, handle: int, rate: int | str, wss: int | str | None = None) -> int:
        """As the model's ``writer``: a background process keeps writing random pages of the first
        ``wss`` bytes (default: all) of anon handle ``handle`` at ``rate`` bytes per second
        (``memhold write``, through /proc/PID/mem); ``rate=0`` stops it. Returns ``handle``."""
        h = self._handle(handle)
        if h.kind != "anon" or not h.alive or self.helper != "memhold":
            raise ValueError(f"writer needs a live anon handle held by memhold, got handle {handle} "
                             f"({h.kind}{'' if h.alive else ', not alive'}; helper {self.helper})")
        rate_bytes = parse_size(rate, name="rate")
        wss_bytes = h.size if wss is None else parse_size(wss, name="wss")
        if rate_bytes < 0 or not 0 < wss_bytes <= h.size:
            raise ValueError(f"rate must be >= 0 and wss from 4 KiB to the handle's "
                             f"{format_size(h.size)}, got {rate!r}, {wss!r}")
        self.writer_stop(handle)
        if rate_bytes:
            out = self.run(f"memhold write {h.pid} {rate_bytes // 1024} {wss_bytes // 1024}")[0]
            h.writer_pid = int(out.split()[-1])
        return handle

    def writer_stop(self, handle: int) -> int:
        h = self._handle(handle)
        if h.writer_pid:
            self.run(f"kill {h.writer_pid} 2>/dev/null; true")
            h.writer_pid = 0
        return handle

    def free(self, handle: int) -> None:
        h = self._handle(handle)
        if h.writer_pid:
            self.writer_stop(handle)
        if h.kind == "anon" and h.alive and self.helper == "memhold":
            self.run(f"memhold free {h.pid} || true")
        elif h.kind == "anon" and h.alive:
            self.run(f"kill {h.pid} {h.extra_pid}; while [ -d /proc/{h.pid} ]; do usleep 1000; done; "
                     f"rm -f {RUN_DIR}/h{h.id}.pid")
        elif h.path:
            self.run(f"rm -f {h.path}")
        h.alive = False
        del self.table[h.id]

    def drop_caches(self) -> int:
        out, _ = self.run("grep '^Cached:' /proc/meminfo; echo 3 > /proc/sys/vm/drop_caches; "
                          "grep '^Cached:' /proc/meminfo")
        before, after = (int(line.split()[1]) for line in out.split("\n") if line.startswith("Cached"))
        return max(0, before - after) * 1024 // PAGE_SIZE

    def sync(self) -> int:
        out, _ = self.run("grep -E '^(Dirty|Writeback):' /proc/meminfo; sync" + self.sync_extra())
        return sum(int(line.split()[1]) for line in out.splitlines() if ":" in line) * 1024 // PAGE_SIZE

    def handles(self) -> list[dict]:
        rows = []
        for h in self.table.values():
            resident = 0
            if h.kind == "anon" and h.alive:
                out, status = self.run(f"awk '/RssAnon/{{print $2}}' /proc/{h.pid}/status", check=False)
                if status or not out.strip():
                    h.alive = False
                else:
                    resident = int(out.split()[0]) * 1024
            elif h.kind == "shmem":
                resident = h.size
            elif h.kind == "file" and self.helper == "memhold":
                resident = int(self.run(f"memhold incore {h.path}")[0].split()[0])
            rows.append({"handle": h.id, "kind": h.kind, "name": h.name, "alive": h.alive,
                         "size": h.size, "resident": resident})
        return rows

    # --- memory hotplug (virtio-mem) ----------------------------------------------------------
    def _device_blocks(self) -> list[tuple[str, int]]:
        return [(d["id"], block) for d in self.memory_devices()
                for block in range(d["memaddr"] // MEMORY_BLOCK_SIZE,
                                   (d["memaddr"] + d["max-size"]) // MEMORY_BLOCK_SIZE)]

    def memory_blocks(self) -> list[dict]:
        """The virtio-mem devices' memory blocks the guest added, as ``lsmem`` lists them:
        ``{"device", "block", "state": "online"|"offline", "zone": "Movable"|"Normal"|None}``."""
        blocks = dict((b, dev) for dev, b in self._device_blocks())
        if not blocks:
            return []
        out, _ = self.run("cd /sys/devices/system/memory && for b in memory*; do "
                          "echo ${b#memory} $(cat $b/state) $(cat $b/valid_zones 2>/dev/null); done")
        rows = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and int(parts[0]) in blocks:
                zone = parts[2] if parts[1] == "online" and len(parts) > 2 else None
                rows.append({"device": blocks[int(parts[0])], "block": int(parts[0]),
                             "state": parts[1], "zone": zone})
        return sorted(rows, key=lambda r: r["block"])

    def online_memory(self, block: int | str = "all", zone: str = "movable") -> int:
        """Online offline virtio-mem blocks into ZONE_MOVABLE ("movable") or ZONE_NORMAL
        ("kernel"); returns how many were onlined."""
        if zone not in ("movable", "kernel"):
            raise ValueError(f"zone {zone!r} is not one of ['movable', 'kernel']")
        offline = [r["block"] for r in self.memory_blocks() if r["state"] == "offline"]
        if block != "all":
            if block not in offline:
                raise ValueError(f"block {block!r} is not an offline virtio-mem block; offline: {offline}")
            offline = [block]
        done = 0
        for b in offline:
            _, status = self.run(f"echo online_{zone} > /sys/devices/system/memory/memory{b}/state",
                                 check=False)
            done += status == 0
        return done
