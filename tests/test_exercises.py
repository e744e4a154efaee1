"""labkit.exercises: per-student variants, checkers that run the model, hints, the marking table, and
the exercise notebooks run with the solution filled in.

The expected answers come from the model; the tests hold them against the facts of
docs/mechanisms.md each exercise is built on (the § is named in each test).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import nbformat
import pytest

from labkit import exercises
from labkit.devices.balloon import VIRTIO_BALLOON_ARRAY_PFNS_MAX
from labkit.exercises.reporting import per_pass_mib
from labkit.exercises.virtio_mem import unplug_requests
from labkit.model.pages import PAGES_PER_MEMORY_BLOCK, STRUCT_PAGE_SIZE
from labkit.units import GiB, MiB, PAGE_SIZE

ROOT = Path(__file__).resolve().parent.parent
EXERCISE_NOTEBOOKS = sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))
STUDENTS = [f"student{i:02d}" for i in range(40)]


def first(name: str, predicate) -> exercises.Exercise:
    """The first of STUDENTS whose variant (its params only: no model run) satisfies ``predicate``."""
    for student in STUDENTS:
        ex = exercises.make(name, student)
        if predicate(ex.params):
            return ex
    raise AssertionError(f"no student among {len(STUDENTS)} has a {name} variant like that")


def hint_for(ex: exercises.Exercise, **wrong) -> str:
    """Check the right answer with some parts replaced (strictly, as an nbgrader test cell does);
    return the AssertionError's text."""
    answer = ex.solve()
    answer = {**answer, **wrong} if isinstance(answer, dict) else next(iter(wrong.values()))
    with pytest.raises(AssertionError) as err:
        ex.check(answer, strict=True)
    return str(err.value)


# --- variants ---------------------------------------------------------------------------------------
def test_there_are_four_to_six_exercises_each_citing_mechanisms():
    assert 4 <= len(exercises.names()) <= 6
    for name in exercises.names():
        spec = exercises.spec(name)
        assert spec.sections and all(s.startswith("§") for s in spec.sections), name
        assert spec.parts and spec.hint is not None and spec.explain is not None, name


@pytest.mark.parametrize("name", exercises.names())
def test_variants_are_deterministic_per_student_and_seed_and_differ_between_students(name):
    a = exercises.make(name, "alice", seed=3)
    assert a.params == exercises.make(name, "alice", seed=3).params
    assert a.params != exercises.make(name, "alice", seed=4).params
    distinct = {json.dumps(exercises.make(name, s).params, sort_keys=True) for s in STUDENTS[:10]}
    assert len(distinct) >= 6, f"10 students share {10 - len(distinct) + 1} variants"
    assert exercises.make(name, 1234).params == exercises.make(name, "1234").params


@pytest.mark.parametrize("name", exercises.names())
def test_the_right_answer_passes_with_a_tick_and_the_prompt_has_the_students_numbers(name, capsys):
    ex = exercises.make(name, "bob")
    result = ex.check(ex.solve())
    assert result.passed and not result.missing
    assert capsys.readouterr().out.startswith(f"✓ {name} (bob, seed 0)")
    # every number of the variant is in the prompt; dommemstat shows the balloon as QMP's target
    hidden = {"vm_seed", "balloon_mib"} if name == "dommemstat" else {"vm_seed"}
    shown = [v for k, v in ex.params.items() if k not in hidden and not isinstance(v, bool)]
    shown += [ex.facts["target"]] if name == "dommemstat" else []
    assert all(str(v) in ex.prompt for v in shown), (shown, ex.prompt)
    assert all(f"`{p.name}`" in ex.prompt for p in ex.parts)
    assert exercises.check(name, "bob", ex.solve()).passed  # what an nbgrader test cell calls


# --- wrong answers get hints ------------------------------------------------------------------------
def test_balloon_requests_off_by_one_request_fails_with_the_partial_request_hint():
    ex = exercises.make("balloon_requests", "carol")
    right = ex.solve()
    assert "partial request" in hint_for(ex, requests=right["requests"] - 1)
    assert "requests: " in hint_for(ex, requests=right["requests"] + 1)
    pages = (ex.params["memory_gib"] * GiB - ex.params["value"]) // PAGE_SIZE
    assert "256 PFNs" in hint_for(ex, requests=pages)
    balloon_size = ex.params["after"] * VIRTIO_BALLOON_ARRAY_PFNS_MAX * PAGE_SIZE
    text = hint_for(ex, actual_after=balloon_size)
    assert "logical size" in text and "§1.7" in text and "requests:" not in text
    assert "in bytes" in hint_for(ex, actual_after=right["actual_after"] / MiB)


