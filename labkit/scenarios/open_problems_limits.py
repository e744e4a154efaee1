"""The open problems that are arithmetic or wording rather than a switch (docs/mechanisms.md §12.4,
§12.5): the balloon's 32-bit page counts, deflate-on-oom as the virtio spec words it and as Linux
does it, and what accepting memory again would cost a confidential guest (modelled, labelled so).

>>> rows = interface_limits()
>>> [r["num_pages"] for r in rows if r["balloon"] == 1 << 44]   # 2^32 pages: truncated to 0
[0]
"""

from __future__ import annotations

from dataclasses import dataclass

import labkit
from labkit.devices.balloon import (
    VIRTIO_BALLOON_OOM_NR_PAGES,
    VIRTIO_BALLOON_PFN_SHIFT,
    BalloonDevice,
)
from labkit.units import GiB, MiB, TiB

UINT32_MAX = 0xFFFFFFFF
MODELLED = "modelled"

# The virtio spec's words (virtio v1.2, "Memory Balloon Device / Device Operation", driver
# requirements; device-types/balloon/description.tex), the normative clauses quoted as such
SPEC_DEFLATE_ON_OOM = (
    "If VIRTIO_BALLOON_F_DEFLATE_ON_OOM has been negotiated, the driver MAY use pages from the balloon "
    "when num_pages is less than or equal to the actual number of pages in the balloon if this is "
    "required for system stability (e.g. if memory is required by applications running within the "
    "guest).")
SPEC_TELL_HOST = ("The driver MUST use the deflateq to inform the device of pages that it wants to use "
                  "from the balloon.")
SPEC_SUPPLY = ("The driver SHOULD supply pages to the balloon when num_pages is greater than the actual "
               "number of pages in the balloon.")


def _device(ram: int) -> BalloonDevice:
    """QEMU's balloon device on its own: its arithmetic needs no guest of that size."""
    return BalloonDevice(None, None, None, ram, {"id": "balloon0", "deflate_on_oom": False,
                                                  "free_page_hint": False, "free_page_reporting": False,
                                                  "page_poison": True}, lambda *a: None, lambda: 0.0)


def interface_limits(ram: int = 20 * TiB) -> list[dict]:
    """``virtio_balloon_to_target`` on a guest of ``ram`` for balloons around 2^32 pages (16 TiB,
    the talk's "more than 2^44"): the pages wanted, the ``num_pages`` QEMU stores (a u32) and what
    the guest's driver then chases. The guest is never built: only QEMU's arithmetic runs."""
    rows = []
    for balloon in (4 * TiB, 16 * TiB - 4096, 16 * TiB, 16 * TiB + 4096, 17 * TiB):
        d = _device(ram)
        d.to_target(ram - balloon)
        chased = d.config.num_pages << VIRTIO_BALLOON_PFN_SHIFT
        rows.append({"balloon": balloon, "wanted_pages": d.wanted_pages, "num_pages": d.config.num_pages,
                     "guest_chases": chased, "lost": balloon - chased})
    return rows


def balloon_pfn(guest_pfn: int, pages_per_page: int = 1) -> int:
    """drivers/virtio/virtio_balloon.c ``page_to_balloon_pfn``: a u32, so a guest page at or above
    16 TiB cannot be named in an inflate request (the value wraps; no guard found: UNCONFIRMED)."""
    return (guest_pfn * pages_per_page) & UINT32_MAX


def deflate_on_oom(memory: int = 1 * GiB, balloon: int = 768 * MiB, demand: int = 300 * MiB,
                   seed: int = 0) -> dict:
    """Linux's deflate-on-oom on the model: a balloon of ``balloon`` bytes, then the guest asks for
    ``demand`` bytes more than it has. The OOM notifier (virtio_balloon_oom_notify) runs from
    out_of_memory() only after reclaim failed, gives back VIRTIO_BALLOON_OOM_NR_PAGES (256 = 1 MiB)
    per call, tells the host first (the deflateq: the spec's MUST), and nothing inflates the
    balloon again until the host changes the target."""
    with labkit.open(backend="model", memory=memory, seed=seed, balloon={"deflate_on_oom": True},
                     model={"boot": "minimal"}) as vm:
        total = vm.meminfo()["MemTotal"] * 1024
        vm.qmp("balloon", value=memory - balloon)
        vm.advance(10_000)
        before = vm.inspect("balloon")
        vm.guest("alloc", size=demand)
        after = vm.inspect("balloon")
        deflates = after.deflate_requests - before.deflate_requests
        vm.advance(10_000)
        later = vm.inspect("balloon")
        # the spec's MAY covers a deflate while num_pages <= actual: true for the first notifier
        # call only; after it the balloon is below its target (a reading of the spec, see §12.5)
        return {"num_pages": later.num_pages, "actual_pages": later.actual_pages,
                "balloon_before": before.driver_pages * 4096, "balloon_after": after.driver_pages * 4096,
                "oom_deflated": after.oom_deflated_pages * 4096,
                "notifier_calls": after.oom_deflated_pages // VIRTIO_BALLOON_OOM_NR_PAGES,
                "deflate_requests": deflates, "memtotal_change": vm.meminfo()["MemTotal"] * 1024 - total,
                "oom_kills": vm.vmstat()["oom_kill"], "balloon_10s_later": later.driver_pages * 4096,
                "actual": vm.qmp("query-balloon")["actual"]}


@dataclass(frozen=True)
class AcceptCost:
    """Assumed costs (microseconds) of making one page private and usable again in a confidential
    guest after the host reclaimed it: the page-state-change request to the host (an SNP PSC via the
    GHCB / a TDX MapGPA: a VM exit and KVM's conversion), the accept or validate instruction (SNP
    PVALIDATE / TDX TDG.MEM.PAGE.ACCEPT), and zeroing the page. Not measured, not sourced: labkit's
    assumptions, shown as such."""

    exit_us: float = 4.0  # one conversion request: a VM exit and the host's bookkeeping
    accept_4k_us: float = 1.0
    accept_2m_us: float = 60.0  # one 2 MiB accept (the hardware validates 512 pages' worth)
    clear_gbps: float = 10.0  # zeroing bandwidth, GB/s


def reaccept_cost(size: int, unit: int = 4096, cost: AcceptCost | None = None) -> dict:
    """The modelled guest time to take ``size`` bytes back after the host reclaimed them, in
    ``unit`` (4 KiB or 2 MiB) conversions: one request and one accept per unit, zeroing per byte.
    Linux accepts lazily in 2 MiB units on first allocation (mm/page_alloc.c ``accept_memory``, 6.5+);
    a host that reclaimed 4 KiB pieces leaves 4 KiB conversions."""
    cost = cost or AcceptCost()
    if unit not in (4096, 2 * MiB):
        raise ValueError(f"unit must be 4 KiB or 2 MiB, got {unit!r}")
    units = -(-size // unit)
    accept = cost.accept_4k_us if unit == 4096 else cost.accept_2m_us
    ms = units * (cost.exit_us + accept) / 1000 + size / (cost.clear_gbps * 1e9) * 1000
    return {"size": size, "unit": unit, "conversions": units, "ms": ms, "label": MODELLED}


__all__ = ["MODELLED", "SPEC_DEFLATE_ON_OOM", "SPEC_SUPPLY", "SPEC_TELL_HOST", "AcceptCost", "balloon_pfn",
           "deflate_on_oom", "interface_limits", "reaccept_cost"]
