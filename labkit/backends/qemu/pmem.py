"""virtio-pmem on the live backend: the model's guest ops and sample keys on a real guest.

``labkit.open(backend="qemu", virtio_pmem=[{"id": "vpmem0", "path": "disk.img", "size": "256M"}])``
takes the model's options (validated by :func:`labkit.devices.virtio_pmem.validate_specs`: the file
must exist, be raw and big enough) and starts QEMU with ``-object memory-backend-file,id=mem-vpmem0,
share=on,mem-path=disk.img,size=...`` and ``-device virtio-pmem-pci,memdev=mem-vpmem0,id=vpmem0``.
After boot the guest loads libnvdimm, nd_virtio, virtio_pmem, nd_btt and nd_pmem (in modules.dep
order) and each device becomes ``/dev/pmemN``; the device is told from the region's ``resource``
(its guest-physical start), which is QEMU's ``memaddr``.

The ops, with the model's names, arguments and result keys (:mod:`labkit.devices.virtio_pmem_vm`):

* ``pmem_write(device, offset, size)``: the whole pages of the range are written with
  ``dd oflag=direct`` to ``/dev/pmemN`` (the byte :data:`PMEM_FILL`, so the host can find it in the
  file). O_DIRECT on the pmem block device is the driver's memcpy straight into the region, i.e.
  stores into QEMU's shared mapping of the file: no guest page cache, as a DAX store on the model.
  ``dirty_pages`` is what the host says: the dirty pages of QEMU's mapping of the file
  (``/proc/<pid>/smaps``); ``private_pages`` its copied-on-write pages (``share=off``).
* ``pmem_read(device, offset, size)``: ``dd iflag=direct`` to /dev/null. ``host_cache_hits`` are
  the range's pages the host page cache held before (``mincore``), ``disk_reads`` the others;
  ``guest_page_cache_pages`` is the guest's Cached + Buffers growth (0 expected).
* ``pmem_flush(device, requests=1)``: ``requests`` concurrent ``fsync`` calls on ``/dev/pmemN``
  (busybox ``sync FILE``). ``blkdev_fsync`` always ends in ``blkdev_issue_flush``: a PREFLUSH bio
  that nd_pmem hands to ``async_pmem_flush``, one virtio FLUSH request, one ``fsync`` of the backing
  file in QEMU. ``written_bytes`` is the drop of the mapping's dirty pages; ``max_in_flight`` is
  ``None`` (the ring can't be seen from outside).

``elapsed_ms`` is the host's wall time of the guest command (busybox ``dd`` prints no timing and
``date`` no nanoseconds); it includes the serial round trip, 1-2 ms here.
* ``pmem_devices()``: the model's rows, plus ``mode`` (the namespace's sysfs mode: ``memory``
  means a raw namespace whose struct pages live in guest RAM), ``host_rss`` and ``host_dirty``.
* ``sync``: besides sync(2), every ``/dev/pmemN`` is fsynced, which is what the model's sync means
  (it assumes a DAX filesystem on the region, whose ``sync_fs`` flushes it; sync(2) alone flushes
  no raw block device).
* ``pmem_mmap`` is not available: MAP_SYNC needs a DAX filesystem and a C helper in the guest.

``memmap_bytes`` (and the sample's ``pmem_memmap``) is measured: the drop of the guest's free pages
(the buddy's and the per-CPU lists', :data:`FREE_PAGES`) while nd_pmem probed the regions, shared
out by region size.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable

from labkit.backends.qemu.hostmem import file_mapping_usage, resident_pages
from labkit.errors import GuestError
from labkit.units import MiB, PAGE_SIZE, parse_size

PMEM_MODULES = ("libnvdimm", "nd_virtio", "virtio_pmem", "nd_btt", "nd_pmem")
PMEM_FILL = ord("L")  # what pmem_write stores, so the host can see it in the backing file
PMEM_OPS = ("pmem_write", "pmem_read", "pmem_flush", "pmem_devices", "pmem_mmap")
PROBE_TIMEOUT_S = 60.0
# Free pages including those on the per-CPU lists (/proc/zoneinfo "count:"), which MemFree leaves
# out: they hold up to ~3 MiB of a 512 MiB guest, as much as a 256 MiB region's struct pages.
FREE_PAGES = "awk '/^  pages free/{s+=$3} /^ +count:/{s+=$2} END{print \"FREE\", s}' /proc/zoneinfo"


def probe_script(modules: list[str], count: int) -> str:
    """Load the pmem modules (those of the image, in its order), wait for ``count`` regions with a
    block device, print the free pages around nd_pmem and one ``region START MODE DISK`` line each."""
    loads = "\n".join((f"{FREE_PAGES}; insmod /lib/modules/{m}.ko; {FREE_PAGES}" if m == "nd_pmem"
                       else f"insmod /lib/modules/{m}.ko") for m in modules)
    return f"""{loads}
for try in $(seq 1 200); do
  n=$(ls -d /sys/bus/nd/devices/region*/namespace*/block/pmem* 2>/dev/null | wc -l)
  [ "$n" -ge {count} ] && break
  usleep 50000