def test_dommemstat_hints_name_the_confusion():
    plain = first("dommemstat", lambda p: not p["deflate_on_oom"])
    assert "adjust_managed_page_count" in hint_for(plain, available=plain.facts["MemTotal"])
    assert "falls by the balloon" in hint_for(plain, usable=plain.facts["MemAvailable"])
    assert "not MemFree" in hint_for(
        plain, usable=plain.facts["MemFree"] - plain.params["balloon_mib"])
    assert "logical size" in hint_for(plain, actual=float(plain.params["balloon_mib"]))
    doo = first("dommemstat", lambda p: p["deflate_on_oom"])
    assert "does not shrink" in hint_for(doo, available=doo.facts["MemTotal"] - doo.params["balloon_mib"])


def test_reporting_tolerance_edges_and_hints():
    ex = exercises.make("reporting_rss", "dave")
    right = ex.solve()
    returned = right["returned_mib"]
    slack = 16 + 0.10 * returned  # the part's stated tolerance
    assert ex.check({**right, "returned_mib": returned + 0.9 * slack}).passed
    assert ex.check({**right, "returned_mib": returned - 0.9 * slack}).passed
    assert "too high (by more than 10% + 16 MiB)" in hint_for(ex, returned_mib=returned + 1.1 * slack)
    assert "too low" in hint_for(ex, returned_mib=returned - 1.1 * slack)
    assert "paced" in hint_for(ex, returned_mib=float(ex.params["job_mib"]))
    assert "PAGE_REPORTING_DELAY" in hint_for(ex, passes=right["passes"] + 1)
    assert "passes:" in hint_for(ex, passes=right["passes"] - 1)


