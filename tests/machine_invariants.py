"""Every invariant of a whole model VM, checked from its internals in one place.

The fuzzer (tests/test_fuzz.py) and the regression tests of issue 12 drive a VM through public calls
only (``vm.qmp``, ``vm.guest``, ``vm.advance``, ``vm.step``); this module is the one place that reads
the model's internals, so renaming one of them is a one-place change here.

The invariants (docs/architecture.md, "Invariants the tests hold"):

* every page is in exactly one state, and the per-zone and unzoned counts equal a recount;
* the buddy free lists (derived per zone) hold exactly the zone's free pages, and no free page lies
  outside a zone;
* every page a workload, the page cache, the balloon, hinting or a memmap owns is owned once, is in
  its owner's state, and is never PageOffline, absent or free; no anonymous, shmem, page-cache,
  balloon or hinted page is without an owner;
* balloon list pages are BALLOON, the balloon holds ``num_pages`` plus its request in flight, pages
  the host was told about are discarded (unless discard is disabled), and ``actual`` only moves
  toward the target the request read, by at most 256 pages a request (:class:`BalloonWatch`);
* a reported page is free, and reporting's count of them is exact;
* virtio-mem: the plugged size equals the plugged blocks (device and driver agree), plugged blocks
  lie inside the usable region, and unplugged memory is offline or absent and not backed;
* the host: RSS equals the backed pages, a page is in host RAM or host swap but not both, no VM has
  more backed than present pages, and host RAM and swap are never over-committed.
"""

from __future__ import annotations

import numpy as np

from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.model.buddy import free_blocks
from labkit.model.pages import N_STATES, PageFlag, PageState
from labkit.units import PAGE_SIZE
from tests.helpers import check_invariants

S = PageState
OWNER_STATES = {"anon": (S.ANON,), "shmem": (S.SHMEM,), "file": (S.FILE_CLEAN, S.FILE_DIRTY),
                "kernel": (S.KERNEL,), "slab": (S.KERNEL,)}
# states whose every page has an owner the model tracks (KERNEL included: boot slab, slab workloads,
# a handle's page tables and page cache nodes, hot-plugged memmaps, the pmem memmap)
OWNED_STATES = (S.KERNEL, S.ANON, S.SHMEM, S.FILE_CLEAN, S.FILE_DIRTY, S.BALLOON, S.HINTED)
HINT_BLOCK_PAGES = 1024  # VIRTIO_BALLOON_HINT_BLOCK_ORDER 10


class InvariantViolation(AssertionError):
    """An invariant of the machine does not hold (the message says which, with numbers)."""


def _fail(message: str) -> None:
    raise InvariantViolation(message)


def owners(vm) -> list[tuple[str, np.ndarray, tuple]]:
    """(who, PFNs, states allowed) for every owner of guest pages the model keeps."""
    kernel = vm.kernel
    out = []
    for h in kernel.handles.values():
        if h.kind not in OWNER_STATES:
            _fail(f"handle {h.id} has an unknown kind {h.kind!r}")
        if not h.alive and len(h.pages):
            _fail(f"handle {h.id} ({h.name}) is dead but holds {len(h.pages)} pages")
        out.append((f"handle {h.id} ({h.name})", np.asarray(h.pages), OWNER_STATES[h.kind]))
        if h.overhead is not None and len(h.overhead):  # its page tables, xa_nodes, buffer heads
            out.append((f"handle {h.id} ({h.name})'s kernel overhead", np.asarray(h.overhead), (S.KERNEL,)))
    if vm.balloon is not None:
        out.append(("the balloon list", vm.balloon.pages, (S.BALLOON,)))
        out.append(("the balloon's request in flight", np.asarray(vm.balloon.in_flight), (S.BALLOON,)))
    hinting = getattr(vm, "hinting", None)
    if hinting is not None:
        starts = hinting.driver._free_page_list
        pfns = (starts[:, None] + np.arange(HINT_BLOCK_PAGES)).ravel()
        out.append(("hinting's free_page_list", pfns, (S.HINTED,)))
    hotplug = kernel.hotplug
    if hotplug is not None:
        for block, memmap in hotplug.memmap.items():
            out.append((f"the memmap of memory block {block}", memmap, (S.KERNEL,)))
    return out


