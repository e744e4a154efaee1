"""The guest kernel's boot parameters and sysctls, with the defaults of the live backend's kernel.

The model boots the kernel the live backend boots: Debian 12's 6.1 cloud kernel
(``linux-image-cloud-amd64``) on QEMU's q35 machine. What its build configuration and command line
decide, and what moves the numbers a learner reads, is a named knob here, spelled as on a kernel
command line (``transparent_hugepage=``, ``init_on_alloc=``, ``swiotlb=``, ``nr_cpus=``,
``memory_hotplug.online_policy=``...) or as a sysctl (``vm.min_free_kbytes``...). Each defaults to the
distro's value, measured on that guest (docs/mechanisms.md §10):

=====================================  ==================  ==================================================
knob                                   Debian 6.1 default  what it changes
=====================================  ==================  ==================================================
``transparent_hugepage``               ``always``          CONFIG_TRANSPARENT_HUGEPAGE_ALWAYS=y: THP on, which
                                                           raises ``min_free_kbytes`` (mm/khugepaged.c
                                                           ``set_recommended_min_free_kbytes``); the kernel
                                                           turns THP off below 512 MiB (mm/huge_memory.c
                                                           ``hugepage_init``)
``init_on_alloc``                      1                   CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y ("mem auto-init:
                                                           ... heap alloc:on"): every page allocated is
                                                           zeroed, so the host backs it
``init_on_free``, ``page_poison``      0, 0                what free pages hold (reporting's gate)
``vm.min_free_kbytes``                 None (computed)     a sysctl: the user's value replaces the
                                                           computed one
``vm.watermark_scale_factor``          10                  the gap between min, low and high
``vm.lowmem_reserve_ratio``            256 256 32 0 0      protection of the lower zones
``vm.percpu_pagelist_high_fraction``   0                   0: ``pcp->high`` follows the low watermark
``swiotlb``                            None (auto)         64 MiB bounce buffer when RAM may lie above 4 GiB
                                                           (arch/x86/kernel/pci-dma.c ``pci_swiotlb_detect``)
``nr_cpus``                            1                   CPUs: the per-CPU page lists (QEMU ``-smp``)
``memory_hotplug.online_policy``       ``contig-zones``    where "online" puts hot-plugged memory
``memory_hotplug.auto_movable_ratio``  301                 auto-movable's MOVABLE:KERNEL limit (%)
``page_reporting.page_reporting_order``  -1                -1: ``pageblock_order``
=====================================  ==================  ==================================================

Bad values raise ``ValueError`` naming the knob, the value and what is accepted, as the kernel's own
parsers refuse them (``parse_bootparams``); nothing is half-applied.

>>> p = parse_bootparams({"transparent_hugepage": "never", "vm.min_free_kbytes": 65536})
>>> p.transparent_hugepage, p.min_free_kbytes, p.init_on_alloc
('never', 65536, 1)
>>> parse_bootparams({"init_on_alloc": 2})
Traceback (most recent call last):
...
ValueError: cmdline init_on_alloc=2: accepted: 0 or 1
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# mm/page_alloc.c: sysctl_lowmem_reserve_ratio (DMA, DMA32, NORMAL, MOVABLE, DEVICE) on x86-64
LOWMEM_RESERVE_RATIO = (256, 256, 32, 0, 0)
WATERMARK_SCALE_FACTOR_MAX = 3000  # mm/page_alloc.c: the sysctl's extra2 (SYSCTL_THREE_THOUSAND)
MIN_PERCPU_PAGELIST_HIGH_FRACTION = 8  # mm/page_alloc.c
IO_TLB_SHIFT = 11  # include/linux/swiotlb.h: one slab is 2 KiB
IO_TLB_SEGSIZE = 128  # slabs are allocated in segments of 128
IO_TLB_DEFAULT_SIZE = 64 << 20  # include/linux/swiotlb.h: 64 MiB
THP_MODES = ("always", "madvise", "never")
ONLINE_POLICIES = ("contig-zones", "auto-movable")
MAX_CPUS = 256


@dataclass(frozen=True)
class BootParams:
    """What the guest kernel was booted with (see the module docstring for each knob)."""

    transparent_hugepage: str = "always"
    init_on_alloc: int = 1
    init_on_free: int = 0
    page_poison: int = 0
    min_free_kbytes: int | None = None
    watermark_scale_factor: int = 10
    lowmem_reserve_ratio: tuple[int, ...] = LOWMEM_RESERVE_RATIO
    percpu_pagelist_high_fraction: int = 0
    swiotlb: int | str | None = None
    nr_cpus: int = 1
    online_policy: str = "contig-zones"
    auto_movable_ratio: int = 301
    auto_movable_numa_aware: bool = True
    page_reporting_order: int = -1

    @property
    def thp_enabled(self) -> bool:
        """``hugepage_flags_enabled()``: THP ``always`` or ``madvise`` (before the 512 MiB rule)."""
        return self.transparent_hugepage != "never"

    def swiotlb_slabs(self, ram_above_4g_possible: bool) -> int:
        """Slabs of the bounce buffer the kernel sets up: ``swiotlb=N`` (rounded up to a segment),
        ``noforce`` none, else the 64 MiB default when x86's ``pci_swiotlb_detect`` wants one (RAM,
        or hot-pluggable memory in the SRAT, above 4 GiB) or ``force`` asks for it."""
        value = self.swiotlb
        count, _, mode = (str(value).partition(",") if value is not None else ("", "", ""))
        if count in ("noforce", "force"):
            count, mode = "", count
        if mode == "noforce":
            return 0
        if not (ram_above_4g_possible or mode == "force"):
            return 0
        if count:
            return -(-int(count) // IO_TLB_SEGSIZE) * IO_TLB_SEGSIZE
        return IO_TLB_DEFAULT_SIZE >> IO_TLB_SHIFT

    def cmdline_keys(self) -> dict:
        """This object back as ``{cmdline key: value}`` (every knob, defaults included)."""
        return {key: getattr(self, attr) for key, attr in CMDLINE_KEYS.items()}


# cmdline / sysctl spelling -> BootParams field
CMDLINE_KEYS = {
    "transparent_hugepage": "transparent_hugepage",
    "init_on_alloc": "init_on_alloc",
    "init_on_free": "init_on_free",
    "page_poison": "page_poison",
    "vm.min_free_kbytes": "min_free_kbytes",
    "vm.watermark_scale_factor": "watermark_scale_factor",
    "vm.lowmem_reserve_ratio": "lowmem_reserve_ratio",
    "vm.percpu_pagelist_high_fraction": "percpu_pagelist_high_fraction",
    "swiotlb": "swiotlb",
    "nr_cpus": "nr_cpus",
    "memory_hotplug.online_policy": "online_policy",
    "memory_hotplug.auto_movable_ratio": "auto_movable_ratio",
    "memory_hotplug.auto_movable_numa_aware": "auto_movable_numa_aware",
    "page_reporting.page_reporting_order": "page_reporting_order",
}
DEFAULTS = BootParams()
CMDLINE_DEFAULTS = DEFAULTS.cmdline_keys()


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: object) -> bool:
    """0 or 1, as the kernel's ``kstrtobool``-free int parameters take them (not True, not 1.0)."""
    return _int(value) and value in (0, 1)