def test_virtio_mem_hints_and_off_by_one_requests():
    ex = exercises.make("virtio_mem_requests", "erin")
    right, r = ex.solve(), ex.params["requested_mib"]
    assert "one PLUG request" in hint_for(ex, plug_requests=r // 2)
    assert "whole 128 MiB memory block" in hint_for(ex, memmap_mib=r / 64)
    for off in (-1, 1):
        assert "unplug_requests:" in hint_for(ex, unplug_requests=right["unplug_requests"] + off)
    whole = first("virtio_mem_requests",  # a shrink that takes at least one whole block in one request
                  lambda p: unplug_requests(p["requested_mib"], p["requested_mib"] - p["shrunk_mib"])
                  < (p["requested_mib"] - p["shrunk_mib"]) // 2)
    removed = whole.params["requested_mib"] - whole.params["shrunk_mib"]
    assert "one request" in hint_for(whole, unplug_requests=removed // 2)


def test_migration_hints_explain_convergence_both_ways():
    never = first("migration_converges", lambda p: p["rate_mib"] > p["bandwidth_mib"] and
                  p["wss_mib"] > p["bandwidth_mib"] * p["downtime_ms"] / 1000)
    assert "Auto-converge" in hint_for(never, converges=True)
    fits = first("migration_converges", lambda p: p["rate_mib"] > p["bandwidth_mib"] and
                 p["wss_mib"] <= p["bandwidth_mib"] * p["downtime_ms"] / 1000)
    assert "fits under" in hint_for(fits, converges=False)
    threshold = never.solve()["threshold_mib"]
    assert "units" in hint_for(never, threshold_mib=threshold * 1000)


# --- bad input ----------------------------------------------------------------------------------------
def test_unknown_exercise_and_bad_student_or_seed_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown exercise 'ballon'; accepted: \['balloon_requests'"):
        exercises.make("ballon", "alice")
    with pytest.raises(ValueError, match="non-empty"):
        exercises.make("dommemstat", "  ")
    with pytest.raises(TypeError, match="student must be a str"):
        exercises.make("dommemstat", None)
    with pytest.raises(TypeError, match="student must be a str"):
        exercises.make("dommemstat", True)
    with pytest.raises(TypeError, match="seed must be an int, got '0'"):
        exercises.make("dommemstat", "alice", seed="0")
    with pytest.raises(ValueError, match="at least one student"):
        exercises.variants("dommemstat", students=[])


@pytest.mark.parametrize(("answer", "error", "text"), [
    ({"requests": "38", "actual_after": 1}, TypeError, "requests must be a whole number .int., got '38'"),
    ({"requests": True, "actual_after": 1}, TypeError, "requests must be a whole number"),
    ({"requests": 38.5, "actual_after": 1}, ValueError, "requests must be a whole number .int., got 38.5"),
    ({"requests": float("nan"), "actual_after": 1}, ValueError, "finite"),
    ({"requests": 38, "actual": 1}, ValueError, r"unknown answer key\(s\) \['actual'\]; the parts are"),
    (38, TypeError, "has 2 parts: answer with a dict"),
])
def test_malformed_answers_are_rejected_before_the_model_runs(answer, error, text):
    ex = exercises.make("balloon_requests", "alice")
    with pytest.raises(error, match=text):
        ex.check(answer)
    assert ex._outcome is None  # nothing ran: a bad answer changes nothing


def test_a_bool_part_takes_only_a_bool():
    ex = exercises.make("migration_converges", "alice")
    with pytest.raises(TypeError, match="converges must be True or False, got 'yes'"):
        ex.check({"threshold_mib": 1.0, "converges": "yes"})


def test_missing_answers_fail_unless_missing_ok(capsys):
    ex = exercises.make("balloon_requests", "alice")
    with pytest.raises(AssertionError, match=r"no answer yet for \['requests', 'actual_after'\]"):
        ex.check(ex.blank(), strict=True)
    capsys.readouterr()
    shown = ex.check(ex.blank())  # in a notebook: a cross, no exception
    assert not shown.passed and shown.missing == ("requests", "actual_after")
    assert capsys.readouterr().out.startswith("✗ balloon_requests (alice, seed 0): no answer yet for")
    result = ex.check(ex.blank(), missing_ok=True)
    assert not result.passed and result.missing == ("requests", "actual_after")
    assert "not answered yet" in capsys.readouterr().out
    partial = ex.check({"requests": ex.solve()["requests"], "actual_after": None}, missing_ok=True)
    assert partial.parts == {"requests": True, "actual_after": None}
    with pytest.raises(AssertionError):  # a wrong part still raises when others are missing
        ex.check({"requests": 0, "actual_after": None}, missing_ok=True, strict=True)


def test_a_wrong_answer_prints_a_cross_and_the_hint_and_strict_raises_the_same_text(capsys):
    """What a student sees in a notebook (a printed cross and hint, Run All goes on) and what an
    nbgrader test cell sees (AssertionError) carry the same text."""
    ex = exercises.make("balloon_requests", "alice")
    wrong = {**ex.solve(), "requests": ex.solve()["requests"] + 3}
    capsys.readouterr()
    result = ex.check(wrong)
    printed = capsys.readouterr().out
    assert not result.passed and result.parts == {"requests": False, "actual_after": True}
    assert printed.startswith("✗ balloon_requests (alice, seed 0): 1 of 2 parts is wrong.")
    assert "Hint: " in printed
    with pytest.raises(AssertionError) as err:
        ex.check(wrong, strict=True)
    assert printed == f"✗ {err.value}\n"
    with pytest.raises(AssertionError) as graded:  # the module-level call graders use
        exercises.check("balloon_requests", "alice", wrong, strict=True)
    assert str(graded.value) == str(err.value)
    assert not exercises.check("balloon_requests", "alice", wrong).passed
    with pytest.raises(TypeError, match="requests must be"):  # malformed answers raise either way
        ex.check({**wrong, "requests": "many"})


@pytest.mark.parametrize("mode", ["autograde", "validate"])
def test_under_nbgrader_a_check_cell_raises_for_wrong_and_for_unanswered(mode, monkeypatch, capsys):
    """nbgrader 0.9 sets NBGRADER_EXECUTION in the kernel (converters/autograde.py, validator.py) and
    scores a test cell by whether it raises: there, a wrong answer and an empty one both raise, even
    from a notebook's non-strict, missing_ok check call (else an empty submission scores full marks)."""
    ex = exercises.make("balloon_requests", "alice")
    right, wrong = ex.solve(), {**ex.solve(), "requests": ex.solve()["requests"] + 1}
    monkeypatch.setenv("NBGRADER_EXECUTION", mode)
    with pytest.raises(AssertionError, match="no answer yet"):
        ex.check(ex.blank(), missing_ok=True)
    with pytest.raises(AssertionError, match="1 of 2 parts is wrong"):
        ex.check(wrong)
    capsys.readouterr()
    assert ex.check(right, missing_ok=True).passed and capsys.readouterr().out.startswith("✓")
    monkeypatch.delenv("NBGRADER_EXECUTION")
    assert not ex.check(ex.blank(), missing_ok=True).passed  # a student's notebook: a note, no raise


def test_exercise_notebook_runs_on_after_a_wrong_answer(tmp_path):
    """ex01 with a wrong answer typed into exercise 1: its check cell prints the cross and the hint,
    and Run All reaches exercise 2 and the last cell (nbclient, the notebook's own kernel)."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "notebooks" / "exercises" / "ex01_balloon.ipynb"
    nb = nbformat.read(path, as_version=4)
    answer = next(c for c in nb.cells if c.source.startswith("answer1 = "))
    answer.source = 'answer1 = {"requests": 1, "actual_after": 1}'
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in c.outputs) for i, c in enumerate(nb.cells)
               if c.cell_type == "code"}
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    check1 = next(i for i, c in enumerate(nb.cells) if "ex1.check(answer1" in c.source)
    assert outputs[check1].startswith("✗ balloon_requests (alice, seed 0): 2 of 2 parts are wrong.")
    assert outputs[check1].count("Hint: ") == 2
    check2 = next(i for i, c in enumerate(nb.cells) if "ex2.check(answer2" in c.source)
    assert "not answered yet" in outputs[check2]  # the next exercise's check ran too
    assert nb.cells[-1].execution_count is not None


# --- the expected answers agree with the mechanisms -------------------------------------------------
def test_balloon_requests_follow_the_256_pfn_batches():
    """§1.2: at most VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256 PFNs per request; §1.7: num_pages =
    (vm_ram_size - value) >> 12 and query-balloon's actual = vm_ram_size - balloon pages x 4096."""
    for student in STUDENTS[:10]:
        ex = exercises.make("balloon_requests", student)
        ram = ex.params["memory_gib"] * GiB
        pages = (ram - ex.params["value"]) >> 12
        assert pages % 256, "every variant ends with a partial request"
        assert ex.solve() == {"requests": math.ceil(pages / 256),
                              "actual_after": ram - ex.params["after"] * 256 * PAGE_SIZE}


def test_dommemstat_follows_memtotal_and_memavailable_rules():
    """§1.7: actual = RAM - balloon; §1.3: MemTotal shrinks by the balloon unless deflate-on-oom;
    §1.5: usable = MemAvailable, which balloon pages taken from free memory lower one for one."""
    seen = set()
    for student in STUDENTS[:10]:
        ex = exercises.make("dommemstat", student)
        p, facts, got = ex.params, ex.facts, ex.solve()
        balloon = p["balloon_mib"]
        assert facts["MemFree"] - balloon > 64, "the balloon fits in free memory: nothing reclaimed"
        assert got["actual"] == pytest.approx(p["memory_gib"] * 1024 - balloon)
        assert got["available"] == pytest.approx(facts["MemTotal"] - (0 if p["deflate_on_oom"] else balloon))
        # the balloon's first pages come off the per-CPU lists (not in MemFree/MemAvailable): all
        # but those of UNMOVABLE pageblocks, and the last refill leaves < one batch there
        assert got["usable"] == pytest.approx(facts["MemAvailable"] - balloon + facts["PerCpu"], abs=1.0)
        seen.add(p["deflate_on_oom"])
    assert seen == {True, False}


def test_reporting_answers_follow_the_delay_and_the_per_pass_budget():
    """§3.2: the first pass runs PAGE_REPORTING_DELAY = 2 s after the free, then one every 2 s;
    §3.3: a pass makes budget + 1 calls of 32 blocks, budget = ceil(nr_free / 512). The textbook
    estimate lands within the part's tolerance, and the instant asked is mid-staircase."""
    for student in STUDENTS[:6]:
        ex = exercises.make("reporting_rss", student)
        p, facts, got = ex.params, ex.facts, ex.solve()
        passes = p["seconds"] // 2
        assert got["passes"] == passes
        # each zone reporting walks has its own order-10 list and budget (page_reporting_process_zone),
        # and gives back at most its unreported blocks (reported ones are skipped)
        one_pass = sum(per_pass_mib(n) for n in facts["order10_zones"])
        estimate = min(p["job_mib"], sum(min(job * 4, passes * per_pass_mib(n)) for n, job in
                                         zip(facts["order10_zones"], facts["job10_zones"], strict=True)))
        assert got["returned_mib"] == pytest.approx(estimate, rel=0.10, abs=16)
        assert got["returned_mib"] < 0.9 * p["job_mib"], "asked before the job is all back"
        assert one_pass > 16 + 0.10 * got["returned_mib"], "one pass off is outside the tolerance"


def test_virtio_mem_answers_follow_blocks_and_subblocks():
    """§5.4: one PLUG request per new 128 MiB memory block (min(remaining, 64) subblocks); the
    memmap, 64 B of struct page per 4 KiB page, is allocated per added block; §5.5: unplug from the
    top block, a full block in one request, else one 2 MiB subblock per request."""
    memmap_per_block = PAGES_PER_MEMORY_BLOCK * STRUCT_PAGE_SIZE / MiB
    for student in STUDENTS[:10]:
        ex = exercises.make("virtio_mem_requests", student)
        r, s = ex.params["requested_mib"], ex.params["shrunk_mib"]
        assert ex.facts["plugged_mib"] == r and ex.facts["shrunk_plugged_mib"] == s
        blocks = math.ceil(r / 128)
        assert ex.solve() == {"plug_requests": blocks, "memmap_mib": blocks * memmap_per_block,
                              "unplug_requests": unplug_requests(r, r - s)}


def test_migration_answers_follow_the_threshold_rule():
    """§6.2: threshold_size = bandwidth x downtime-limit, and QEMU stops the VM only when the
    backlog is under it: a guest dirtying faster than the link with a working set above the
    threshold never converges without auto-converge (§6.3)."""
    outcomes = set()
    for student in STUDENTS[:8]:
        ex = exercises.make("migration_converges", student)
        p, got = ex.params, ex.solve()
        threshold = p["bandwidth_mib"] * p["downtime_ms"] / 1000
        assert got["threshold_mib"] == pytest.approx(threshold, rel=0.05)
        assert got["converges"] == (p["rate_mib"] < p["bandwidth_mib"] or p["wss_mib"] <= threshold)
        outcomes.add(got["converges"])
    assert outcomes == {True, False}


# --- the marking table --------------------------------------------------------------------------------
def test_variants_table_matches_each_students_exercise_and_exports_csv(tmp_path):
    students = ["alice", "bob", 7]
    table = exercises.variants("virtio_mem_requests", students=students, seed=2)
    assert len(table) == 3 and [row["student"] for row in table] == ["alice", "bob", "7"]
    for row, student in zip(table, students, strict=True):
        ex = exercises.make("virtio_mem_requests", student, seed=2)
        assert {k: row[k] for k in ex.params} == ex.params
        assert {p.name: row[f"expected_{p.name}"] for p in ex.parts} == ex.solve()
    path = tmp_path / "marks.csv"
    text = table.to_csv(str(path))
    assert path.read_text(encoding="utf-8") == text
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert [r["student"] for r in rows] == ["alice", "bob", "7"]
    assert int(rows[1]["expected_unplug_requests"]) == table[1]["expected_unplug_requests"]
    assert "alice" in str(table) and "<td>bob</td>" in table._repr_html_()


def test_part_kinds_are_checked():
    with pytest.raises(ValueError, match="kind 'str' is not one of"):
        exercises.Part("x", "str", "x")


# --- the exercise notebooks, with the solution filled in ----------------------------------------------
def test_there_are_exercise_notebooks_with_student_and_solution_parameters():
    assert len(EXERCISE_NOTEBOOKS) >= 2
    for path in EXERCISE_NOTEBOOKS:
        first_code = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for name in ("student", "seed", "solution", "out_json"):
            assert f"{name} =" in first_code.source, (path.name, name)


@pytest.mark.notebook
@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: f"exercises/{p.name}")
def test_exercise_notebook_checks_the_models_answer(path: Path, tmp_path: Path, notebook_times: dict):
    import papermill

    out_json = tmp_path / "result.json"
    start = time.perf_counter()
    papermill.execute_notebook(
        str(path), str(tmp_path / path.name), kernel_name="python3", cwd=str(tmp_path),
        parameters={"student": "bob", "seed": 1, "solution": True, "out_json": str(out_json)},
        progress_bar=False, log_output=False, execution_timeout=300)
    notebook_times[f"exercises/{path.name} (solution=True)"] = time.perf_counter() - start
    result = json.loads(out_json.read_text())
    assert result["student"] == "bob" and result["exercises"]
    for name, outcome in result["exercises"].items():
        assert outcome["passed"], (name, outcome)
        assert outcome["params"] == exercises.make(name, "bob", seed=1).params
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, out_json.name])
