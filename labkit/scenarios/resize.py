"""Resize a running VM: virtio-mem against the balloon, on the same guest and the same workload.

Each variant gets a fresh VM of the same full size: the balloon variants boot with all of it
(``boot_memory + device_size``); the virtio-mem variants boot with ``boot_memory`` and plug
``device_size`` at probe, onlined to ZONE_MOVABLE or ZONE_NORMAL (``memhp_default_state``). The
workload leaves an application (anonymous memory) and, after a big allocation that filled the
guest was freed, slab (unmovable kernel memory) where the freed pages were: in hot-plugged memory
when it is ZONE_NORMAL. Then, in order, the scenario measures (facts from
docs/mechanisms.md):

* **shrink**: remove ``shrink`` bytes (QMP ``balloon`` to the smaller logical size, or ``qom-set
  requested-size``) and time it in simulated ms until reached. The balloon moves 256 pages a
  request (§1.2) and takes any free page; virtio-mem migrates movable pages out of each subblock
  (``alloc_contig_range``) and cannot take a subblock that holds an unmovable page (-EBUSY), so in
  ZONE_NORMAL it stops partway and arms its 50 s retry timer (§5.5, §5.6); ZONE_MOVABLE holds only
  movable pages and unplugs completely.
* **MemTotal**: virtio-mem really shrinks it (unplugged memory is offlined and removed, §5.5); the
  balloon shrinks it only without deflate-on-oom (§1.3, §8.2).
* **grow** back to the full size, timed the same way.
* **removable at most**: ask for everything (the balloon: a 1-byte logical size, until "Out of
  puff"; virtio-mem: requested-size 0). The balloon can take almost all free memory, boot memory
  included; virtio-mem only its own device memory, and only where it is movable.
* **memmap**: hot-plugged memory pays 64 B of ``struct page`` per 4 KiB page from ZONE_NORMAL,
  2 MiB per 128 MiB block, ~1.6 % (docs/results.md#firecracker; labkit.model.hotplug); the
  balloon VM's memmap is a boot-time reservation, outside MemTotal.
* **reboot**, from the shrunk size: QEMU unplugs all virtio-mem memory at system reset
  (``virtio_mem_system_reset``, §5.2), so the host gets it back at once, the guest boots with boot
  memory only and its driver plugs ``requested-size`` again. The balloon's target is QEMU state that
  survives the reset (``virtio_balloon_device_reset`` leaves ``num_pages`` alone: docs/mechanisms.md
  §9.9), so the guest boots with all its RAM and the new driver inflates again.

Simplification: the model has no guest reboot (no QMP ``system_reset``). The scenario calls the
QEMU device's ``system_reset()`` to read what the reset leaves (size, usable region, host RSS), then
boots a fresh VM with the same options and the preserved target to time the way back.

>>> rows = resize_table(resize_compare(ResizeParams(boot_memory="1G", device_size="1G", shrink="512M",
...     app="256M", slab="64M", variants=("balloon", "virtio_mem_movable"), probe_max=False,
...     reboot=False)))
>>> [int(x) >> 20 for x in rows["removed_bytes"]]
[512, 512]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

import labkit
from labkit.backends.base import Backend
from labkit.model.hotplug import MEMMAP_PAGES_PER_BLOCK
from labkit.scenarios.base import Run, table
from labkit.units import GiB, MiB, PAGE_SIZE, format_size, parse_size

VARIANTS = {  # name: (mechanism, balloon deflate_on_oom or memhp_default_state)
    "balloon": ("balloon", False),
    "balloon_doo": ("balloon", True),
    "virtio_mem_movable": ("virtio_mem", "online_movable"),
    "virtio_mem_kernel": ("virtio_mem", "online_kernel"),
}
DEVICE_ID = "vm0"
FILL_HEADROOM = 192 * MiB  # the fill allocation leaves this much free: no reclaim, no OOM
TABLE_ROWS = (  # (summary key, label, kind): kind "size", "ms", "pct", "count"
    ("memtotal_full", "MemTotal at full size", "size"),
    ("memmap_bytes", "hot-plugged memmap (64 B per 4 KiB)", "size"),
    ("memmap_share", "  as a share of plugged memory", "pct"),
    ("shrink_request_bytes", "asked to remove", "size"),
    ("shrink_ms", "time to shrink (simulated)", "ms"),
    ("removed_bytes", "removed", "size"),
    ("memtotal_shrunk", "MemTotal after shrinking", "size"),
    ("host_returned_bytes", "host RSS returned", "size"),
    ("unplug_rc", "driver result (0 or -errno)", "count"),
    ("retry_ms", "retry timer armed", "ms"),
    ("grow_ms", "time to grow back (simulated)", "ms"),
    ("removable_max_bytes", "removable at most", "size"),
    ("memtotal_min", "MemTotal at the smallest", "size"),
    ("reset_size_bytes", "virtio-mem size after system reset", "size"),
    ("reset_host_returned_bytes", "host RSS returned by the reset", "size"),
    ("boot_memtotal", "MemTotal when the guest boots again", "size"),
    ("restore_ms", "time back to the target after reboot", "ms"),
)


@dataclass(frozen=True)
class ResizeParams:
    """Parameters of the resize comparison. Sizes in bytes (strings like ``"4G"`` are parsed).

    ``boot_memory``: the virtio-mem VM's boot RAM (-m); ``device_size``: its virtio-mem region,
    plugged at boot; the balloon VM boots with both. ``shrink``: bytes to remove (at most
    ``device_size``, a multiple of 2 MiB). Workload: ``app`` bytes of anonymous memory, then (with
    ``fill``) a transient allocation of nearly all free memory, freed, then ``slab`` bytes of
    unmovable kernel memory. Each phase waits at most ``settle_ms``, checking every
    ``resolution_ms`` and sampling every ``sample_ms``. ``variants``: names from :data:`VARIANTS`.
    """

    boot_memory: int | str = 2 * GiB
    device_size: int | str = 4 * GiB
    shrink: int | str = 4 * GiB
    app: int | str = 1 * GiB
    slab: int | str = 256 * MiB
    fill: bool = True
    seed: int = 0
    variants: tuple[str, ...] = tuple(VARIANTS)
    settle_ms: float = 10_000.0
    resolution_ms: float = 5.0
    sample_ms: float = 100.0
    probe_max: bool = True
    reboot: bool = True
    backend: str = "model"

    def __post_init__(self) -> None:
        sizes = {}
        for name in ("boot_memory", "device_size", "shrink", "app", "slab"):
            sizes[name] = parse_size(getattr(self, name), name=name)
            object.__setattr__(self, name, sizes[name])
        if sizes["boot_memory"] < 512 * MiB or sizes["boot_memory"] % (128 * MiB):
            raise ValueError(f"boot_memory must be a multiple of 128 MiB, at least 512 MiB, got "
                             f"{format_size(sizes['boot_memory'])}")
        if sizes["device_size"] <= 0 or sizes["device_size"] % (128 * MiB):
            raise ValueError(f"device_size must be a positive multiple of 128 MiB (a memory block), "
                             f"got {format_size(sizes['device_size'])}")
        if not 0 < sizes["shrink"] <= sizes["device_size"] or sizes["shrink"] % (2 * MiB):
            raise ValueError(f"shrink must be a multiple of 2 MiB in (0, device_size "
                             f"{format_size(sizes['device_size'])}], got {format_size(sizes['shrink'])}")
        used = sizes["app"] + sizes["slab"]
        if used > (sizes["boot_memory"] + sizes["device_size"]) // 2:
            raise ValueError(f"app + slab ({format_size(used)}) must fit in half of the full size "
                             f"({format_size(sizes['boot_memory'] + sizes['device_size'])})")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or unknown:
            raise ValueError(f"variants {unknown or self.variants!r}: accepted {list(VARIANTS)}")
        for name in ("settle_ms", "resolution_ms", "sample_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 ms, got {getattr(self, name)!r}")

    @property
    def full_size(self) -> int:
        return self.boot_memory + self.device_size


# --- the two ways to resize, behind one interface ------------------------------------------------
class _Resizer:
    """Ask for a total guest size and read what was reached, with the balloon or virtio-mem."""

    def __init__(self, vm: Backend, params: ResizeParams, mechanism: str):
        self.vm, self.params, self.mechanism = vm, params, mechanism

    def request(self, total: int) -> None:
        if self.mechanism == "balloon":
            self.vm.qmp("balloon", value=max(1, total))
        else:
            value = max(0, total - self.params.boot_memory)
            self.vm.qmp("qom-set", path=DEVICE_ID, property="requested-size", value=value)

    def size(self) -> int:
        """The guest's current size as the host sees it (balloon: logical size)."""
        if self.mechanism == "balloon":
            return int(self.vm.qmp("query-balloon")["actual"])
        return self.params.boot_memory + int(self.vm.qmp("qom-get", path=DEVICE_ID, property="size"))

    def wait(self, target: int | None, rows: list[dict]) -> float:
        """Advance until the guest is at ``target``: ``size() == target`` and MemTotal no longer
        moving (virtio-mem acks a plug before the block is added and onlined). None: just settle.
        Returns the simulated ms it took (to ``resolution_ms``), or NaN after ``settle_ms``."""
        p = self.params
        elapsed, next_sample = 0.0, p.sample_ms
        if target is not None and self.size() == target:
            return 0.0
        memtotal, changed, reached = self.vm.meminfo()["MemTotal"], 0.0, None
        while elapsed < p.settle_ms:
            self.vm.advance(p.resolution_ms)
            elapsed += p.resolution_ms
            if elapsed >= next_sample:
                rows.append(self.vm.sample())
                next_sample += p.sample_ms
            previous, memtotal = memtotal, self.vm.meminfo()["MemTotal"]
            if memtotal != previous:
                changed = elapsed
            at = target is not None and self.size() == target
            reached = (reached if reached is not None else elapsed) if at else None
            if at and memtotal == previous:  # there, and MemTotal has settled
                rows.append(self.vm.sample())
                return max(reached, changed)
        rows.append(self.vm.sample())
        return float("nan")

    def driver(self) -> Any:
        """The virtio-mem device and its driver now (a snapshot), or None for the balloon."""
        if self.mechanism != "virtio_mem":
            return None
        return self.vm.inspect("virtio-mem").devices[0]


