"""Memory-usage traces in the Bitbrains GWA-T-12 format: parse, check, write, and generate seeded ones.

GWA-T-12 (Grid Workloads Archive, TU Delft; Shen et al., CCGrid 2015) holds one CSV file per VM,
5-minute samples, ``;``-separated (the real files put a tab after each ``;``), with this header::

    Timestamp [ms]; CPU cores; CPU capacity provisioned [MHZ]; CPU usage [MHZ]; CPU usage [%];
    Memory capacity provisioned [KB]; Memory usage [KB]; Disk read throughput [KB/s];
    Disk write throughput [KB/s]; Network received throughput [KB/s]; Network transmitted throughput [KB/s]

Despite its name the first column holds **Unix seconds**; memory is in KB (KiB). A :class:`Trace`
keeps every column as a read-only numpy array. Parsing is all-or-nothing: the first bad line raises a
:class:`TraceError` naming the file, the line, the column and the value, and no Trace exists.

Replay (what :mod:`labkit.scenarios.overcommit` does with a trace): the guest's anonymous working set
at time t is ``usage(t) / provisioned(t)`` (linear interpolation between samples, the first and last
sample held outside the trace), capped at ``max_share``, times the VM's memory. A VM given 8 GiB
replaying a trace that used 1.5 GiB of 6 GiB provisioned holds 2 GiB of anonymous memory: the trace
supplies the *shape* (how full, how bursty) and the scenario the size.

This module reads and writes text files (its purpose); the rest of ``labkit.model`` does no I/O.
``python -m labkit.model.traces --out DIR --vms 4 --hours 6 --seed 0`` regenerates a seeded set.

>>> traces = generate_traces(n_vms=2, hours=1, seed=0)
>>> [len(t) for t in traces]
[12, 12]
>>> again = parse_trace(format_trace(traces[0]), source="1.csv")
>>> bool((again.memory_usage_kb == traces[0].memory_usage_kb).all())
True
>>> parse_trace("1;2;3", source="bad.csv")
Traceback (most recent call last):
...
labkit.model.traces.TraceError: bad.csv, line 1: expected 11 ';'-separated columns (Timestamp [ms]; \
CPU cores; ...), got 3: '1;2;3'
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The GWA-T-12 header, column by column, and the attribute each column becomes on a Trace.
COLUMNS = (
    ("Timestamp [ms]", "timestamp_s"),
    ("CPU cores", "cpu_cores"),
    ("CPU capacity provisioned [MHZ]", "cpu_capacity_mhz"),
    ("CPU usage [MHZ]", "cpu_usage_mhz"),
    ("CPU usage [%]", "cpu_usage_percent"),
    ("Memory capacity provisioned [KB]", "memory_provisioned_kb"),
    ("Memory usage [KB]", "memory_usage_kb"),
    ("Disk read throughput [KB/s]", "disk_read_kbps"),
    ("Disk write throughput [KB/s]", "disk_write_kbps"),
    ("Network received throughput [KB/s]", "net_received_kbps"),
    ("Network transmitted throughput [KB/s]", "net_transmitted_kbps"),
)
N_COLUMNS = len(COLUMNS)
SEPARATOR = ";\t"  # what the published files use; parsing accepts any whitespace after ';'
SAMPLE_S = 300  # GWA-T-12 samples every 5 minutes
MILLISECONDS_LOOK = 1e11  # Unix seconds stay below this until the year 5138; milliseconds do not
NONNEGATIVE = ("cpu_cores", "cpu_capacity_mhz", "cpu_usage_mhz", "cpu_usage_percent",
               "memory_usage_kb", "disk_read_kbps", "disk_write_kbps", "net_received_kbps",
               "net_transmitted_kbps")
EPOCH = 1_767_225_600  # generated traces start at labkit's model epoch (2026-01-01 UTC)
CPU_MHZ_PER_CORE = 2926.0  # a 2.9 GHz Xeon core, the kind of capacity GWA-T-12 VMs report
PROVISIONED_GIB = (2, 4, 8, 16)


class TraceError(ValueError):
    """A malformed trace: ``source``, ``line`` (1-based, 0 if the whole file) and what was wrong."""

    def __init__(self, source: str, line: int, message: str):
        where = f"{source}, line {line}" if line else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line


@dataclass(frozen=True, eq=False)
class Trace:
    """One VM's samples. Every column of :data:`COLUMNS` is a read-only float64 array attribute.

    >>> t = generate_traces(n_vms=1, hours=1, seed=3)[0]
    >>> t.duration_s, t.sample_s
    (3300.0, 300.0)
    >>> 0.0 < float(t.usage_fraction(0.0)) < 1.0
    True
    """

    name: str
    timestamp_s: np.ndarray
    cpu_cores: np.ndarray
    cpu_capacity_mhz: np.ndarray
    cpu_usage_mhz: np.ndarray
    cpu_usage_percent: np.ndarray
    memory_provisioned_kb: np.ndarray
    memory_usage_kb: np.ndarray
    disk_read_kbps: np.ndarray
    disk_write_kbps: np.ndarray
    net_received_kbps: np.ndarray
    net_transmitted_kbps: np.ndarray

    def __post_init__(self) -> None:
        for _, attr in COLUMNS:
            column = np.array(getattr(self, attr), dtype=np.float64)
            column.setflags(write=False)
            object.__setattr__(self, attr, column)

    def __len__(self) -> int:
        return len(self.timestamp_s)

    @property
    def duration_s(self) -> float:
        """Seconds from the first sample to the last."""
        return float(self.timestamp_s[-1] - self.timestamp_s[0])

    @property
    def sample_s(self) -> float:
        """The median spacing of the samples (300 s in GWA-T-12)."""
        return float(np.median(np.diff(self.timestamp_s))) if len(self) > 1 else float(SAMPLE_S)

    def usage_fraction(self, t_s: float | np.ndarray) -> np.ndarray:
        """Memory usage / provisioned at ``t_s`` seconds after the first sample (interpolated)."""
        fraction = self.memory_usage_kb / self.memory_provisioned_kb
        return np.interp(np.asarray(t_s, dtype=np.float64) + self.timestamp_s[0], self.timestamp_s,
                         fraction)

    def working_set_bytes(self, t_s: float | np.ndarray, memory: int, max_share: float = 0.8,
                          speed: float = 1.0) -> np.ndarray:
        """The anonymous working set a VM of ``memory`` bytes replays at scenario time ``t_s``.

        ``usage / provisioned``, capped at ``max_share``, times ``memory``; ``speed`` > 1 plays the
        trace faster (``speed=12`` plays an hour of samples in five minutes).
        """
        share = np.minimum(self.usage_fraction(np.asarray(t_s, dtype=np.float64) * speed), max_share)
        return (share * memory).astype(np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _header_ok(fields: list[str]) -> bool:
    norm = [" ".join(f.split()).lower() for f in fields]
    return norm == [name.lower() for name, _ in COLUMNS]


def parse_trace(text: str, source: str = "<string>", name: str | None = None) -> Trace:
    """Parse GWA-T-12 text (header optional). Raises :class:`TraceError` on the first bad line."""
    expected = "; ".join(n for n, _ in COLUMNS[:2]) + "; ..."
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(";")]
        if len(fields) == N_COLUMNS + 1 and not fields[-1]:  # a trailing ';'
            fields.pop()
        if len(fields) != N_COLUMNS:
            raise TraceError(source, number, f"expected {N_COLUMNS} ';'-separated columns ({expected}), "
                                             f"got {len(fields)}: {line[:80]!r}")
        if not rows and not line_numbers and not _is_number(fields[0]):
            if not _header_ok(fields):
                raise TraceError(source, number, f"header {line[:120]!r} does not name the GWA-T-12 "
                                                 f"columns: {'; '.join(n for n, _ in COLUMNS)}")
            line_numbers.append(0)  # header seen: data must follow
            continue
        values = []
        for (column, attr), field in zip(COLUMNS, fields, strict=True):
            try:
                value = float(field)
            except ValueError:
                raise TraceError(source, number, f"column {column!r}: {field!r} is not a number") from None
            if not math.isfinite(value):
                raise TraceError(source, number, f"column {column!r}: {field!r} is not a finite number")
            if attr in NONNEGATIVE and value < 0:
                raise TraceError(source, number, f"column {column!r}: {field!r} is negative")
            values.append(value)
        t, provisioned = values[0], values[5]
        if t >= MILLISECONDS_LOOK:
            raise TraceError(source, number, f"timestamp {fields[0]} looks like milliseconds; GWA-T-12's "
                                             "'Timestamp [ms]' column holds Unix seconds")
        if provisioned <= 0:
            raise TraceError(source, number, f"column 'Memory capacity provisioned [KB]': {fields[5]!r} "
                                             "must be > 0 (usage is replayed as a share of it)")
        if rows and t <= rows[-1][0]:
            previous = line_numbers[-1]
            verb = "repeats" if t == rows[-1][0] else "goes back in time from"
            raise TraceError(source, number, f"timestamp {fields[0]} {verb} line {previous}'s "
                                             f"{rows[-1][0]:.0f}; samples must be in increasing time")
        rows.append(values)
        line_numbers.append(number)
    if not rows:
        raise TraceError(source, 0, "no samples (an empty file, or a header without data)")
    table = np.array(rows, dtype=np.float64)
    return Trace(name if name is not None else Path(source).stem,
                 *(table[:, i] for i in range(N_COLUMNS)))


def read_trace(path: str | Path) -> Trace:
    """Read one GWA-T-12 file; the trace is named after the file (``"7.csv"`` gives ``"7"``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise TraceError(str(path), 0, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_trace(text, source=str(path))


def read_traces(path: str | Path | Sequence[str | Path]) -> list[Trace]:
    """Read a directory of ``*.csv`` files (in numeric then name order), one file, or a list of files.

    All files are parsed before anything is returned, so one bad file means no traces at all.
    """
    if isinstance(path, str | Path):
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.csv"), key=lambda f: (not f.stem.isdigit(),
                                                           int(f.stem) if f.stem.isdigit() else 0, f.stem))
            if not files:
                raise FileNotFoundError(f"trace directory {str(p)!r} holds no *.csv files")
        else:
            files = [p]
    else:
        files = [Path(f) for f in path]
        if not files:
            raise ValueError("read_traces() needs at least one file")
    return [read_trace(f) for f in files]


