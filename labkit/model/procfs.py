"""/proc/meminfo and /proc/zoneinfo of the model's guest, computed as the kernel computes them.

* ``meminfo`` (fs/proc/meminfo.c, mm/page_alloc.c ``si_mem_available``): MemFree is
  ``NR_FREE_PAGES``, so pages on per-CPU lists are not in it; MemAvailable is MemFree less
  ``totalreserve_pages``, plus the page cache less ``min(cache / 2, sum of low watermarks)``, plus
  reclaimable slab less the same cap.
* ``zoneinfo`` (mm/vmstat.c ``zoneinfo_show_print``): per node and zone the fields the lessons use:
  free, min, low, high, spanned, present, managed, protection, and per CPU the pcp count, high and
  batch; ``start_pfn`` and ``spanned`` are in real physical frames (the PCI hole included).

>>> import labkit
>>> with labkit.open(memory="1G", seed=0, model={"boot": "minimal"}) as vm:
...     zones = vm.zoneinfo()
>>> [(z["zone"], z["min"], z["low"], z["high"]) for z in zones]
[('DMA', 175, 218, 261), ('DMA32', 11088, 13860, 16632)]
"""

from __future__ import annotations

from labkit.model.pages import PageState

KB = 4  # kB per page


def meminfo(kernel) -> dict[str, int]:
    """/proc/meminfo fields in kB."""
    t = kernel.mem.totals()
    free = int(t[PageState.FREE])
    file_pages = int(t[PageState.FILE_CLEAN] + t[PageState.FILE_DIRTY])
    wmark_low = sum(w.low for w in kernel.watermarks)
    pagecache = file_pages - min(file_pages // 2, wmark_low)
    kernel_pages = int(t[PageState.KERNEL])
    slab = kernel_pages - kernel.page_table_pages  # PageTables is its own line, not Slab
    reclaimable = min(kernel.slab_reclaimable, slab)
    available = free - kernel.totalreserve_pages + pagecache
    available += reclaimable - min(reclaimable // 2, wmark_low)
    cached = file_pages + int(t[PageState.SHMEM])
    return {
        "MemTotal": kernel.totalram_pages() * KB,
        "MemFree": free * KB,
        "MemAvailable": max(0, available) * KB,
        "Buffers": 0,
        "Cached": cached * KB,
        "SwapCached": 0,
        "Active(file)": file_pages // 2 * KB,
        "Inactive(file)": (file_pages - file_pages // 2) * KB,
        "SwapTotal": 0,
        "SwapFree": 0,
        "Dirty": int(t[PageState.FILE_DIRTY]) * KB,
        "Writeback": 0,
        "AnonPages": int(t[PageState.ANON]) * KB,
        "Shmem": int(t[PageState.SHMEM]) * KB,
        "Slab": slab * KB,
        "SReclaimable": reclaimable * KB,
        "SUnreclaim": (slab - reclaimable) * KB,
        "PageTables": kernel.page_table_pages * KB,
    }


def zoneinfo(kernel) -> list[dict]:
    """One dict per populated zone (``present`` > 0), node by node, zones in ``zone_idx`` order."""
    mem = kernel.mem
    managed = kernel.zone_managed()
    rows = []
    for zi, zone in enumerate(mem.zones):
        counts = mem.counts[zi]
        present = int(counts.sum() - counts[PageState.ABSENT])
        if present <= 0:
            continue
        start, end = kernel.zone_phys_span(zi)
        w = kernel.watermarks[zi]
        rows.append({
            "node": zone.node, "zone": zone.name, "start_pfn": start, "spanned": end - start,
            "present": present, "managed": int(managed[zi]), "free": int(counts[PageState.FREE]),
            "min": w.min, "low": w.low, "high": w.high,
            "protection": [int(x) for x in kernel.lowmem_reserve[zi]],
            "pcp": [{"cpu": cpu, "count": p.count, "high": p.high, "batch": p.batch}
                    for cpu, p in enumerate(kernel.pcp[zi])],
        })
    rows.sort(key=lambda r: (r["node"], ("DMA", "DMA32", "Normal", "Movable").index(r["zone"])))
    return rows


def format_zoneinfo(rows: list[dict]) -> str:
    """The rows in /proc/zoneinfo's layout (the fields :func:`zoneinfo` keeps)."""
    lines = []
    for r in rows:
        lines += [f"Node {r['node']}, zone {r['zone']:>8s}",
                  f"  pages free     {r['free']}",
                  f"        min      {r['min']}",
                  f"        low      {r['low']}",
                  f"        high     {r['high']}",
                  f"        spanned  {r['spanned']}",
                  f"        present  {r['present']}",
                  f"        managed  {r['managed']}",
                  f"        protection: ({', '.join(map(str, r['protection']))})",
                  "  pagesets"]
        for p in r["pcp"]:
            lines += [f"    cpu: {p['cpu']}", f"              count: {p['count']}",
                      f"              high:  {p['high']}", f"              batch: {p['batch']}"]
        lines.append(f"  start_pfn:           {r['start_pfn']}")
    return "\n".join(lines)


def parse_zoneinfo(text: str) -> list[dict]:
    """The live guest's /proc/zoneinfo as :func:`zoneinfo` rows (populated zones only).

    >>> text = ("Node 0, zone      DMA\\n  pages free     3808\\n        min      175\\n"
    ...         "        low      218\\n        high     261\\n        spanned  4095\\n"
    ...         "        present  3998\\n        managed  3840\\n"
    ...         "        protection: (0, 946, 946, 946, 946)\\n  pagesets\\n    cpu: 0\\n"
    ...         "              count: 0\\n              high:  218\\n              batch: 1\\n"
    ...         "  start_pfn:           1\\n")
    >>> row = parse_zoneinfo(text)[0]
    >>> row["zone"], row["low"], row["protection"][1], row["pcp"][0]["high"]
    ('DMA', 218, 946, 218)
    """
    rows: list[dict] = []
    row: dict | None = None
    cpu: dict | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "Node" and "zone" in parts:
            row = {"node": int(parts[1].rstrip(",")), "zone": parts[-1], "pcp": []}
            rows.append(row)
            cpu = None
            continue
        if row is None:
            continue
        if parts[:2] == ["pages", "free"]:
            row["free"] = int(parts[2])
        elif parts[0] in ("min", "low", "high", "spanned", "present", "managed") and len(parts) == 2 \
                and cpu is None:
            row[parts[0]] = int(parts[1])
        elif parts[0] == "protection:":
            row["protection"] = [int(x) for x in line.split("(", 1)[1].rstrip(")").split(",")]
        elif parts[0] == "cpu:":
            cpu = {"cpu": int(parts[1])}
            row["pcp"].append(cpu)
        elif parts[0] in ("count:", "high:", "batch:") and cpu is not None:
            cpu[parts[0][:-1]] = int(parts[1])
        elif parts[0] == "start_pfn:":
            row["start_pfn"] = int(parts[1])
            cpu = None
    return [r for r in rows if r.get("present", 0) > 0]