def check_machine(vm) -> None:
    """Raise :class:`InvariantViolation` naming the first invariant of ``vm`` that does not hold."""
    mem = vm.mem
    if int(mem.state.max()) >= N_STATES:
        _fail(f"a page is in no known state: {int(mem.state.max())}")
    try:
        check_invariants(mem)
    except AssertionError as e:
        _fail(str(e))
    totals = mem.totals()

    # --- free lists ------------------------------------------------------------------------------
    if mem.unzoned[S.FREE]:
        _fail(f"{int(mem.unzoned[S.FREE])} free pages lie in no zone (on no free list)")
    for zi, zone in enumerate(mem.zones):
        listed = free_blocks(mem, zone).free_pages()
        if listed != int(mem.counts[zi, S.FREE]):
            _fail(f"zone {zi} ({zone.name}): free lists hold {listed} pages, the zone counts "
                  f"{int(mem.counts[zi, S.FREE])} free")

    # --- owners ----------------------------------------------------------------------------------
    parts = owners(vm)
    allp = np.concatenate([p for _, p, _ in parts]) if parts else np.zeros(0, np.int64)
    if len(np.unique(allp)) != len(allp):
        uniq, n = np.unique(allp, return_counts=True)
        twice = uniq[n > 1]
        who = [w for w, p, _ in parts if np.isin(p, twice[:1]).any()]
        _fail(f"{len(twice)} pages have two owners, e.g. PFN {int(twice[0])}: {who}")
    for who, pfns, allowed in parts:
        if len(pfns) == 0:
            continue
        st = mem.state[pfns]
        bad = ~np.isin(st, [int(s) for s in allowed])
        if bad.any():
            seen = np.bincount(st[bad], minlength=N_STATES)
            names = {S(i).name: int(c) for i, c in enumerate(seen) if c}
            _fail(f"{who} owns {int(bad.sum())} pages that are not {[s.name for s in allowed]}: "
                  f"{names}")
    owned = np.bincount(mem.state[allp], minlength=N_STATES) if len(allp) else np.zeros(N_STATES, int)
    for s in OWNED_STATES:
        if int(owned[s]) != int(totals[s]):
            _fail(f"{int(totals[s]) - int(owned[s])} {s.name} pages have no owner "
                  f"({int(totals[s])} in the state array, {int(owned[s])} owned)")

    # --- balloon ---------------------------------------------------------------------------------
    balloon = vm.balloon
    if balloon is not None:
        device = vm.balloon_device
        if int(totals[S.BALLOON]) != balloon.num_pages + len(balloon.in_flight):
            _fail(f"{int(totals[S.BALLOON])} BALLOON pages, but the balloon holds "
                  f"{balloon.num_pages} + {len(balloon.in_flight)} in flight")
        if abs(device.config.actual - balloon.num_pages) > VIRTIO_BALLOON_ARRAY_PFNS_MAX:
            _fail(f"actual {device.config.actual} is more than a request from num_pages "
                  f"{balloon.num_pages}")
        if vm.host.discard_enabled:
            told = balloon.pages
            backed = (mem.flags[told] & PageFlag.BACKED) != 0
            if backed.any():
                _fail(f"{int(backed.sum())} pages on the balloon list are still backed on the host")
        watch = getattr(device, "_fuzz_watch", None)
        if watch is not None and watch.violations:
            _fail(watch.violations[0])

    # --- reporting -------------------------------------------------------------------------------
    reporting = getattr(vm, "reporting", None)
    if reporting is not None and reporting.core is not None:
        counted = reporting.core.count_reported()
        if counted != reporting.core.reported_now_pages:
            _fail(f"reporting counts {reporting.core.reported_now_pages} reported pages, the flags "
                  f"say {counted}")

    # --- virtio-mem ------------------------------------------------------------------------------
    vmem = getattr(vm, "virtio_mem", None)
    plugged_pages = 0
    if vmem is not None:
        for dev, drv in zip(vmem.devices, vmem.drivers, strict=True):
            c = dev.config
            if c.plugged_size != int(dev.bitmap.sum()) * c.block_size:
                _fail(f"{dev.id}: size {c.plugged_size} but {int(dev.bitmap.sum())} blocks of "
                      f"{c.block_size} plugged")
            if drv.plugged_size != c.plugged_size:
                _fail(f"{dev.id}: the driver thinks {drv.plugged_size} is plugged, the device "
                      f"{c.plugged_size}")
            if int(drv.plugged.sum()) * drv.unit_bytes != drv.plugged_size:
                _fail(f"{dev.id}: the driver's bitmap has {int(drv.plugged.sum())} units of "
                      f"{drv.unit_bytes}, its plugged size is {drv.plugged_size}")
            per_unit = drv.unit_bytes // c.block_size
            bits = dev.bitmap[:len(drv.plugged) * per_unit].reshape(-1, per_unit)
            if (bits != drv.plugged[:, None]).any():
                _fail(f"{dev.id}: driver and device bitmaps differ")
            usable = c.usable_region_size // c.block_size
            if dev.bitmap[usable:].any():
                _fail(f"{dev.id}: plugged blocks outside the usable region ({c.usable_region_size})")
            if c.plugged_size > c.region_size:
                _fail(f"{dev.id}: plugged {c.plugged_size} > region {c.region_size}")
            plugged_pages += c.plugged_size // PAGE_SIZE
            r = drv.region
            unplugged = np.repeat(~drv.plugged, drv.unit_pages)
            st = mem.state[r.start:r.start + len(unplugged)][unplugged]
            wrong = (st != S.OFFLINE) & (st != S.ABSENT)
            if wrong.any():
                seen = np.bincount(st[wrong], minlength=N_STATES)
                _fail(f"{dev.id}: {int(wrong.sum())} pages of unplugged blocks are online: "
                      f"{ {S(i).name: int(n) for i, n in enumerate(seen) if n} }")
            fl = mem.flags[r.start:r.start + len(unplugged)][unplugged]
            if ((fl & (PageFlag.BACKED | PageFlag.SWAPPED)) != 0).any():
                _fail(f"{dev.id}: unplugged memory is still backed or swapped on the host")
        absent = mem.state == S.ABSENT
        if ((mem.flags[absent] & (PageFlag.BACKED | PageFlag.SWAPPED)) != 0).any():
            _fail("absent (never plugged or removed) memory is backed on the host")

    # --- host ------------------------------------------------------------------------------------
    host = vm.host
    present = mem.boot_pages + plugged_pages
    if not 0 <= mem.backed_pages <= present:
        _fail(f"host RSS {mem.backed_pages} pages is outside [0, {present}] (the guest's RAM)")
    if host.used_pages > host.ram_pages:
        _fail(f"host uses {host.used_pages} pages of RAM, it has {host.ram_pages}")
    if host.swap_used_pages > host.swap >> 12:
        _fail(f"host swap holds {host.swap_used_pages} pages, it has {host.swap >> 12}")


