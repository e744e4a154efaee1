"""virtio-balloon on the model, each behaviour checked against docs/mechanisms.md §1."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.devices.balloon import (
    OUT_OF_PUFF_SLEEP_MS,
    STAT_UNSET,
    VIRTIO_BALLOON_ARRAY_PFNS_MAX,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_OOM_NR_PAGES,
)
from labkit.model.pages import PageFlag, PageState
from tests.helpers import check_invariants, free_kb

MiB = 1 << 20
GiB = 1 << 30


def open_vm(memory="1G", **kw):
    kw.setdefault("seed", 0)
    return labkit.open(memory=memory, **kw)


def test_constants_match_the_kernel():
    # §1.1/§1.2: 256 PFNs per request; §1.4: 256 pages per OOM notification; 200 ms Out of puff
    assert VIRTIO_BALLOON_ARRAY_PFNS_MAX == 256
    assert VIRTIO_BALLOON_OOM_NR_PAGES == 256
    assert OUT_OF_PUFF_SLEEP_MS == 200


def test_features_offered_follow_qemu_properties():
    # §1.1: STATS_VQ always; PAGE_POISON on by default; DEFLATE_ON_OOM only from the property
    with open_vm() as vm:
        assert vm.balloon_device.features == {VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_PAGE_POISON}
    with open_vm(balloon={"deflate_on_oom": True}) as vm:
        assert VIRTIO_BALLOON_F_DEFLATE_ON_OOM in vm.balloon_device.features


def test_value_is_the_target_logical_size_and_num_pages_follows_qemus_formula():
    # §1.7: num_pages = (vm_ram_size - value) >> 12; query-balloon actual = vm_ram_size - actual*4096
    with open_vm() as vm:
        vm.qmp("balloon", value=768 * MiB)
        assert vm.balloon_device.config.num_pages == (GiB - 768 * MiB) >> 12
        assert vm.qmp("query-balloon") == {"actual": GiB}  # nothing acked yet at t=0
        vm.advance(2000)
        assert vm.qmp("query-balloon") == {"actual": 768 * MiB}
        assert vm.balloon.num_pages == (256 * MiB) >> 12


def test_value_above_ram_size_is_clamped_to_a_full_deflate():
    # §1.7: a value above vm_ram_size is clamped, giving num_pages = 0
    with open_vm() as vm:
        vm.qmp("balloon", value=512 * MiB)
        vm.advance(2000)
        vm.qmp("balloon", value=64 * GiB)
        assert vm.balloon_device.config.num_pages == 0
        vm.advance(2000)
        assert vm.qmp("query-balloon")["actual"] == GiB
        assert vm.mem.count(PageState.BALLOON) == 0


def test_each_request_moves_at_most_256_pages_and_actual_follows_each_ack():
    # §1.2: one batch of <= 256 PFNs per work run, then actual = vb->num_pages
    with open_vm() as vm:
        vm.qmp("balloon", value=GiB - 3 * MiB - 100 * 4096)
        seen = []
        while vm.step():
            seen.append(vm.balloon_device.config.actual)
        assert seen == [256, 512, 768, 868]
        assert np.all(np.diff([0, *seen]) <= VIRTIO_BALLOON_ARRAY_PFNS_MAX)
        vm.qmp("balloon", value=GiB)
        down = []
        while vm.step():
            down.append(vm.balloon_device.config.actual)
        assert down == [612, 356, 100, 0]


def test_a_request_in_flight_when_the_target_changes_still_lands_then_the_next_run_leaks_back():
    # §1.2 and drivers/virtio/virtio_balloon.c: update_balloon_size_func reads towards_target() once
    # per run and fill_balloon(vb, diff) sizes its batch on entry (num = min(num, 256)); neither the
    # wait for the host's ack (tell_host) nor the Out-of-puff msleep(200) looks at the target again,
    # so a batch in flight when the target drops is still enqueued and acked: actual passes the new
    # target by at most that batch, and the next run leaks it back.
    with open_vm() as vm:
        vm.qmp("balloon", value=512 * MiB)
        vm.advance(0)  # the first run allocated its 256 pages and waits for the ack
        chased = vm.balloon_device.config.num_pages
        assert vm.balloon.num_pages == VIRTIO_BALLOON_ARRAY_PFNS_MAX and vm.balloon_device.config.actual == 0
        vm.qmp("balloon", value=GiB)  # the target is now an empty balloon
        assert vm.step()
        assert vm.balloon_device.config.actual == VIRTIO_BALLOON_ARRAY_PFNS_MAX  # past the target (0)
        assert vm.balloon.last_request_target == chased
        assert vm.step()  # the next run reads the new target and leaks the batch back
        assert vm.balloon_device.config.actual == 0 and vm.balloon.last_request_target == 0
        assert not vm.step()
    with open_vm() as vm:  # the same with a short batch held through the Out-of-puff sleep
        vm.guest("alloc", size="700M", kind="anon")
        vm.qmp("balloon", value=64 * MiB)
        chased = vm.balloon_device.config.num_pages
        for _ in range(5000):
            if vm.balloon.out_of_puff and len(vm.balloon.in_flight):
                break
            vm.advance(1)
        held = len(vm.balloon.in_flight)
        assert 0 < held < VIRTIO_BALLOON_ARRAY_PFNS_MAX
        before = vm.balloon_device.config.actual
        vm.qmp("balloon", value=GiB - before * 4096)  # the target is what is acked now
        target = vm.balloon_device.config.num_pages
        assert vm.step()
        assert vm.balloon_device.config.actual == before + held == target + held
        assert vm.balloon.last_request_target == chased
        while vm.step():
            assert target <= vm.balloon_device.config.actual < target + held
        assert vm.balloon_device.config.actual == target
        check_invariants(vm.mem)


def test_inflation_takes_page_cache_before_giving_up():
    # §1.2: balloon pages are __GFP_NORETRY: reclaim (page cache) is tried before "Out of puff"
    with open_vm() as vm:
        vm.guest("alloc", size="600M", kind="file")
        cached_before = vm.meminfo()["Cached"]
        vm.qmp("balloon", value=300 * MiB)
        vm.advance(5000)
        assert vm.meminfo()["Cached"] < cached_before / 4
        assert vm.kernel.vmstat.pgsteal_kswapd + vm.kernel.vmstat.pgsteal_direct > 0
        check_invariants(vm.mem)


def test_out_of_puff_retries_every_200ms_and_actual_stalls_above_target():
    # §1.2: a failed balloon_page_alloc logs "Out of puff!", sleeps 200 ms, sends what it has
    with open_vm() as vm:
        vm.guest("alloc", size="700M", kind="anon")
        vm.qmp("balloon", value=64 * MiB)
        vm.advance(3000)
        assert vm.balloon.out_of_puff >= 10
        times = [t for t, msg in vm.kernel.dmesg if "Out of puff" in msg]
        assert np.all(np.diff(times) >= OUT_OF_PUFF_SLEEP_MS)
        assert vm.qmp("query-balloon")["actual"] > 64 * MiB
        assert vm.kernel.vmstat.oom_kill == 0  # the balloon never triggers the OOM killer
        free = vm.mem.count(PageState.FREE)
        assert free <= sum(w.low for w in vm.kernel.watermarks) + VIRTIO_BALLOON_ARRAY_PFNS_MAX


def test_memtotal_shrinks_without_deflate_on_oom_and_stays_with_it():
    # §1.3: adjust_managed_page_count(-1) per balloon page unless DEFLATE_ON_OOM
    for deflate_on_oom in (False, True):
        with open_vm(balloon={"deflate_on_oom": deflate_on_oom}) as vm:
            before, free_before = vm.meminfo(), free_kb(vm)
            vm.qmp("balloon", value=768 * MiB)
            vm.advance(2000)
            after, free_after = vm.meminfo(), free_kb(vm)
            ballooned_kb = 256 * 1024
            if deflate_on_oom:
                assert after["MemTotal"] == before["MemTotal"]
            else:
                assert after["MemTotal"] == before["MemTotal"] - ballooned_kb
            # balloon pages come off the per-CPU lists first (not in MemFree: mm/page_alloc.c
            # rmqueue_pcplist), so it is the free pages of both that fall by the balloon
            assert free_before - free_after == ballooned_kb


def test_oom_deflates_256_pages_per_event_and_does_not_reinflate_by_itself():
    # §1.4: the OOM notifier leaks VIRTIO_BALLOON_OOM_NR_PAGES per call; re-inflation only at the
    # next config change, which QEMU raises on every balloon command, even an unchanged one
    with open_vm(balloon={"deflate_on_oom": True}) as vm:
        vm.qmp("balloon", value=400 * MiB)
        vm.advance(3000)
        size = vm.balloon.num_pages
        assert size == (GiB - 400 * MiB) >> 12
        vm.guest("alloc", size="500M", kind="anon")
        given_back = size - vm.balloon.num_pages
        assert given_back > 0 and given_back % VIRTIO_BALLOON_OOM_NR_PAGES == 0
        assert vm.balloon.oom_deflated_pages == given_back
        assert vm.kernel.vmstat.oom_events == given_back // VIRTIO_BALLOON_OOM_NR_PAGES
        assert vm.kernel.vmstat.oom_kill == 0
        shrunk = vm.balloon.num_pages
        vm.advance(10_000)
        assert vm.balloon.num_pages == shrunk  # no re-inflation by itself
        vm.qmp("balloon", value=400 * MiB)  # the same target again: a config change
        vm.advance(1000)
        assert vm.balloon.num_pages > shrunk or vm.balloon.out_of_puff > 0


def test_oom_deflated_pages_pile_up_on_the_per_cpu_list_undrained():
    # §1.4/§10.3: the notifier frees onto the per-CPU list, which the watermark check does not
    # count; __alloc_pages_direct_reclaim drains only after reclaim made progress, so with nothing
    # to reclaim the OOM path deflates on while the list fills, up to pcp->high
    with open_vm(balloon={"deflate_on_oom": True}) as vm:
        vm.qmp("balloon", value=400 * MiB)
        vm.advance(3000)
        drains = vm.kernel.vmstat.drain_all_pages
        vm.guest("alloc", size="500M", kind="anon")
        assert vm.kernel.vmstat.oom_events > 1
        assert vm.kernel.vmstat.drain_all_pages == drains
        lists = [cpu for zone in vm.zoneinfo() for cpu in zone["pcp"]]
        held = sum(cpu["count"] for cpu in lists)
        assert VIRTIO_BALLOON_OOM_NR_PAGES < held <= sum(cpu["high"] for cpu in lists)
        check_invariants(vm.mem)


def test_without_deflate_on_oom_the_oom_killer_kills_instead():
    with open_vm() as vm:
        vm.qmp("balloon", value=400 * MiB)
        vm.advance(3000)
        victim = vm.guest("alloc", size="200M", kind="anon")
        vm.guest("alloc", size="300M", kind="anon")
        assert vm.kernel.vmstat.oom_kill >= 1
        assert vm.balloon.num_pages == (GiB - 400 * MiB) >> 12  # the balloon kept its pages
        alive = {h["handle"]: h["alive"] for h in vm.guest("handles")}
        assert alive[victim] is False or any(not a for a in alive.values())
        assert any("Out of memory: Killed process" in line for line in vm.dmesg())


def test_host_rss_falls_only_by_the_pages_that_were_backed():
    # §1.6: QEMU discards each inflated page; never-touched pages were not in RSS to begin with
    with open_vm(memory="2G") as vm:
        h = vm.guest("alloc", size="512M", kind="anon")
        vm.guest("free", handle=h)  # guest-free but still host-backed
        snap = vm.snapshot()
        rss_before = vm.sample()["host_rss"]
        vm.qmp("balloon", value=GiB)
        vm.advance(3000)
        inflated = vm.balloon.pages
        was_backed = int(((snap["flags"][inflated] & PageFlag.BACKED) != 0).sum())
        assert 0 < was_backed < len(inflated)
        assert rss_before - vm.sample()["host_rss"] == was_backed * 4096
        assert not ((vm.mem.flags[inflated] & PageFlag.BACKED) != 0).any()
        check_invariants(vm.mem)


def test_deflated_pages_stay_unbacked_until_the_guest_touches_them():
    # §1.6: deflate is only MADV_WILLNEED; pages fault back in when the guest writes them
    with open_vm() as vm:
        vm.qmp("balloon", value=512 * MiB)
        vm.advance(2000)
        pages = vm.balloon.pages.copy()
        rss = vm.sample()["host_rss"]
        vm.qmp("balloon", value=GiB)
        vm.advance(2000)
        assert vm.sample()["host_rss"] == rss
        # free again: in the buddy allocator or still on the per-CPU list they were freed to
        assert np.isin(vm.mem.state[pages], [PageState.FREE, PageState.PCP]).all()
        assert not ((vm.mem.flags[pages] & PageFlag.BACKED) != 0).any()
        vm.guest("alloc", size="256M", kind="anon")
        assert vm.sample()["host_rss"] > rss + 200 * MiB


def test_discard_disabled_acks_but_frees_nothing():
    # §1.6: with RAM discard disabled (VFIO) QEMU still acks inflate requests but frees nothing.
    # With init_on_alloc=1 (Debian's default) the guest zeroes each balloon page first, so RSS would
    # even grow by the pages it never touched before; init_on_alloc=0 isolates the device's part.
    with open_vm(host={"discard": False}) as vm:
        vm.qmp("balloon", value=256 * MiB)
        rss = vm.sample()["host_rss"]
        vm.advance(3000)
        assert vm.qmp("query-balloon")["actual"] == 256 * MiB
        assert vm.sample()["host_rss"] >= rss  # zeroed, then nothing discarded
    with open_vm(host={"discard": False}, cmdline={"init_on_alloc": 0}) as vm:
        h = vm.guest("alloc", size="512M", kind="anon")
        vm.guest("free", handle=h)
        rss = vm.sample()["host_rss"]
        vm.qmp("balloon", value=256 * MiB)
        vm.advance(3000)
        assert vm.qmp("query-balloon")["actual"] == 256 * MiB
        assert vm.sample()["host_rss"] == rss
        assert vm.balloon_device.inflate_requests > 0


def test_balloon_change_is_rate_limited_to_one_per_second():
    # §1.7: BALLOON_CHANGE when actual changes, throttled by the monitor to 1/s, newest kept
    with open_vm() as vm:
        vm.qmp("balloon", value=GiB - 900 * MiB)  # 900 requests at 0.5 ms = 450 ms of inflation
        vm.advance(5000)
        events = [e for e in vm.events() if e["event"] == "BALLOON_CHANGE"]
        assert len(events) == 2  # one at once, the newest held one at the end of the second
        assert events[0]["data"]["actual"] == GiB - 256 * 4096
        assert events[-1]["data"]["actual"] == vm.qmp("query-balloon")["actual"]


def test_stats_primed_at_probe_then_polled_on_the_interval():
    # §1.5: the driver primes the stats queue at probe; QEMU's timer fires at once, then every N s
    with open_vm() as vm:
        epoch = vm.knobs["epoch"]
        stats = vm.qmp("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
        assert stats["last-update"] == epoch
        assert vm.qmp("qom-get", path="balloon0", property="guest-stats-polling-interval") == 0
        vm.advance(5000)
        assert vm.qmp("qom-get", path="balloon0", property="guest-stats")["last-update"] == epoch
        vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=2)
        vm.advance(4500)
        stats = vm.qmp("qom-get", path="balloon0", property="guest-stats")
        assert stats["last-update"] == epoch + 9  # polled at 5 s, 7 s, 9 s
        info = vm.meminfo()
        s = stats["stats"]
        assert s["stat-free-memory"] == info["MemFree"] * 1024
        assert s["stat-total-memory"] == info["MemTotal"] * 1024
        assert s["stat-available-memory"] == info["MemAvailable"] * 1024
        assert s["stat-disk-caches"] == info["Cached"] * 1024
        assert sorted(s) == sorted([
            "stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
            "stat-free-memory", "stat-total-memory", "stat-available-memory", "stat-disk-caches",
            "stat-htlb-pgalloc", "stat-htlb-pgfail"])
        assert STAT_UNSET == 2**64 - 1


def test_poll_interval_errors_use_qemus_texts():
    with open_vm() as vm:
        with pytest.raises(labkit.QMPError, match="timer value must be greater than zero"):
            vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval", value=-1)
        with pytest.raises(labkit.QMPError, match="timer value is too big"):
            vm.qmp("qom-set", path="balloon0", property="guest-stats-polling-interval",
                   value=2**32)
        assert vm.balloon_device.stats_poll_interval == 0


def test_invariants_hold_through_a_busy_timeline():
    with open_vm(balloon={"deflate_on_oom": True}) as vm:
        handles = [vm.guest("alloc", size="128M", kind=k) for k in ("anon", "file", "shmem")]
        for target in (600, 300, 900, 200, 1024):
            vm.qmp("balloon", value=target * MiB)
            vm.advance(700)
            check_invariants(vm.mem)
            assert vm.balloon.num_pages == vm.mem.count(PageState.BALLOON)
            assert vm.balloon_device.config.actual == vm.balloon.num_pages
        vm.guest("free", handle=handles[0])
        vm.guest("drop_caches")
        check_invariants(vm.mem)
