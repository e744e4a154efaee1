"""The open problems' switches on a real QEMU (docs/mechanisms.md §12): what this machine's QEMU runs
(hugetlbfs backing with reserved huge pages), the refusals QEMU itself prints next to the model's,
and the live backend's clear refusal of what this machine can't do.

Huge pages are reserved for the hugetlbfs tests with ``sysctl -w vm.nr_hugepages=N`` (root) and the
old value is put back afterwards. Where that is not permitted the tests skip, saying why (and fail
under CI's ``LABKIT_REQUIRE_LIVE=1``, tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import labkit
from labkit.backends.qemu import open_qemu
from labkit.backends.qemu.switches import hugepage_pools, iommu_group_count, qemu_object_types
from labkit.devices.balloon_host import BALLOON_LARGE_PAGE_WARNING
from labkit.errors import NotOnThisHost

pytestmark = pytest.mark.live
MiB = 1 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
POOL_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
HUGE_LINE = ("-object memory-backend-memfd,id=m0,size=512M,hugetlb=on,hugetlbsize=2M "
             "-machine memory-backend=m0 -device virtio-balloon-pci,id=balloon0,free-page-reporting=on")


@pytest.fixture(scope="module")
def huge_pages():
    """300 free 2 MiB pages for a 512 MiB guest (256) and a virtio-mem device, then the old value."""
    old = NR_HUGEPAGES.read_text().strip()
    want = int(old) + 300
    try:
        subprocess.run(["sysctl", "-qw", f"vm.nr_hugepages={want}"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"can't reserve huge pages here (sysctl -w vm.nr_hugepages needs root): {e}")
    try:
        free = int(POOL_2M.read_text())
        if free < 300:
            pytest.skip(f"the kernel reserved only {free} free 2 MiB pages of the {want} asked for "
                        f"(fragmented host memory)")
        yield free
    finally:
        subprocess.run(["sysctl", "-qw", f"vm.nr_hugepages={old}"], check=False, capture_output=True)


def qemu_says(line: str) -> str:
    """What this machine's QEMU prints when it starts ``line`` stopped (-S) and fails at realize;
    the empty string if it starts (it is then stopped by its PID). A small TCG translation buffer
    keeps ``mem-lock`` from locking (and so populating) QEMU's default 1 GiB of it first."""
    args = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,tb-size=16", "-nodefaults", "-display",
            "none", "-S", "-monitor", "none", *line.split()]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return ""


def free_2m() -> int:
    return int(POOL_2M.read_text())


def wait_for(condition, timeout_s: float, vm) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        vm.advance(250)
    return condition()


