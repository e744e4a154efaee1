"""GWA-T-12 traces: parsing, clear errors with nothing half-applied, seeded generation, replay scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labkit.model import traces as tr
from labkit.model.traces import (
    COLUMNS,
    TraceError,
    format_trace,
    generate_traces,
    parse_trace,
    read_trace,
    read_traces,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "traces" / "synthetic-4vm-6h"
HEADER = ";\t".join(name for name, _ in COLUMNS)


def row(t: float, usage_kb: float = 1_000_000, provisioned_kb: float = 4_194_304, sep: str = ";\t") -> str:
    return sep.join(str(v) for v in (t, 2, 5852.0, 1000.5, 17.1, provisioned_kb, usage_kb, 1.5, 0.25,
                                     3.0, 0.5))


def test_shipped_traces_parse_with_the_published_shape():
    traces = read_traces(SHIPPED)
    assert [t.name for t in traces] == ["1", "2", "3", "4"]
    for t in traces:
        assert len(t) == 72  # six hours of 5-minute samples
        assert t.sample_s == 300.0
        assert (np.diff(t.timestamp_s) == 300).all()
        share = t.memory_usage_kb / t.memory_provisioned_kb
        assert 0 < share.min() and share.max() < 1
        assert share.mean() < 0.5  # typical VMs use far less than they are given


def test_shipped_traces_regenerate_byte_for_byte():
    """data/traces/README.md's command reproduces the shipped files exactly."""
    for trace in generate_traces(n_vms=4, hours=6, seed=0):
        assert format_trace(trace) == (SHIPPED / f"{trace.name}.csv").read_text(encoding="utf-8")


def test_cli_writes_the_same_files(tmp_path):
    assert tr.main(["--out", str(tmp_path), "--vms", "2", "--hours", "1", "--seed", "5"]) == 0
    written = read_traces(tmp_path)
    expected = generate_traces(2, 1, 5)
    assert [format_trace(t) for t in written] == [format_trace(t) for t in expected]


def test_format_parse_round_trip_and_seeds():
    a, b = generate_traces(2, 2, seed=7), generate_traces(2, 2, seed=7)
    assert [format_trace(t) for t in a] == [format_trace(t) for t in b]
    c = generate_traces(2, 2, seed=8)
    assert format_trace(a[0]) != format_trace(c[0])
    again = parse_trace(format_trace(a[1]), source="2.csv")
    assert format_trace(again) == format_trace(a[1])
    assert again.name == "2"


def test_header_is_optional_and_separators_are_lenient():
    with_header = parse_trace("\n".join([HEADER, row(100), row(400)]) + "\n", "x.csv")
    without = parse_trace("\n".join([row(100, sep=";"), row(400, sep="; ") + ";"]), "y.csv")
    assert len(with_header) == len(without) == 2
    assert with_header.memory_usage_kb.tolist() == without.memory_usage_kb.tolist()
    with pytest.raises(ValueError):
        with_header.memory_usage_kb[0] = 5  # read-only columns


@pytest.mark.parametrize(("lines", "line_no", "words"), [
    ([HEADER, row(100), "1;2;3"], 3, ["expected 11", "got 3"]),
    ([row(100), row(400).replace("1000000", "lots")], 2, ["'Memory usage [KB]'", "'lots'", "not a number"]),
    ([row(100), row(400), row(300)], 3, ["goes back in time", "line 2", "400"]),
    ([row(100), row(100)], 2, ["repeats", "line 1"]),
    ([row(100, usage_kb=-5)], 1, ["'Memory usage [KB]'", "negative"]),
    ([row(100, provisioned_kb=0)], 1, ["'Memory capacity provisioned [KB]'", "must be > 0"]),
    ([row(1_376_314_846_000)], 1, ["looks like milliseconds", "Unix seconds"]),
    ([row(100, usage_kb=float("nan"))], 1, ["not a finite number"]),
    ([HEADER.replace("Memory usage", "RAM used")], 1, ["does not name the GWA-T-12 columns"]),
])
def test_bad_lines_name_file_line_and_value(lines, line_no, words):
    with pytest.raises(TraceError) as err:
        parse_trace("\n".join(lines), source="vm7.csv")
    text = str(err.value)
    assert text.startswith(f"vm7.csv, line {line_no}: "), text
    for word in words:
        assert word in text, (word, text)
    assert err.value.line == line_no and err.value.source == "vm7.csv"


def test_empty_trace_is_refused():
    for text in ("", HEADER + "\n", "\n\n"):
        with pytest.raises(TraceError, match="no samples"):
            parse_trace(text, source="empty.csv")


def test_one_bad_file_means_no_traces(tmp_path):
    good = generate_traces(2, 1, seed=1)
    tr.write_traces(good, tmp_path)
    (tmp_path / "3.csv").write_text("\n".join([HEADER, row(100), row(50)]))
    with pytest.raises(TraceError, match=r"3\.csv, line 3: .*goes back in time"):
        read_traces(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no"):
        read_traces(_empty_dir(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_directory_order_is_numeric(tmp_path):
    for name in ("10", "2", "1"):
        (tmp_path / f"{name}.csv").write_text(row(100) + "\n")
    assert [t.name for t in read_traces(tmp_path)] == ["1", "2", "10"]


def test_working_set_scales_usage_share_to_the_vm():
    text = "\n".join([row(1000, usage_kb=1 << 20, provisioned_kb=4 << 20),  # 25 %
                      row(1300, usage_kb=3 << 20, provisioned_kb=4 << 20),  # 75 %
                      row(1600, usage_kb=4 << 20, provisioned_kb=4 << 20)])  # 100 %
    t = parse_trace(text, "s.csv")
    gib = 1 << 30
    assert t.working_set_bytes(0, 8 * gib) == 2 * gib  # 25 % of an 8 GiB VM
    assert t.working_set_bytes(150, 8 * gib) == 4 * gib  # halfway to 75 %: 50 %
    assert t.working_set_bytes(300, 8 * gib, max_share=0.9) == int(0.75 * 8 * gib)
    assert t.working_set_bytes(10_000, 8 * gib) == int(0.8 * 8 * gib)  # capped, last sample held
    assert t.working_set_bytes(-50, 8 * gib) == 2 * gib  # first sample held before the trace
    assert t.working_set_bytes(15, 8 * gib, speed=10) == 4 * gib  # 15 s at 10x = 150 s of trace
    assert t.duration_s == 600.0


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_vms"):
        generate_traces(0)
    with pytest.raises(ValueError, match="hours"):
        generate_traces(1, hours=0)
    with pytest.raises(ValueError, match="sample_s"):
        generate_traces(1, sample_s=0)
