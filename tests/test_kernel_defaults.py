"""The model's guest kernel boots as the live backend's does (docs/mechanisms.md §10), held against
/proc/zoneinfo and /proc/meminfo of that guest: Debian 12's 6.1.0-57-cloud-amd64 kernel, booted by
the live backend under QEMU 7.2 (q35, TCG, 1 vCPU unless said), at several ``-m`` sizes.

Measured on the real guest (the numbers below; ``labkit twin zoneinfo_*`` shows them again, and
data/recorded/zoneinfo_*.json keeps three of them). What each field checks:

* spanned/present/managed: q35's RAM layout, the e820 holes of the first megabyte and memblock's
  reservations (kernel image, memmap, hash tables, swiotlb; docs/mechanisms.md §10.7);
* min/low/high: ``calculate_min_free_kbytes``, THP's ``set_recommended_min_free_kbytes`` (§10.2)
  and ``__setup_per_zone_wmarks``, computed while the initramfs and ``__init`` were still reserved;
* protection: ``setup_per_zone_lowmem_reserve`` (§10.1);
* pcp high/batch: ``zone_highsize`` / ``zone_batchsize`` (§10.3).
"""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.model.bootparams import BootParams, kernel_arguments, parse_bootparams
from labkit.model.layout import probe_memory_block_size, q35_layout
from labkit.model.pages import PAGEBLOCK_ORDER, PageFlag, PageState
from tests.helpers import check_invariants

MiB, GiB = 1 << 20, 1 << 30

# zone: (spanned, present, managed, min, low, high, protection, pcp high, pcp batch)
MEASURED = {
    "512M": (2739, 481424, {
        "DMA": (4095, 3998, 3840, 22, 27, 32, [0, 443, 443, 443, 443], 27, 1),
        "DMA32": (126976, 126976, 116516, 661, 826, 991, [0, 0, 0, 0, 0], 826, 31)}),
    "600M": (27596, 568720, {
        "DMA": (4095, 3998, 3840, 190, 237, 284, [0, 528, 528, 528, 528], 237, 1),
        "DMA32": (149504, 149504, 138340, 6708, 8385, 10062, [0, 0, 0, 0, 0], 8385, 31)}),
    "1G": (45056, 996752, {
        "DMA": (4095, 3998, 3840, 175, 218, 261, [0, 946, 946, 946, 946], 218, 1),
        "DMA32": (258048, 258048, 245348, 11088, 13860, 16632, [0, 0, 0, 0, 0], 13860, 63)}),
    "2816M": (67584, 2732172, {
        "DMA": (4095, 3998, 3840, 95, 118, 141, [0, 1924, 2641, 2641, 2641], 118, 1),
        "DMA32": (1044480, 520192, 495705, 12241, 15301, 18361, [0, 0, 716, 716, 716], 15301, 63),
        "Normal": (196608, 196608, 183498, 4559, 5698, 6837, [0, 0, 0, 0, 0], 5698, 63)}),
    "4G": (67584, 4022412, {
        "DMA": (4095, 3998, 3840, 64, 80, 96, [0, 1924, 3901, 3901, 3901], 80, 1),
        "DMA32": (1044480, 520192, 495705, 8302, 10377, 12452, [0, 0, 1976, 1976, 1976], 10377, 63),
        "Normal": (524288, 524288, 506058, 8528, 10660, 12792, [0, 0, 0, 0, 0], 10660, 63)}),
    "6G": (67584, 6080648, {
        "DMA": (4095, 3998, 3840, 42, 52, 62, [0, 1924, 5911, 5911, 5911], 52, 1),
        "DMA32": (1044480, 520192, 495705, 5486, 6857, 8228, [0, 0, 3986, 3986, 3986], 6857, 63),
        "Normal": (1048576, 1048576, 1020617, 11366, 14207, 17048, [0, 0, 0, 0, 0], 14207, 63)}),
}


MEASURED_INITRD = 3708 << 10


def zones_of(vm) -> dict:
    return {z["zone"]: z for z in vm.zoneinfo()}


