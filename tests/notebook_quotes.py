"""What the notebooks' "What you just saw" notes say, held against what the notebooks measure.

Every number in a note is either a **quote** of the notebook's own run (a phrase, an expression over
the metrics the notebook writes to ``out_json``, the value the phrase says and a tolerance: checked
by tests/test_notebooks.py when the notebook runs at its default parameters), or a **fact** (a
phrase whose number comes from the mechanism or from the notebook's parameters, with its source).
:func:`unregistered` finds a number a note quotes that neither covers: a note cannot say a number
nobody checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB, GiB = float(1 << 20), float(1 << 30)


@dataclass(frozen=True)
class Quote:
    """``phrase`` says ``value`` (within ``tol``) of ``expression`` over the notebook's metrics."""

    phrase: str
    expression: str
    value: float
    tol: float


@dataclass(frozen=True)
class Fact:
    """``phrase``'s numbers come from ``source`` (a section of docs/, a parameter of the notebook)."""

    phrase: str
    source: str


QUOTES: dict[str, list[Quote | Fact]] = {
    "00_start.ipynb": [
        Fact("the balloon holds 1 GiB", "the notebook inflates to 3/4 of its 4 GiB"),
        Quote("host RSS fell by only 66 MiB", "host_returned_bytes / MiB", 66, 1),
        Quote("host RSS grew by 1.5 GiB", "job_idle_backed_bytes / GiB", 1.5, 0.05),
        Quote("the second 1 GiB of balloon gave the host back 1018 MiB", "deeper_returned_bytes / MiB",
              1018, 1),
        Fact("the second 1 GiB of balloon", "the notebook inflates by another 1 GiB"),
        Quote("where the first gave 66 MiB", "host_returned_bytes / MiB", 66, 1),
    ],
    "01_balloon.ipynb": [
        Quote("1024 requests, and only 7", "inflate_1gib_requests_count", 1024, 0),
        Quote("1024 requests, and only 7", "inflate_1gib_events_count", 7, 0),
        Fact("jumps of about 200 MiB", "§1.7: one event a second; 5 ms a 1 MiB request is 200 MiB a second"),
        Quote("136 OOM events", "oom_events_count", 136, 0),
        Fact("exactly 256 pages", "§1.4: VIRTIO_BALLOON_OOM_NR_PAGES"),
        Quote("256 pages, 34816 pages in all", "oom_deflated_pages_count", 34816, 0),
        Quote("256 pages, 34816 pages in all", "oom_deflated_pages_count / oom_events_count", 256, 0),
        Fact("it had 32 MiB of the 128 MiB", "the notebook inflates to guest_demand + 32 MiB and the "
             "application allocates 128 MiB"),
        Quote("10134 pages (40 MiB) were still there", "oom_pcp_pages_count", 10134, 0),
        Quote("10134 pages (40 MiB) were still there", "oom_pcp_pages_count / 256", 40, 0.5),
        Fact("the same 128 MiB allocation", "the notebook's application allocates 128 MiB"),
        Quote("cost 2 OOM kills", "oom_kills_plain_count", 2, 0),
        Fact("Asked for 30 % and 40 % of RAM", "SizingParams' targets"),
        Quote("stopped at 1839 MiB both times", "sizing_plain_30_actual_bytes / MiB", 1839, 1),
        Quote("stopped at 1839 MiB both times", "sizing_plain_40_actual_bytes / MiB", 1839, 1),
        Quote("after 10 \"Out of puff\"", "sizing_plain_30_out_of_puff_count", 10, 0),
        Fact("each followed by a 200 ms sleep", "§1.2: the driver's msleep(200) after a failed fill"),
        Quote("(1 OOM kill)", "sizing_plain_30_oom_kills_count", 1, 0),
        Quote("deflated 464 MiB instead", "sizing_doo_30_oom_deflated_bytes / MiB", 464, 1),
        Fact("with a 1 GiB balloon already inflated", "the notebook inflates 1 GiB"),
        Quote("still said 3.8 GiB", "stats_stale_total_bytes / GiB", 3.8, 0.05),
        Quote("MemTotal (2.8 GiB)", "stats_total_bytes / GiB", 2.8, 0.05),
        Fact("below the 4 GiB of", "the notebook's memory parameter (QEMU's -m)"),
        Fact("a 2 GiB balloon", "the notebook inflates to half its 4 GiB"),
        Quote("it *rose* by 988 MiB", "-discard_off_returned_bytes / MiB", 988, 1),
    ],
    "02_free_page_hinting.ipynb": [
        Quote("its downtime is longer (305 ms vs 61 ms)", "idle_hinting_downtime_ms", 305, 0.5),
        Quote("its downtime is longer (305 ms vs 61 ms)", "idle_plain_downtime_ms", 61, 0.5),
        Quote("hinting is 4.3x faster in total", "idle_plain_total_time_ms / idle_hinting_total_time_ms",
              4.3, 0.05),
        Fact("here 2 s of an unlimited link", "hinting_anchor: Wang's downtime limit"),
        Fact("the whole 8 GiB", "compare_memory"),
        Fact("all 2 million pages", "8 GiB / 4 KiB"),
        Fact("so pass 1 reads", "the first pass, by name"),
        Quote("the guest stops for 61 ms", "idle_plain_downtime_ms", 61, 0.5),
        Fact("free 4 MiB blocks", "§2.2: hints are order-10 blocks"),
        Quote("the ~470 MiB hinting cannot skip", "idle_hinting_sent_bytes / MiB", 470, 5),
        Quote("(the 120973 normal pages", "idle_hinting_normal_pages_count", 120973, 0),
        Quote("sends those pages during the downtime: 305 ms", "idle_hinting_downtime_ms", 305, 0.5),
        Fact("well inside the 2 s the setup allows", "hinting_anchor: Wang's downtime limit"),
        Fact("QEMU's default 300 ms limit", "§6.1: downtime-limit"),
        Fact("fits in 300 ms of link", "§6.1: downtime-limit"),
        Fact("as Wang's 2018 guests were", "hinting_anchor: Wang's v34 series (2018), init_on_alloc=0"),
        Fact("Try it 4 asks", "the notebook's fourth exercise"),
        Quote("the host got back 0 B", "overcommit_hinting_returned_bytes", 0, 0),
        Quote("swapped out 400 MiB", "overcommit_hinting_swap_out_bytes / MiB", 400, 1),
        Quote("swapped out 400 MiB", "overcommit_none_swap_out_bytes / MiB", 400, 1),
        Quote("reporting gave back 584 MiB", "overcommit_reporting_returned_bytes / MiB", 584, 1),
    ],
    "03_free_page_reporting.ipynb": [
        Quote("the first pass ran 2.0 s after the free", "first_pass_after_ms / 1000", 2.0, 0.05),
        Quote("and reported 748 MiB", "first_pass_reported_bytes / MiB", 748, 1),
        Quote("from the third pass on each reports 512 MiB", "third_pass_reported_bytes / MiB", 512, 0),
        Fact("two zones with order-10 blocks", "§10.1: DMA is 16 MiB; DMA32 and Normal hold the rest"),
        Fact("the RAM q35 puts below 4 GiB) and Normal (the rest, above 4 GiB)", "§10.1: q35's zones"),
        Quote("With 1428 free order-10 blocks in Normal", "first_pass_normal_order10_blocks_count", 1428, 0),
        Fact("ceil(1428 / 512) = 3", "§3.3: budget = ceil(nr_free / (PAGE_REPORTING_CAPACITY x 16))"),
        Fact("budget + 1 = 4 batches of 32 blocks of 4 MiB", "§3.3"),
        Fact("512 MiB, then stops", "§3.3: 4 x 32 x 4 MiB"),
        Fact("another pass 2 s later", "§3.2: PAGE_REPORTING_DELAY"),
        Quote("DMA32's list of 477 blocks", "first_pass_dma32_order10_blocks_count", 477, 0),
        Fact("ceil(477 / 512) = 1", "§3.3: budget = ceil(nr_free / (PAGE_REPORTING_CAPACITY x 16))"),
        Quote("host RSS fell in 12 steps", "staircase_steps_count", 12, 0),
        Quote("settled 24.5 s after the job exited", "staircase_settled_s", 24.5, 0.25),
        Quote("given the host back 5.9 GiB", "staircase_returned_bytes / GiB", 5.9, 0.05),
        Fact("of the 6 GiB the job wrote", "the job parameter"),
        Fact("2 s at a time", "§3.2: PAGE_REPORTING_DELAY"),
        Quote("0 reported pages reused", "head_first_reused_count", 0, 0),
        Fact("the 256 MiB came from the 512 MiB just freed", "the notebook's allocations"),
        Fact("allocating 1 GiB", "the notebook's allocation"),
        Quote("took 970.8 MiB of reported blocks", "refaulted_count * 4096 / MiB", 970.8, 0.1),
        Quote("248534 zero-filled pages", "refaulted_count", 248534, 0),
        Quote("497 ms of faults", "refault_ms", 497, 1),
        Quote("host RSS up by the same 970.8 MiB", "refaulted_count * 4096 / MiB", 970.8, 0.1),
        Quote("nothing is reported (0 B)", "gate_at_reported_bytes", 0, 0),
        Fact("8 MiB above it", "the notebook fills to the gate + 8 MiB"),
        Quote("the pass reports 80 MiB", "gate_above_reported_bytes / MiB", 80, 0.5),
        Fact("than the 8 MiB above the gate", "the notebook fills to the gate + 8 MiB"),
        Quote("free went down to 46 MiB", "gate_above_lowest_free_bytes / MiB", 46, 1),
        Quote("min watermark of 43 MiB", "gate_min_watermark_bytes / MiB", 43, 1),
        Fact("With `page_poison=1` and `page-poison=on`", "the case's parameters"),
        Quote("guest sent 14 reports and the host got 0 B back", "silent_poison_on_reports_count", 14, 0),
        Quote("guest sent 14 reports and the host got 0 B back", "silent_poison_on_returned_bytes", 0, 0),
        Quote("With discard disabled: 14 reports, 0 B.", "silent_no_discard_reports_count", 14, 0),
        Quote("With discard disabled: 14 reports, 0 B.", "silent_no_discard_returned_bytes", 0, 0),
        Quote("(0 reports)", "silent_poison_off_reports_count", 0, 0),
        Quote("979 MiB of the 1 GiB it freed", "silent_plain_returned_bytes / MiB", 979, 1),
    ],
    "04_virtio_pmem.ipynb": [
        Fact("Four guests read the same 512 MiB", "n_vms and boot_read"),
        Quote("the host holds 5 copies", "shared_blk_writeback_copies_count", 5, 0),
        Quote("own): 2879 MiB of host memory", "shared_blk_writeback_host_used_bytes / MiB", 2879, 1),
        Quote("`cache=none` 4 copies (2367 MiB)", "shared_blk_none_copies_count", 4, 0),
        Quote("`cache=none` 4 copies (2367 MiB)", "shared_blk_none_host_used_bytes / MiB", 2367, 1),
        Quote("With virtio-pmem 1 copy", "shared_pmem_copies_count", 1, 0),
        Quote("1266 MiB in all", "shared_pmem_host_used_bytes / MiB", 1266, 1),
        Quote("188 MiB each against", "shared_pmem_guest_ram_bytes / MiB", 188, 1),
        Quote("80 MiB (besides the image", "shared_blk_none_guest_ram_bytes / MiB", 80, 1),
        Fact("a 64 MiB swiotlb bounce buffer", "§10.7: IO_TLB_DEFAULT_SIZE"),
        Fact("lies above 4 GiB", "x86-64: the device region lies above 4 GiB; §10.7"),
        Fact("`image_size / 64` each", "§4.2: 64 bytes of struct page per 4 KiB page"),
        Quote("128 MiB for the four", "shared_pmem_memmap_bytes / MiB", 128, 0),
        Quote("write 64 MiB and took 215 ms", "flush_64m_ms", 215, 1),
        Fact("write 64 MiB", "the notebook writes 64 MiB"),
        Fact("300 threads flushing at once", "the notebook's requests"),
        Quote("never had more than 128 requests", "max_in_flight_count", 128, 0),
        Fact("the queue has 128 entries", "§4.2: the driver's single virtqueue"),
        Quote("returned -5 (EIO); the second returned 0", "fsync_error_ret_count", -5, 0),
        Fact("the second returned 0", "the notebook prints the second flush's ret"),
        Quote("every transport loses the 64 MiB to a crash 1 s later",
              "lost_blk_writeback_noflush_1s_bytes / MiB + lost_blk_none_noflush_1s_bytes / MiB"
              " + lost_pmem_noflush_1s_bytes / MiB", 192, 0),
        Quote("At 40 s virtio-blk with `cache=writeback` still loses all 64 MiB",
              "lost_blk_writeback_noflush_40s_bytes / MiB", 64, 0),
        Quote("virtio-pmem and `cache=none` lose nothing",
              "lost_pmem_noflush_40s_bytes + lost_blk_none_noflush_40s_bytes", 0, 0),
    ],
    "05_virtio_mem.ipynb": [
        Quote("2 PLUG requests for 200 MiB", "plug_200mib_requests_count", 2, 0),
        Fact("64 subblocks (128 MiB) and then 36 (72 MiB)", "§5.4: one request per memory block"),
        Quote("6 MiB less took 3 UNPLUG requests", "unplug_6mib_requests_count", 3, 0),
        Fact("one 2 MiB subblock each", "§5.5"),
        Fact("asked for 0", "the notebook's requested-size"),
        Quote("(0 B left plugged)", "unplug_left_online_movable_bytes", 0, 0),
        Fact("within 301 %", "§5.7: memory_hotplug.auto_movable_ratio's default"),
        Quote("kept 64 MiB plugged, all of the slab", "unplug_left_online_kernel_bytes / MiB", 64, 0),
        Fact("returned -16 (-EBUSY)", "§5.5: alloc_contig_range fails with -EBUSY"),
        Fact("in 20 minutes", "the notebook watches 240 x 5 s"),
        Quote("failed 6 times", "len_retry_delays_s", 6, 0),
        Quote("50, 100, 200, 300, 300 and 300 s", "retry_delays_s[0] + retry_delays_s[1] + retry_delays_s[2]"
              " + retry_delays_s[3] + retry_delays_s[4] + retry_delays_s[5]", 1250, 0),
        Quote("50, 100, 200, 300, 300 and 300 s", "retry_delays_s[2]", 200, 0),
        Fact("doubling from 50 s and capped at 300 s", "§5.6"),
        Quote("(135 ms against 1025 ms to shrink by 2 GiB)", "resize_virtio_mem_movable_shrink_ms", 135, 1),
        Quote("(135 ms against 1025 ms to shrink by 2 GiB)", "resize_balloon_shrink_ms", 1025, 1),
        Fact("to shrink by 2 GiB", "device_size"),
    ],
    "06_overcommit.ipynb": [
        Quote("**none** swapped out 388 MiB", "none_swap_out_bytes / MiB", 388, 1),
        Quote("returns memory (295 MiB)", "static_returned_bytes / MiB", 295, 1),
        Quote("(45 OOM kills)", "static_oom_kills", 45, 0),
        Quote("avoids swap and returns 427 MiB", "mom_returned_bytes / MiB", 427, 1),
        Quote("avoids swap and returns 427 MiB", "mom_swap_out_bytes", 0, 0),
        Quote("(3 OOM kills)", "mom_oom_kills", 3, 0),
        Quote("584 MiB, and no swap at all", "reporting_returned_bytes / MiB", 584, 1),
        Quote("584 MiB, and no swap at all", "reporting_swap_out_bytes", 0, 0),
        Fact("(< 20 % free), 5 % of a guest per 10 s", "MoM's policy: labkit.scenarios.mom"),
        Quote("MoM alone changed the balloons 46 times", "mom_balloon_changes_count", 46, 0),
        Quote("with reporting beside it, 14 times", "reporting_mom_balloon_changes_count", 14, 0),
        Fact("MoM's 20 % line", "MoM's policy: labkit.scenarios.mom"),
        Quote("changed no balloon at all (0 changes)", "roomy_mom_balloon_changes_count", 0, 0),
        Quote("reporting cost 0.03 % of the workload's own time", "reporting_overhead_percent", 0.03, 0.005),
        Fact("the talk's \"1-2 %\"", "the talk"),
        Quote("0 extra zero-fill faults", "reporting_extra_zero_fill_count", 0, 0),
        Quote("only 1 ms of report requests", "reporting_report_ms", 1, 0.5),
        Fact("the 2 s delay", "§3.2: PAGE_REPORTING_DELAY"),
        Quote("the host swapped out 1430 MiB", "trace_none_swap_out_bytes / MiB", 1430, 1),
        Quote("Reporting alone cut that to 249 MiB", "trace_reporting_swap_out_bytes / MiB", 249, 1),
        Quote("249 MiB (0 OOM kills)", "trace_reporting_oom_kills_count", 0, 0),
        Fact("the low watermark plus 64 MiB", "§3.3: low watermark + (32 << page_reporting_order) pages"),
        Fact("the low watermark of a 1 GiB guest is about 54 MiB",
             "§10.2: min_free_kbytes 45056 kB with two zones, low = min + min/4"),
        Quote("(4205 MiB against 3088 MiB)", "trace_reporting_mom_returned_bytes / MiB", 4205, 1),
        Quote("(4205 MiB against 3088 MiB)", "trace_reporting_returned_bytes / MiB", 3088, 1),
        Quote("cost 42 OOM kills", "trace_reporting_mom_oom_kills_count", 42, 0),
        Fact("played 72 times faster", "trace_speed"),
        Fact("within one 10 s evaluation", "MoM's policy"),
        Fact("by only 5 % per evaluation", "MoM's policy"),
    ],
    "07_live_qemu.ipynb": [
        Fact("1 GiB guest", "the demo"),
        Quote("MemFree after the deflate ends tens of MiB lower", "deflate_memfree_short_live_mib", 40, 30),
        Quote("35 MiB on the real guest and 40 MiB in the model", "deflate_memfree_short_live_mib", 35, 1),
        Quote("35 MiB on the real guest and 40 MiB in the model", "deflate_memfree_short_model_mib", 40, 1),
        Quote("falls by only 9 MiB on the real guest and 12 MiB in the model", "balloon_rss_drop_live_mib",
              9, 1),
        Quote("falls by only 9 MiB on the real guest and 12 MiB in the model", "balloon_rss_drop_model_mib",
              12, 1),
        Fact("not by the 256 MiB ballooned", "the demo inflates from 1024 to 768 MiB"),
        Quote("the real guest asked for 279 MiB and gave back 38 MiB", "oom_alloc_asked_mib", 279, 0),
        Quote("the real guest asked for 279 MiB and gave back 38 MiB", "oom_deflate_mib", 38, 0.5),
        Quote("the model asked for 281 MiB and gave back 40 MiB", "model_oom_alloc_asked_mib", 281, 0),
        Quote("the model asked for 281 MiB and gave back 40 MiB", "model_oom_deflate_mib", 40, 0.5),
        Fact("Each asks for 32 MiB more than its own MemAvailable",
             "the demo: labkit/backends/qemu/demos.py _oom"),
        Fact("gives back those 32 MiB", "the demo: labkit/backends/qemu/demos.py _oom"),
        Fact("1 MiB per OOM event", "§1.4: VIRTIO_BALLOON_OOM_NR_PAGES"),
        Fact("the notifier's 256 pages per event", "§1.4"),
        Quote("Both give the 256 MiB back", "reporting_given_back_mib", 256, 3),
        Quote("it back 2.5 s later than the model", "-reporting_live_earlier_s", 2.5, 0.05),
        Fact("allocating and freeing 256 MiB", "the demo's job"),
        Quote("real guest takes 1.9 s", "reporting_live_after_free_s", 1.9, 0.05),
        Quote("where the model takes 2.5 s", "reporting_model_after_free_s", 2.5, 0.05),
        Fact("its 2 s reporting delay", "§3.2: PAGE_REPORTING_DELAY"),
        Fact("the next 0.5 s sample", "the recorder's sampling"),
        Fact("sampled every 0.5 s", "the recorder's sampling"),
        Fact("real guest's 2 s reporting delay", "§3.2"),
        Fact("freeing the 256 MiB", "the demo's job"),
        Fact("(2 MiB)", "§3.1: pageblock_order on x86-64"),
        Quote("keep 2 MiB plugged", "virtio_mem_kernel_left_plugged_mib", 2, 0.5),
        Quote("keep 2 MiB plugged", "virtio_mem_kernel_model_left_plugged_mib", 2, 0.5),
        Quote("ends about 3 MiB above where it started", "virtio_mem_kernel_live_rss_up_mib", 3, 0.5),
        Quote("ends about 3 MiB above where it started", "virtio_mem_kernel_model_rss_up_mib", 3, 0.5),
        Fact("lies above 4 GiB", "x86-64: the device's region above 4 GiB"),
        Quote("the guest 64.75 MiB of MemTotal", "virtio_mem_boot_memtotal_cost_mib", 64.75, 0),
        Quote("the guest 64.75 MiB of MemTotal", "virtio_mem_boot_memtotal_cost_model_mib", 64.75, 0),
        Fact("the 64 MiB swiotlb bounce buffer", "§10.7: IO_TLB_DEFAULT_SIZE"),
        Fact("its 24 bytes of metadata per 2 KiB slot", "kernel/dma/swiotlb.c: sizeof(struct io_tlb_slot), "
             "IO_TLB_SHIFT (labkit/model/reservations.py)"),
        Fact("memory may appear above 4 GiB", "x86-64: SWIOTLB is set up when memory may lie above 4 GiB"),
    ],
    "08_which_mechanism.ipynb": [
        Quote("the balloon migrates fastest (1559 ms", "cells_migration_balloon", 1559, 1),
        Quote("against 2037 ms with hinting", "cells_migration_hinting", 2037, 1),
        Quote("2134 ms with nothing", "cells_migration_plain", 2134, 1),
        Quote("practically no faster than nothing (2131 ms)", "cells_migration_reporting", 2131, 1),
        Quote("hinting returns nothing (0 MiB)", "cells_overcommit_hinting", 0, 0),
        Quote("reporting returns 653 MiB", "cells_overcommit_reporting / MiB", 653, 1),
        Fact("three guests sharing an image", "n_guests"),
        Quote("keep 4 copies of it", "cells_page_cache_blk_writeback", 4, 0),
        Quote("`cache=writeback`, 1 with virtio-pmem", "cells_page_cache_pmem", 1, 0),
    ],
    "09_open_problems.ipynb": [
        Fact("On plain 4 KiB pages", "the baseline switch: x86-64 base pages"),
        Fact("the same inflate of 512 MiB", "the scenario's inflate (labkit.scenarios.open_problems)"),
        Quote("gave the host back 509 MiB", "balloon_freed_baseline_bytes / MiB", 509, 1),
        Fact("(the 600 MiB the guest wrote and freed)", "the scenario's workload"),
        Fact("On 2 MiB hugetlbfs pages the guest gave the same 512 MiB", "the switch and the inflate"),
        # seed 0: whether a balloon page lands in a huge page the guest never touched is placement
        Quote("host RSS even grew by 2 MiB", "-balloon_freed_hugetlbfs_2M_bytes / MiB", 2, 0),
        Fact("all 512 pieces of a 2 MiB page in one request of 256 PFNs",
             "§12.1, §1.2: VIRTIO_BALLOON_ARRAY_PFNS_MAX"),
        Quote("On 1 GiB pages the balloon frees 0 MiB", "balloon_freed_hugetlbfs_1G_bytes", 0, 0),
        Quote("gave back 596 MiB on 4 KiB pages", "reporting_freed_baseline_bytes / MiB", 596, 1),
        Quote("598 MiB on 2 MiB pages", "reporting_freed_hugetlbfs_2M_bytes / MiB", 598, 1),
        Fact("its 2 MiB blocks", "§3.1: pageblock_order on x86-64"),
        Quote("but 0 MiB on 1 GiB pages", "reporting_freed_hugetlbfs_1G_bytes", 0, 0),
        Quote("On a 64 KiB host the balloon frees 477 MiB", "balloon_freed_host_64K_bytes / MiB", 477, 1),
        Fact("whose 16 pieces", "§12.1: 64 KiB / 4 KiB"),
        Quote("2 MiB, 1024 MiB on 1 GiB pages", "virtio_mem_block_baseline_bytes / MiB", 2, 0),
        Quote("2 MiB, 1024 MiB on 1 GiB pages", "virtio_mem_block_hugetlbfs_1G_bytes / MiB", 1024, 0),
        Quote("512 MiB on a 64 KiB host", "virtio_mem_block_host_64K_bytes / MiB", 512, 0),
    ],
    "10_model_vs_real.ipynb": [
        Quote("15 scenarios, 161 checks, and all 161 hold", "all_scenarios", 15, 0),
        Quote("15 scenarios, 161 checks, and all 161 hold", "all_checks", 161, 0),
        Quote("15 scenarios, 161 checks, and all 161 hold", "all_hold", 161, 0),
    ],
}

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def flat(metrics: dict) -> dict:
    """The metrics as expression names: non-identifier characters become ``_``; a nested dict's
    entries are ``<key>_<entry>``; a list metric ``x`` also gives ``len_x``."""
    out: dict = {}
    for key, value in metrics.items():
        name = re.sub(r"\W", "_", key)
        if isinstance(value, dict):
            for inner, v in value.items():
                out[name + "_" + re.sub(r"\W", "_", inner)] = v
            continue
        out[name] = value
        if isinstance(value, list):
            out[f"len_{name}"] = len(value)
    return out


