"""Hypothesis: docs/architecture.md's invariants hold through random timelines of guest and host actions."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import labkit
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.errors import GuestError
from labkit.model.buddy import free_blocks
from labkit.model.pages import PageFlag, PageState
from tests.helpers import check_invariants

MiB = 1 << 20

actions = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from(["anon", "file", "shmem"]), st.integers(1, 96)),
    st.tuples(st.just("free"), st.integers(0, 20)),
    st.tuples(st.just("touch"), st.integers(0, 20)),
    st.tuples(st.just("drop_caches")),
    st.tuples(st.just("balloon"), st.integers(64, 512)),
    st.tuples(st.just("advance"), st.integers(0, 1500)),
    st.tuples(st.just("step"),),
), min_size=1, max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions, st.booleans(), st.integers(0, 1000))
# a request in flight (its ack, or an Out-of-puff sleep) when the target is raised lands past it
@example([("balloon", 64), ("advance", 199), ("balloon", 115), ("step",), ("step",)], False, 0)
@example([("balloon", 64), ("advance", 199), ("balloon", 115), ("step",), ("step",)], True, 1)
def test_invariants_hold_through_random_timelines(steps, deflate_on_oom, seed):
    with labkit.open(memory="512M", seed=seed, balloon={"deflate_on_oom": deflate_on_oom},
                     host={"ram": "2G"}) as vm:
        handles = []
        for step in steps:
            before_actual = vm.balloon_device.config.actual
            if step[0] == "alloc":
                try:
                    handles.append(vm.guest("alloc", size=step[2] * MiB, kind=step[1]))
                except GuestError:
                    # only shmem/file left and the balloon holding the rest: Linux panics too
                    assert vm.kernel.panicked
                    check_invariants(vm.mem)
                    return
            elif step[0] == "free" and handles:
                vm.guest("free", handle=handles.pop(step[1] % len(handles)))
            elif step[0] == "touch" and handles:
                h = handles[step[1] % len(handles)]
                if any(x["handle"] == h and x["alive"] for x in vm.guest("handles")):
                    vm.guest("touch", handle=h)
            elif step[0] == "drop_caches":
                vm.guest("drop_caches")
            elif step[0] == "balloon":
                vm.qmp("balloon", value=step[1] * MiB)
            elif step[0] == "advance":
                vm.advance(step[1])
            elif step[0] == "step" and vm.step():
                after = vm.balloon_device.config.actual
                # a request moves actual by at most 256 pages, toward the num_pages its run read
                # (docs/mechanisms.md §1.2): a target changed while the request was in flight does not
                # stop it, so actual may end up past the new target, by at most that request
                assert abs(after - before_actual) <= VIRTIO_BALLOON_ARRAY_PFNS_MAX
                chased = vm.balloon.last_request_target  # None: an OOM deflate, which chases nothing
                if chased is not None:
                    assert abs(chased - after) <= abs(chased - before_actual)
            mem = vm.mem
            check_invariants(mem)
            balloon = mem.state == PageState.BALLOON
            assert int(balloon.sum()) == vm.balloon.num_pages + len(vm.balloon.in_flight)
            # a discarded (ballooned) page is not backed, and reads as zero; pages the driver
            # holds before telling the host (in flight) are discarded only at the request
            told = balloon.copy()
            told[vm.balloon.in_flight] = False
            assert not (mem.flags[told] & PageFlag.BACKED).any()
            assert vm.sample()["host_rss"] == mem.backed_pages * 4096
        every = [free_blocks(vm.mem, zone) for zone in vm.mem.zones]
        assert sum(b.free_pages() for b in every) == vm.mem.count(PageState.FREE)
        for blocks in every:
            for k, starts in enumerate(blocks.starts):
                assert (starts % (1 << k) == 0).all()  # aligned
                if k < 10 and len(starts):
                    # maximal: a block's buddy of the same order is never free as a whole block too
                    buddies = starts ^ (1 << k)
                    assert not np.isin(buddies, starts).any()