@pytest.mark.parametrize("memory", list(MEASURED))
def test_zoneinfo_and_memtotal_match_the_debian_guest(memory):
    min_free, memtotal, expected = MEASURED[memory]
    # measured with the initramfs of then ("Freeing initrd memory: 3708K"): it is still reserved
    # when the watermarks are computed, so it moves them by a page at some sizes
    with labkit.open(memory=memory, seed=0, model={"boot": "minimal", "initrd_bytes": MEASURED_INITRD}) as vm:
        assert vm.kernel.min_free_kbytes == min_free
        # MemTotal: memblock's reservations as measured; within one page (a page of early
        # allocations the breakdown does not place exactly at every size)
        assert abs(vm.meminfo()["MemTotal"] - memtotal) <= 4
        zones = zones_of(vm)
        assert list(zones) == list(expected)
        for name, fields in expected.items():
            spanned, present, managed, wmin, low, high, protection, high_pcp, batch = fields
            z = zones[name]
            assert (z["spanned"], z["present"]) == (spanned, present), name
            assert abs(z["managed"] - managed) <= 1, name
            assert (z["min"], z["low"], z["high"]) == (wmin, low, high), name
            assert z["protection"] == protection, name
            assert (z["pcp"][0]["high"], z["pcp"][0]["batch"]) == (high_pcp, batch), name


def test_two_cpus_split_pcp_high_and_cost_a_percpu_chunk():
    # zone_highsize: the low watermark over the CPUs of the node (measured: 218 -> 109, 13860 -> 6930);
    # the second CPU's first percpu chunk is one more memblock reservation (61 pages: MemTotal 996508)
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}, cmdline={"nr_cpus": 2}) as vm:
        zones = zones_of(vm)
        assert [p["high"] for p in zones["DMA"]["pcp"]] == [109, 109]
        assert [p["high"] for p in zones["DMA32"]["pcp"]] == [6930, 6930]
        assert zones["DMA32"]["managed"] == 245287
        assert vm.meminfo()["MemTotal"] == 996508


def test_hot_plugged_zone_normal_recomputes_the_watermarks():
    # 512 MiB + virtio-mem 512 MiB onlined into ZONE_NORMAL: online_pages -> init_per_zone_wmark_min
    # for each block, THP off (below 512 MiB at boot), swiotlb on (maxmem puts a hot-pluggable
    # range in the SRAT). Measured: min_free_kbytes 3865, DMA 15/18/21, DMA32 411/513/615,
    # Normal 539/673/807 at start_pfn 1048576, MemTotal 939408 kB.
    with labkit.open(memory="512M", seed=0, model={"boot": "minimal"}, memhp_default_state="online_kernel",
                     virtio_mem=[{"id": "vm0", "size": "1G"}]) as vm:
        vm.qmp("qom-set", path="vm0", property="requested-size", value=512 * MiB)
        vm.advance(5000)
        zones = zones_of(vm)
        assert vm.kernel.min_free_kbytes == 3865
        assert [(zones[n]["min"], zones[n]["low"], zones[n]["high"]) for n in ("DMA", "DMA32", "Normal")] == [
            (15, 18, 21), (411, 513, 615), (539, 673, 807)]
        assert zones["DMA"]["protection"] == [0, 390, 902, 902, 902]
        assert zones["DMA32"]["protection"] == [0, 0, 512, 512, 512]
        assert (zones["Normal"]["start_pfn"], zones["Normal"]["spanned"]) == (1048576, 131072)
        assert abs(zones["DMA32"]["managed"] - 99940) <= 1
        assert abs(vm.meminfo()["MemTotal"] - 939408) <= 4


def test_thp_off_below_512_mib_and_never_means_the_square_root_rule():
    # mm/huge_memory.c hugepage_init: THP stays off while totalram < 512 MiB (at boot: before the
    # initramfs and __init are freed); transparent_hugepage=never: calculate_min_free_kbytes only
    with labkit.open(memory="560M", seed=0, model={"boot": "minimal"}) as vm:
        assert not vm.kernel.khugepaged  # 560 MiB less reservations < 512 MiB
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"},
                     cmdline={"transparent_hugepage": "never"}) as vm:
        lowmem = 3840 + 245348 - 3072  # managed while the initramfs and __init were still held
        assert vm.kernel.min_free_kbytes == int(np.sqrt(lowmem * 4 * 16))
        assert not vm.kernel.khugepaged