class BalloonWatch:
    """Records every ``actual`` the balloon driver writes and checks each against the target its
    request read (mechanisms.md §1.2): at most 256 pages per request told to the host since the
    last write, never away from that target. (With deflate-on-oom, the OOM notifier's own
    ``leak_balloon`` + ``update_balloon_size`` may run between a request and the work item's write
    of ``actual``, in Linux too: then one write carries two requests.) Installed on the device
    instance (a test instrument; the model itself is unchanged)."""

    def __init__(self, vm):
        self.violations: list[str] = []
        self.writes = 0
        self.moves: list[tuple[int, int]] = []  # (pages actual moved, requests since the last write)
        device, driver = vm.balloon_device, vm.balloon
        original = device.set_config
        told = [device.inflate_requests + device.deflate_requests]

        def set_config(actual: int) -> None:
            before = device.config.actual
            chased = driver.last_request_target  # _update_balloon_size sets it just before
            requests = device.inflate_requests + device.deflate_requests
            self.writes += 1
            allowed = VIRTIO_BALLOON_ARRAY_PFNS_MAX * max(1, requests - told[0])
            self.moves.append((actual - before, requests - told[0]))
            told[0] = requests
            if abs(actual - before) > allowed:
                self.violations.append(f"actual moved {actual - before} pages in one write, more "
                                       f"than {allowed} (256 per request told to the host)")
            elif chased is not None and abs(chased - actual) > abs(chased - before):
                self.violations.append(f"actual moved away from the target its request read: "
                                       f"{before} -> {actual}, target {chased}")
            original(actual)

        device.set_config = set_config
        device._fuzz_watch = self


def watch(vm) -> BalloonWatch | None:
    """Install a :class:`BalloonWatch` on ``vm``'s balloon (None without a balloon)."""
    if vm.balloon is None:
        return None
    return BalloonWatch(vm)


def is_panicked(vm) -> bool:
    """Did the guest kernel panic (out of memory with nothing left to kill)?"""
    return bool(vm.kernel.panicked)
