"""What the overcommit scenario measures, and the tables and comparisons built from it.

Host-side counters are read from the shared :class:`~labkit.model.host.Host` (what a host monitor
reads from the host kernel), the balloon's and free page reporting's from their devices; every
counter is taken relative to a baseline read after all VMs have booted. Costs turn counts into time
with stated per-page costs:

* **stall**: swap-ins x ``swapin_us`` (the host's, 100 us: a 4 KiB read from an SSD swap device);
* **zero-fill faults**: every host fault that supplied a zeroed page (a first touch, or a touch of a
  page the balloon or a report discarded) x ``refault_us`` (free page reporting's ``REFAULT_US``,
  2 us: EPT violation, host fault, clearing 4 KiB, without THP);
* **report requests**: reports x the reporting device's ``request_ms`` (0.5 ms, assumed).

:func:`reporting_overhead` is the anchor's "reporting costs about 1-2 %": for one workload and seed,
the extra zero-fill faults and report requests a run with reporting paid over a run without, as a
share of the workload's own time to fault in and write the pages it allocated, at
``GUEST_FAULT_US`` (1 us a page: will-it-scale ``page_fault1`` does about a million 4 KiB faults a
second per task; docs/results.md#duyck-reporting quotes 1,012,402).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from labkit.devices.free_page_reporting import REFAULT_US
from labkit.model.pages import PageFlag, PageState
from labkit.scenarios.base import Run, table
from labkit.units import MiB, PAGE_SIZE

FREE = np.uint8(PageState.FREE)
BACKED = np.uint8(PageFlag.BACKED)
SWAPPED = np.uint8(PageFlag.SWAPPED)
GUEST_FAULT_US = 1.0  # the workload's own cost per page it allocates and writes (see above)
COLUMNS = ("swap_outs", "swap_ins", "zero_fill", "discarded", "balloon_discarded", "reports",
           "reporting_refaulted")


class Counters:
    """Per-VM host, balloon and reporting counters, relative to a baseline taken at creation.

    ``host_vms`` are the VMs as the scenario's own Host sees them (its swap, faults and discards);
    the balloon's and reporting's counters come through ``vm.inspect``."""

    def __init__(self, vms: list, host_vms: list):
        self.vms = vms
        self.host_vms = host_vms
        self.views = [[m for m in ("balloon", "reporting") if _view(vm, m) is not None] for vm in vms]
        self.base = self.read()

    def read(self, devices: bool = True) -> np.ndarray:
        """One row per VM, the columns of :data:`COLUMNS` (``devices=False``: only the host's four,
        the devices' zero, which is what the per-sample series need)."""
        rows = []
        for vm, h, mechanisms in zip(self.vms, self.host_vms, self.views, strict=True):
            balloon = vm.inspect("balloon") if devices and "balloon" in mechanisms else None
            reporting = vm.inspect("reporting") if devices and "reporting" in mechanisms else None
            rows.append([h.swap_outs, h.swap_ins, h.zero_fill_faults, h.discarded_pages,
                         int(balloon.discarded_pages) if balloon is not None else 0,
                         reporting.reports if reporting is not None else 0,
                         reporting.refaulted_pages if reporting is not None else 0])
        return np.array(rows, dtype=np.int64)

    def host_delta(self) -> np.ndarray:
        """The host's columns since the baseline (the device columns are left out: zero)."""
        delta = self.read(devices=False) - self.base
        delta[:, 4:] = 0
        return delta

    def delta(self) -> np.ndarray:
        return self.read() - self.base


def summarize(vm_names: Sequence[str], vms: list, workloads: list, delta: np.ndarray,
              peak_vm_rss: np.ndarray, *, swapin_us: float, refault_us: float) -> dict[str, float]:
    """Per-VM metrics as ``vmN.<metric>`` and their totals over the VMs (``peak_rss`` only per VM)."""
    out: dict[str, float] = {}
    per_vm = []
    for i, (name, vm, w) in enumerate(zip(vm_names, vms, workloads, strict=True)):
        swap_outs, swap_ins, zero_fill, discarded, by_balloon, reports, refaulted = (
            int(x) for x in delta[i])
        reporting = _view(vm, "reporting")
        request_ms = reporting.request_ms if reporting is not None else 0.0
        m = {
            "swap_out_pages": swap_outs, "swap_in_pages": swap_ins,
            "swap_out_bytes": swap_outs * PAGE_SIZE, "swap_in_bytes": swap_ins * PAGE_SIZE,
            "stall_s": swap_ins * swapin_us / 1e6,
            "zero_fill_faults": zero_fill, "zero_fill_s": zero_fill * refault_us / 1e6,
            "peak_rss": int(peak_vm_rss[i]) * PAGE_SIZE,
            "returned_bytes": discarded * PAGE_SIZE, "returned_balloon_bytes": by_balloon * PAGE_SIZE,
            "returned_reporting_bytes": (discarded - by_balloon) * PAGE_SIZE,
            "reports": reports, "report_s": reports * request_ms / 1e3,
            "reporting_refaulted_pages": refaulted,
            "oom_kills": int(vm.sample()["oom_kills"]),
            **_free_memory_on_host(vm),
            "workload_alloc_pages": w.allocated_bytes // PAGE_SIZE,
        }
        per_vm.append(m)
        out |= {f"{name}.{k}": float(v) for k, v in m.items()}
    for key in per_vm[0]:
        if key != "peak_rss":
            out[key] = float(sum(m[key] for m in per_vm))
    return out


def _view(vm, mechanism: str):
    """``vm.inspect(mechanism)``, or None when the VM has no such mechanism."""
    try:
        return vm.inspect(mechanism)
    except ValueError:
        return None


def _free_memory_on_host(vm) -> dict[str, int]:
    """At the end of the run: guest-free pages the host still holds in RAM (``free_backed_bytes``,
    the "RSS stays at max" waste) or in swap (``free_swapped_bytes``: swapped garbage)."""
    snap = vm.snapshot()
    free_flags = snap["flags"][snap["state"] == FREE]
    return {"free_backed_bytes": int(np.count_nonzero(free_flags & BACKED)) * PAGE_SIZE,
            "free_swapped_bytes": int(np.count_nonzero(free_flags & SWAPPED)) * PAGE_SIZE}


def reporting_overhead(without: Run, with_reporting: Run, *, refault_us: float = REFAULT_US,
                       guest_fault_us: float = GUEST_FAULT_US) -> dict[str, float]:
    """What free page reporting cost a workload: two runs of the same parameters and seed, one
    without reporting and one with. Returns the counts, the seconds, and ``overhead`` (a share).

    ``extra_zero_fill``: host zero-fill faults the reporting run had beyond the other (pages a
    report discarded and the guest wrote again); ``report_s``: its report requests' time;
    ``own_s``: the workload's own time for the pages it allocated and wrote, at ``guest_fault_us``.
    """
    a, b = without.summary, with_reporting.summary
    extra = max(0.0, b["zero_fill_faults"] - a["zero_fill_faults"])
    extra_s = extra * refault_us / 1e6
    own_s = b["workload_alloc_pages"] * guest_fault_us / 1e6
    if own_s <= 0:
        raise ValueError("the workload allocated nothing: reporting_overhead needs a memory workload")
    return {"extra_zero_fill": extra, "refault_share": extra / b["workload_alloc_pages"],
            "extra_s": extra_s, "report_s": b["report_s"], "own_s": own_s,
            "overhead": (extra_s + b["report_s"]) / own_s}


SUMMARY_COLUMNS = ("swap_out_bytes", "swap_in_bytes", "stall_s", "zero_fill_s", "peak_host_rss",
                   "peak_host_footprint", "returned_bytes", "pressure_s", "oom_kills")


def policy_table(runs: Mapping[str, Run], keys: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """A plain-text table, one row per policy: sizes in MiB, times in seconds.

    >>> r = Run(summary={"swap_out_bytes": 3 * MiB, "stall_s": 0.5})
    >>> print(policy_table({"none": r}, ("swap_out_bytes", "stall_s")))
    policy  swap_out MiB  stall_s
    ------  ------------  -------
      none             3     0.50
    """
    rows = table(list(runs.values()), list(keys))
    heads = ["policy", *[k.replace("_bytes", " MiB").replace("peak_host_", "peak ") for k in keys]]
    body = []
    for i, policy in enumerate(runs):
        cells = [policy]
        for k in keys:
            v = float(rows[k][i])
            sized = "bytes" in k or "rss" in k or "footprint" in k
            cells.append(f"{v / MiB:.0f}" if sized else f"{v:.2f}" if k.endswith("_s") else f"{v:.0f}")
        body.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, body)])
