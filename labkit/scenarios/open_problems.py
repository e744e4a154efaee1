"""The talk's open problems as switches: every mechanism on the same scenario, each switch flipped.

A switch is what QEMU takes on its command line (docs/mechanisms.md §12): the backing of guest RAM
(``memory-backend-memfd,hugetlb=on,hugetlbsize=2M`` ...), a ``vfio-pci`` device, a confidential
guest (``sev-guest``, ``sev-snp-guest``, ``tdx-guest`` named by ``confidential-guest-support``),
``-overcommit mem-lock=on``; or, where QEMU has no syntax, a keyword of ``labkit.open``
(``host_page_size``, ``guest_page_size``). :data:`SWITCHES` lists them as data.

The same scenario runs for every (switch, mechanism) pair on a fresh model guest of ``memory``:

* **balloon**: the guest writes and frees ``churn`` bytes (free memory the host backs), then the
  balloon inflates by ``shrink``: host RSS freed, and what the guest lost (QEMU's ``actual``).
* **reporting**: the same churn with free page reporting on, then ``settle_ms``: host RSS freed.
* **hinting**: the same churn, then a migration with free page hinting: bytes sent, against the
  same guest migrated without hinting (the saving), or QEMU's refusal.
* **virtio-mem**: a device of ``memory`` plugged fully at boot, the guest fills its memory with data
  (``churn``), then everything is unplugged: host RSS freed, or QEMU's refusal at realize.

Each outcome is *computed* into one of :data:`OUTCOMES` by comparing with the baseline switch (plain
anonymous 4 KiB memory): ``works`` (at least 99 % of the baseline's number), ``partial`` (some),
``frees nothing`` (the guest gave memory up and the host got none back), ``refused`` (QEMU's text).

>>> r = run_open_problems(OpenProblemsParams(switches=("baseline", "hugetlbfs-2M"),
...                                          mechanisms=("balloon",)))
>>> [(c.switch, c.outcome) for c in r.cells]
[('baseline', 'works'), ('hugetlbfs-2M', 'frees nothing')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import labkit
from labkit.errors import NotModelled, QMPError
from labkit.units import GiB, MiB, format_size, parse_size

OUTCOMES = ("works", "partial", "frees nothing", "refused")
MECHANISMS = ("balloon", "reporting", "hinting", "virtio-mem")
WORKS_SHARE = 0.99  # at least this share of the baseline's number: "works"


@dataclass(frozen=True)
class Switch:
    """One switch: the QEMU options it adds (``{ram}``: boot RAM's backend object, ``{dev}``: the
    virtio-mem device's), the ``labkit.open`` keywords it sets, and the docs section behind it."""

    key: str
    label: str
    backend: str = "memory-backend-ram,id={id},size={size}"  # the memory backends' -object
    extra: str = ""  # added to the command line
    keywords: dict = field(default_factory=dict)
    section: str = "12.1"


SWITCHES = (
    Switch("baseline", "anonymous 4 KiB (default)"),
    Switch("THP", "anonymous + THP (host)", keywords={"host": {"thp": True}}),
    Switch("hugetlbfs-2M", "hugetlbfs 2 MiB",
           backend="memory-backend-memfd,id={id},size={size},hugetlb=on,hugetlbsize=2M"),
    Switch("hugetlbfs-1G", "hugetlbfs 1 GiB",
           backend="memory-backend-memfd,id={id},size={size},hugetlb=on,hugetlbsize=1G"),
    Switch("host-64K", "64 KiB host pages", keywords={"host_page_size": "64K"}),
    Switch("guest-64K", "64 KiB guest pages", keywords={"guest_page_size": "64K"}, section="12.2"),
    Switch("guest+host-64K", "64 KiB guest and host pages",
           keywords={"guest_page_size": "64K", "host_page_size": "64K"}, section="12.2"),
    Switch("vfio", "vfio-pci assigned", extra="-device vfio-pci,host=0000:01:00.0", section="12.3"),
    Switch("vfio-migratable", "vfio-pci, x-enable-migration=on",
           extra="-device vfio-pci,host=0000:01:00.0,x-enable-migration=on", section="12.3"),
    Switch("SEV", "AMD SEV", extra="-object sev-guest,id=cg0,cbitpos=47,reduced-phys-bits=1 "
                                   "-machine confidential-guest-support=cg0", section="12.4"),
    Switch("SEV-SNP", "AMD SEV-SNP", extra="-object sev-snp-guest,id=cg0,cbitpos=51,reduced-phys-bits=1 "
                                           "-machine confidential-guest-support=cg0", section="12.4"),
    Switch("TDX", "Intel TDX", extra="-object tdx-guest,id=cg0 -machine confidential-guest-support=cg0",
           section="12.4"),
    Switch("mem-lock", "-overcommit mem-lock=on", extra="-overcommit mem-lock=on", section="12.3"),
)
SWITCH_KEYS = tuple(s.key for s in SWITCHES)


@dataclass(frozen=True)
class OpenProblemsParams:
    memory: int | str = 1 * GiB
    churn: int | str = 600 * MiB
    shrink: int | str = 512 * MiB
    settle_ms: float = 8_000.0
    seed: int = 0
    switches: tuple[str, ...] = SWITCH_KEYS
    mechanisms: tuple[str, ...] = MECHANISMS

    def __post_init__(self) -> None:
        for name in ("memory", "churn", "shrink"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name=name))
        if self.memory < 512 * MiB or self.memory % GiB:
            raise ValueError(f"memory must be a whole number of GiB (a 1 GiB huge page fits), got "
                             f"{format_size(self.memory)}")
        if not 0 < self.churn < self.memory or not 0 < self.shrink < self.memory:
            raise ValueError(f"churn and shrink must be between 0 and memory ({format_size(self.memory)}), "
                             f"got {format_size(self.churn)}, {format_size(self.shrink)}")
        unknown = [s for s in self.switches if s not in SWITCH_KEYS]
        if unknown or "baseline" not in self.switches:
            raise ValueError(f"switches {unknown or self.switches!r}: accepted {list(SWITCH_KEYS)}, "
                             f"'baseline' among them (outcomes are measured against it)")
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if unknown or not self.mechanisms:
            raise ValueError(f"mechanisms {unknown or self.mechanisms!r}: accepted {list(MECHANISMS)}")