def format_trace(trace: Trace) -> str:
    """The trace as GWA-T-12 text: the header, then one line per sample (``;`` plus a tab)."""
    lines = [SEPARATOR.join(name for name, _ in COLUMNS)]
    columns = [getattr(trace, attr) for _, attr in COLUMNS]
    for i in range(len(trace)):
        cells = [f"{columns[0][i]:.0f}", f"{columns[1][i]:.0f}"]
        cells += [f"{c[i]:.6f}" for c in columns[2:]]
        lines.append(SEPARATOR.join(cells))
    return "\n".join(lines) + "\n"


def write_trace(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` to ``path`` in the GWA-T-12 format."""
    Path(path).write_text(format_trace(trace), encoding="utf-8")


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """An AR(1) series: slowly wandering noise (a loop over samples, not pages)."""
    noise = rng.normal(0.0, sigma, n)
    out = np.empty(n)
    level = 0.0
    for i in range(n):
        level = phi * level + noise[i]
        out[i] = level
    return out


def generate_trace(name: str, hours: float, rng: np.random.Generator, *, start: int = EPOCH,
                   sample_s: int = SAMPLE_S) -> Trace:
    """One synthetic VM shaped like GWA-T-12's: a low base usage, a daily swing, wandering noise,
    and a few bursts of 5 to 30 minutes (Poisson, about one every two hours)."""
    n = max(1, int(round(hours * 3600 / sample_s)))
    t = start + sample_s * np.arange(n)
    provisioned_kb = float(rng.choice(PROVISIONED_GIB)) * (1 << 20)
    cores = float(rng.choice((1, 2, 4, 8)))
    base = rng.uniform(0.08, 0.35)
    swing = rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * (t - start) / 86400 + rng.uniform(0, 2 * np.pi))
    bursts = np.zeros(n)
    for _ in range(rng.poisson(hours / 2)):
        at, length = int(rng.integers(n)), int(rng.integers(1, 7))
        bursts[at:at + length] += rng.uniform(0.1, 0.4)
    share = np.clip(base + swing + _ar1(rng, n, 0.9, 0.015) + bursts, 0.02, 0.95)
    cpu_percent = np.clip(rng.uniform(2, 20) + 150 * bursts + rng.normal(0, 3, n), 0.0, 100.0)
    capacity = cores * CPU_MHZ_PER_CORE
    disk_read = rng.lognormal(1.0, 1.5, n) * (1 + 20 * bursts)
    return Trace(name, t.astype(np.float64), np.full(n, cores), np.full(n, capacity),
                 np.round(cpu_percent / 100 * capacity, 6), np.round(cpu_percent, 6),
                 np.full(n, provisioned_kb), np.round(share * provisioned_kb, 6),
                 np.round(disk_read, 6), np.round(rng.lognormal(1.5, 1.0, n), 6),
                 np.round(rng.lognormal(0.5, 1.2, n), 6), np.round(rng.lognormal(0.2, 1.2, n), 6))


def generate_traces(n_vms: int = 4, hours: float = 6, seed: int = 0, *, start: int = EPOCH,
                    sample_s: int = SAMPLE_S) -> list[Trace]:
    """``n_vms`` seeded synthetic traces named ``"1"``, ``"2"``... (as GWA-T-12 names its files)."""
    if not isinstance(n_vms, int) or isinstance(n_vms, bool) or n_vms < 1:
        raise ValueError(f"n_vms must be an int >= 1, got {n_vms!r}")
    if not hours > 0:
        raise ValueError(f"hours must be > 0, got {hours!r}")
    if not isinstance(sample_s, int) or sample_s <= 0:
        raise ValueError(f"sample_s must be a positive int (seconds), got {sample_s!r}")
    rng = np.random.default_rng(seed)
    return [generate_trace(str(i + 1), hours, rng, start=start, sample_s=sample_s) for i in range(n_vms)]


def write_traces(traces: Sequence[Trace], directory: str | Path) -> list[Path]:
    """Write each trace to ``directory/<name>.csv``; returns the paths.

    A trace's name becomes a file name in ``directory`` and nothing else: a name with a path
    separator, ``..``, a leading dot or a NUL is refused (ValueError) before anything is written."""
    for trace in traces:
        name = trace.name
        if (not isinstance(name, str) or not name or name.startswith(".") or "\0" in name
                or "/" in name or os.sep in name or (os.altsep and os.altsep in name)):
            raise ValueError(f"trace name {name!r} cannot name a file in {str(directory)!r}: use a "
                             f"plain name (no path separator, not starting with a dot)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for trace in traces:
        path = out / f"{trace.name}.csv"
        write_trace(trace, path)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labkit.model.traces --out DIR [--vms N] [--hours H] [--seed S]``."""
    parser = argparse.ArgumentParser(prog="python -m labkit.model.traces",
                                     description="Write seeded synthetic traces in the GWA-T-12 format.")
    parser.add_argument("--out", required=True, help="directory to write <n>.csv files into")
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--hours", type=float, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_traces(generate_traces(args.vms, args.hours, args.seed), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
