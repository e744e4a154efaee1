"""virtio-pmem vs virtio-blk: who caches a shared image, and what survives a host crash.

**Shared image** (:func:`shared_image`): ``n_vms`` guests on one host boot from the same image and
each reads ``boot_read`` bytes of it. How the image reaches them (``transport``):

* ``blk-writeback``: virtio-blk, ``cache=writeback``. Each guest keeps its own copy in its page
  cache (guest RAM the host backs) and the host caches the file once: **N + 1 copies**.
* ``blk-none``: ``cache=none`` (O_DIRECT): no host copy, still one per guest: **N copies**.
* ``pmem``: virtio-pmem (``share=on``): DAX reads go to the host page cache; no guest keeps a copy:
  **1 copy**, shared. Each guest pays for its region's struct pages instead (64 B per 4 KiB, §4.2
  of :mod:`labkit.devices.virtio_pmem`), and every guest can tell which pages the others touched
  (a cached page answers fast: the side channel the issue warns about).

**Durability** (:func:`durability`): a guest writes ``write`` bytes, flushes or not, and the host
crashes ``crash_after_s`` later. What is lost follows the writeback timers: virtio-pmem data sits in
the host page cache until fsync (or the host flusher, 30-35 s); virtio-blk data first sits in the
guest's page cache (guest flusher, 30-35 s), then in the host's (another 30-35 s) with
``cache=writeback``. ``fsync_error=True`` makes the host's disk fail the flush: the guest gets EIO,
the pages look clean, and the data is lost in the crash all the same.

Both create a sparse image in a temporary directory unless ``path`` is given, and remove it.

>>> from labkit.scenarios.pmem import SharedImageParams, shared_image
>>> blk = shared_image(SharedImageParams(n_vms=2, transport="blk-writeback"))
>>> pmem = shared_image(SharedImageParams(n_vms=2, transport="pmem"))
>>> blk.summary["copies"], pmem.summary["copies"]
(3.0, 1.0)
>>> from labkit.scenarios.pmem import DurabilityParams, durability
>>> durability(DurabilityParams(transport="pmem", flush=False, crash_after_s=1)).summary["lost_bytes"]
67108864.0
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

import labkit
from labkit.devices.virtio_blk import add_disk
from labkit.model.host import Host
from labkit.model.pagecache import host_crash, host_page_cache
from labkit.scenarios.base import Run
from labkit.units import GiB, MiB, PAGE_SIZE, parse_size

TRANSPORTS = ("blk-writeback", "blk-none", "pmem")
DEVICE = {"pmem": "vpmem0", "blk-writeback": "blk0", "blk-none": "blk0"}


@contextlib.contextmanager
def image_file(path: str | None, size: int) -> Iterator[str]:
    """``path`` if given (it must exist), else a sparse raw image of ``size`` bytes in a temporary
    directory that is removed afterwards."""
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="labkit-image-") as d:
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            f.truncate(size)
        yield image


def _check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {list(TRANSPORTS)}")


def _open(transport: str, image: str, size: int, host: Host, name: str, memory: int, seed: int):
    """A minimal guest with the image attached the way ``transport`` says."""
    pmem = [{"id": "vpmem0", "path": image, "size": size}] if transport == "pmem" else None
    vm = labkit.open(memory=memory, seed=seed, host=host, vm_name=name, virtio_pmem=pmem,
                     model={"boot": "minimal"})
    if transport != "pmem":
        add_disk(vm, image, cache=transport.split("-")[1])
    return vm


def _read(vm, transport: str, size: int) -> dict:
    op = "pmem_read" if transport == "pmem" else "blk_read"
    return vm.guest(op, device=DEVICE[transport], offset=0, size=size)


def _write(vm, transport: str, size: int) -> dict:
    op = "pmem_write" if transport == "pmem" else "blk_write"
    return vm.guest(op, device=DEVICE[transport], offset=0, size=size)


# --- N VMs, one image ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedImageParams:
    """``n_vms`` guests of ``vm_memory`` boot from one ``image_size`` image, each reading
    ``boot_read`` bytes of it, one every ``boot_interval_s``. Sizes in bytes or strings."""

    n_vms: int = 4
    transport: str = "blk-writeback"
    vm_memory: int | str = 1 * GiB
    image_size: int | str = 2 * GiB
    boot_read: int | str = 512 * MiB
    boot_interval_s: float = 5.0
    host_ram: int | str | None = None  # default: room for every guest and the image, twice
    seed: int = 0
    path: str | None = None


def shared_image(params: SharedImageParams) -> Run:
    """Boot the VMs one after the other; one sample row per boot. Summary (bytes): ``host_used``,
    ``guest_copies`` (image bytes in guest page caches), ``host_copy`` (in the host page cache),
    ``copies`` (both, in units of ``boot_read``), ``memmap`` (guest RAM for pmem struct pages),
    ``per_vm`` (host memory per VM, image included), and ``second_read_ms``, what the last VM's
    boot read cost (host cache hits are ~8x cheaper than disk reads in the model)."""
    _check_transport(params.transport)
    if not isinstance(params.n_vms, int) or params.n_vms < 1:
        raise ValueError(f"n_vms must be an int >= 1, got {params.n_vms!r}")
    memory = parse_size(params.vm_memory, name="vm_memory")
    image_size = parse_size(params.image_size, name="image_size")
    boot_read = parse_size(params.boot_read, name="boot_read")
    if not 0 < boot_read <= image_size:
        raise ValueError(f"boot_read must be in (0, image_size], got {params.boot_read!r}")
    ram = parse_size(params.host_ram, name="host_ram") if params.host_ram is not None else 2 * (
        params.n_vms * memory + image_size)
    host = Host(ram)
    rows, vms, reads = [], [], []
    with image_file(params.path, image_size) as image:
        try:
            for i in range(params.n_vms):
                vm = _open(params.transport, image, image_size, host, f"vm{i}", memory, params.seed + i)
                vms.append(vm)
                reads.append(_read(vm, params.transport, boot_read))
                vm.advance(params.boot_interval_s * 1000.0)
                rows.append(_shared_row(host, vms, params.transport, i))
        finally:
            for vm in vms:
                vm.close()
    last = rows[-1]
    summary = {k: float(last[k]) for k in ("host_used", "guest_copies", "host_copy", "memmap",
                                             "guests_rss")}
    summary["copies"] = (last["guest_copies"] + last["host_copy"]) / boot_read
    summary["per_vm"] = last["host_used"] / params.n_vms
    summary["first_read_ms"] = float(reads[0]["elapsed_ms"])
    summary["second_read_ms"] = float(reads[-1]["elapsed_ms"])
    return Run.from_rows(rows, summary=summary, params=params)


def _shared_row(host: Host, vms: list, transport: str, i: int) -> dict:
    cache = host_page_cache(host)
    guest_copies = sum(vm.inspect("virtio-pmem").guest_cached_pages for vm in vms) * PAGE_SIZE
    return {"t_ms": float(vms[-1].now_ms), "vms": float(i + 1),
            "host_used": float(host.used_pages * PAGE_SIZE),
            "guests_rss": float(sum(vm.sample()["host_rss"] for vm in vms)),
            "host_copy": float(cache.cached_pages * PAGE_SIZE),
            "guest_copies": float(guest_copies),
            "memmap": float(sum(vm.sample()["pmem_memmap"] for vm in vms))}


def shared_image_table(runs: Sequence[Run]) -> dict[str, list]:
    """One row per run: transport and the summary metrics, for printing or plotting."""
    keys = ("host_used", "guests_rss", "host_copy", "guest_copies", "copies", "memmap", "per_vm")
    return {"transport": [r.params.transport for r in runs],
            **{k: [r.summary[k] for r in runs] for k in keys}}


def probe_cached(vm, device: str = "vpmem0", chunk: int | str = MiB, chunks: int = 16,
                 offset: int | str = 0) -> np.ndarray:
    """The side channel, attacker's side: time a DAX read of each of ``chunks`` chunks from
    ``offset`` (model milliseconds). A chunk another VM read recently is in the shared host page
    cache and answers ~8x faster than one read from the disk. Probing caches what it reads, as a
    real probe would (flush+reload needs the page evicted before the next round)."""
    chunk, offset = parse_size(chunk, name="chunk"), parse_size(offset, name="offset")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    return np.array([vm.guest("pmem_read", device=device, offset=offset + i * chunk, size=chunk)[
        "elapsed_ms"] for i in range(chunks)])


# --- durability ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DurabilityParams:
    """A guest writes ``write`` bytes through ``transport``, flushes (``flush``: fsync for pmem,
    ``sync`` for virtio-blk) or not, and the host crashes ``crash_after_s`` seconds later.
    ``fsync_error``: the host's disk fails the flush (pmem: the guest gets EIO)."""

    transport: str = "pmem"
    write: int | str = 64 * MiB
    flush: bool = False
    crash_after_s: float = 1.0
    fsync_error: bool = False
    vm_memory: int | str = 1 * GiB
    image_size: int | str = 1 * GiB
    sample_s: float = 1.0
    seed: int = 0
    path: str | None = None


