"""A guest with 64 KiB pages (arm64), modelled at the driver/device boundary (docs/mechanisms.md §12.2;
labkit.model.guest_pages): the balloon's 4 KiB PFNs, its target alignment, the reporting order the
driver picks, virtio-mem's big blocks. Linux 6.1 drivers/virtio/virtio_balloon.c and virtio_mem.c."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.devices.free_page_reporting import large_page_reporting_order
from labkit.errors import NotModelled
from labkit.model.guest_pages import LARGE_PAGE_FACTS, free_runs
from labkit.model.page_reporting import PAGE_REPORTING_CAPACITY
from tests.helpers import check_invariants

MiB, GiB = 1 << 20, 1 << 30
PER = 16  # VIRTIO_BALLOON_PAGES_PER_PAGE = PAGE_SIZE >> VIRTIO_BALLOON_PFN_SHIFT = 64 KiB / 4 KiB


def guest(**kw):
    return labkit.open(backend="model", memory="1G", guest_page_size="64K", model={"boot": "minimal"}, **kw)


def test_balloon_names_each_guest_page_with_16_pfns():
    """set_page_pfns: page_to_balloon_pfn(page) + i for i < VIRTIO_BALLOON_PAGES_PER_PAGE; one request
    of VIRTIO_BALLOON_ARRAY_PFNS_MAX (256) PFNs is 16 guest pages, 1 MiB."""
    vm = guest()
    vm.qmp("balloon", value=GiB - MiB)  # one request's worth
    vm.advance(2000)
    pfns = vm.balloon.pages
    assert len(pfns) == VIRTIO_BALLOON_ARRAY_PFNS_MAX and vm.inspect("balloon").requests == 1
    groups = pfns.reshape(-1, PER)
    assert (groups[:, 0] % PER == 0).all() and (np.diff(groups, axis=1) == 1).all()
    check_invariants(vm.mem)


def test_target_is_aligned_up_and_the_balloon_settles():
    """towards_target: target = ALIGN(num_pages, VIRTIO_BALLOON_PAGES_PER_PAGE) "to avoid inflating and
    deflating balloon endlessly": a num_pages that is no multiple of 16 is met by the next one up,
    and no request follows once it is."""
    vm = guest()
    vm.qmp("balloon", value=GiB - 256 * MiB - 5 * 4096)  # num_pages = 65541, not a multiple of 16
    vm.advance(10_000)
    b = vm.inspect("balloon")
    assert b.num_pages == 65541 and b.driver_pages == b.actual_pages == 65552
    requests = b.requests
    vm.advance(20_000)
    assert vm.inspect("balloon").requests == requests


def test_oom_notifier_gives_back_guest_pages():
    """virtio_balloon_oom_notify returns leak_balloon(vb, 256) / VIRTIO_BALLOON_PAGES_PER_PAGE guest
    pages: 256 balloon pages = 16 pages of 64 KiB."""
    vm = guest(balloon={"deflate_on_oom": True})
    vm.qmp("balloon", value=256 * MiB)
    vm.advance(10_000)
    assert vm.balloon.oom_notify() == VIRTIO_BALLOON_ARRAY_PFNS_MAX // PER


@pytest.mark.parametrize("host, frees_all", [("4K", True), ("64K", True)])
def test_a_64k_guest_balloon_frees_whole_host_pages(host, frees_all):
    """Each guest page is 16 consecutive balloon PFNs, so on a 64 KiB host every one fills QEMU's
    partially-ballooned-page bitmap in one go (balloon_inflate_page): nothing is dropped, unlike a
    4 KiB guest on the same host."""
    vm = guest(host_page_size=host)
    vm.guest("free", handle=vm.guest("alloc", size=600 * MiB))
    rss = vm.sample()["host_rss"]
    vm.qmp("balloon", value=512 * MiB)
    vm.advance(10_000)
    assert vm.inspect("host").balloon_partial_pages_dropped == 0
    assert rss - vm.sample()["host_rss"] >= 500 * MiB


def test_reporting_order_is_the_drivers_2_mib_not_the_512_mib_pageblock():
    """virtballoon_probe sets pr_dev_info.order = 5 with CONFIG_ARM64_64K_PAGES ("The default page
    reporting order is @pageblock_order, which corresponds to 512MB"); page_reporting_register uses
    it. Order 5 of 64 KiB pages is order 9 of the model's 4 KiB pages."""
    assert large_page_reporting_order(64 << 10) == 9
    vm = guest(balloon={"free_page_reporting": True})
    assert vm.reporting.order == 9
    vm.guest("free", handle=vm.guest("alloc", size=600 * MiB))
    rss = vm.sample()["host_rss"]
    vm.advance(10_000)
    assert rss - vm.sample()["host_rss"] > 500 * MiB


def test_the_pageblock_order_would_need_512_mib_blocks_and_16_gib_free():
    """With pageblock_order 13 (512 MiB blocks) a pass starts only with free > low + (32 << 13) pages
    (page_reporting_process's zone check, PAGE_REPORTING_CAPACITY): 16 GiB above the low watermark
    on a 64 KiB guest; and a guest that has been used rarely holds a free, aligned 512 MiB block."""
    pageblock = LARGE_PAGE_FACTS[64 << 10]["pageblock_bytes"]
    assert PAGE_REPORTING_CAPACITY * pageblock == 16 * GiB
    vm = guest()
    for _ in range(3):  # a used guest: allocations that stay, and some that are freed again
        vm.guest("alloc", size=100 * MiB)
        vm.guest("free", handle=vm.guest("alloc", size=300 * MiB))
    state = vm.snapshot()["state"]
    assert free_runs(state, 0, len(state), pageblock // 4096) == 0
    assert free_runs(state, 0, len(state), 2 * MiB // 4096) > 0  # what order 5 reports


def test_virtio_mem_works_in_512_mib_big_blocks():
    """virtio_mem_init_hotplug: sb_size = max(pageblock, device block) = 512 MiB, no smaller than the
    512 MiB memory block: big block mode, bb_size = max(device block, memory block) = 512 MiB. QEMU's
    block stays 2 MiB (the host's THP); the guest plugs and unplugs 512 MiB at a time."""
    vm = labkit.open(backend="model", memory="1G", guest_page_size="64K",
                     memhp_default_state="online_movable", model={"boot": "minimal"},
                     virtio_mem=[{"id": "vm0", "size": "2G", "requested_size": "700M"}])
    vm.advance(5000)
    d = vm.inspect("virtio-mem").devices[0]
    assert d.block_size == 2 * MiB and d.big_block_mode and d.unit_bytes == 512 * MiB
    assert d.size == 512 * MiB  # 700 MiB asked: one whole big block fits under it


def test_free_page_hinting_on_a_64k_guest_is_not_modelled():
    with pytest.raises(NotModelled, match="hints 512 MiB blocks"):
        guest(qemu_args="-object iothread,id=io0 -device virtio-balloon-pci,free-page-hint=on,iothread=io0")