def _swiotlb(value: object) -> bool:
    if value is None or _int(value):
        return value is None or value >= 0
    if not isinstance(value, str):
        return False
    count, _, mode = value.partition(",")
    if count in ("force", "noforce") and not mode:
        return True
    return count.isdigit() and mode in ("", "force", "noforce")


def _ratio(value: object) -> bool:
    return (isinstance(value, tuple | list) and len(value) == len(LOWMEM_RESERVE_RATIO)
            and all(_int(v) and v >= 0 for v in value))


CHECKS = {
    "transparent_hugepage": (lambda v: v in THP_MODES, f"accepted: {', '.join(map(repr, THP_MODES))}"),
    "init_on_alloc": (_flag, "accepted: 0 or 1"),
    "init_on_free": (_flag, "accepted: 0 or 1"),
    "page_poison": (_flag, "accepted: 0 or 1"),
    "vm.min_free_kbytes": (lambda v: v is None or (_int(v) and v >= 0),
                           "accepted: None (computed by the kernel) or an int >= 0 (kB)"),
    "vm.watermark_scale_factor": (lambda v: _int(v) and 1 <= v <= WATERMARK_SCALE_FACTOR_MAX,
                                  f"accepted: 1..{WATERMARK_SCALE_FACTOR_MAX}"),
    "vm.lowmem_reserve_ratio": (_ratio, f"accepted: {len(LOWMEM_RESERVE_RATIO)} ints >= 0 "
                                        "(DMA, DMA32, Normal, Movable, Device)"),
    "vm.percpu_pagelist_high_fraction": (
        lambda v: _int(v) and (v == 0 or v >= MIN_PERCPU_PAGELIST_HIGH_FRACTION),
        f"accepted: 0 or an int >= {MIN_PERCPU_PAGELIST_HIGH_FRACTION}"),
    "swiotlb": (_swiotlb, "accepted: None (auto), a number of 2 KiB slabs, 'force', 'noforce' or "
                          "'<slabs>,force' / '<slabs>,noforce'"),
    "nr_cpus": (lambda v: _int(v) and 1 <= v <= MAX_CPUS, f"accepted: 1..{MAX_CPUS}"),
    "memory_hotplug.online_policy": (lambda v: v in ONLINE_POLICIES,
                                     "accepted: 'contig-zones' or 'auto-movable'"),
    "memory_hotplug.auto_movable_ratio": (lambda v: _int(v) and v >= 0, "accepted: an int >= 0 (%)"),
    "memory_hotplug.auto_movable_numa_aware": (lambda v: isinstance(v, bool) or v in (0, 1),
                                               "accepted: True or False"),
    "page_reporting.page_reporting_order": (lambda v: _int(v) and -1 <= v <= 10,
                                            "accepted: -1 (default) or 0..10"),
}