def open_variant(params: ResizeParams, variant: str) -> Backend:
    """A fresh VM of ``variant`` at its full size (the virtio-mem one plugs at boot)."""
    mechanism, setting = VARIANTS[variant]
    if mechanism == "balloon":
        return labkit.open(backend=params.backend, memory=params.full_size, seed=params.seed,
                           balloon={"deflate_on_oom": setting})
    return _open_virtio_mem(params, setting, params.device_size)


def _open_virtio_mem(params: ResizeParams, online: str, requested: int) -> Backend:
    return labkit.open(backend=params.backend, memory=params.boot_memory, seed=params.seed,
                       balloon=False, memhp_default_state=online,
                       virtio_mem=[{"id": DEVICE_ID, "size": params.device_size,
                                    "requested_size": requested}])


def run_workload(vm: Backend, params: ResizeParams) -> None:
    """The application, the fill that is freed again, then slab where the freed pages were."""
    vm.guest("alloc", size=params.app, kind="anon")
    if params.fill:
        fill = vm.meminfo()["MemFree"] * 1024 - FILL_HEADROOM
        if fill > 0:
            job = vm.guest("alloc", size=fill // MiB * MiB, kind="anon")
            vm.guest("free", handle=job)
    if params.slab:
        vm.guest("alloc", size=params.slab, kind="slab")


def _hotplug(vm: Backend, mechanism: str) -> Any:
    """The virtio-mem snapshot (added blocks, migrated pages), None for the balloon variants."""
    return vm.inspect("virtio-mem") if mechanism == "virtio_mem" else None


def _memmap_bytes(view: Any) -> float:
    if view is None:
        return 0.0
    if view.added_blocks is None:  # a backend that can't see the guest's memmap
        return float("nan")
    return float(len(view.added_blocks) * MEMMAP_PAGES_PER_BLOCK * PAGE_SIZE)


def run_variant(params: ResizeParams, variant: str) -> Run:
    """One column of the comparison: every phase of the module docstring on a fresh VM.

    >>> run = run_variant(ResizeParams(boot_memory="1G", device_size="1G", shrink="256M",
    ...                   app="128M", slab="32M", probe_max=False, reboot=False), "balloon_doo")
    >>> run.summary["removed_bytes"] == 256 << 20, run.summary["memtotal_drop_bytes"]
    (True, 0.0)
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {list(VARIANTS)}")
    mechanism, setting = VARIANTS[variant]
    full, target = params.full_size, params.full_size - params.shrink
    s: dict[str, float] = {"variant": float(list(VARIANTS).index(variant))}
    rows: list[dict] = []
    vm = open_variant(params, variant)
    with vm:
        r = _Resizer(vm, params, mechanism)
        rows.append(vm.sample())
        s["boot_plug_ms"] = 0.0 if mechanism == "balloon" else r.wait(full, rows)
        vm.advance(params.sample_ms)  # the last block's add_memory and onlining follow its PLUG
        run_workload(vm, params)
        before = vm.sample()
        rows.append(before)
        s["memtotal_full"] = before["memtotal"]
        s["memmap_bytes"] = _memmap_bytes(_hotplug(vm, mechanism))
        s["memmap_share"] = s["memmap_bytes"] / params.device_size if mechanism != "balloon" else 0.0
        s["shrink_request_bytes"] = float(params.shrink)

        hotplug = _hotplug(vm, mechanism)
        migrated = hotplug.migrated_pages if hotplug is not None else 0
        r.request(target)  # --- shrink
        s["shrink_ms"] = r.wait(target, rows)
        # pages alloc_contig_range moved out of the unplugged subblocks (the balloon moves none)
        after = _hotplug(vm, mechanism)
        s["migrated_bytes"] = float((after.migrated_pages - migrated) * PAGE_SIZE
                                   if after is not None and after.migrated_pages is not None else 0)
        shrunk = rows[-1]
        s["removed_bytes"] = float(full - r.size())
        s["memtotal_shrunk"] = shrunk["memtotal"]
        s["memtotal_drop_bytes"] = before["memtotal"] - shrunk["memtotal"]
        s["memavailable_shrunk"] = shrunk["memavailable"]
        s["host_returned_bytes"] = before["host_rss"] - shrunk["host_rss"]
        drv = r.driver()
        s["unplug_rc"] = float(drv.last_rc) if drv is not None else 0.0
        s["retry_ms"] = float(drv.retry_ms) if drv is not None and drv.last_rc else float("nan")
        s["out_of_puff"] = float(vm.inspect("balloon").out_of_puff or 0) if mechanism == "balloon" else 0.0

        r.request(full)  # --- grow back
        s["grow_ms"] = r.wait(full, rows)
        s["memtotal_grown"] = rows[-1]["memtotal"]

        if params.probe_max:  # --- as small as it gets
            r.request(0 if mechanism == "balloon" else params.boot_memory)
            r.wait(None, rows)
            s["removable_max_bytes"] = float(full - r.size())
            s["memtotal_min"] = rows[-1]["memtotal"]
            r.request(target)
            r.wait(target, rows)
        else:
            r.request(target)
            r.wait(target, rows)
        events = vm.events()
        if params.reboot:  # --- reboot from the shrunk size
            s.update(_reboot(vm, r, params, mechanism, setting, target))
    run = Run.from_rows(rows, summary={k: float(v) for k, v in s.items()}, events=events,
                        params=params)
    run.variant = variant  # type: ignore[attr-defined]
    return run


def _reboot(vm: Backend, r: _Resizer, params: ResizeParams, mechanism: str, setting: Any,
            target: int) -> dict[str, float]:
    """QEMU's system reset (the device side only: the model has no guest reboot), then a fresh
    boot with the target QEMU kept, timed until the guest is back at it."""
    out: dict[str, float] = {}
    rss = vm.sample()["host_rss"]
    if mechanism == "virtio_mem":
        requested = vm.inspect("virtio-mem").devices[0].requested_size
        # virtio_mem_system_reset: unplug everything, shrink the usable region. An action on the
        # model's device: the model has no guest reboot, so there is no QMP system_reset to call
        vm.virtio_mem.devices[0].system_reset()
        reset = vm.inspect("virtio-mem").devices[0]
        out["reset_size_bytes"] = float(reset.size)
        out["reset_usable_bytes"] = float(reset.usable_region_size)
        out["reset_host_returned_bytes"] = rss - vm.sample()["host_rss"]
        fresh = _open_virtio_mem(params, setting, requested)
    else:
        out["reset_size_bytes"] = float("nan")
        out["reset_usable_bytes"] = float("nan")
        out["reset_host_returned_bytes"] = 0.0
        fresh = open_variant(params, "balloon_doo" if setting else "balloon")
    with fresh:
        out["boot_memtotal"] = fresh.sample()["memtotal"]
        again = _Resizer(fresh, params, mechanism)
        if mechanism == "balloon":
            again.request(target)  # the new driver sees the num_pages QEMU kept
        out["restore_ms"] = again.wait(target, [])
        out["memtotal_rebooted"] = fresh.sample()["memtotal"]
    return out


def resize_compare(params: ResizeParams | None = None, **overrides: Any) -> list[Run]:
    """Run every variant of ``params`` (keywords override fields); one :class:`Run` each."""
    params = params or ResizeParams()
    if overrides:
        params = replace(params, **overrides)
    return [run_variant(params, v) for v in params.variants]


def resize_table(runs: list[Run]) -> dict[str, np.ndarray]:
    """One row per variant: ``variant`` (names) and every summary metric as a column."""
    rows = table(runs)
    rows["variant"] = np.array([list(VARIANTS)[int(v)] for v in rows["variant"]])
    return rows


def format_table(rows: dict[str, np.ndarray], keys: tuple = TABLE_ROWS) -> str:
    """The comparison as text: one line per metric, one column per variant."""
    def cell(kind: str, v: float) -> str:
        if np.isnan(v):
            return "-"
        return {"size": lambda: f"{v / MiB:.0f} MiB", "ms": lambda: f"{v:.0f} ms",
                "pct": lambda: f"{100 * v:.2f} %", "count": lambda: f"{v:.0f}"}[kind]()

    heads = list(rows["variant"])
    body = [[label] + [cell(kind, float(x)) for x in rows[key]] for key, label, kind in keys if key in rows]
    widths = [max(len(r[j]) for r in [["", *heads], *body]) for j in range(len(heads) + 1)]
    line: Callable[[list[str]], str] = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(["", *heads]), line(["-" * w for w in widths]), *map(line, body)])