def test_vm_min_free_kbytes_is_the_users_value():
    # min_free_kbytes_sysctl_handler: user_min_free_kbytes, then setup_per_zone_wmarks (with the
    # managed pages of the booted guest); a later hotplug keeps it if it is larger
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"},
                     cmdline={"vm.min_free_kbytes": 131072}) as vm:
        assert vm.kernel.min_free_kbytes == vm.kernel.user_min_free_kbytes == 131072
        zones = zones_of(vm)
        total_min = sum(z["min"] for z in zones.values())
        assert abs(total_min - 131072 // 4) <= len(zones)


@pytest.mark.parametrize(("cmdline", "text"), [
    ({"init_on_alloc": 2}, "cmdline init_on_alloc=2: accepted: 0 or 1"),
    ({"transparent_hugepage": "sometimes"}, "cmdline transparent_hugepage='sometimes': accepted: 'always'"),
    ({"vm.min_free_kbytes": -1}, "cmdline vm.min_free_kbytes=-1: accepted: None"),
    ({"vm.watermark_scale_factor": 0}, "accepted: 1..3000"),
    ({"vm.lowmem_reserve_ratio": (256, 256)}, "accepted: 5 ints >= 0"),
    ({"vm.percpu_pagelist_high_fraction": 4}, "accepted: 0 or an int >= 8"),
    ({"swiotlb": "sometimes"}, "cmdline swiotlb='sometimes'"),
    ({"nr_cpus": 0}, "cmdline nr_cpus=0: accepted: 1..256"),
    ({"memory_hotplug.online_policy": "random"}, "accepted: 'contig-zones' or 'auto-movable'"),
    ({"init_on_aloc": 1}, "unknown cmdline option(s) ['init_on_aloc']"),
])
def test_bad_boot_parameters_are_refused_by_name(cmdline, text):
    with pytest.raises(ValueError) as err:
        labkit.open(memory="512M", cmdline=cmdline)
    assert text in str(err.value)


def test_boot_parameters_default_to_the_distro_and_become_kernel_arguments():
    p = parse_bootparams(None)
    assert p == BootParams() and (p.transparent_hugepage, p.init_on_alloc, p.nr_cpus) == ("always", 1, 1)
    assert kernel_arguments({}) == []
    assert kernel_arguments({"init_on_alloc": 0, "vm.min_free_kbytes": 65536, "nr_cpus": 2}) == [
        "init_on_alloc=0", "sysctl.vm.min_free_kbytes=65536"]
    # swiotlb: 64 MiB (32768 slabs of 2 KiB) once RAM may lie above 4 GiB; noforce/force/N
    assert (p.swiotlb_slabs(False), p.swiotlb_slabs(True)) == (0, 32768)
    assert parse_bootparams({"swiotlb": "noforce"}).swiotlb_slabs(True) == 0
    assert parse_bootparams({"swiotlb": "1000,force"}).swiotlb_slabs(False) == 1024


def test_swiotlb_is_reserved_when_maxmem_is_set():
    # measured at 512 MiB: swiotlb=force takes MemTotal from 481424 to 415120 kB (64 MiB buffer +
    # 768 kB of slot metadata) and host RSS up by 64 MiB (the buffer is zeroed at boot)
    with labkit.open(memory="512M", seed=0, model={"boot": "minimal"}, cmdline={"swiotlb": "force"}) as vm:
        assert vm.meminfo()["MemTotal"] == 415120
    with labkit.open(memory="512M", seed=0, model={"boot": "minimal"},
                     virtio_mem=[{"id": "d", "size": "1G"}]) as vm:
        assert vm.meminfo()["MemTotal"] == 415120  # maxmem: a hot-pluggable range in the SRAT


def test_memory_block_size_follows_probe_memory_block_size():
    # arch/x86/mm/init_64.c: 128 MiB below 64 GiB of boot memory; above, the largest power of two
    # up to 2 GiB dividing the end of boot memory (q35: RAM above 2 GiB starts at 4 GiB)
    assert probe_memory_block_size(q35_layout(60 * GiB)) == 128 * MiB  # ends at 62 GiB
    assert probe_memory_block_size(q35_layout(62 * GiB)) == 2 * GiB  # ends at 64 GiB
    assert probe_memory_block_size(q35_layout(64 * GiB)) == 2 * GiB  # ends at 66 GiB
    assert probe_memory_block_size(q35_layout(65 * GiB)) == GiB  # ends at 67 GiB
    assert probe_memory_block_size(q35_layout(64 * GiB), hypervisor=False) == 2 * GiB


def test_free_pages_land_on_the_per_cpu_list_outside_memfree():
    # free_unref_page: order-0 frees go to the CPU's list; NR_FREE_PAGES (MemFree) does not count
    # them; the list gives the oldest back in bulk once it reaches pcp->high (§10.3)
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}) as vm:
        vm.kernel.drain_all_pages()
        free = vm.meminfo()["MemFree"]
        pages = vm.kernel.alloc_pages(4096, PageState.ANON)
        vm.kernel.drain_all_pages()
        before = vm.meminfo()["MemFree"]
        vm.kernel.free_pages(pages)
        pcp = zones_of(vm)["DMA32"]["pcp"][0]
        assert vm.meminfo()["MemFree"] == before  # 4096 pages < high: all on the list
        assert pcp["count"] == 4096
        assert vm.mem.count(PageState.PCP) == vm.kernel.pcp_pages() == 4096
        vm.kernel.drain_all_pages()
        assert vm.meminfo()["MemFree"] == free
        # a free bigger than high is given back in ever larger chunks: the list ends below high
        h = vm.guest("alloc", size="256M")
        vm.guest("free", handle=h)
        assert zones_of(vm)["DMA32"]["pcp"][0]["count"] <= pcp["high"]
        check_invariants(vm.mem)