@dataclass(frozen=True)
class OutcomeCell:
    """One (switch, mechanism) outcome: the class, its number, the text shown, and the details."""

    switch: str
    mechanism: str
    outcome: str
    value: float  # bytes freed (balloon, reporting, virtio-mem) or saved (hinting); NaN if refused
    text: str
    details: dict = field(default_factory=dict)


@dataclass
class OpenProblemsResult:
    params: OpenProblemsParams
    cells: list[OutcomeCell]

    def cell(self, switch: str, mechanism: str) -> OutcomeCell:
        for c in self.cells:
            if c.switch == switch and c.mechanism == mechanism:
                return c
        raise KeyError(f"no cell ({switch!r}, {mechanism!r})")

    def outcomes(self) -> dict[str, dict[str, str]]:
        """switch -> mechanism -> outcome."""
        out: dict[str, dict[str, str]] = {}
        for c in self.cells:
            out.setdefault(c.switch, {})[c.mechanism] = c.outcome
        return out


# --- one scenario per mechanism -----------------------------------------------------------------
def command_line(switch: Switch, p: OpenProblemsParams, *, balloon: str | None = None,
                 virtio_mem: bool = False) -> str:
    """The switch's QEMU command line for one scenario: boot RAM on the switch's backend, a
    virtio-mem device on another (``virtio_mem``), a balloon with ``balloon``'s properties."""
    mem = p.memory // MiB
    line = f"-m {mem}M" + (f",maxmem={2 * mem}M" if virtio_mem else "")
    ram = switch.backend.format(id="ram0", size=f"{mem}M")
    line += f" -object {ram} -machine memory-backend=ram0 {switch.extra}"
    if virtio_mem:
        line += (f" -object {switch.backend.format(id='vmem0', size=f'{mem}M')} -device virtio-mem-pci,"
                 f"id=vm0,memdev=vmem0,requested-size={mem}M")
    if balloon is not None:
        line += f" -device virtio-balloon-pci{balloon}"
    return line


