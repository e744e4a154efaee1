"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np

from labkit.model.pages import GuestMemory, PageFlag, PageState


def naive_free_blocks(free: np.ndarray, max_order: int = 10) -> list[set[int]]:
    """Reference buddy free lists by a per-block loop (test-only; small arrays)."""
    n = len(free)
    out = [set() for _ in range(max_order + 1)]
    claimed = np.zeros(n, dtype=bool)
    for k in range(max_order, -1, -1):
        size = 1 << k
        for start in range(0, n - size + 1, size):
            if free[start:start + size].all() and not claimed[start:start + size].any():
                out[k].add(start)
                claimed[start:start + size] = True
    return out


def check_invariants(mem: GuestMemory) -> None:
    """docs/architecture.md invariants that hold at every instant."""
    assert (mem.recount() == mem.counts).all(), "per-zone counts drifted from the state array"
    assert (mem.recount_unzoned() == mem.unzoned).all(), "counts of unzoned pages drifted"
    assert mem.counts.sum() + mem.unzoned.sum() == mem.n_pages, "counts must add up to the size"
    backed = (mem.flags & PageFlag.BACKED) != 0
    swapped = (mem.flags & PageFlag.SWAPPED) != 0
    assert int(backed.sum()) == mem.backed_pages, "host RSS must equal the backed pages"
    assert int(swapped.sum()) == mem.swapped_pages
    assert not (backed & swapped).any(), "a page is either in host RAM or in host swap"
    reported = (mem.flags & PageFlag.REPORTED) != 0
    assert (mem.state[reported] == PageState.FREE).all(), "a reported page is free"


def pcp_kb(vm) -> int:
    """kB on the guest's per-CPU page lists (/proc/zoneinfo's pcp counts): free pages that are not
    in MemFree (NR_FREE_PAGES) until the lists give them back (mm/page_alloc.c)."""
    return 4 * sum(p["count"] for z in vm.zoneinfo() for p in z["pcp"])


def free_kb(vm) -> int:
    """Every free page of the guest in kB: MemFree plus the per-CPU lists."""
    return vm.meminfo()["MemFree"] + pcp_kb(vm)