def parse_bootparams(cmdline: dict | None = None) -> BootParams:
    """Check ``cmdline`` (``{knob: value}``, spelled as in :data:`CMDLINE_KEYS`) and return the
    :class:`BootParams` it gives over the distro defaults. Unknown knobs and bad values raise
    ``ValueError`` naming them and what is accepted."""
    given = dict(cmdline or {})
    unknown = sorted(set(given) - set(CMDLINE_KEYS))
    if unknown:
        raise ValueError(f"unknown cmdline option(s) {unknown}; accepted: {sorted(CMDLINE_KEYS)}")
    for key, value in given.items():
        check, accepted = CHECKS[key]
        if not check(value):
            raise ValueError(f"cmdline {key}={value!r}: {accepted}")
    values = {CMDLINE_KEYS[k]: v for k, v in given.items()}
    if "lowmem_reserve_ratio" in values:
        values["lowmem_reserve_ratio"] = tuple(values["lowmem_reserve_ratio"])
    if "auto_movable_numa_aware" in values:
        values["auto_movable_numa_aware"] = bool(values["auto_movable_numa_aware"])
    return BootParams(**values)


def kernel_arguments(cmdline: dict | None) -> list[str]:
    """The live guest's kernel command line for ``cmdline`` (checked first): each knob the way the
    kernel takes it, sysctls as ``sysctl.vm.<name>=`` (init/main.c ``do_sysctl_args``, applied
    once the kernel is up, as a sysctl written at boot would be). Defaults are left out, so an
    empty ``cmdline`` boots the distro's kernel as it is; ``nr_cpus`` is QEMU's ``-smp`` and is
    not a kernel argument here."""
    parse_bootparams(cmdline)
    out = []
    for key, value in (cmdline or {}).items():
        if key == "nr_cpus":
            continue
        if key.startswith("vm."):
            if value is None:
                continue
            text = " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value)
            out.append(f"sysctl.{key}={text.replace(' ', ',')}")
        elif isinstance(value, bool):
            out.append(f"{key}={int(value)}")
        elif value is not None:
            out.append(f"{key}={value}")
    return out


assert {f.name for f in fields(BootParams)} == set(CMDLINE_KEYS.values())
