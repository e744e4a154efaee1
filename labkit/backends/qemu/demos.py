"""Scripted runs that work on every backend: live, model, and a replay of a recorded live run.

Each demo is a VM's options and a script that only uses the Backend protocol, so
``run_demo(name, vm)`` gives rows of ``vm.sample()`` (plus a ``label``) on the model, on a live
guest, and on a :class:`~labkit.backends.qemu.record.ReplayBackend` of a recording made by
:func:`record_demo` (the project ships those under ``data/recorded/``).

>>> import labkit
>>> with labkit.open(backend="model", **model_options("balloon")) as vm:
...     rows = run_demo("balloon", vm)
>>> [r["label"] for r in rows]
['boot', 'inflate to 768 MiB', 'deflate to 1024 MiB']
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.backends.qemu.twin import balloon_timeline

MiB = 1 << 20
RECORDED_DIR = Path(__file__).resolve().parents[3] / "data" / "recorded"


def _balloon(vm: Any) -> list[dict]:
    rows = balloon_timeline(vm, [768 * MiB, 1024 * MiB])
    for row, label in zip(rows, ("boot", "inflate to 768 MiB", "deflate to 1024 MiB"), strict=True):
        row["label"] = label
    return rows


def _balloon_4g(vm: Any) -> list[dict]:
    rows = balloon_timeline(vm, [3840 * MiB, 4096 * MiB])
    for row, label in zip(rows, ("boot", "inflate to 3840 MiB", "deflate to 4096 MiB"), strict=True):
        row["label"] = label
    return rows


REPORTING_SETTLE_MS = 10_000


def _reporting_watch(size: int) -> Callable[[Any], list[dict]]:
    """Allocate ``size`` of anon memory, free it, and watch host RSS for 8 s, every 500 ms (free
    page reporting gives the freed 2 MiB blocks back to the host about 2 s after they are freed;
    what the first pass missed goes in later passes, so the watch does not stop at the first drop).
    It first waits 10 s: the passes over the memory boot left free (every 2 s from the driver's
    probe, a budget at a time) are over, so the pass that gives the job back is the one its free
    asks for."""
    def run(vm: Any) -> list[dict]:
        vm.advance(REPORTING_SETTLE_MS)
        rows = [vm.sample() | {"label": "boot + 10 s"}]
        handle = vm.guest("alloc", size=size, kind="anon")
        rows.append(vm.sample() | {"label": f"alloc {size // MiB} MiB"})
        vm.guest("free", handle=handle)
        rows.append(vm.sample() | {"label": "free"})
        for i in range(16):
            vm.advance(500)
            rows.append(vm.sample() | {"label": f"+{(i + 1) * 0.5:.1f} s"})
        return rows
    return run


# 256 MiB of a 1 GiB guest; and 300 MiB of a 512 MiB guest, where what comes back is what the free
# left in whole 2 MiB blocks (page_reporting_order 9)
_reporting = _reporting_watch(256 * MiB)
_reporting_fragmented = _reporting_watch(300 * MiB)


def _oom(vm: Any) -> list[dict]:
    """Balloon a 512 MiB guest down to 320 MiB, then allocate 32 MiB more anon memory than the
    guest has available: with deflate-on-oom the OOM notifier gives balloon pages back (1 MiB per
    OOM event) instead of the OOM killer taking the process."""
    rows = balloon_timeline(vm, [320 * MiB])
    rows[0]["label"], rows[1]["label"] = "boot", "inflate to 320 MiB"
    size = (int(rows[1]["memavailable"]) // MiB + 32) * MiB
    vm.guest("alloc", size=size, kind="anon")
    rows.append(vm.sample() | {"label": f"alloc {size // MiB} MiB"})
    vm.advance(1500)  # QEMU holds a BALLOON_CHANGE for up to 1 s (event throttle)
    pcp = sum(cpu["count"] for zone in vm.zoneinfo() for cpu in zone["pcp"])
    rows.append(vm.sample() | {"label": "+1.5 s", "pcp_pages": pcp})
    return rows


def _wait_size(vm: Any, device: str, target: int, limit_ms: float, still_ms: float | None = None) -> float:
    """Advance until virtio-mem ``device``'s plugged size is ``target``, at most ``limit_ms``; with
    ``still_ms``, also stop once the size has not moved for that long: an unplug the guest can't
    finish (unmovable pages in a ZONE_NORMAL block) gives up with -EBUSY, and the driver's next try
    is 50 s later (VIRTIO_MEM_RETRY_TIMER_MIN_MS, drivers/virtio/virtio_mem.c)."""
    waited = still = 0.0
    last = None
    while waited < limit_ms:
        size = vm.qmp("qom-get", path=device, property="size")
        if size == target:
            break
        still = still + 200 if size == last else 0.0
        if still_ms is not None and still >= still_ms:
            break
        last = size
        vm.advance(200)
        waited += 200
    return waited


def _virtio_mem(vm: Any) -> list[dict]:
    """Plug 512 MiB, run 384 MiB of anon memory through it, ask for everything back; wait until it
    is back or the guest has stopped unplugging for 5 s (at most 20 s)."""
    rows = [vm.sample() | {"label": "boot"}]
    vm.qmp("qom-set", path="vm0", property="requested-size", value=512 * MiB)
    _wait_size(vm, "vm0", 512 * MiB, 30_000)
    rows.append(vm.sample() | {"label": "plug 512 MiB"})
    handle = vm.guest("alloc", size=384 * MiB, kind="anon")
    rows.append(vm.sample() | {"label": "alloc 384 MiB"})
    vm.guest("free", handle=handle)
    vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
    _wait_size(vm, "vm0", 0, 20_000, still_ms=5_000)
    rows.append(vm.sample() | {"label": "unplug to 0 (until done or stuck 5 s, <= 20 s)"})
    return rows


def _pmem(vm: Any) -> list[dict]:
    """Write 16 MiB to a virtio-pmem region (DAX stores: the host's page cache pages of the file,
    dirty), fsync it (one FLUSH: QEMU fsyncs the file, the pages are clean), then write 4 MiB more
    and sync(2)."""
    rows = [vm.sample() | {"label": "boot"}]
    wrote = vm.guest("pmem_write", device="vpmem0", offset=0, size=16 * MiB)
    rows.append(vm.sample() | {"label": "write 16 MiB", "dirty_pages": wrote["dirty_pages"]})
    flushed = vm.guest("pmem_flush", device="vpmem0")
    rows.append(vm.sample() | {"label": "fsync /dev/pmem0", "written_bytes": flushed["written_bytes"],
                               "flush_ms": flushed["elapsed_ms"]})
    vm.guest("pmem_write", device="vpmem0", offset=64 * MiB, size=4 * MiB)
    rows.append(vm.sample() | {"label": "write 4 MiB more"})
    vm.guest("sync")
    rows.append(vm.sample() | {"label": "sync"})
    return rows


def private_file(name: str, size: int) -> Path:
    """A new sparse file of ``size`` bytes in a directory made for it alone (``mkdtemp``: mode
    0700, a fresh random name), created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: nothing planted in
    the shared temp directory (a symlink, a file of the same name) is ever opened, truncated or
    written. The directory is removed when the interpreter exits."""
    directory = tempfile.mkdtemp(prefix="labkit-demo-")
    _PRIVATE_DIRS.append(directory)
    path = Path(directory) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.truncate(size)
    return path


@atexit.register
def _remove_private_dirs() -> None:
    while _PRIVATE_DIRS:
        shutil.rmtree(_PRIVATE_DIRS.pop(), ignore_errors=True)
def _zoneinfo(vm: Any) -> list[dict]:
    """What the guest booted into: /proc/zoneinfo (watermarks, spans, per-CPU lists) and
    /proc/meminfo, as the boot row."""
    return [vm.sample() | {"label": "boot", "zoneinfo": vm.zoneinfo(), "meminfo": vm.meminfo()}]




MIGRATION_POLL_MS = 100
MIGRATION_LIMIT_MS = 60_000
MIGRATION_URI = "tcp:127.0.0.1:4444"  # the model's simulated destination


def _migration(busy: bool) -> Callable[[Any], list[dict]]:
    """Migrate the guest to a second QEMU on 127.0.0.1 (``start_incoming``; the model has a
    simulated destination) with QEMU's default parameters, polling ``query-migrate`` every 100 ms
    until it completes. ``busy``: a writer first rewrites 128 MiB of anon memory at 32 MiB/s.
    Rows after ``migrate`` are query-migrate answers (``t_ms`` is their ``total-time``): the
    source pauses at the end, so the guest is not asked anything more."""
    def run(vm: Any) -> list[dict]:
        rows = [vm.sample() | {"label": "boot"}]
        if busy:
            handle = vm.guest("alloc", size=128 * MiB, kind="anon")
            vm.guest("writer", handle=handle, rate=32 * MiB)
            vm.advance(1000)
            rows.append(vm.sample() | {"label": "writer at 32 MiB/s"})
        start = getattr(vm, "start_incoming", None)
        try:
            uri = start() if start is not None else MIGRATION_URI
        except AttributeError:  # a Recorder around the model: no second QEMU to start
            uri = MIGRATION_URI
        vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        vm.qmp("migrate", uri=uri)
        waited, info = 0, vm.qmp("query-migrate")
        while info["status"] not in ("completed", "failed", "cancelled") and waited < MIGRATION_LIMIT_MS:
            vm.advance(MIGRATION_POLL_MS)
            waited += MIGRATION_POLL_MS
            info = vm.qmp("query-migrate")
            rows.append({"label": info["status"], "t_ms": float(info.get("total-time", waited)),
                         "migrate": info})
        return rows
    return run


def _pmem_vm() -> dict:
    """The pmem demo's VM: 512 MiB and a 256 MiB virtio-pmem region on a fresh sparse file of its
    own on every call (a live run writes into it; the model needs it to exist)."""
    path = private_file(PMEM_DEMO_FILE, 256 * MiB)
    return {"memory": 512 * MiB, "virtio_pmem": [{"id": "vpmem0", "path": str(path), "size": 256 * MiB}]}


PMEM_DEMO_FILE = "pmem.img"
_PRIVATE_DIRS: list[str] = []
VIRTIO_MEM_VM = {"memory": 512 * MiB, "virtio_mem": [{"id": "vm0", "size": 1024 * MiB}]}
# a disk's contents are not migrated: migration demos run without the scratch disk
MIGRATION_VM = {"memory": 1024 * MiB, "qemu": {"scratch_disk": False}}
HINT_BALLOON = {"free_page_hint": True, "iothread": "io0"}
# a VM's options, or a function returning them (when they need a file made first)
DEMOS: dict[str, tuple[dict | Callable[[], dict], Callable[[Any], list[dict]]]] = {
    "balloon": ({"memory": 1024 * MiB, "balloon": {"deflate_on_oom": False}}, _balloon),
    "balloon_deflate_on_oom": ({"memory": 1024 * MiB, "balloon": {"deflate_on_oom": True}}, _balloon),
    "reporting": ({"memory": 1024 * MiB, "balloon": {"free_page_reporting": True}}, _reporting),
    "oom_deflate": ({"memory": 512 * MiB, "balloon": {"deflate_on_oom": True}}, _oom),
    "virtio_mem_movable": (VIRTIO_MEM_VM | {"memhp_default_state": "online_movable"}, _virtio_mem),
    "virtio_mem_kernel": (VIRTIO_MEM_VM | {"memhp_default_state": "online_kernel"}, _virtio_mem),
    "pmem": (_pmem_vm, _pmem),
    "zoneinfo_512m": ({"memory": 512 * MiB}, _zoneinfo),
    "zoneinfo_1g": ({"memory": 1024 * MiB}, _zoneinfo),
    "zoneinfo_4g": ({"memory": 4096 * MiB}, _zoneinfo),
    "balloon_4g": ({"memory": 4096 * MiB, "balloon": {"deflate_on_oom": False}}, _balloon_4g),
    "reporting_512m": ({"memory": 512 * MiB, "balloon": {"free_page_reporting": True}},
                       _reporting_fragmented),
    "migration_idle": (MIGRATION_VM, _migration(busy=False)),
    "migration_busy": (MIGRATION_VM, _migration(busy=True)),
    "migration_hint_idle": (MIGRATION_VM | {"balloon": HINT_BALLOON}, _migration(busy=False)),
    "migration_hint_busy": (MIGRATION_VM | {"balloon": HINT_BALLOON}, _migration(busy=True)),
}


def _check(name: str) -> None:
    if name not in DEMOS:
        raise ValueError(f"demo {name!r} is not one of {sorted(DEMOS)}")


def live_options(name: str) -> dict:
    """``labkit.open`` options of a demo's VM."""
    _check(name)
    options = DEMOS[name][0]
    return copy.deepcopy(options() if callable(options) else options)