def live_keywords(switch: Switch) -> dict:
    """The switch's ``labkit.open`` keywords for the live backend: the host's THP is the live
    backend's ``qemu={"thp": True}`` (QEMU runs under this machine's THP policy)."""
    keywords = {k: v for k, v in switch.keywords.items() if k != "host"}
    if switch.keywords.get("host", {}).get("thp"):
        keywords["qemu"] = {"thp": True}
    return keywords


def _open(switch: Switch, p: OpenProblemsParams, **line: Any):
    return labkit.open(backend="model", qemu_args=command_line(switch, p, **line), seed=p.seed,
                       model={"boot": "minimal"}, memhp_default_state="online_movable", **switch.keywords)


def _churn(vm, size: int) -> None:
    vm.guest("free", handle=vm.guest("alloc", size=size))


def _refused(switch: str, mechanism: str, error: Exception) -> OutcomeCell:
    text = str(error).split(": ", 1)[-1] if str(error).startswith("-") else str(error)
    return OutcomeCell(switch, mechanism, "refused", float("nan"), text, {"error": str(error)})


def _balloon(switch: Switch, p: OpenProblemsParams) -> dict:
    with _open(switch, p, balloon="") as vm:
        _churn(vm, p.churn)
        rss = vm.sample()["host_rss"]
        vm.qmp("balloon", value=p.memory - p.shrink)
        vm.advance(p.settle_ms)
        host = vm.inspect("host")
        gave = p.memory - vm.qmp("query-balloon")["actual"]
        return {"freed": rss - vm.sample()["host_rss"], "guest_gave": gave, "rss_before": rss,
                "log": host.qemu_log[:2], "log_lines": host.qemu_log_lines}


def _reporting(switch: Switch, p: OpenProblemsParams) -> dict:
    with _open(switch, p, balloon=",free-page-reporting=on") as vm:
        _churn(vm, p.churn)
        rss = vm.sample()["host_rss"]
        vm.advance(p.settle_ms)
        host = vm.inspect("host")
        reported = vm.inspect("reporting").reported_pages * 4096
        return {"freed": rss - vm.sample()["host_rss"], "guest_gave": reported, "rss_before": rss,
                "unaligned": host.report_unaligned_entries, "log": host.qemu_log[:2]}


def _migrate(switch: Switch, p: OpenProblemsParams, hint: bool) -> int:
    balloon = ",free-page-hint=on,iothread=io0" if hint else None
    extra = " -object iothread,id=io0" if hint else ""
    s = Switch(switch.key, switch.label, switch.backend, switch.extra + extra, switch.keywords)
    with _open(s, p, balloon=balloon) as vm:
        _churn(vm, p.churn)
        vm.qmp("migrate-set-parameters", **{"max-bandwidth": 0})
        vm.qmp("migrate", uri="tcp:127.0.0.1:4444")
        vm.advance_until("MIGRATION", max_ms=120_000, status="completed")
        return int(vm.qmp("query-migrate")["ram"]["transferred"])


def _hinting(switch: Switch, p: OpenProblemsParams) -> dict:
    plain = _migrate(switch, p, hint=False)
    hinted = _migrate(switch, p, hint=True)
    return {"freed": plain - hinted, "guest_gave": 0, "plain_sent": plain, "hinted_sent": hinted}


