"""A kernel's zone setup: watermarks, lowmem_reserve and per-CPU list sizes, when Linux sets them.

The arithmetic is :mod:`labkit.model.watermarks`; this mixin of :class:`labkit.model.kernel.Kernel`
runs it at the moments mm/page_alloc.c and mm/khugepaged.c do: at boot ``init_per_zone_wmark_min``
(a postcore initcall, while the initramfs and ``__init`` are still reserved) and THP's
``hugepage_init`` (a subsys initcall); again whenever memory goes on- or offline
(``online_pages``, ``offline_pages``), and when ``vm.min_free_kbytes`` is written.
"""

from __future__ import annotations

from labkit.model import watermarks as wm
from labkit.model.pages import PageState
from labkit.model.watermarks import Watermarks


class ZoneSetup:
    """Mixed into :class:`labkit.model.kernel.Kernel` (``self.mem``, ``self.params``, ``self.pcp``...)."""

    # --- watermarks (mm/page_alloc.c, mm/khugepaged.c) ----------------------------------------
    def _zone_infos(self) -> list[wm.ZoneInfo]:
        managed = self.zone_managed()
        return [wm.ZoneInfo(z.idx, z.node, int(m)) for z, m in zip(self.mem.zones, managed, strict=True)]

    def boot_watermarks(self) -> None:
        """Boot: ``init_per_zone_wmark_min`` (postcore initcall: no watermark set yet, every
        managed page counts), then ``hugepage_init`` (subsys initcall)."""
        self.min_free_kbytes, self.khugepaged = 0, False
        self.watermarks = [Watermarks(0, 0, 0) for _ in self.mem.zones]
        self.init_per_zone_wmark_min()
        self.hugepage_init()

    def init_per_zone_wmark_min(self) -> None:
        """``init_per_zone_wmark_min``: at boot and whenever memory goes on- or offline."""
        zones = self._zone_infos()
        new = wm.calculate_min_free_kbytes(zones, self.watermarks if self.min_free_kbytes else None)
        if new > self.user_min_free_kbytes:
            self.min_free_kbytes = new
        else:
            self.log(f"min_free_kbytes is not updated to {new} because user defined value "
                     f"{self.user_min_free_kbytes} is preferred")
        self.setup_per_zone_wmarks()
        self.lowmem_reserve = wm.setup_per_zone_lowmem_reserve(zones, self.params.lowmem_reserve_ratio)
        self._totalreserve()
        if self.khugepaged:  # khugepaged_min_free_kbytes_update
            self.set_recommended_min_free_kbytes()

    def hugepage_init(self) -> None:
        """mm/huge_memory.c ``hugepage_init`` (a subsys_initcall): THP stays off below 512 MiB of
        RAM; otherwise khugepaged starts and raises min_free_kbytes."""
        if not self.params.thp_enabled or self.totalram_pages() < wm.THP_MIN_RAM_PAGES:
            return
        self.khugepaged = True
        self.set_recommended_min_free_kbytes()

    def set_recommended_min_free_kbytes(self) -> None:
        recommended = wm.recommended_min_free_kbytes(self._zone_infos(), self.watermarks)
        if recommended > self.min_free_kbytes:
            if self.user_min_free_kbytes >= 0:
                self.log(f"raising min_free_kbytes from {self.min_free_kbytes} to {recommended} "
                         "to help transparent hugepage allocations")
            self.min_free_kbytes = recommended
        self.setup_per_zone_wmarks()

    def setup_per_zone_wmarks(self) -> None:
        """``setup_per_zone_wmarks``: watermarks, then every zone's pcp high and batch."""
        zones = self._zone_infos()
        self.watermarks = wm.setup_per_zone_wmarks(zones, self.min_free_kbytes,
                                                   self.params.watermark_scale_factor)
        cpus = {}
        for cpu in range(self.params.nr_cpus):  # QEMU's default: CPU i on node i % nodes
            node = self.mem.nodes[cpu % len(self.mem.nodes)]
            cpus[node] = cpus.get(node, 0) + 1
        for zi, (high, batch) in enumerate(wm.pcp_sizes(zones, self.watermarks, self.params, cpus)):
            for pcp in self.pcp[zi]:
                pcp.high, pcp.batch = high, batch
        self._totalreserve()

    def _totalreserve(self) -> None:
        self.totalreserve_pages = wm.calculate_totalreserve_pages(
            self._zone_infos(), self.watermarks, self.lowmem_reserve)

    def set_min_free_kbytes(self, kbytes: int) -> None:
        """The ``vm.min_free_kbytes`` sysctl (``min_free_kbytes_sysctl_handler``)."""
        if not isinstance(kbytes, int) or isinstance(kbytes, bool) or kbytes < 0:
            raise ValueError(f"vm.min_free_kbytes must be an int >= 0 (kB), got {kbytes!r}")
        self.user_min_free_kbytes = self.min_free_kbytes = kbytes
        self.setup_per_zone_wmarks()

    def recompute_watermarks(self) -> None:
        """Memory went on- or offline (``online_pages`` / ``offline_pages``)."""
        self.init_per_zone_wmark_min()

    def zone_phys_span(self, zone_index: int) -> tuple[int, int]:
        """[zone_start_pfn, zone_end_pfn) in physical frames, as /proc/zoneinfo counts them: a boot
        zone spans its node's RAM within the zone's limits, holes included."""
        a, b = self.mem.zone_span(zone_index)
        if b <= a:
            return 0, 0
        state = self.mem.state
        absent = int(PageState.ABSENT)
        while a < b and state[a] == absent:  # the first frames of DMA are no RAM (e820)
            a += 1
        start, end = self.phys_pfn(a), self.phys_pfn(b - 1) + 1
        zone = self.mem.zones[zone_index]
        if zone_index < self.mem.n_boot_zones and zone.name == "DMA32":
            node_zones = [z for z in self.mem.zones[:self.mem.n_boot_zones] if z.node == zone.node]
            if any(z.name == "Normal" for z in node_zones):  # the node goes on above 4 GiB
                end = (4 << 30) >> 12
        return start, end

