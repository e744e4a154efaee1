"""Where a q35 guest's RAM lies, and the zones Linux makes of it (x86-64).

QEMU's q35 machine (hw/i386/pc_q35.c ``pc_q35_init``) puts the first ``below_4g`` bytes of RAM at
physical address 0 and the rest from 4 GiB up: all RAM stays below 4 GiB when it is smaller than
0xB0000000 (2.75 GiB); otherwise 2 GiB stay below and the PCI hole takes the space up to 4 GiB.
Linux (arch/x86/mm/init.c ``zone_sizes_init``) makes ZONE_DMA of the first 16 MiB, ZONE_DMA32 of
the rest below 4 GiB and ZONE_NORMAL of what lies above; hot-plugged memory joins ZONE_NORMAL or
ZONE_MOVABLE (mm/memory_hotplug.c).

labkit's page index is the guest's RAM without the PCI hole: index ``i`` is physical frame ``i``
below ``below_4g`` and ``i + (4 GiB - below_4g) / 4 KiB`` above, so a 6 GiB guest is one array of
6 GiB. :func:`phys_pfn` gives the real frame number back (``/proc/zoneinfo``'s ``start_pfn``).
The first megabyte keeps its real shape: frame 0 and the legacy hole 0x9f000-0xfffff (97 frames,
the BIOS area QEMU's e820 does not report as RAM) are absent pages of ZONE_DMA.

>>> layout = q35_layout(4 << 30)
>>> layout.below_4g >> 20, layout.above_4g >> 20
(2048, 2048)
>>> [(z.name, z.start, z.end) for z in zones_for(layout, numa_nodes=1)]
[('DMA', 0, 4096), ('DMA32', 4096, 524288), ('Normal', 524288, 1048576)]
>>> probe_memory_block_size(layout) >> 20
128
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.model.pages import MEMORY_BLOCK_SIZE, Zone
from labkit.units import GiB, MiB, PAGE_SHIFT, PAGE_SIZE

Q35_LOWMEM_LIMIT = 0xB0000000  # hw/i386/pc_q35.c: RAM below this stays entirely below 4 GiB
Q35_LOWMEM_SPLIT = 0x80000000  # ... otherwise 2 GiB stay below and the rest goes above 4 GiB
ZONE_DMA_END = 16 * MiB  # arch/x86/include/asm/dma.h MAX_DMA_PFN
FOUR_GIB = 4 * GiB
LEGACY_HOLE = (0x9F, 0x100)  # frames 0x9f000-0xfffff: QEMU's e820 ends usable RAM at 0x9fc00
# arch/x86/mm/init_64.c
MEM_SIZE_FOR_LARGE_BLOCK = 64 * GiB
MAX_BLOCK_SIZE = 2 * GiB
ZONE_NAMES = ("DMA", "DMA32", "Normal", "Movable")


@dataclass(frozen=True)
class Q35Layout:
    """RAM placement of a q35 guest with ``memory`` bytes of boot RAM."""

    memory: int
    below_4g: int
    above_4g: int

    @property
    def pages(self) -> int:
        return self.memory // PAGE_SIZE

    @property
    def below_4g_pages(self) -> int:
        return self.below_4g // PAGE_SIZE

    @property
    def boot_mem_end(self) -> int:
        """The end of boot RAM in the physical address space (``max_pfn << PAGE_SHIFT``)."""
        return FOUR_GIB + self.above_4g if self.above_4g else self.below_4g


def q35_layout(memory: int) -> Q35Layout:
    """``pc_q35_init``'s split of ``memory`` bytes below and above 4 GiB."""
    below = memory if memory < Q35_LOWMEM_LIMIT else Q35_LOWMEM_SPLIT
    return Q35Layout(memory, below, memory - below)


def phys_pfn(layout: Q35Layout, index: int) -> int:
    """The physical frame number of page ``index`` of boot RAM."""
    if index < layout.below_4g_pages:
        return index
    return index + (FOUR_GIB - layout.below_4g) // PAGE_SIZE


def node_ranges(pages: int, numa_nodes: int, block_pages: int) -> list[tuple[int, int]]:
    """Each NUMA node's pages [start, end): equal shares in whole memory blocks, the rest on the
    last node (as QEMU's ``-numa node,memdev=`` backends are given by the live backend)."""
    per_node = pages // numa_nodes // block_pages * block_pages
    out, start = [], 0
    for node in range(numa_nodes):
        end = pages if node == numa_nodes - 1 else start + per_node
        out.append((start, end))
        start = end
    return out


def zones_for(layout: Q35Layout, numa_nodes: int = 1,
              block_pages: int = MEMORY_BLOCK_SIZE // PAGE_SIZE,
              node_sizes: tuple[int, ...] | None = None) -> list[Zone]:
    """The boot zones of every node: its share of DMA (first 16 MiB), DMA32 (the rest below 4 GiB)
    and Normal (above 4 GiB); empty pieces are left out. ``node_sizes`` (bytes per node, as
    ``-numa node,memdev=`` gives them) replaces the equal shares of ``numa_nodes``."""
    bounds = {"DMA": (0, ZONE_DMA_END // PAGE_SIZE),
              "DMA32": (ZONE_DMA_END // PAGE_SIZE, layout.below_4g_pages),
              "Normal": (layout.below_4g_pages, layout.pages)}
    if node_sizes:
        ends = np.cumsum([size // PAGE_SIZE for size in node_sizes]).tolist()
        ranges = list(zip([0] + ends[:-1], ends, strict=True))
    else:
        ranges = node_ranges(layout.pages, numa_nodes, block_pages)
    zones = []
    for node, (a, b) in enumerate(ranges):
        for name, (lo, hi) in bounds.items():
            start, end = max(a, lo), min(b, hi)
            if start < end:
                zones.append(Zone(name, node, start, end))
    return zones


def probe_memory_block_size(layout: Q35Layout, hypervisor: bool = True) -> int:
    """arch/x86/mm/init_64.c ``probe_memory_block_size``: 128 MiB below 64 GiB of boot memory;
    above, bare metal takes 2 GiB and a VM the largest power of two up to 2 GiB that divides the
    end of boot memory (so hot-plugged memory stays aligned).

    >>> probe_memory_block_size(q35_layout(64 << 30)) >> 20   # ends at 66 GiB
    2048
    >>> probe_memory_block_size(q35_layout(65 << 30)) >> 20   # ends at 67 GiB
    1024
    """
    end = layout.boot_mem_end
    if end < MEM_SIZE_FOR_LARGE_BLOCK:
        return MEMORY_BLOCK_SIZE
    if not hypervisor:
        return MAX_BLOCK_SIZE
    size = MAX_BLOCK_SIZE
    while size > MEMORY_BLOCK_SIZE and end % size:
        size >>= 1
    return size


assert PAGE_SHIFT == 12
