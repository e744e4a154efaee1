"""Free page reporting (mm/page_reporting.c + virtio-balloon's reporting vq + QEMU), against the facts
of docs/mechanisms.md §3 (cited as "3.x"; "3.3.N" is item N of §3.3), §8.4-§8.5 and docs/results.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import labkit
from labkit.devices import free_page_reporting as fpr
from labkit.devices.balloon import VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING
from labkit.errors import GuestError
from labkit.model import block_scan
from labkit.model import page_reporting as core
from labkit.model.buddy import free_blocks
from labkit.model.pages import GuestMemory, PageFlag, PageState, Zone
from tests.helpers import check_invariants

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
REPORTED = np.uint8(PageFlag.REPORTED)


def open_vm(memory="2G", balloon=None, host=None, cmdline=None, seed=0):
    return labkit.open(backend="model", memory=memory, seed=seed,
                       balloon={"free_page_reporting": True, **(balloon or {})},
                       host={"ram": "64G", **(host or {})}, cmdline=cmdline)


def settle(vm, limit_ms=200_000):
    """Run until reporting is IDLE (no work scheduled): what an idle guest reaches."""
    waited = 0
    while vm.reporting.state != core.PageReportingState.IDLE and waited < limit_ms:
        vm.advance(1000)
        waited += 1000
    assert vm.reporting.state == core.PageReportingState.IDLE


def check_reported_blocks(vm) -> None:
    """PageReported marks exactly whole free blocks of order >= page_reporting_order (3.3.6-7), and the
    running count matches the flags."""
    mem = vm.mem
    flagged = (mem.flags & REPORTED) != 0
    covered = np.zeros(mem.n_pages, dtype=bool)
    for zone in mem.zones:
        blocks = free_blocks(mem, zone)
        for k in range(11):
            starts = blocks.starts[k][blocks.reported[k]]
            if len(starts):
                assert k >= vm.reporting.order, f"an order-{k} block is flagged"
                pages = block_scan.expand_blocks(starts, k)
                assert flagged[pages].all(), "a reported block is flagged on every page"
                covered[pages] = True
    assert (flagged == covered).all(), "PageReported outside reported free blocks"
    assert vm.reporting.reported_now_pages == int(flagged.sum())


def main_zone(vm) -> int:
    """The zone with the most pages (ZONE_DMA32 below 4 GiB; ZONE_NORMAL above): where the
    workloads' memory and its reporting are."""
    return int(np.argmax(vm.kernel.zone_managed()))


def lists_now(vm, zone_index=None):
    """(unreported blocks, nr_free) per order from buddy.free_blocks, the allocator's own view."""
    zone_index = main_zone(vm) if zone_index is None else zone_index
    blocks = free_blocks(vm.mem, vm.mem.zones[zone_index])
    return ({k: int((~blocks.reported[k]).sum()) for k in range(11)},
            {k: len(blocks.starts[k]) for k in range(11)})


