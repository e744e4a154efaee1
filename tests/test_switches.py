"""Host page size and backing as QEMU takes them (docs/mechanisms.md §12.1): anonymous 4 KiB pages,
THP, hugetlbfs 2 MiB / 1 GiB (memory-backend-memfd, memory-backend-file on hugetlbfs), a 64 KiB host.

Each test names the QEMU or Linux function it checks (QEMU 7.2, Linux 6.1 unless said otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.backends.options import parse_options
from labkit.backends.options_switches import hugetlbfs_mount
from labkit.devices.balloon_host import BALLOON_LARGE_PAGE_WARNING, inflate_discards
from labkit.errors import HostOutOfMemory
from labkit.model.backing import Backing, RamBlock
from labkit.model.host import Host
from labkit.model.pages import GuestMemory, PageFlag, Zone
from tests.helpers import check_invariants

MiB, GiB = 1 << 20, 1 << 30
WARNING = f"qemu-system-x86_64: warning: {BALLOON_LARGE_PAGE_WARNING}"


def memfd(size: str, page: str) -> str:
    return (f"-object memory-backend-memfd,id=m0,size={size},hugetlb=on,hugetlbsize={page} "
            f"-machine memory-backend=m0")


def churn(vm, size: int = 600 * MiB) -> None:
    """Write ``size`` and free it again: free guest memory the host backs."""
    vm.guest("free", handle=vm.guest("alloc", size=size))


def open_line(line: str, reporting: bool = False, **kw):
    balloon = " -device virtio-balloon-pci" + (",free-page-reporting=on" if reporting else "")
    return labkit.open(backend="model", qemu_args=line + balloon, model={"boot": "minimal"}, **kw)


def inflate(vm, to: int) -> int:
    """Inflate to ``to`` bytes of logical size; the host RSS freed by it."""
    before = vm.sample()["host_rss"]
    vm.qmp("balloon", value=to)
    vm.advance(10_000)
    assert vm.qmp("query-balloon")["actual"] == to
    return before - vm.sample()["host_rss"]


# --- the balloon: QEMU's partially-ballooned-page tracking --------------------------------------
def test_hugetlbfs_2m_inflate_frees_nothing_and_warns_once():
    """hw/virtio/virtio-balloon.c balloon_inflate_page: a 2 MiB host page holds 512 balloon pages,
    a request at most 256 (drivers/virtio/virtio_balloon.c VIRTIO_BALLOON_ARRAY_PFNS_MAX), and the
    PartiallyBalloonedPage lives for one request (virtio_balloon_handle_output, QEMU 4.1+): the
    bitmap is never full, no huge page is discarded; warn_report_once prints the warning once."""
    vm = open_line(memfd("1G", "2M"))
    churn(vm)  # backed free memory the balloon could have freed on 4 KiB pages
    # nothing freed; init_on_alloc (the distro default) zeroes each balloon page as it is allocated,
    # which faults in the few huge pages the churn had not touched: RSS may even grow
    assert inflate(vm, 512 * MiB) <= 0
    host = vm.inspect("host")
    assert host.qemu_log == (WARNING,)
    assert host.balloon_partial_pages_dropped > 0
    assert [(b["kind"], b["page_size"]) for b in host.blocks] == [("hugetlb", 2 * MiB)]
    check_invariants(vm.mem)


def test_same_inflate_frees_what_each_backing_allows():
    """One inflate of 512 MiB on a 1 GiB guest: anonymous 4 KiB pages and THP free every backed
    balloon page (MADV_DONTNEED splits the THP), hugetlbfs nothing."""
    freed = {}
    for name, line, kw in (("anon", "-m 1G", {}), ("thp", "-m 1G", {"host": {"thp": True}}),
                           ("hugetlb", memfd("1G", "2M"), {})):
        vm = open_line(line, **kw)
        churn(vm)
        freed[name] = inflate(vm, 512 * MiB)
    assert freed["anon"] > 0 and freed["thp"] > 0 and freed["hugetlb"] <= 0  # (<: init_on_alloc)


def _host_vm(pages: int, page: int, host_page: int = 4096):
    host = Host(ram=8 * GiB)
    vm = host.attach(GuestMemory(pages, [Zone("Normal", 0, 0, pages)]), "vm0")
    vm.set_blocks([RamBlock("ram0", 0, pages, Backing("anon" if page == host_page else "hugetlb", page,
                                                          host_page))])
    return host, vm


def test_64k_host_frees_only_whole_host_pages_seen_in_one_run_of_one_request():
    """balloon_inflate_page on 64 KiB pages: 16 pieces of one host page in a row fill the bitmap
    (in any order); a PFN of another host page drops the partial one ("Too hard, give up on the old
    partial page"); the tracking ends with the request."""
    host, vm = _host_vm(4096, 64 << 10, 64 << 10)
    host.touch(vm, np.arange(4096))
    reversed_run = np.arange(32, 16, -1) - 1  # 31..16: one host page, in the driver's LIFO order
    pfns, dropped = inflate_discards(vm, reversed_run)
    assert sorted(pfns.tolist()) == list(range(16, 32)) and dropped == 0
    interleaved = np.array([64, 80, 65, 81] + list(range(66, 80)))
    pfns, dropped = inflate_discards(vm, interleaved)
    assert len(pfns) == 0 and dropped == 5  # four runs cut short, and the last one ends with the request
    first, second = inflate_discards(vm, np.arange(96, 104)), inflate_discards(vm, np.arange(104, 112))
    assert len(first[0]) == len(second[0]) == 0  # 8 + 8 pieces in two requests: never freed
    assert vm.log == [WARNING]


def test_64k_host_model_inflate_frees_part_of_what_4k_frees():
    """The same workload and inflate on a 4 KiB and a 64 KiB host: on 64 KiB pages only host pages
    whose 16 pieces the buddy allocator handed out together are freed."""
    freed = {}
    for page in ("4K", "64K"):
        vm = labkit.open(backend="model", memory="1G", host_page_size=page, model={"boot": "minimal"})
        churn(vm)
        freed[page] = inflate(vm, 512 * MiB)
    assert 0 < freed["64K"] <= freed["4K"]


# --- free page reporting: the alignment check ---------------------------------------------------
@pytest.mark.parametrize("page, frees", [("2M", True), ("1G", False)])
def test_reporting_frees_on_2m_pages_and_nothing_on_1g(page, frees):
    """virtio_balloon_handle_report: an entry is discarded only if QEMU_IS_ALIGNED(ram_offset | size,
    qemu_ram_pagesize(rb)); the guest reports order 9 and 10 blocks (2 and 4 MiB, mm/page_reporting.c),
    never aligned to 1 GiB: silently ignored."""
    vm = open_line(memfd("2G", page), reporting=True)
    job = vm.guest("alloc", size=512 * MiB)
    vm.guest("free", handle=job)
    before = vm.sample()["host_rss"]
    vm.advance(10_000)
    host = vm.inspect("host")
    assert vm.reporting.reports > 0
    if frees:
        assert before - vm.sample()["host_rss"] >= 400 * MiB and host.report_unaligned_entries == 0
    else:
        assert vm.sample()["host_rss"] == before and host.report_unaligned_entries > 0
        assert host.qemu_log == ()  # "For now we will simply ignore unaligned memory regions"


# --- first touch in page-size steps -------------------------------------------------------------
def test_hugetlbfs_1g_backs_a_whole_gigabyte_on_the_first_write():
    host, vm = _host_vm(2 * 262144, 1 * GiB)
    host.touch(vm, np.array([5]))
    assert vm.rss_pages == 262144


def test_thp_faults_in_2m_and_a_partial_discard_splits_it():
    """mm/huge_memory.c: a write into an empty aligned 2 MiB range faults in a THP; MADV_DONTNEED of
    part of it splits the PMD, and later faults there are 4 KiB (until khugepaged, not modelled)."""
    host = Host(ram=GiB)
    vm = host.attach(GuestMemory(4096, [Zone("Normal", 0, 0, 4096)]), "vm0")
    vm.set_blocks([RamBlock("ram0", 0, 4096, Backing("anon", thp=True))])
    host.touch(vm, np.array([3]))
    assert vm.rss_pages == 512
    assert host.discard(vm, np.arange(0, 10)) == 10
    assert vm.blocks[0].split[0] and not vm.blocks[0].split[1]
    host.touch(vm, np.array([4]))
    assert vm.rss_pages == 503  # 4 KiB again inside the split range
    host.touch(vm, np.array([600]))
    assert vm.rss_pages == 503 + 512
    check_invariants(vm.mem)


def test_hugetlbfs_pages_are_never_swapped_by_the_host():
    """hugetlbfs pages are not on the LRU: an overcommitted host swaps other memory or runs out."""
    host = Host(ram=3 * 1024 * 4096, swap=1 << 30)
    a = host.attach(GuestMemory(2048, [Zone("Normal", 0, 0, 2048)]), "a")
    a.set_blocks([RamBlock("ram0", 0, 2048, Backing("hugetlb", 2 * MiB))])
    host.touch(a, np.arange(2048))
    b = host.attach(GuestMemory(2048, [Zone("Normal", 0, 0, 2048)]), "b")
    host.touch(b, np.arange(1024))
    host.touch(b, np.arange(1024, 2048))  # the host is full: only b's own pages can go to swap
    assert a.swap_outs == 0 and not (a.mem.flags & PageFlag.SWAPPED).any()
    assert b.swap_outs == 1024
    c = host.attach(GuestMemory(4096, [Zone("Normal", 0, 0, 4096)]), "c")
    c.set_blocks([RamBlock("ram0", 0, 4096, Backing("hugetlb", 2 * MiB))])
    host.detach(b)
    with pytest.raises(HostOutOfMemory):  # nothing swappable left: the real host's OOM killer
        host.touch(c, np.arange(4096))


# --- virtio-mem: the block size follows the backing ---------------------------------------------
@pytest.mark.parametrize("line, kw, block", [
    ("-object memory-backend-ram,id=vm0mem,size=1G", {}, 2 * MiB),
    ("-object memory-backend-memfd,id=vm0mem,size=1G,hugetlb=on,hugetlbsize=2M", {}, 2 * MiB),
    ("-object memory-backend-memfd,id=vm0mem,size=1G,hugetlb=on,hugetlbsize=1G", {}, 1 * GiB),
    ("-object memory-backend-ram,id=vm0mem,size=1G", {"host_page_size": "64K"}, 512 * MiB),
])
def test_virtio_mem_default_block_size_follows_the_backing(line, kw, block):
    """hw/virtio/virtio-mem.c virtio_mem_default_block_size: the THP size (hpage_pmd_size, 512 MiB
    on a 64 KiB host) for base pages, the huge page size for hugetlbfs; at least 1 MiB."""
    vm = labkit.open(backend="model", qemu_args=f"-m 1G,maxmem=2G {line} -device virtio-mem-pci,id=vm0,"
                                                f"memdev=vm0mem", **kw)
    assert vm.qmp("qom-get", path="vm0", property="block-size") == block


@pytest.mark.parametrize("backend, block, text", [
    ("memory-backend-memfd,id=vm0mem,size=1G,hugetlb=on,hugetlbsize=2M", "1M",
     "'block-size' property has to be at least the page size (0x200000)"),
    ("memory-backend-memfd,id=vm0mem,size=1G,hugetlb=on,hugetlbsize=1G", "2M",
     "'block-size' property has to be at least the page size (0x40000000)"),
    ("memory-backend-ram,id=vm0mem,size=1G", "512K", "'block-size' property has to be at least 0x100000"),
    ("memory-backend-ram,id=vm0mem,size=1G", "3M", "'block-size' property has to be a power of two"),
])
def test_virtio_mem_refuses_blocks_below_the_page_size(backend, block, text):
    line = f"-m 1G,maxmem=2G -object {backend} -device virtio-mem-pci,id=vm0,memdev=vm0mem,block-size={block}"
    with pytest.raises(ValueError) as e:
        parse_options("model", qemu_args=line)
    assert str(e.value).endswith(text)


@pytest.mark.parametrize("host_page, default", [("4K", "2 MiB"), ("64K", "200 MiB")])
def test_virtio_mem_warns_below_the_default_block_size_in_qemus_words(host_page, default):
    """warn_report("'block-size' property is smaller than the default block size (%" PRIx64 " MiB)"):
    the MiB count is printed in hex, so 512 MiB reads "200 MiB"."""
    line = ("-m 1G,maxmem=2G -object memory-backend-ram,id=vm0mem,size=1G "
            "-device virtio-mem-pci,id=vm0,memdev=vm0mem,block-size=2M")
    vm = labkit.open(backend="model", qemu_args=line, host_page_size=host_page)
    log = vm.inspect("host").qemu_log
    warning = f"'block-size' property is smaller than the default block size ({default})"
    assert (warning in log[0]) if host_page == "64K" else log == ()


def test_virtio_mem_unplug_on_hugetlbfs_returns_whole_huge_pages():
    line = ("-m 1G,maxmem=2G -object memory-backend-memfd,id=vm0mem,size=1G,hugetlb=on,hugetlbsize=2M "
            "-device virtio-mem-pci,id=vm0,memdev=vm0mem,requested-size=512M")
    vm = labkit.open(backend="model", qemu_args=line, memhp_default_state="online_movable",
                     model={"boot": "minimal"})
    vm.advance(2000)
    vm.guest("alloc", size=700 * MiB)
    block = vm.inspect("host").blocks[1]
    backed = lambda: (vm.mem.flags[block["start"]:block["end"]] & PageFlag.BACKED) != 0  # noqa: E731
    before = int(backed().sum())
    vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
    vm.advance(20_000)
    after = backed().reshape(-1, 512)
    assert block["kind"] == "hugetlb" and before > after.sum() >= 0
    assert (after.all(axis=1) | ~after.any(axis=1)).all()  # every huge page whole, or gone


# --- the backends' syntax and QEMU's texts ------------------------------------------------------
@pytest.mark.parametrize("props, text", [
    ("size=101M,hugetlb=on,hugetlbsize=2M", "failed to resize memfd to 105906176: Invalid argument"),
    ("size=128M,hugetlb=on,hugetlbsize=4M", "failed to create memfd: Invalid argument"),
    ("size=128M,hugetlb=on,hugetlbsize=0",
     "Property 'memory-backend-memfd.hugetlbsize' doesn't take value '0'"),
])
def test_memfd_refusals(props, text):
    """util/memfd.c qemu_memfd_create (memfd_create, ftruncate: EINVAL) and hostmem-memfd.c."""
    with pytest.raises(ValueError) as e:
        parse_options("model", qemu_args=f"-object memory-backend-memfd,id=m0,{props} "
                                         f"-machine memory-backend=m0")
    assert str(e.value).endswith(text)


def test_memfd_without_hugetlb_is_shared_4k_memory():
    o = parse_options("model", qemu_args="-object memory-backend-memfd,id=m0,size=1G "
                                         "-machine memory-backend=m0")
    b = o.memory_backends[0]
    assert (b.hugetlbfs, b.page_size, b.share) == (False, 4096, True)


def test_mem_path_on_hugetlbfs_takes_the_mount_page_size(monkeypatch):
    """qemu_fd_getpagesize: statfs's f_bsize of a hugetlbfs mount (its pagesize= option)."""
    mounts = "none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1G 0 0\nnone /mnt/h hugetlbfs rw 0 0\n"
    assert hugetlbfs_mount("/mnt/huge1g/vm0", mounts) == GiB
    assert hugetlbfs_mount("/mnt/h", mounts) == 2 * MiB
    assert hugetlbfs_mount("/var/tmp/x", mounts) is None
    assert hugetlbfs_mount("/dev/hugepages", "") == 2 * MiB  # systemd's mount, assumed on the model
    o = parse_options("model", qemu_args="-object memory-backend-file,id=m0,size=1G,mem-path=/dev/hugepages "
                                         "-machine memory-backend=m0")
    assert (o.memory_backends[0].hugetlbfs, o.memory_backends[0].page_size) == (True, 2 * MiB)
    monkeypatch.setattr("labkit.backends.options_switches.hugetlbfs_mount", lambda path: GiB)
    with pytest.raises(ValueError, match="memory size 0x20000000 must be equal to or larger than page size "
                                         "0x40000000"):  # softmmu/physmem.c file_ram_alloc
        parse_options("model", qemu_args="-object memory-backend-file,id=m0,size=512M,mem-path=/mnt/huge1g "
                                         "-machine memory-backend=m0")


def test_page_size_keywords():
    assert parse_options("model", memory="1G", host_page_size="64K").host_page_size == 64 << 10
    with pytest.raises(ValueError, match="host_page_size must be one of"):
        parse_options("model", memory="1G", host_page_size="16K")
