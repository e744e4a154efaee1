"""The talk's pros and cons about the mechanisms, each turned into a row with the measurement that
supports, qualifies or contradicts it and the verdict computed from it (never typed in), from a
:class:`labkit.scenarios.matrix.MatrixResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labkit.scenarios import costs
from labkit.units import MiB

VERDICTS = ("supported", "qualified", "contradicted")


@dataclass(frozen=True)
class Claim:
    """One of the talk's pros/cons with the measurement behind it and the verdict it gets."""

    key: str
    mechanism: str
    job: str
    claim: str
    evidence: str
    verdict: str
    label: str  # where the evidence comes from: costs.MODELLED / MEASURED / PUBLISHED
    cause: str  # why the outcome is what it is, with the source section


def _mib(v: float) -> str:
    return f"{v / MiB:.0f} MiB"


def _pct(a: float, b: float) -> float:
    return 100.0 * (1.0 - a / b) if b else float("nan")


def claims(r: Any) -> list[Claim]:
    """Every claim of the talk the matrix ``r`` has evidence for."""
    m = {c.variant: c for c in r.jobs["migration"]}
    o = {c.variant: c for c in r.jobs["overcommit"]}
    pc = {c.variant: c for c in r.jobs["page cache"]}
    rs = {c.variant: c for c in r.jobs["resize"]}
    k = r.costs
    out: list[Claim] = []

    def add(key, mechanism, job, claim, evidence, verdict, label, cause):
        assert verdict in VERDICTS
        out.append(Claim(key, mechanism, job, claim, evidence, verdict, label, cause))

    idle = o["hinting"].details, o["none"].details
    same = o["hinting"].value == o["none"].value and idle[0]["peak_host_rss"] == idle[1]["peak_host_rss"]
    add("hinting-no-overhead", "hinting", "overcommit", "hinting: no overhead until requested",
        f"overcommit with hinting on: {_mib(o['hinting'].value)} returned, peak host RSS "
        f"{_mib(idle[0]['peak_host_rss'])} vs {_mib(idle[1]['peak_host_rss'])} with nothing",
        "supported" if same else "contradicted", costs.MODELLED,
        "QEMU starts a hinting round only from the precopy notifier after a bitmap sync (§2.3): "
        "without a migration the guest never hints")
    wt = k["write_tracking"]
    add("hinting-write-overhead", "hinting", "migration", "hinting adds overhead to writes",
        f"{wt['rewritten_pages']:.0f} pages re-dirtied while a kernel build migrates with hinting: "
        f"{1000 * wt['tracking_s']:.1f} ms of write-protect faults ({100 * wt['share']:.2f} % of a vCPU)",
        "supported" if wt["tracking_s"] > 0 else "qualified", costs.MODELLED,
        "a hint is only safe while QEMU tracks writes (dirty logging, §2.3): every first write after a "
        "sync faults; hinting outside a migration would need that tracking all the time")
    save = _pct(m["hinting"].value, m["plain"].value)
    add("hinting-migration", "hinting", "migration", "hinting: a good fit for migration",
        f"total {m['hinting'].text} vs {m['plain'].text} plain ({save:.0f} % faster)",
        "supported" if save >= 10 else ("qualified" if save > 0 else "contradicted"), costs.MODELLED,
        "hinted free pages leave the dirty bitmap and are never read or sent (§2.3); the published "
        "8 GB idle guest: 284 vs 1757 ms")
    add("hinting-overcommit", "hinting", "overcommit", "hinting: a poor fit for overcommit",
        f"{_mib(o['hinting'].value)} returned with hinting, {_mib(o['reporting'].value)} with reporting",
        "supported" if o["hinting"].value == 0 < o["reporting"].value else "contradicted", costs.MODELLED,
        "hints only clear migration bitmap bits; nothing is discarded (§2.3)")
    pf, mh = k["page_fault1"], k["memhog"]
    pub = k["published"]
    add("reporting-overhead", "reporting", "overcommit",
        "reporting: overhead incurred periodically, 1-2 % in memory-intensive workloads",
        f"memhog {100 * mh['overhead']:.2f} %, page_fault1 {100 * pf['overhead']:.3f} % (model); "
        f"Duyck v17 page_fault1: {100 * pub['page_fault1, 1 task']['overhead']:.2f} % (1 task), "
        f"{100 * pub['page_fault1, 16 tasks']['overhead']:.2f} % (16 tasks)",
        "supported" if 0 < mh["overhead"] <= 0.02 and pf["overhead"] < mh["overhead"] else "qualified",
        costs.MODELLED + " + " + costs.PUBLISHED,
        "a pass every 2 s reports free blocks >= 2 MiB (§3.2); a reported page the guest takes back is "
        "zero-filled by the host again (2 us each); page_fault1 re-uses its memory before the 2 s delay")
    add("reporting-overcommit", "reporting", "overcommit", "reporting: a good fit for overcommit",
        f"{_mib(o['reporting'].value)} returned vs {_mib(o['none'].value)} with nothing, without any "
        f"host-side policy", "supported" if o["reporting"].value > o["none"].value else "contradicted",
        costs.MODELLED, "freed memory goes back to the host on its own, 2 s after it is freed (§3)")
    rsave = _pct(m["reporting"].value, m["plain"].value)
    add("reporting-migration", "reporting", "migration", "reporting: a poor fit for migration",
        f"total {m['reporting'].text} vs {m['plain'].text} plain ({rsave:.0f} % faster)",
        "supported" if rsave < 10 else "contradicted", costs.MODELLED,
        "reported pages stay in the dirty bitmap: they are read and sent as zero pages (§6.4)")
    live = k["resize_live"]
    model = k["resize_model"]
    src = live if live is not None and "remove_used_ratio" in live else model
    label = costs.MEASURED if src is live else costs.MODELLED
    where = "live QEMU" if src is live else "model"
    empty, used = src["remove_ratio"], src.get("remove_used_ratio", float("nan"))
    ev = (f"{where}, {_mib(src['size'])}: empty memory: unplug {src['virtio_mem_unplug_ms']:.0f} ms vs "
          f"inflate {src['balloon_inflate_ms']:.0f} ms; with {_mib(src.get('used', 0))} of data in it: "
          f"unplug {src.get('virtio_mem_unplug_used_ms', float('nan')):.0f} ms vs inflate "
          f"{src.get('balloon_inflate_used_ms', float('nan')):.0f} ms (model: "
          f"{model['virtio_mem_unplug_ms']:.0f} / {model['virtio_mem_unplug_used_ms']:.0f} vs "
          f"{model['balloon_inflate_ms']:.0f} / {model['balloon_inflate_used_ms']:.0f} ms)")
    verdict = ("supported" if empty > 1.1 and used > 1.1 else
               "qualified" if used > 1.1 or empty > 0.5 else "contradicted")
    add("virtio-mem-slower", "virtio-mem", "resize", "virtio-mem: slower than ballooning", ev, verdict, label,
        "the balloon moves 256 pages per request (§1.2); virtio-mem moves whole 2 MiB blocks, but must "
        "migrate used pages out of each block first (alloc_contig_range, §5.5): empty memory is fast, "
        "memory holding data is not")
    bal, mov, ker = rs["balloon"], rs["virtio_mem_movable"], rs["virtio_mem_kernel"]
    add("virtio-mem-less", "virtio-mem", "resize", "virtio-mem: cannot unplug as much",
        f"at most {_mib(mov.value)} (ZONE_MOVABLE) / {_mib(ker.value)} (ZONE_NORMAL) vs "
        f"{_mib(bal.value)} with the balloon", "supported" if max(mov.value, ker.value) < bal.value
        else "contradicted", costs.MODELLED,
        "virtio-mem only unplugs its own device memory, and only subblocks without unmovable pages "
        "(§5.5); the balloon takes any free page, boot memory included (§1.2)")
    add("virtio-mem-movable", "virtio-mem", "resize", "virtio-mem unplug is reliable only in ZONE_MOVABLE",
        f"host got back {_mib(mov.details['host_returned_bytes'])} (online_movable) vs "
        f"{_mib(ker.details['host_returned_bytes'])} (online_kernel) of {_mib(r.params.memory // 2)} asked",
        "supported" if mov.details["host_returned_bytes"] > ker.details["host_returned_bytes"]
        else "qualified",
        costs.MODELLED, "slab in ZONE_NORMAL subblocks makes alloc_contig_range fail with -EBUSY (§5.5)")
    add("virtio-mem-granularity", "virtio-mem", "resize",
        "virtio-mem resizes in blocks, the balloon in pages",
        f"granularity {_mib(mov.details['granularity'])} vs {bal.details['granularity'] / 1024:.0f} KiB",
        "supported" if mov.details["granularity"] > bal.details["granularity"] else "contradicted",
        costs.MODELLED, "QEMU's default block size is the host THP size, 2 MiB on x86-64 (§5.2)")
    doo = rs["balloon_doo"]
    add("balloon-memtotal", "balloon", "resize", "the balloon shrinks MemTotal only without deflate-on-oom",
        f"MemTotal -{_mib(bal.details['memtotal_drop_bytes'])} without, "
        f"-{_mib(doo.details['memtotal_drop_bytes'])} with deflate-on-oom",
        "supported" if bal.details["memtotal_drop_bytes"] > 0 == doo.details["memtotal_drop_bytes"]
        else "contradicted", costs.MODELLED, "adjust_managed_page_count only without DEFLATE_ON_OOM (§1.3)")
    numa = r.runs["resize"].get("numa")
    if numa is not None:
        b, v = numa["balloon"]["taken"], numa["virtio-mem"]["taken"]
        aimed = v[1] >= 0.99 * numa["virtio-mem"]["removed"] and v[0] <= 0
        add("virtio-mem-numa", "virtio-mem", "resize", "virtio-mem: NUMA-aware resizing",
            f"shrinking the node-1 device took {_mib(v[1])} from node 1 and {_mib(max(v[0], 0))} from "
            f"node 0; the balloon took {_mib(b[0])} / {_mib(b[1])} from nodes 0 / 1, where its allocator "
            f"put it", "supported" if aimed else "contradicted",
            costs.MODELLED, "a virtio-mem device belongs to one node (its node property, §5.1); the "
            "balloon command names no node and the driver allocates with alloc_page (§1.2)")
    n = r.params.n_guests
    add("pmem-one-copy", "virtio-pmem", "page cache", "virtio-pmem: one cached copy of a shared image",
        f"{n} guests: {pc['pmem'].text} with virtio-pmem, {pc['blk-writeback'].text} with virtio-blk "
        f"cache=writeback, {pc['blk-none'].text} with cache=none",
        "supported" if pc["pmem"].value == 1 and pc["blk-writeback"].value == n + 1 else "contradicted",
        costs.MODELLED, "DAX maps the host's page cache into every guest; virtio-blk fills each guest's "
        "own page cache (§4.2)")
    return out


__all__ = ["VERDICTS", "Claim", "claims"]