def test_user_memory_takes_the_highest_zone_and_leaves_dma_alone():
    # get_page_from_freelist walks the zonelist from ZONE_NORMAL down; lowmem_reserve keeps a
    # movable allocation from taking ZONE_DMA below min + protection (§10.1)
    with labkit.open(memory="4G", seed=0, model={"boot": "minimal"}) as vm:
        h = vm.guest("alloc", size="1G")
        zone_of = vm.mem.zone_index_of(vm.kernel.handles[h].pages)
        names = [vm.mem.zones[z].name for z in np.unique(zone_of)]
        assert names == ["Normal"]
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}, balloon={}) as vm:
        vm.qmp("balloon", value=64 * MiB)  # as deep as it goes
        vm.advance(5000)
        dma = zones_of(vm)["DMA"]
        # zone_watermark_fast refuses once free <= min + lowmem_reserve[ZONE_MOVABLE]: never below
        assert dma["free"] >= dma["min"] + dma["protection"][3]


def test_init_on_alloc_backs_balloon_pages_before_the_discard():
    # §10.4: init_on_alloc=1 zeroes every allocated page, so inflating never-touched memory
    # faults it in on the host just before QEMU discards it; net RSS unchanged
    for init_on_alloc, faults in ((1, True), (0, False)):
        with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}, balloon={},
                         cmdline={"init_on_alloc": init_on_alloc}) as vm:
            rss, zero_fills = vm.sample()["host_rss"], vm.kernel.host_vm.zero_fill_faults
            vm.qmp("balloon", value=512 * MiB)
            vm.advance(3000)
            assert (vm.kernel.host_vm.zero_fill_faults - zero_fills > 100_000) == faults
            assert vm.sample()["host_rss"] <= rss


def test_kernel_allocations_gather_in_unmovable_pageblocks():
    # mm/page_alloc.c __rmqueue_fallback / steal_suitable_fallback: unmovable allocations claim
    # whole pageblocks, so page tables and slab do not scatter over user memory
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}) as vm:
        for _ in range(20):
            h = vm.guest("alloc", size="8M")
            vm.guest("free", handle=h)
        kernel = np.flatnonzero(vm.mem.state == PageState.KERNEL)
        blocks = np.unique(kernel >> PAGEBLOCK_ORDER)
        assert vm.mem.pageblock_unmovable[blocks].all()
        assert len(blocks) * 512 < 2 * len(kernel)  # densely packed: > half of each pageblock


def test_workloads_cost_page_tables_and_page_cache_metadata():
    # measured on the live guest: PageTables +544 kB for a 256 MiB anonymous holder, Slab +7.5 MiB
    # for a 256 MiB file on ext2 (xa_nodes + buffer heads); both unmovable kernel memory
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}) as vm:
        before = vm.meminfo()
        h = vm.guest("alloc", size="256M", kind="anon")
        assert vm.meminfo()["PageTables"] - before["PageTables"] == 512  # 128 PTE pages
        slab = vm.meminfo()["Slab"]
        vm.guest("alloc", size="256M", kind="file")
        assert 6_900 <= vm.meminfo()["Slab"] - slab <= 7_700
        vm.guest("free", handle=h)
        assert vm.meminfo()["PageTables"] == before["PageTables"]


def test_hinted_blocks_are_zeroed_backed_and_read_as_zero():
    # §10.4 + §2: with init_on_alloc the driver's order-10 allocations are zeroed: the host backs
    # them (RSS rises during a migration's hinting round), and they read as zero pages
    with labkit.open(memory="1G", seed=0, model={"boot": "minimal"},
                     balloon={"free_page_hint": True, "iothread": "io0"}) as vm:
        rss = vm.sample()["host_rss"]
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance(300)
        hinted = np.flatnonzero(vm.mem.state == PageState.HINTED)
        assert len(hinted) > 100_000
        assert vm.sample()["host_rss"] > rss + 400 * MiB
        assert ((vm.mem.flags[hinted] & PageFlag.ZEROED) != 0).all()