def notes(markdown: str) -> list[str]:
    """The "What you just saw" paragraphs of a markdown cell, whitespace-normalised, with link
    targets, § citations and code spans left out (they are not quoted numbers)."""
    found = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        if "What you just saw" not in paragraph:
            continue
        text = re.sub(r"\[§[\d.]+\]\([^)]*\)", "§", paragraph)      # citations
        text = re.sub(r"\]\([^)]*\)", "]", text)                       # link targets
        found.append(" ".join(text.split()))
    return found


def normalise(phrase: str) -> str:
    return " ".join(phrase.split())


def unregistered(name: str, markdown_cells: list[str]) -> list[str]:
    """Numbers in the notes of notebook ``name`` that no quote or fact phrase covers."""
    phrases = [normalise(q.phrase) for q in QUOTES.get(name, [])]
    missing = []
    for text in (n for cell in markdown_cells for n in notes(cell)):
        covered = [False] * len(text)
        for phrase in phrases:
            for m in re.finditer(re.escape(phrase), text):
                covered[m.start():m.end()] = [True] * (m.end() - m.start())
        bare = re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), text)  # code is not a quote
        for m in NUMBER.finditer(bare):
            if not all(covered[m.start():m.end()]):
                missing.append(f"{name}: {m.group(0)!r} in …{text[max(0, m.start() - 50):m.end() + 30]}…")
    return missing