def _virtio_mem(switch: Switch, p: OpenProblemsParams) -> dict:
    with _open(switch, p, virtio_mem=True) as vm:
        vm.advance(2000)
        plugged = int(vm.qmp("qom-get", path="vm0", property="size"))
        _churn(vm, p.churn)
        job = vm.guest("alloc", size=p.churn // 2)  # data in the device's memory when it is unplugged
        rss, device_rss = vm.sample()["host_rss"], vm.inspect("host").blocks[-1]["rss"]
        vm.qmp("qom-set", path="vm0", property="requested-size", value=0)
        vm.advance(2 * p.settle_ms)
        left = int(vm.qmp("qom-get", path="vm0", property="size"))
        vm.guest("free", handle=job)
        # what the unplug returned from the device's memory (its data moved to boot RAM meanwhile)
        return {"freed": device_rss - vm.inspect("host").blocks[-1]["rss"], "guest_gave": plugged - left,
                "plugged": plugged, "net_freed": rss - vm.sample()["host_rss"], "rss_before": rss,
                "block_size": int(vm.qmp("qom-get", path="vm0", property="block-size"))}


RUNNERS = {"balloon": _balloon, "reporting": _reporting, "hinting": _hinting, "virtio-mem": _virtio_mem}


def classify(measured: dict, baseline: float, mechanism: str) -> str:
    """``works``, ``partial`` or ``frees nothing`` from the number against the baseline's."""
    value = measured["freed"]
    if value >= WORKS_SHARE * baseline:
        return "works"
    if value > 0:
        return "partial"
    return "frees nothing"


def _text(mechanism: str, outcome: str, m: dict) -> str:
    freed = f"{m['freed'] / MiB:.0f} MiB"
    if mechanism == "hinting":
        return f"{freed} fewer sent ({m['hinted_sent'] / MiB:.0f} of {m['plain_sent'] / MiB:.0f} MiB)"
    gave = f"{m['guest_gave'] / MiB:.0f} MiB"
    return f"{freed} freed, guest gave {gave}"


def run_open_problems(params: OpenProblemsParams | None = None) -> OpenProblemsResult:
    """Every switch of ``params`` against every mechanism; outcomes computed against the baseline."""
    p = params or OpenProblemsParams()
    switches = [s for s in SWITCHES if s.key in p.switches]
    cells = []
    baseline: dict[str, float] = {}
    for mechanism in p.mechanisms:
        for s in switches:  # the baseline comes first in SWITCHES
            try:
                m = RUNNERS[mechanism](s, p)
            except NotModelled:  # QEMU would run it; labkit's model does not (the cell stays empty)
                continue
            except (ValueError, QMPError) as e:
                cells.append(_refused(s.key, mechanism, e))
                continue
            if s.key == "baseline":
                baseline[mechanism] = m["freed"]
            outcome = classify(m, baseline[mechanism], mechanism)
            cells.append(OutcomeCell(s.key, mechanism, outcome, float(m["freed"]),
                                     _text(mechanism, outcome, m), m))
    order = {k: i for i, k in enumerate(SWITCH_KEYS)}
    cells.sort(key=lambda c: (order[c.switch], MECHANISMS.index(c.mechanism)))
    return OpenProblemsResult(p, cells)


def format_outcomes(result: OpenProblemsResult) -> str:
    """The matrix as text: one row per switch, one column per mechanism."""
    mechs = list(result.params.mechanisms)
    rows = [["switch", *mechs]]
    outcomes = result.outcomes()
    for key in result.params.switches:
        rows.append([key] + [outcomes.get(key, {}).get(m, "not modelled") for m in mechs])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


__all__ = ["MECHANISMS", "OUTCOMES", "SWITCHES", "SWITCH_KEYS", "OpenProblemsParams", "OpenProblemsResult",
           "OutcomeCell", "Switch", "classify", "command_line", "format_outcomes", "live_keywords",
           "run_open_problems"]
