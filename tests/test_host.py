"""The host: backing on first touch, discard, swap by a second-chance clock (model/host.py)."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.errors import HostOutOfMemory
from labkit.model.host import Host
from labkit.model.pages import GuestMemory, PageFlag, Zone
from tests.helpers import check_invariants


def guest(host: Host, n: int, name: str = "vm"):
    mem = GuestMemory(n, [Zone("Normal", 0, 0, n)])
    return mem, host.attach(mem, name)


def test_only_touched_pages_are_backed_and_discard_unbacks_them():
    host = Host(ram=64 << 20)
    mem, vm = guest(host, 4096)
    host.touch(vm, np.arange(100))
    host.touch(vm, np.arange(50, 150))
    assert vm.rss_pages == 150 and vm.zero_fill_faults == 150
    assert host.discard(vm, np.arange(0, 200)) == 150
    assert vm.rss_pages == 0
    check_invariants(mem)


def test_overcommitted_host_swaps_unreferenced_pages_first_and_swaps_them_back_in():
    host = Host(ram=1024 * 4096, swap=4096 * 4096, swapin_us=100)
    mem, vm = guest(host, 4096)
    host.touch(vm, np.arange(1024))  # the host's RAM is full
    # clear the accessed bits, then re-reference the first half: the second half is colder
    mem.flags[:1024] &= ~np.uint8(PageFlag.REFERENCED)
    host.touch(vm, np.arange(512))
    host.touch(vm, np.arange(1024, 1124))  # 100 more pages need room
    swapped = np.flatnonzero(mem.flags & PageFlag.SWAPPED)
    assert len(swapped) == 100 and swapped.min() >= 512  # the cold half went to swap
    assert vm.rss_pages == 1024 and host.free_pages == 0
    host.touch(vm, swapped[:10])
    assert vm.swap_ins == 10
    assert host.stall_ms(vm) == pytest.approx(1.0)
    check_invariants(mem)


def test_host_out_of_memory_when_ram_and_swap_are_exhausted():
    host = Host(ram=100 * 4096, swap=0)
    mem, vm = guest(host, 1024)
    host.touch(vm, np.arange(100))
    with pytest.raises(HostOutOfMemory, match="host out of memory"):
        host.touch(vm, np.arange(100, 101))
    assert vm.rss_pages == 100


def test_two_vms_share_one_host_and_its_clock():
    host = Host(ram=1000 * 4096, swap=2000 * 4096)
    mem_a, a = guest(host, 2048, "a")
    mem_b, b = guest(host, 2048, "b")
    host.touch(a, np.arange(800))
    host.touch(b, np.arange(800))
    assert a.rss_pages + b.rss_pages == 1000
    assert a.swap_pages + b.swap_pages == 600
    check_invariants(mem_a)
    check_invariants(mem_b)


def test_shared_host_object_through_open():
    host = Host(ram=3 << 30)
    with labkit.open(memory="1G", host=host, vm_name="a") as a, \
            labkit.open(memory="1G", host=host, vm_name="b") as b:
        a.guest("alloc", size="256M")
        assert host.used_pages * 4096 == a.sample()["host_rss"] + b.sample()["host_rss"]
    assert host.vms == []