done
for r in /sys/bus/nd/devices/region*; do
  for b in $r/namespace*/block/pmem*; do
    [ -e "$b" ] && echo region $(cat $r/resource) $(cat ${{b%/block/*}}/mode) ${{b##*/}}
  done
done"""


def parse_probe(text: str) -> tuple[int, dict[int, tuple[str, str]]]:
    """``(free-page drop in bytes across nd_pmem, {start: (mode, disk)})`` from :func:`probe_script`."""
    free = [int(x) * PAGE_SIZE for x in re.findall(r"^FREE (\d+)$", text, re.M)]
    drop = max(0, free[0] - free[1]) if len(free) >= 2 else 0
    regions = {int(start, 16): (mode, disk)
               for start, mode, disk in re.findall(r"^region (0x[0-9a-f]+) (\S+) (\S+)$", text, re.M)}
    return drop, regions


def page_range(size_total: int, device: str, offset: int | str, size: int | str | None) -> tuple[int, int]:
    """``(first page, pages)`` of ``[offset, offset + size)``, with the model's checks and text."""
    offset = parse_size(offset, name="offset")
    size = size_total - offset if size is None else parse_size(size, name="size")
    if offset < 0 or size <= 0 or offset + size > size_total:
        raise ValueError(f"offset {offset} + size {size} is outside {device}'s region ({size_total} bytes)")
    first = offset // PAGE_SIZE
    return first, -(-(offset + size) // PAGE_SIZE) - first


def dd_blocks(first: int, pages: int) -> tuple[int, int, int]:
    """``(bs, skip/seek, count)``: the biggest block (up to 1 MiB) that divides both, since every
    O_DIRECT block is one bio and a TCG guest pays per request."""
    bs = PAGE_SIZE
    while bs < MiB and (first * PAGE_SIZE) % (bs * 2) == 0 and (pages * PAGE_SIZE) % (bs * 2) == 0:
        bs *= 2
    return bs, first * PAGE_SIZE // bs, pages * PAGE_SIZE // bs


def _guest_cache_kib(text: str) -> int:
    return sum(int(v) for v in re.findall(r"^(?:Buffers|Cached):\s+(\d+)", text, re.M))


class LivePmem:
    """The virtio-pmem devices of one live VM (see the module docstring)."""

    def __init__(self, specs: list[dict], run: Callable[..., tuple[str, int]],
                 memory_devices: Callable[[], list[dict]], qemu_pid: Callable[[], int], modules: list[str],
                 builtin: tuple[str, ...] = ()):
        self.specs = specs
        self.run = run
        self.qemu_pid = qemu_pid
        self.paths = {s["id"]: os.path.realpath(s["path"]) for s in specs}
        self.flushes = {s["id"]: 0 for s in specs}
        self.eio = {s["id"]: 0 for s in specs}
        self.disks: dict[str, str] = {}
        self.modes: dict[str, str] = {}
        self.starts: dict[str, int] = {}
        self.memmap_total = 0
        if not specs:
            return
        wanted = [m for m in modules if m in PMEM_MODULES]
        missing = sorted(set(PMEM_MODULES) - set(wanted) - set(builtin) - {"nd_btt"})
        if missing:
            raise GuestError(f"the guest image lacks the virtio-pmem modules {missing}")
        out, _ = run(probe_script(wanted, len(specs)), timeout=PROBE_TIMEOUT_S)
        self.memmap_total, regions = parse_probe(out)
        for device in memory_devices():
            if device.get("type") == "virtio-pmem":
                data = device["data"]
                self.starts[data["id"]] = data["memaddr"]
                if data["memaddr"] in regions:
                    self.modes[data["id"]], self.disks[data["id"]] = regions[data["memaddr"]]
        lost = [s["id"] for s in specs if s["id"] not in self.disks]
        if lost:
            raise GuestError(f"virtio-pmem device(s) {lost} got no /dev/pmemN in the guest; it said:\n"
                             f"{out.strip()[-800:]}")

    # --- helpers --------------------------------------------------------------------------------
    def _spec(self, device: str) -> dict:
        for spec in self.specs:
            if device == spec["id"] or device == self.disks.get(spec["id"]):
                return spec
        raise ValueError(f"no virtio-pmem device {device!r} in this guest; devices: "
                         f"{[s['id'] for s in self.specs]}")

    def host_usage(self, device: str) -> dict[str, int]:
        """QEMU's mapping of the device's backing file: rss, dirty, anonymous (bytes)."""
        with open(f"/proc/{self.qemu_pid()}/smaps") as f:
            return file_mapping_usage(f.read(), self.paths[device])

    def call(self, op: str, arguments: dict) -> object:
        if op == "pmem_mmap":
            raise NotImplementedError("pmem_mmap (MAP_SYNC) is not available on the live backend: it "
                                      "needs a DAX filesystem and a C helper in the guest; the model "
                                      "answers EOPNOTSUPP, as drivers/nvdimm/pmem.c does for an async region")
        return getattr(self, op.removeprefix("pmem_"))(**arguments)

    # --- ops --------------------------------------------------------------------------------------
    def write(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        spec = self._spec(device)
        first, pages = page_range(spec["size"], spec["id"], offset, size)
        bs, seek, count = dd_blocks(first, pages)
        started = time.monotonic()
        self.run(f"tr '\\000' '\\{PMEM_FILL:03o}' < /dev/zero | dd of=/dev/{self.disks[spec['id']]} "
                 f"bs={bs} seek={seek} count={count} iflag=fullblock oflag=direct 2>/dev/null",
                 timeout=30.0 + pages * PAGE_SIZE / (4 * MiB))
        elapsed = (time.monotonic() - started) * 1000.0
        host = self.host_usage(spec["id"])
        private = host["anonymous"] // PAGE_SIZE
        return {"pages": pages, "dirty_pages": host["dirty"] // PAGE_SIZE - private,
                "private_pages": private if not spec["share"] else 0, "elapsed_ms": elapsed}

    def read(self, device: str, offset: int | str = 0, size: int | str | None = None) -> dict:
        spec = self._spec(device)
        first, pages = page_range(spec["size"], spec["id"], offset, size)
        hits = resident_pages(self.paths[spec["id"]], first, pages)
        bs, skip, count = dd_blocks(first, pages)
        cache = "grep -E '^(Buffers|Cached):' /proc/meminfo"
        started = time.monotonic()
        out, _ = self.run(f"{cache}; echo @@; dd if=/dev/{self.disks[spec['id']]} of=/dev/null bs={bs} "
                          f"skip={skip} count={count} iflag=direct 2>/dev/null; echo @@; {cache}",
                          timeout=30.0 + pages * PAGE_SIZE / (4 * MiB))
        elapsed = (time.monotonic() - started) * 1000.0
        before, _, after = out.split("@@\n")
        grown = max(0, _guest_cache_kib(after) - _guest_cache_kib(before)) * 1024 // PAGE_SIZE
        private = self.host_usage(spec["id"])["anonymous"] // PAGE_SIZE if not spec["share"] else 0
        return {"pages": pages, "host_cache_hits": hits, "disk_reads": pages - hits,
                "private_pages": private, "guest_page_cache_pages": grown, "elapsed_ms": elapsed}

    def flush(self, device: str, requests: int = 1) -> dict:
        spec = self._spec(device)
        if not isinstance(requests, int) or isinstance(requests, bool) or not 1 <= requests <= 1000:
            raise ValueError(f"requests must be an int from 1 to 1000 on the live backend, got {requests!r}")
        disk, name = self.disks[spec["id"]], spec["id"]
        dirty_before = self.host_usage(name)["dirty"]
        script = (f"sync /dev/{disk}; echo rc=$?" if requests == 1 else
                  f"for i in $(seq {requests}); do (sync /dev/{disk}; echo rc=$?) & done; wait")
        started = time.monotonic()
        out, _ = self.run(script, timeout=60.0 + requests * 0.1)
        elapsed = (time.monotonic() - started) * 1000.0
        failed = sum(rc != "0" for rc in re.findall(r"rc=(\d+)", out))
        self.flushes[name] += requests
        self.eio[name] += failed
        host = self.host_usage(name)
        dirty_after = host["dirty"] - host["anonymous"]
        return {"ret": -errno.EIO if failed else 0, "error": "EIO" if failed else None, "eio": failed,
                "elapsed_ms": elapsed, "written_bytes": max(0, dirty_before - host["dirty"]),
                "max_in_flight": None, "dirty_pages": dirty_after // PAGE_SIZE}

    def devices(self) -> list[dict]:
        total = sum(s["size"] for s in self.specs) or 1
        rows = []
        for spec in self.specs:
            name = spec["id"]
            host = self.host_usage(name)
            rows.append({"device": name, "disk": self.disks[name], "start": self.starts[name],
                         "size": spec["size"], "sync": False,  # virtio_pmem: ND_REGION_ASYNC, always
                         "memmap_bytes": self.memmap_total * spec["size"] // total // PAGE_SIZE * PAGE_SIZE,
                         "flushes": self.flushes[name], "eio": self.eio[name], "mode": self.modes[name],
                         "host_rss": host["rss"], "host_dirty": host["dirty"] - host["anonymous"]})
        return rows

    def sync_command(self) -> str:
        """What ``sync`` adds: an fsync of every /dev/pmemN (see the module docstring); each counts
        as one flush, as the model's sync flushes every region once."""
        for name in self.disks:
            self.flushes[name] += 1
        return "".join(f"; sync /dev/{disk}" for disk in self.disks.values())

    def sample(self) -> dict[str, int]:
        """The model's virtio-pmem sample keys (``guest_dirty`` is added by the backend): the host
        figures are those of the backing files (the model's host page cache holds nothing else)."""
        cached = dirty = 0
        for spec in self.specs:
            cached += resident_pages(self.paths[spec["id"]]) * PAGE_SIZE
            host = self.host_usage(spec["id"])
            dirty += host["dirty"] - host["anonymous"]
        return {"host_page_cache": cached, "host_page_cache_dirty": dirty,
                "pmem_size": sum(s["size"] for s in self.specs), "pmem_memmap": self.memmap_total}