def test_hugetlbfs_2m_balloon_frees_nothing_reporting_does(huge_pages, figures):
    """QEMU 7.2, hw/virtio/virtio-balloon.c: ``balloon_inflate_page`` warns once and frees a 2 MiB
    host page only when all 512 pieces arrive in one request, which holds at most 256 PFNs: an
    inflate frees no huge page. ``virtio_balloon_handle_report``: 2 MiB-aligned reports on 2 MiB
    pages are discarded (fallocate punches the huge page out). The model says the same."""
    with open_qemu(qemu_args=HUGE_LINE) as vm:
        host = vm.inspect("host")
        assert [(b["kind"], b["page_size"]) for b in host.blocks] == [("hugetlb", 2 * MiB)]
        start = free_2m()
        job = vm.guest("alloc", size=200 * MiB)
        taken = start - free_2m()
        assert taken >= 90  # 200 MiB written: about 100 huge pages faulted in
        vm.guest("free", handle=job)
        assert wait_for(lambda: start - free_2m() <= taken // 4, 20, vm), \
            f"reporting gave back {taken - (start - free_2m())} of {taken} huge pages"
        returned = taken - (start - free_2m())
        before = free_2m()
        rss_before = vm.sample()["host_rss"]
        vm.qmp("balloon", value=256 * MiB)
        assert wait_for(lambda: vm.qmp("query-balloon")["actual"] == 256 * MiB, 60, vm)
        after = free_2m()
        rss_after = vm.sample()["host_rss"]
        log = vm.inspect("host").qemu_log
    assert after <= before  # not one huge page came back from 256 MiB of balloon
    assert sum(BALLOON_LARGE_PAGE_WARNING in line for line in log) == 1  # warn_report_once
    with labkit.open(backend="model", qemu_args=HUGE_LINE, model={"boot": "minimal"}) as model:
        rss = model.sample()["host_rss"]
        model.qmp("balloon", value=256 * MiB)
        model.advance(10_000)
        m = model.inspect("host")
        # nothing freed; init_on_alloc zeroes each balloon page first, which faults its huge page in
        assert model.sample()["host_rss"] >= rss and m.balloon_partial_pages_dropped > 0
        assert m.qemu_log == (f"qemu-system-x86_64: warning: {BALLOON_LARGE_PAGE_WARNING}",)
    figures["hugetlbfs 2M live"] = (f"reporting returned {returned} of {taken} huge pages; a 256 MiB "
                                    f"inflate changed free huge pages by {after - before} and guest-RAM "
                                    f"RSS by {(rss_after - rss_before) / MiB:+.0f} MiB (init_on_alloc "
                                    f"faults the balloon's pages in; none can be discarded)")


def test_virtio_mem_on_hugetlbfs_block_size_and_refusals_match_qemu(huge_pages, figures):
    """hw/virtio/virtio-mem.c ``virtio_mem_default_block_size``: hugetlbfs 2 MiB -> 2 MiB blocks;
    ``block-size=1M`` is refused with QEMU's text, which the model gives word for word."""
    line = ("-m 256M,maxmem=512M -object memory-backend-memfd,id=vmem0,size=128M,hugetlb=on,"
            "hugetlbsize=2M -device virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=64M")
    with open_qemu(qemu_args=line, memhp_default_state="online_movable") as vm:
        assert vm.qmp("qom-get", path="vm0", property="block-size") == 2 * MiB
        plugged = wait_for(lambda: vm.qmp("qom-get", path="vm0", property="size") == 64 * MiB, 30, vm)
        assert plugged
    model = labkit.open(backend="model", qemu_args=line, memhp_default_state="online_movable")
    assert model.qmp("qom-get", path="vm0", property="block-size") == 2 * MiB
    bad = line.replace("requested-size=64M", "block-size=1M,requested-size=64M")
    with pytest.raises(ValueError) as modelled:
        labkit.open(backend="model", qemu_args=bad)
    text = "'block-size' property has to be at least the page size (0x200000)"
    assert text in qemu_says(bad) and text in str(modelled.value)
    figures["virtio-mem on hugetlbfs"] = f"QEMU and the model: block-size 2 MiB; block-size=1M: {text!r}"


def test_mem_lock_refuses_virtio_mem_as_the_model_does():
    """hw/virtio/virtio-mem.c realize: "Incompatible with mlock" (softmmu/vl.c -overcommit mem-lock)."""
    line = ("-m 256M,maxmem=512M -overcommit mem-lock=on -object memory-backend-ram,id=vmem0,size=128M "
            "-device virtio-mem-pci,id=vm0,memdev=vmem0")
    assert "Incompatible with mlock" in qemu_says(line)
    with pytest.raises(ValueError, match="Incompatible with mlock"):
        labkit.open(backend="model", qemu_args=line)


@pytest.mark.parametrize("keywords, why", [
    ({"memory": "512M", "host_page_size": "64K"}, "this machine's pages are 4 KiB"),
    ({"memory": "512M", "guest_page_size": "64K"}, "the live guest is x86-64"),
])
def test_page_sizes_this_machine_does_not_have_are_refused(keywords, why):
    with pytest.raises(NotOnThisHost, match=why):
        open_qemu(**keywords)


def test_vfio_and_confidential_guests_are_refused_with_the_reason():
    """No IOMMU group, no /dev/sev, no sev-snp-guest/tdx-guest in this QEMU: each refused before
    QEMU starts, saying what is missing (docs/mechanisms.md §12.3, §12.4)."""
    if iommu_group_count() and os.path.exists("/dev/vfio"):
        pytest.skip("this machine has IOMMU groups: vfio-pci could be tried here")
    with pytest.raises(NotOnThisHost, match="vfio-pci needs the host device in an IOMMU group"):
        open_qemu(qemu_args="-m 512M -device vfio-pci,host=0000:00:1f.0")
    objects = qemu_object_types()
    for qom_type, extra in (("sev-guest", ",cbitpos=47,reduced-phys-bits=1"),
                            ("sev-snp-guest", ",cbitpos=51,reduced-phys-bits=1"), ("tdx-guest", "")):
        line = f"-m 512M -object {qom_type},id=cg0{extra} -machine confidential-guest-support=cg0"
        if qom_type not in objects:
            match = f"Parameter 'qom-type' does not accept value '{qom_type}'"
        elif not os.path.exists("/dev/sev") and qom_type == "sev-guest":
            match = "no /dev/sev"
        else:
            match = "OVMF"
        with pytest.raises(NotOnThisHost, match=match):
            open_qemu(qemu_args=line)


def test_huge_pages_the_pool_lacks_are_refused():
    pools = hugepage_pools()
    if pools.get(1 << 30, {}).get("free", 0) >= 1:
        pytest.skip("this machine has free 1 GiB pages")
    line = "-object memory-backend-memfd,id=m0,size=1G,hugetlb=on,hugetlbsize=1G -machine memory-backend=m0"
    with pytest.raises(NotOnThisHost, match="needs 1 free 1 GiB huge pages"):
        open_qemu(qemu_args=line)