def durability(params: DurabilityParams) -> Run:
    """Write, maybe flush, wait, crash the host; series of dirty data at risk every ``sample_s``.
    Summary (bytes unless named): ``written``, ``lost`` (the pages whose last write the disk does
    not hold after the crash), ``durable`` (written minus lost), ``flush_ret`` (0, or -5 = EIO),
    ``flush_ms``; and ``lost_bytes`` = ``lost``."""
    _check_transport(params.transport)
    memory = parse_size(params.vm_memory, name="vm_memory")
    image_size = parse_size(params.image_size, name="image_size")
    write = parse_size(params.write, name="write")
    if not 0 < write <= image_size:
        raise ValueError(f"write must be in (0, image_size], got {params.write!r}")
    if params.crash_after_s < 0 or params.sample_s <= 0:
        raise ValueError(f"crash_after_s must be >= 0 and sample_s > 0, got {params.crash_after_s!r}, "
                         f"{params.sample_s!r}")
    host = Host(4 * (memory + image_size))
    with image_file(params.path, image_size) as image:
        vm = _open(params.transport, image, image_size, host, "vm0", memory, params.seed)
        cache = host_page_cache(host)
        f = cache.open(image)
        if params.fsync_error:
            f.inject_fsync_error(1)
        _write(vm, params.transport, write)
        flush_ret, flush_ms = 0, 0.0
        if params.flush:
            start = vm.now_ms
            if params.transport == "pmem":
                flush_ret = vm.guest("pmem_flush", device="vpmem0")["ret"]
            else:
                vm.guest("sync")
                flush_ret = -5 if f.stats["fsync_errors"] else 0
            flush_ms = vm.now_ms - start
        rows = [_risk_row(vm)]
        left = params.crash_after_s * 1000.0
        while left > 0:
            step = min(params.sample_s * 1000.0, left)
            vm.advance(step)
            left -= step
            rows.append(_risk_row(vm))
        host_crash(host, [vm])
        lost = int(f.lost[: write // PAGE_SIZE].sum()) * PAGE_SIZE
    summary = {"written": float(write), "lost": float(lost), "durable": float(write - lost),
               "flush_ret": float(flush_ret), "flush_ms": float(flush_ms), "lost_bytes": float(lost)}
    return Run.from_rows(rows, summary=summary, params=params)


def _risk_row(vm) -> dict:
    s = vm.sample()
    return {"t_ms": s["t_ms"], "guest_dirty": s["guest_dirty"],
            "host_dirty": s["host_page_cache_dirty"], "at_risk": s["guest_dirty"] + s[
                "host_page_cache_dirty"], "host_page_cache": s["host_page_cache"]}


def durability_matrix(base: DurabilityParams = DurabilityParams(),
                      transports: Sequence[str] = TRANSPORTS,
                      crash_after_s: Sequence[float] = (1.0, 40.0, 70.0)) -> list[Run]:
    """Every transport, without and with a flush, crashed at each time: a list of Runs."""
    return [durability(replace(base, transport=t, flush=flush, crash_after_s=after))
            for t in transports for flush in (False, True) for after in crash_after_s]


def durability_table(runs: Sequence[Run]) -> dict[str, list]:
    """One row per durability run: its parameters and what was lost."""
    return {"transport": [r.params.transport for r in runs],
            "flush": [r.params.flush for r in runs],
            "crash_after_s": [r.params.crash_after_s for r in runs],
            "lost": [r.summary["lost"] for r in runs],
            "durable": [r.summary["durable"] for r in runs],
            "flush_ret": [r.summary["flush_ret"] for r in runs]}

