"""Bugs the whole-machine fuzzer (tests/test_fuzz.py) found: each one's minimal reproducer, shrunk by
hypothesis and written out by hand, with the kernel or QEMU behaviour the fix follows."""

from __future__ import annotations

import pytest

import labkit
from labkit.errors import GuestError
from tests.machine_invariants import check_machine, is_panicked

MiB = 1 << 20


def test_a_panic_mid_allocation_leaves_no_page_without_an_owner():
    """Two NUMA nodes, shmem (never reclaimed, no swap) bound to node 1 until the node is full and
    nothing is killable there: ``out_of_memory`` panics ("System is deadlocked on memory",
    mm/oom_kill.c). The pages the allocation had already taken went nowhere: 3 SHMEM pages had no
    owner. Now they go back to the free lists before the panic is raised."""
    vm = labkit.open(memory="256M", seed=0, numa_nodes=2, balloon=False,
                     host={"ram": 213909504, "swap": 1 << 30})
    size = int(256 * MiB * 0.7990758502460036) // 4096 * 4096
    with pytest.raises(GuestError, match="panicked"):
        vm.guest("alloc", size=size, kind="shmem", node=1)
    assert is_panicked(vm)
    check_machine(vm)