def model_options(name: str) -> dict:
    """The same VM on the model, booted as the live busybox guest is (``boot="minimal"``); the
    live backend's own options (``qemu``) are left out."""
    options = live_options(name)
    options.pop("qemu", None)
    return options | {"seed": 0, "model": {"boot": "minimal"}}


def run_demo(name: str, vm: Any) -> list[dict]:
    """Run demo ``name``'s script on ``vm``; returns its sample rows, each with a ``label``."""
    _check(name)
    return DEMOS[name][1](vm)


def recording_path(name: str) -> Path:
    _check(name)
    return RECORDED_DIR / f"{name}.json"


def record_demo(name: str, path: str | Path | None = None) -> Path:
    """Boot a live VM, run demo ``name`` under a Recorder, save it (default:
    ``data/recorded/<name>.json``) and return the path."""
    from labkit.backends.qemu.backend import open_qemu
    from labkit.backends.qemu.record import Recorder

    with Recorder(open_qemu(**live_options(name)), note=f"labkit demo {name!r}") as vm:
        run_demo(name, vm)
        return vm.save(path or recording_path(name))


def open_demo(name: str, mode: str = "auto") -> tuple[Any, str]:
    """``(vm, mode)`` for demo ``name``: ``"live"`` boots QEMU, ``"replay"`` reads the recording,
    ``"auto"`` boots QEMU when it and a guest kernel are available, else replays."""
    if mode not in ("auto", "live", "replay"):
        raise ValueError(f"mode {mode!r} is not one of ['auto', 'live', 'replay']")
    from labkit.backends.qemu.record import ReplayBackend

    if mode == "replay":
        return ReplayBackend(recording_path(name)), "replay"
    from labkit.backends.qemu.backend import open_qemu

    try:
        return open_qemu(**live_options(name)), "live"
    except (FileNotFoundError, ModuleNotFoundError, RuntimeError) as e:
        if mode == "live":
            raise
        return ReplayBackend(recording_path(name)), f"replay (live unavailable: {str(e)[:160]})"