def reference_pass(unreported, nr_free, free, wmark_min, wmark_low, order):
    """page_reporting_process_zone as the kernel loops, one block at a time (test-only, counts
    only): returns (report calls, blocks reported per order, REQUESTED set) or None if gated."""
    if free <= wmark_low + (32 << order):
        return None
    unreported, sg, calls, requested = dict(unreported), [], 0, False
    reported = dict.fromkeys(range(order, 11), 0)
    for k in range(order, 11):
        if nr_free[k] == 0:
            continue
        budget = -(-nr_free[k] // (32 * 16))
        while unreported[k] > 0:  # the walk is at an unreported page
            if budget < 0:
                requested = True
                break
            if len(sg) < 32:
                if not free - sum(1 << o for o in sg) > wmark_min + (1 << k):
                    break  # __isolate_free_page fails
                sg.append(k)
                unreported[k] -= 1
                continue
            calls += 1
            for o in sg:
                reported[o] += 1
            sg, budget = [], budget - 1
    if sg:
        calls += 1
        for o in sg:
            reported[o] += 1
    return calls, reported, requested


def drained_per_order(stats):
    out = {}
    for starts, k in stats.drained:
        out[k] = out.get(k, 0) + len(starts)
    return out


def run_next_pass(vm, start_ms):
    """Advance to just before the pass due at ``start_ms``, return the reference's prediction from
    the lists at that instant (every zone, each with its own gate and scatterlist, as
    page_reporting_process_zone), then run the pass; returns (prediction, the pass's stats)."""
    vm.advance(start_ms - vm.now_ms)
    calls, reported, requested = 0, {}, False
    for zi in range(len(vm.mem.zones)):
        unreported, nr_free = lists_now(vm, zi)
        marks = vm.kernel.watermarks[zi]
        zone = reference_pass(unreported, nr_free, vm.kernel.zone_free(zi), marks.min, marks.low,
                              vm.reporting.order)
        if zone is not None:
            calls += zone[0]
            requested |= zone[2]
            for k, n in zone[1].items():
                reported[k] = reported.get(k, 0) + n
    expected = (calls, reported, requested)
    passes = vm.reporting.passes
    vm.advance(0)
    while vm.reporting.passes == passes:
        vm.advance(1)
    return expected, vm.reporting.core.history[-1]


# --- 3.1 constants and registration ----------------------------------------------------------------
def test_constants_are_the_kernel_and_qemu_values():
    assert core.PAGE_REPORTING_CAPACITY == 32  # 3.1 include/linux/page_reporting.h
    assert core.PAGE_REPORTING_DELAY_MS == 2000  # 3.1 2 * HZ
    assert core.PAGE_REPORTING_BUDGET_DIVISOR == 16  # 3.3.3 DIV_ROUND_UP(nr_free, 32 * 16)
    assert fpr.REPORTING_VQ_SIZE == 32  # 3.4 QEMU's reporting vq has exactly 32 entries
    assert [s.value for s in core.PageReportingState] == [0, 1, 2]  # 3.2 IDLE, REQUESTED, ACTIVE
    assert core.resolve_reporting_order(-1) == 9  # 3.1 -1: pageblock_order
    assert core.resolve_reporting_order(-1, driver_order=5) == 5  # arm64 64K pages: the driver's
    assert core.resolve_reporting_order(0) == 0 and core.resolve_reporting_order(10) == 10
    for bad in (11, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            core.resolve_reporting_order(bad)
    with open_vm(cmdline={"page_reporting.page_reporting_order": 10}) as vm:
        assert vm.reporting.order == 10


def test_registration_requests_an_initial_pass_after_two_seconds():
    """3.2: registration requests an initial pass; the work runs PAGE_REPORTING_DELAY later."""
    with open_vm() as vm:
        assert vm.reporting.state == core.PageReportingState.REQUESTED
        assert any("Free page reporting enabled" in line for line in vm.dmesg())
        vm.advance(2000)  # events at exactly 2000 ms not yet run
        assert vm.reporting.passes == 0 and vm.reporting.reports == 0
        vm.advance(0)
        assert vm.reporting.reports == 1  # the first request went out at t = 2000 ms
        vm.advance(100)
        assert vm.reporting.core.history[0].start_ms == 2000


def test_attach_returns_none_without_the_option():
    with labkit.open(backend="model", memory="1G") as vm:
        assert vm.reporting is None and "reported_bytes" not in vm.sample()
    with open_vm() as vm:
        sample = vm.sample()
        for key in ("reported_bytes", "reporting_passes", "reporting_discarded_bytes",
                    "reporting_refaulted_bytes"):
            assert key in sample
        # QEMU has no runtime knob: QOM shows the device property only
        assert vm.qmp("qom-get", path="balloon0", property="free-page-reporting") is True


# --- 3.2 notification and the state machine ------------------------------------------------------
def test_no_report_before_two_seconds_then_passes_on_the_two_second_cadence():
    """3.2: a qualifying free schedules the work 2 s later; a pass ending REQUESTED (budget out,
    3.3.3) re-schedules 2 s after it ends."""
    with open_vm(memory="4G") as vm:
        settle(vm)
        h = vm.guest("alloc", size="3G")
        vm.guest("free", handle=h)
        t_free = vm.now_ms
        assert vm.reporting.state == core.PageReportingState.REQUESTED
        reports, passes = vm.reporting.reports, vm.reporting.passes
        vm.advance(1999.9)
        assert vm.reporting.reports == reports, "reported before PAGE_REPORTING_DELAY"
        vm.advance(0.2)
        assert vm.reporting.reports > reports
        settle(vm)
        runs = list(vm.reporting.core.history)[passes - vm.reporting.passes:]
        assert len(runs) >= 3
        assert runs[0].start_ms == t_free + 2000
        for before, after in zip(runs, runs[1:], strict=False):
            assert before.requested_at_end
            assert after.start_ms == pytest.approx(before.end_ms + 2000)
            assert before.end_ms - before.start_ms == pytest.approx(
                before.report_calls * fpr.REPORT_REQUEST_MS)
        assert not runs[-1].requested_at_end


def test_a_free_that_merges_below_the_reporting_order_does_not_notify():
    """3.2: page_reporting_notify_free returns unless the merged order >= page_reporting_order."""
    with open_vm() as vm:
        settle(vm)
        pfns = vm.kernel.alloc_pages(2048, PageState.ANON)  # the smallest blocks go first
        vm.kernel.touch(pfns)
        notifications = vm.reporting.core.notifications
        vm.kernel.free_pages(pfns)
        # independently: no freed page sits in an entirely free aligned 2 MiB run
        runs = np.unique(pfns >> 9)
        assert not (vm.mem.state[(runs[:, None] << 9) + np.arange(512)] == PageState.FREE).all(1).any()
        assert vm.reporting.state == core.PageReportingState.IDLE
        assert vm.reporting.core.notifications == notifications
        passes = vm.reporting.passes
        vm.advance(5000)
        assert vm.reporting.passes == passes


def test_a_free_that_completes_a_2mib_block_notifies():
    """3.2: a single 4 KiB free that merges into a >= 2 MiB block schedules a pass."""
    with open_vm() as vm:
        settle(vm)
        zone = vm.mem.zones[main_zone(vm)]
        vm.kernel.drain_all_pages()
        small = {k: len(s) << k for k, s in enumerate(free_blocks(vm.mem, zone).starts)}
        # the smallest blocks go first; the per-CPU list's refill takes a few pages past them,
        # which a drain gives back (they merge into their block again)
        filler = vm.kernel.alloc_pages(sum(n for k, n in small.items() if k < 9), PageState.ANON)
        vm.kernel.drain_all_pages()
        assert sum(len(s) for s in free_blocks(vm.mem, zone).starts[:9]) == 0
        page = vm.kernel.alloc_pages(1, PageState.ANON)  # splits a reported order >= 9 block
        assert vm.mem.flags[page[0] & ~511] & REPORTED == 0  # the whole block lost the flag
        notifications = vm.reporting.core.notifications
        vm.kernel.free_pages(page)
        # an order-0 free lands on the per-CPU list (free_unref_page): nothing merges yet
        assert vm.reporting.core.notifications == notifications
        vm.kernel.drain_all_pages()  # __free_one_page merges it to >= order 9: notify
        assert vm.reporting.core.notifications == notifications + 1
        assert vm.reporting.state == core.PageReportingState.REQUESTED
        vm.kernel.free_pages(filler)
        check_invariants(vm.mem)
        check_reported_blocks(vm)


# --- 3.3 the pass -----------------------------------------------------------------------------------
def test_budget_reports_a_sixteenth_plus_one_call_per_pass():
    """3.3.3: budget = DIV_ROUND_UP(nr_free, 512), budget + 1 report calls of 32 per list, then
    REQUESTED; a big list is fully reported over several passes. Each pass is checked against a
    block-by-block port of the kernel loop, fed by the allocator's own free lists."""
    with open_vm(memory="2G") as vm:  # one zone worth reporting: DMA32 (DMA stays below the gate)
        settle(vm)
        h = vm.guest("alloc", size="1536M")
        vm.guest("free", handle=h)
        start = vm.now_ms + 2000
        per_pass = []
        while True:
            expected, stats = run_next_pass(vm, start)
            calls, reported, requested = expected
            assert stats.report_calls == calls
            assert drained_per_order(stats) == {k: n for k, n in reported.items() if n}
            assert stats.requested_at_end == requested
            key = (main_zone(vm), 10)
            budget = -(-stats.nr_free[key] // 512)
            assert stats.budget[key] == budget
            assert stats.list_calls[key] <= budget + 1
            if stats.stop[key] == "budget":
                assert stats.list_calls[key] == budget + 1
                assert sum(drained_per_order(stats).values()) == 32 * stats.report_calls  # full
            per_pass.append((sum(drained_per_order(stats).values()), stats.nr_free[key]))
            if not requested:
                break
            start = stats.end_ms + 2000
        assert len(per_pass) >= 4
        for blocks, nr_free in per_pass[:-1]:  # about 1/16 of the list, plus one call
            assert blocks == 32 * (-(-nr_free // 512) + 1)
            assert nr_free / 16 <= blocks <= nr_free / 16 + 64
        unreported, _ = lists_now(vm)
        assert unreported[9] == unreported[10] == 0  # fully reported
        check_reported_blocks(vm)


def test_zone_gate_low_watermark_plus_64_mib():
    """3.3.1, 8.5: a zone is skipped unless free > low + (32 << 9) pages (low + 64 MiB)."""
    for above, expect_reports in ((0, False), (2048, True)):
        with open_vm(memory="1G") as vm:
            z = main_zone(vm)  # DMA32; ZONE_DMA (3808 free pages) is always below its gate
            gate = vm.kernel.watermarks[z].low + (32 << 9)
            vm.kernel.drain_all_pages()
            vm.kernel.alloc_pages(vm.kernel.zone_free(z) - gate - above, PageState.ANON)
            vm.kernel.drain_all_pages()  # what the per-CPU list's last refill took comes back
            assert vm.kernel.zone_free(z) == gate + above
            vm.advance(2100)  # the initial pass ran
            assert vm.reporting.passes == 1
            stats = vm.reporting.core.history[0]
            assert (stats.zones_skipped == 2) != expect_reports
            assert (vm.reporting.reports > 0) == expect_reports
            assert (vm.reporting.reported_now_pages > 0) == expect_reports
            assert vm.reporting.state == core.PageReportingState.IDLE


def test_isolation_stops_at_min_watermark_plus_block():
    """3.3.4: __isolate_free_page fails once zone free (less what is isolated) would fall to the
    min watermark + the block; the list ends, REQUESTED is not set, and nothing retries."""
    with open_vm(memory="1G") as vm:
        z = main_zone(vm)
        marks = vm.kernel.watermarks[z]
        target = marks.low + (32 << 9) + 5000  # past the gate, < min + 32 order-10 blocks
        vm.kernel.drain_all_pages()
        vm.kernel.alloc_pages(vm.kernel.zone_free(z) - target, PageState.ANON)
        vm.kernel.drain_all_pages()
        expected, stats = run_next_pass(vm, 2000)
        calls, reported, requested = expected
        assert stats.report_calls == calls and not requested
        assert drained_per_order(stats) == {k: n for k, n in reported.items() if n}
        assert stats.stop[(z, 10)] == "isolation"
        # each isolation needed free > min + block before it: free stayed above min, and the next
        # order-10 block found free <= min + block
        assert marks.min < stats.lowest_free[z] <= marks.min + 1024
        unreported, _ = lists_now(vm)
        assert unreported[10] > 0 and vm.reporting.state == core.PageReportingState.IDLE
        vm.advance(20_000)
        assert vm.reporting.passes == 1  # those blocks wait for the next notification


def test_page_reported_set_in_drain_cleared_on_allocation_and_on_merge():
    """3.3.6-7: PageReported only from drain, on blocks still free and unmerged; cleared when the
    block leaves the free list, allocated (split remainders unflagged) or merged."""
    with open_vm() as vm:
        before = vm.mem.flags.copy()
        vm.advance(2100)
        stats = vm.reporting.core.history[0]
        new = ((vm.mem.flags & REPORTED) != 0) & ((before & REPORTED) == 0)
        drained = np.zeros(vm.mem.n_pages, dtype=bool)
        for starts, k in stats.drained:
            drained[block_scan.expand_blocks(starts, k)] = True
        assert (new == drained).all() and drained.any()
        settle(vm)
        check_reported_blocks(vm)
        # allocation: consume every block below order 10, then half of a reported order-10 block.
        # Order-0 allocations refill the per-CPU list in batches and frees land on it: the drains
        # below give the batches' extra pages back (they merge again), as drain_all_pages does.
        # A movable allocation takes blocks of MOVABLE pageblocks first (labkit.model.allocator):
        # the small blocks left in the kernel's UNMOVABLE pageblocks are not its to take.
        zone = vm.mem.zones[main_zone(vm)]
        vm.kernel.drain_all_pages()

        def movable_small() -> dict:
            blocks = free_blocks(vm.mem, zone).starts
            return {k: int((~vm.mem.pageblock_unmovable[s >> 9]).sum()) << k
                    for k, s in enumerate(blocks) if k < 10}

        vm.kernel.alloc_pages(sum(movable_small().values()), PageState.ANON)
        vm.kernel.drain_all_pages()
        assert sum(movable_small().values()) == 0
        spare = vm.kernel.alloc_pages(2048, PageState.ANON)  # two whole order-10 blocks
        vm.kernel.drain_all_pages()
        lower = vm.kernel.alloc_pages(512, PageState.ANON)
        vm.kernel.drain_all_pages()
        block = int(lower[0])
        assert block % 1024 == 0 and (lower == block + np.arange(512)).all()
        assert not vm.mem.has_flag(np.arange(block, block + 1024), PageFlag.REPORTED).any()
        check_reported_blocks(vm)
        # the upper half is reported again, at order 9, once some other free notifies
        vm.kernel.free_pages(spare)
        vm.kernel.drain_all_pages()
        settle(vm)
        upper = np.arange(block + 512, block + 1024)
        assert vm.mem.has_flag(upper, PageFlag.REPORTED).all()
        # merge: freeing the lower half absorbs the reported upper half, which loses the flag
        reported = vm.reporting.reported_now_pages
        vm.kernel.free_pages(lower)
        vm.kernel.drain_all_pages()
        assert not vm.mem.has_flag(upper, PageFlag.REPORTED).any()
        assert vm.reporting.reported_now_pages == reported - 512
        assert vm.reporting.state == core.PageReportingState.REQUESTED  # merged to order 10
        check_reported_blocks(vm)
        settle(vm)
        assert vm.mem.has_flag(np.arange(block, block + 1024), PageFlag.REPORTED).all()


def test_reported_blocks_are_handed_out_last():
    """3.2 puts-back go to the tail; 3.3.8 the allocator takes unreported blocks first."""
    with open_vm(memory="4G") as vm:
        settle(vm)
        h = vm.guest("alloc", size="512M")
        vm.guest("free", handle=h)  # 512 MiB unreported at the head
        reused = vm.reporting.reused_pages
        pfns = vm.kernel.alloc_pages(256 * 256, PageState.ANON)
        assert len(pfns) == 256 * 256 and vm.reporting.reused_pages == reused, "took a reported page"


# --- the host: RSS staircase, refaults (3.5) --------------------------------------------------------
def staircase(vm, seconds=60, every_ms=100):
    t0, rows = vm.now_ms, []
    for _ in range(int(seconds * 1000 / every_ms)):
        vm.advance(every_ms)
        rows.append((vm.now_ms - t0, vm.sample()["host_rss"]))
    steps = [(t, rss) for (t, rss), (_, prev) in zip(rows[1:], rows, strict=False) if rss != prev]
    return rows, steps


def test_host_rss_staircase_after_freeing_a_big_allocation():
    """3.5, 7: each reported 2-4 MiB block is discarded; RSS falls every 2 s by one pass's worth
    (32 x (budget + 1) order-10 blocks) and settles in about 30 s for an idle guest."""
    with open_vm(memory="8G", host={"ram": "16G"}) as vm:
        settle(vm)
        rss_idle = vm.sample()["host_rss"]
        h = vm.guest("alloc", size="6G")
        rss_max = vm.sample()["host_rss"]
        vm.guest("free", handle=h)
        rows, steps = staircase(vm, seconds=45)
        times = [t for t, _ in steps]
        settle_s = times[-1] / 1000
        drops = [prev - rss for (_, rss), (_, prev) in zip(steps, [rows[0]] + steps, strict=False)]
        print(f"\nRSS staircase (8 GiB guest, 6 GiB freed): idle {rss_idle / MiB:.0f} MiB, "
              f"max {rss_max / MiB:.0f} MiB, steps at "
              + ", ".join(f"{t / 1000:.1f} s -> {r / MiB:.0f} MiB" for t, r in steps)
              + f"; settled after {settle_s:.1f} s")
        assert len(steps) >= 8
        assert all(1999 <= b - a <= 2100 for a, b in zip(times, times[1:], strict=False))
        assert 2000 <= times[0] <= 2100
        # each zone's order-10 list gets budget + 1 calls a pass (page_reporting_process_zone)
        per_pass = sum(32 * (-(-(vm.kernel.zone_free(z) >> 10) // 512) + 1)
                       for z in range(len(vm.mem.zones)))
        assert max(drops) <= per_pass * 4 * MiB
        # + fragments (< 2 MiB blocks) memhog backed, + the per-CPU lists (never reported)
        assert rows[-1][1] <= rss_idle + 64 * MiB + vm.kernel.pcp_pages() * PAGE
        assert 10 <= settle_s <= 35


def test_anchor_memhog_drop_caches_returns_memory_only_with_reporting():
    """docs/results.md#duyck-reporting: after memhog + drop_caches, ~all freed memory returns to the host
    with reporting and none without, settling in about 30 s (32 GB guest)."""
    result = {}
    for reporting in (True, False):
        with labkit.open(backend="model", memory="32G", balloon={"free_page_reporting": reporting},
                         host={"ram": "48G"}) as vm:
            vm.advance(60_000)
            h = vm.guest("alloc", size="30G")
            rss_max = vm.sample()["host_rss"]
            vm.guest("free", handle=h)
            vm.guest("drop_caches")
            rows, steps = staircase(vm, seconds=60, every_ms=500)
            returned = rss_max - rows[-1][1]
            result[reporting] = (returned, steps[-1][0] / 1000 if steps else 0.0)
    returned, settle_s = result[True]
    print(f"\nanchor 32 GiB guest, memhog 30 GiB + drop_caches: returned to the host "
          f"{returned / GiB:.2f} GiB with reporting (settled after {settle_s:.1f} s), "
          f"{result[False][0] / GiB:.2f} GiB without")
    assert returned >= 29.5 * GiB
    assert result[False][0] == 0
    assert 20 <= settle_s <= 40


def test_reused_reported_pages_refault_zero_filled():
    """3.5: a reused reported block is faulted back in zero-filled when the guest writes it."""
    with open_vm(memory="4G") as vm:
        # boot's freed pages the host backs, on the buddy lists or the per-CPU list (which the
        # first job's exit empties: free_high)
        free = (vm.mem.state == PageState.FREE) | (vm.mem.state == PageState.PCP)
        churn = free & ((vm.mem.flags & PageFlag.BACKED) != 0)
        settle(vm)
        first = vm.guest("alloc", size="2G")
        hog = np.concatenate([vm.kernel.handles[first].pages, vm.kernel.handles[first].overhead])
        vm.guest("free", handle=first)
        settle(vm)
        reported_before = (vm.mem.flags & REPORTED) != 0
        backed_before = (vm.mem.flags & PageFlag.BACKED) != 0
        faults, rss = vm.kernel.host_vm.zero_fill_faults, vm.sample()["host_rss"]
        refaulted, reused = vm.reporting.refaulted_pages, vm.reporting.reused_pages
        second = vm.guest("alloc", size="1G")
        h = vm.kernel.handles[second]
        # its pages and the page tables they need (one PTE page per 2 MiB, written as well)
        pages = np.concatenate([h.pages, h.overhead])
        # pages a report discarded while the host backed them: memhog's, and boot's freed pages
        was_backed = churn.copy()
        was_backed[hog] = True
        expected = int((was_backed[pages] & reported_before[pages]).sum())
        assert expected > 200_000  # most of 1 GiB came back from discarded, reported blocks
        assert vm.reporting.refaulted_pages - refaulted == expected
        # reused: reported pages that left the free lists; the per-CPU list's last refill takes a
        # batch (63 pages) and may keep a few of them on the list, unused yet (rmqueue_bulk)
        extra = vm.reporting.reused_pages - reused - int(reported_before[pages].sum())
        assert 0 <= extra < 2 * 63
        assert vm.kernel.host_vm.zero_fill_faults - faults == int((~backed_before[pages]).sum())
        assert vm.sample()["host_rss"] - rss == int((~backed_before[pages]).sum()) * PAGE
        total = vm.reporting.refaulted_pages
        assert vm.reporting.refault_ms == pytest.approx(total * fpr.REFAULT_US / 1000)
        assert vm.sample()["reporting_refaulted_bytes"] == total * PAGE
        assert not vm.mem.has_flag(pages, PageFlag.REPORTED).any()
        check_invariants(vm.mem)


# --- 3.4, 3.5, 8.4: the silent no-ops ---------------------------------------------------------------
@pytest.mark.parametrize("case, balloon, host, cmdline, negotiated, discards", [
    ("plain", {}, {}, {}, True, True),
    ("poison, PAGE_POISON not offered: REPORTING dropped", {"page_poison": False}, {},
     {"page_poison": 1}, False, False),
    ("poison_val != 0: acked, not discarded", {}, {}, {"page_poison": 1}, True, False),
    ("poisoning wins over init_on_free", {}, {}, {"page_poison": 1, "init_on_free": 1}, True, False),
    ("init_on_free: poison_val 0", {}, {}, {"init_on_free": 1}, True, True),
    ("init_on_free, PAGE_POISON not offered", {"page_poison": False}, {}, {"init_on_free": 1},
     False, False),
    ("discard disabled (VFIO)", {}, {"discard": False}, {}, True, False),
])
def test_cases_where_reporting_silently_frees_nothing(case, balloon, host, cmdline, negotiated,
                                                      discards):
    with open_vm(balloon=balloon, host=host, cmdline=cmdline) as vm:
        r = vm.reporting
        assert r.negotiated == negotiated, case
        assert (VIRTIO_BALLOON_F_REPORTING in vm.balloon.features) == negotiated
        if VIRTIO_BALLOON_F_PAGE_POISON in vm.balloon.features:
            assert r.poison_val == (0 if cmdline.get("init_on_free") and not cmdline.get(
                "page_poison") else 0xAAAAAAAA)
        h = vm.guest("alloc", size="1G")
        rss = vm.sample()["host_rss"]
        vm.guest("free", handle=h)
        vm.advance(40_000)
        freed = rss - vm.sample()["host_rss"]
        if discards:
            assert freed >= 900 * MiB and r.discarded_pages * PAGE == freed  # all but < 2 MiB blocks
        else:
            assert freed == 0 and r.discarded_pages == 0
            assert r.skipped_reports == r.reports
        assert (r.reports > 0) == negotiated  # acked requests still flow when negotiated
        assert (r.core is None) == (not negotiated)
        assert r.state == core.PageReportingState.IDLE


# --- numpy derivations ------------------------------------------------------------------------------
@pytest.mark.parametrize("lo", [0, 1, 2, 3, 5, 9, 10])
def test_reporting_free_lists_match_the_buddy_derivation(lo):
    rng = np.random.default_rng(lo)
    n = 3 * 4096 + 256
    mem = GuestMemory(n, [Zone("Normal", 0, 0, 4096), Zone("Normal", 1, 4096, n)])
    busy = rng.random(n) < 0.002
    busy[rng.integers(0, n, 8)] = True
    mem.set_state(np.flatnonzero(busy), PageState.ANON)
    mem.flags[rng.integers(0, n, 50)] |= REPORTED
    for zone in mem.zones:
        starts, reported = block_scan.reporting_free_lists(mem, zone, lo)
        ref = free_blocks(mem, zone)
        for k in range(lo, 11):
            assert (starts[k - lo] == ref.starts[k]).all()
            assert (reported[k - lo] == ref.reported[k]).all()


def runs_of(pages, n, lo):
    hit = np.zeros(n >> lo, dtype=bool)
    hit[np.asarray(pages) >> lo] = True
    return hit


def test_merged_runs_finds_the_merged_buddy_block():
    mask = np.zeros(2048, dtype=bool)
    mask[1024 + 512:2048] = True  # an order-9 free block in the second window
    mask[0:256] = True  # an order-8 block in the first
    cover = block_scan.merged_runs(mask, runs_of([1024 + 600, 10], 2048, 9), 9)
    assert cover[1024 + 512:2048].all() and cover.sum() == 512  # order < 9 runs are not merged
    cover = block_scan.merged_runs(mask, runs_of([10], 2048, 8), 8)
    assert cover[:256].all() and cover.sum() == 256
    mask[1024:1024 + 512] = True  # now the whole second window: one order-10 block
    assert block_scan.merged_runs(mask, runs_of([1100], 2048, 9), 9)[1024:].all()
    windows, hit = block_scan.hit_runs(np.array([5000, 5001, 9000]), 12288, 9)
    assert windows.tolist() == [4, 8] and hit.tolist() == [False, True, False, True]


# --- invariants through random timelines ------------------------------------------------------------
actions = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from(["anon", "file"]), st.integers(1, 160)),
    st.tuples(st.just("free"), st.integers(0, 20)),
    st.tuples(st.just("drop_caches")),
    st.tuples(st.just("balloon"), st.integers(192, 768)),
    st.tuples(st.just("advance"), st.integers(0, 4000)),
), min_size=1, max_size=20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions, st.integers(0, 1000), st.sampled_from([1, 2]), st.sampled_from([-1, 5, 10]))
def test_invariants_hold_with_reporting(steps, seed, nodes, order):
    with labkit.open(backend="model", memory="768M", seed=seed, numa_nodes=nodes,
                     balloon={"free_page_reporting": True, "deflate_on_oom": True},
                     host={"ram": "2G"}, cmdline={"page_reporting.page_reporting_order": order}) as vm:
        handles = []
        for step in steps:
            if step[0] == "alloc":
                try:
                    handles.append(vm.guest("alloc", size=step[2] * MiB, kind=step[1]))
                except GuestError:
                    return
            elif step[0] == "free" and handles:
                h = handles.pop(step[1] % len(handles))
                if any(x["handle"] == h for x in vm.guest("handles")):
                    vm.guest("free", handle=h)
            elif step[0] == "drop_caches":
                vm.guest("drop_caches")
            elif step[0] == "balloon":
                vm.qmp("balloon", value=step[1] * MiB)
            else:
                vm.advance(step[1])
            check_invariants(vm.mem)
            check_reported_blocks(vm)
            assert vm.sample()["reported_bytes"] == vm.reporting.reported_now_pages * PAGE
