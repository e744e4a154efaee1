"""The buddy allocator's derived free lists and allocation order (docs/architecture.md; mm/page_alloc.c)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.model.allocator import ZoneAllocator
from labkit.model.buddy import buddyinfo, free_blocks
from labkit.model.pages import GuestMemory, PageFlag, PageState, Zone
from tests.helpers import naive_free_blocks


def memory(n: int, free_pfns=None) -> GuestMemory:
    mem = GuestMemory(n, [Zone("Normal", 0, 0, n)], initial=PageState.KERNEL)
    if free_pfns is not None:
        mem.set_state(np.asarray(free_pfns, dtype=np.int64), PageState.FREE)
    return mem


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3).map(lambda k: k * 2048), st.integers(0, 2**32 - 1), st.floats(0.05, 0.98))
def test_derived_free_lists_match_a_per_block_reference(n, seed, density):
    rng = np.random.default_rng(seed)
    free = rng.random(n) < density
    # add some aligned free runs so high orders occur
    for k in (9, 10):
        start = int(rng.integers(0, n >> k)) << k
        free[start:start + (1 << k)] = True
    mem = memory(n, np.flatnonzero(free))
    blocks = free_blocks(mem, mem.zones[0])
    expected = naive_free_blocks(free)
    for k in range(11):
        assert set(blocks.starts[k].tolist()) == expected[k], f"order {k}"
    assert blocks.free_pages() == int(free.sum())


def test_zone_not_a_multiple_of_max_order_is_padded_with_non_free():
    mem = memory(3000, np.arange(3000))
    blocks = free_blocks(mem, mem.zones[0])
    # 3000 = 2048 + 512 + 256 + 128 + 32 + 16 + 8: never a block past the zone's end
    assert blocks.free_pages() == 3000
    assert blocks.nr_free()[10] == 2 and blocks.nr_free()[9] == 1
    assert all((s + (1 << k) <= 3000).all() for k, s in enumerate(blocks.starts))


def test_buddyinfo_prints_one_line_per_zone_with_eleven_orders():
    mem = GuestMemory(4096, [Zone("Normal", 0, 0, 2048), Zone("Movable", 0, 2048, 4096)])
    lines = buddyinfo(mem).splitlines()
    assert lines[0].startswith("Node 0, zone   Normal") and lines[1].startswith("Node 0, zone  Movable")
    assert [int(x) for x in lines[0].split()[4:]] == [0] * 10 + [2]


def test_smallest_fitting_block_first_then_ascending_split():
    # an isolated order-0 page at 5000, an order-1 block at 6002, and a free order-10 block at 8192
    mem = memory(16384, [5000, 6002, 6003, *range(8192, 9216)])
    alloc = ZoneAllocator(mem, mem.zones[0])
    assert alloc.take(1).tolist() == [5000]  # order 0 before splitting anything
    assert alloc.take(2).tolist() == [6002, 6003]  # then order 1
    assert alloc.take(3).tolist() == [8192, 8193, 8194]  # expand(): the low half first


def test_reported_blocks_sit_at_the_tail_of_their_order():
    # two free order-9 blocks; the lower one is reported: the unreported one is handed out first
    mem = memory(4096, [*range(0, 512), *range(1024, 1536)])
    mem.set_flag(np.arange(0, 512), PageFlag.REPORTED)
    alloc = ZoneAllocator(mem, mem.zones[0])
    first = alloc.take(512)
    assert first.min() == 1024 and first.max() == 1535
    assert alloc.take(1).tolist() == [0]


def test_recent_small_frees_are_reused_first_lifo():
    mem = memory(8192, range(4096, 8192))
    alloc = ZoneAllocator(mem, mem.zones[0])
    alloc.take(10)
    freed = np.array([100, 200, 300])
    mem.set_state(freed, PageState.FREE)
    alloc.freed(freed)
    assert alloc.take(3).tolist() == [300, 200, 100]  # per-CPU lists are LIFO


def test_large_recent_free_goes_to_the_head_of_its_order():
    # old free order-10 block at 4096; a freshly freed order-10 block at 0 is used first
    mem = memory(8192, range(4096, 5120))
    alloc = ZoneAllocator(mem, mem.zones[0])
    pfns = np.arange(0, 1024)
    mem.set_state(pfns, PageState.FREE)
    alloc.freed(pfns)
    assert alloc.take(1).tolist() == [0]


def test_take_never_returns_a_page_twice_and_only_free_pages():
    rng = np.random.default_rng(3)
    mem = memory(1 << 14, np.flatnonzero(rng.random(1 << 14) < 0.7))
    alloc = ZoneAllocator(mem, mem.zones[0])
    seen = []
    for _ in range(40):
        got = alloc.take(int(rng.integers(1, 400)))
        assert (mem.state[got] == PageState.FREE).all()
        mem.set_state(got, PageState.ANON)
        seen.append(got)
        if rng.random() < 0.3:
            back = got[: len(got) // 2]
            mem.set_state(back, PageState.FREE)
            alloc.freed(back)
    live = mem.state == PageState.ANON
    assert int(live.sum()) == mem.count(PageState.ANON)
