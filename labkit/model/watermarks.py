"""Zone watermarks, lowmem_reserve and per-CPU list sizes, as Linux 6.1 computes them.

All from mm/page_alloc.c unless said otherwise (docs/mechanisms.md §10.2, §10.3):

* ``calculate_min_free_kbytes``: ``min_free_kbytes = int_sqrt(lowmem_kbytes * 16)`` clamped to
  [128, 262144], where ``lowmem_kbytes`` is ``nr_free_buffer_pages()``: the pages of every zone up
  to ZONE_NORMAL *above its high watermark* (all of them the first time, when no watermark is set).
  A value the user wrote (``vm.min_free_kbytes``) is kept if it is larger.
* ``set_recommended_min_free_kbytes`` (mm/khugepaged.c), while THP is enabled: at least
  ``pageblock_nr_pages * nr_zones * (2 + MIGRATE_PCPTYPES**2)`` pages (``nr_zones``: populated
  zones up to ZONE_NORMAL), at most ``nr_free_buffer_pages() / 20``, raise ``min_free_kbytes``.
* ``__setup_per_zone_wmarks``: a zone's ``min`` is its share of ``min_free_kbytes`` by managed
  pages among the zones up to ZONE_NORMAL (ZONE_MOVABLE: ``clamp(managed / 1024, 32, 128)``);
  ``low = min + step`` and ``high = low + step``, ``step = max(share / 4, managed *
  watermark_scale_factor / 10000)``.
* ``setup_per_zone_lowmem_reserve``: ``lowmem_reserve[j]`` of zone ``i`` of a node is the managed
  pages of its zones ``i+1..j`` divided by ``lowmem_reserve_ratio[i]`` (0 when the ratio is 0 or
  the zone is empty): what an allocation that may use zone ``j`` must leave in zone ``i``.
* ``calculate_totalreserve_pages``: per zone, its largest ``lowmem_reserve`` plus its high
  watermark (at most its managed pages): what ``si_mem_available`` does not count as available.
* ``zone_batchsize``: ``rounddown_pow_of_two(b + b/2) - 1`` with ``b = min(managed >> 10, 256) / 4``,
  at least 1; ``zone_highsize``: the low watermark (or ``managed / percpu_pagelist_high_fraction``)
  split over the CPUs of the zone's node, at least ``4 * batch``.

>>> zone_batchsize(245348), zone_highsize(13860, 63, 1), zone_highsize(13860, 63, 2)
(63, 13860, 6930)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from labkit.model.bootparams import BootParams
from labkit.model.pages import PAGEBLOCK_ORDER, ZONE_INDEX

MIN_FREE_KBYTES_MIN = 128  # mm/page_alloc.c calculate_min_free_kbytes clamp
MIN_FREE_KBYTES_MAX = 262144
SWAP_CLUSTER_MAX = 32  # include/linux/swap.h (ZONE_MOVABLE's smallest min watermark)
MIGRATE_PCPTYPES = 3  # include/linux/mmzone.h: UNMOVABLE, MOVABLE, RECLAIMABLE
PAGEBLOCK_NR_PAGES = 1 << PAGEBLOCK_ORDER
ZONE_NORMAL = ZONE_INDEX["Normal"]
ZONE_MOVABLE = ZONE_INDEX["Movable"]
MAX_NR_ZONES = 5  # DMA, DMA32, NORMAL, MOVABLE, DEVICE on Debian's x86-64 kernel
THP_MIN_RAM_PAGES = (512 << 20) >> 12  # mm/huge_memory.c hugepage_init: THP off below 512 MiB


@dataclass
class Watermarks:
    min: int
    low: int
    high: int


@dataclass(frozen=True)
class ZoneInfo:
    """What the watermark code needs to know of a zone."""

    idx: int  # zone_idx(): 0 DMA, 1 DMA32, 2 Normal, 3 Movable
    node: int
    managed: int


def nr_free_buffer_pages(zones: list[ZoneInfo], marks: list[Watermarks] | None) -> int:
    """``nr_free_buffer_pages``: pages above the high watermark in zones up to ZONE_NORMAL."""
    total = 0
    for i, z in enumerate(zones):
        if z.idx <= ZONE_NORMAL:
            high = marks[i].high if marks is not None else 0
            total += max(0, z.managed - high)
    return total


def calculate_min_free_kbytes(zones: list[ZoneInfo], marks: list[Watermarks] | None) -> int:
    """``calculate_min_free_kbytes`` (before the user's value is considered)."""
    lowmem_kbytes = nr_free_buffer_pages(zones, marks) * 4
    return min(max(math.isqrt(lowmem_kbytes * 16), MIN_FREE_KBYTES_MIN), MIN_FREE_KBYTES_MAX)


def recommended_min_free_kbytes(zones: list[ZoneInfo], marks: list[Watermarks]) -> int:
    """mm/khugepaged.c ``set_recommended_min_free_kbytes``: what THP asks ``min_free_kbytes`` to be
    at least, in kB (capped at 5 % of ``nr_free_buffer_pages()``)."""
    nr_zones = sum(1 for z in zones if z.managed > 0 and z.idx <= ZONE_NORMAL)
    pages = PAGEBLOCK_NR_PAGES * nr_zones * 2
    pages += PAGEBLOCK_NR_PAGES * nr_zones * MIGRATE_PCPTYPES * MIGRATE_PCPTYPES
    pages = min(pages, nr_free_buffer_pages(zones, marks) // 20)
    return pages * 4


def setup_per_zone_wmarks(zones: list[ZoneInfo], min_free_kbytes: int,
                          watermark_scale_factor: int) -> list[Watermarks]:
    """``__setup_per_zone_wmarks`` (no watermark boost: labkit has no fragmentation events)."""
    pages_min = min_free_kbytes >> 2
    lowmem_pages = sum(z.managed for z in zones if z.idx != ZONE_MOVABLE)
    out = []
    for z in zones:
        share = pages_min * z.managed // lowmem_pages if lowmem_pages else 0
        if z.idx == ZONE_MOVABLE:
            zmin = min(max(z.managed // 1024, SWAP_CLUSTER_MAX), 128)
        else:
            zmin = share
        step = max(share >> 2, z.managed * watermark_scale_factor // 10000)
        out.append(Watermarks(zmin, zmin + step, zmin + 2 * step))
    return out


def setup_per_zone_lowmem_reserve(zones: list[ZoneInfo], ratio: tuple[int, ...]) -> np.ndarray:
    """``setup_per_zone_lowmem_reserve``: ``out[i, j]`` = zone i's ``lowmem_reserve[j]``
    (``/proc/zoneinfo``'s ``protection``), per node over its zone types."""
    out = np.zeros((len(zones), MAX_NR_ZONES), dtype=np.int64)
    for node in sorted({z.node for z in zones}):
        managed = np.zeros(MAX_NR_ZONES, dtype=np.int64)  # per zone type on this node
        for z in zones:
            if z.node == node:
                managed[z.idx] += z.managed
        for i, z in enumerate(zones):
            if z.node != node:
                continue
            r = ratio[z.idx]
            if not r or not z.managed:
                continue
            above = np.cumsum(managed[z.idx + 1:])
            out[i, z.idx + 1:] = above // r
    return out


def calculate_totalreserve_pages(zones: list[ZoneInfo], marks: list[Watermarks],
                                 reserve: np.ndarray) -> int:
    """``calculate_totalreserve_pages``."""
    total = 0
    for i, z in enumerate(zones):
        biggest = int(reserve[i, z.idx:].max()) if z.idx < MAX_NR_ZONES else 0
        total += min(biggest + marks[i].high, z.managed)
    return total


def zone_batchsize(managed: int) -> int:
    """``zone_batchsize`` with ``zone_set_pageset_high_and_batch``'s ``max(1, ...)``."""
    batch = min(managed >> 10, (1 << 20) // 4096) // 4
    batch = max(batch, 1)
    batch = (1 << ((batch + batch // 2).bit_length() - 1)) - 1
    return max(1, batch)


def zone_highsize(total_pages: int, batch: int, split_cpus: int) -> int:
    """``zone_highsize``: ``total_pages`` (the low watermark, or managed / fraction) over the CPUs."""
    return max(total_pages // max(split_cpus, 1), batch << 2)


def pcp_sizes(zones: list[ZoneInfo], marks: list[Watermarks], params: BootParams,
              cpus_of_node: dict[int, int]) -> list[tuple[int, int]]:
    """``zone_pcp_update`` for every zone: (high, batch) of its per-CPU lists."""
    out = []
    for z, m in zip(zones, marks, strict=True):
        batch = zone_batchsize(z.managed)
        fraction = params.percpu_pagelist_high_fraction
        total = z.managed // fraction if fraction else m.low
        split = cpus_of_node.get(z.node, 0) or params.nr_cpus
        out.append((zone_highsize(total, batch, split), batch))
    return out
