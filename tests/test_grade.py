"""labkit grade: synthetic submissions (right, wrong, crashed, tampered, timed out, broken, not a
notebook) graded end to end on a dask LocalCluster, and the pieces one by one.

The expected marks are computed here from the model (``exercises.make(...).solve()`` for the
student's own variant), not copied from a run: a part is right exactly when the answer written into
the submission equals the model's answer for the trusted student and seed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest

from labkit import exercises
from labkit.cli import main
from labkit.exercises import record
from labkit.grading import answer_key, marks, submissions

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "notebooks" / "exercises" / "ex01_balloon.ipynb"
PARTS = [f"{name}.{p.name}" for name in ("balloon_requests", "dommemstat")
         for p in exercises.spec(name).parts]
TIMEOUT_S = 12


def solved(student: str, seed: int = 0) -> dict[str, dict]:
    return {name: exercises.make(name, student, seed).solve() for name in ("balloon_requests", "dommemstat")}


def write_submission(root: Path, student: str, answers: dict[str, str], params: dict | None = None,
                     edit=None) -> Path:
    """The handed-out ex01 with the answer cells replaced (``answer1``/``answer2`` -> source) and
    the parameters cell set (``student`` is always the student's own id unless ``params`` says)."""
    nb = nbformat.read(TEMPLATE, as_version=4)
    params = {"student": student, **(params or {})}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if submissions.ANSWER_MARK in cell.source:
            var = cell.source.split("=")[0].strip()
            cell.source = answers.get(var, cell.source)
        if "parameters" in cell.metadata.get("tags", []):
            lines = cell.source.splitlines()
            for key, value in params.items():
                lines = [f"{key} = {value!r}" if ln.split("=")[0].strip() == key else ln for ln in lines]
            cell.source = "\n".join(lines)
    if edit:
        edit(nb)
    path = root / student / "ex01_balloon.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    return path


def literal(var: str, answer: dict) -> str:
    return f"{var} = {answer!r}"


def expected_marks(student: str, answers: dict[str, dict | None]) -> dict[str, int]:
    """What the model says each part is worth for ``student`` (seed 0) given these answers."""
    out = {}
    for name in ("balloon_requests", "dommemstat"):
        ex = exercises.make(name, student, 0)
        right = ex.solve()
        given = answers.get(name) or {}
        for part in ex.parts:
            value = given.get(part.name)
            out[f"{name}.{part.name}"] = int(value is not None and part.matches(value, right[part.name]))
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    answers: dict[str, dict] = {}
    alice = solved("alice")
    write_submission(root, "alice", {"answer1": literal("answer1", alice["balloon_requests"]),
                                     "answer2": literal("answer2", alice["dommemstat"])})
    answers["alice"] = alice
    bob = solved("bob")
    bob_wrong = {"balloon_requests": {**bob["balloon_requests"],
                                      "requests": bob["balloon_requests"]["requests"] + 1},
                 "dommemstat": {**bob["dommemstat"], "available": bob["dommemstat"]["actual"] + 1}}
    write_submission(root, "bob", {"answer1": literal("answer1", bob_wrong["balloon_requests"]),
                                   "answer2": literal("answer2", bob_wrong["dommemstat"])})
    answers["bob"] = bob_wrong
    carol = solved("carol")  # the kernel dies in her second answer cell
    write_submission(root, "carol", {"answer1": literal("answer1", carol["balloon_requests"]),
                                     "answer2": "import os\nos._exit(3)"})
    answers["carol"] = {"balloon_requests": carol["balloon_requests"]}
    dave = solved("dave", seed=5)  # changed his seed and answered for it
    write_submission(root, "dave", {"answer1": literal("answer1", dave["balloon_requests"]),
                                    "answer2": literal("answer2", dave["dommemstat"])}, {"seed": 5})
    answers["dave"] = dave
    write_submission(root, "erin", {}, {"solution": True})  # let the model answer for her
    answers["erin"] = {}
    write_submission(root, "frank", {"answer1": "import time\ntime.sleep(600)"})
    answers["frank"] = {}
    gina = solved("gina")  # a NameError in her first answer, the second one right
    write_submission(root, "gina", {"answer1": "answer1 = {'requests': undefined_name}",
                                    "answer2": literal("answer2", gina["dommemstat"])})
    answers["gina"] = {"dommemstat": gina["dommemstat"]}
    (root / "hank").mkdir()
    (root / "hank" / "ex01_balloon.ipynb").write_text("{ not json")
    (root / "ivan.pdf").write_bytes(b"%PDF-1.4\n")
    roster = root.parent / "roster.csv"
    roster.write_text("student,seed\n" + "".join(f"{s},0\n" for s in
                                                  ["alice", "bob", "carol", "dave", "erin", "frank",
                                                   "gina", "hank", "ivan", "judy"]))
    out, html_path = root.parent / "marks.csv", root.parent / "report.html"
    code = main(["grade", str(root), "--out", str(out), "--html", str(html_path),
                 "--roster", str(roster), "--timeout", str(TIMEOUT_S), "--workers", "2"])
    assert code == 0
    with open(out, newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return rows, answers, html_path.read_text()


def marks_of(row: dict) -> dict[str, int]:
    return {col: int(row[col]) for col in PARTS}


def test_one_row_a_student_one_column_a_part(graded):
    rows, _, _ = graded
    assert sorted(rows) == ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan", "judy"]
    first = next(iter(rows.values()))
    assert list(first)[:2] == ["student", "seed"] and list(first)[2:2 + len(PARTS)] == PARTS
    assert {"total", "max", "percent", "status", "flags", "notes"} <= set(first)


@pytest.mark.parametrize("student", ["alice", "bob", "carol", "dave", "erin", "frank", "gina"])
def test_marks_match_the_model(graded, student):
    rows, answers, _ = graded
    want = expected_marks(student, answers[student])
    assert marks_of(rows[student]) == want, rows[student]
    assert int(rows[student]["total"]) == sum(want.values())


def test_right_and_wrong(graded):
    rows, _, html = graded
    assert rows["alice"]["status"] == "graded" and rows["alice"]["total"] == "5"
    assert rows["alice"]["flags"] == "" and rows["alice"]["notes"] == ""
    assert rows["bob"]["status"] == "graded" and rows["bob"]["total"] == "3"
    # the report groups bob's wrong parts under the exercise's own hint for them
    hint = marks.verify("bob", 0, ["balloon_requests"], [{
        "exercise": "balloon_requests", "student": "bob", "seed": 0,
        "answer": {**solved("bob")["balloon_requests"],
                   "requests": solved("bob")["balloon_requests"]["requests"] + 1}}])
    text = hint["balloon_requests"]["requests"]["hint"]
    assert text and text.split(".")[0][:40] in html.replace("&#x27;", "'").replace("&quot;", '"')


def test_tampered_parameters_are_flagged_and_not_trusted(graded):
    rows, _, _ = graded
    assert rows["dave"]["status"] == "flagged"
    assert "seed changed to 5 (graded as 0)" in rows["dave"]["flags"]
    assert rows["erin"]["status"] == "flagged"
    assert "solution changed to True" in rows["erin"]["flags"]
    assert rows["erin"]["total"] == "0"  # solution=False was injected: nothing was filled in


def test_crash_timeout_error_and_non_notebooks_get_clear_rows(graded):
    rows, _, _ = graded
    assert rows["carol"]["status"] == "crashed" and "kernel died in cell" in rows["carol"]["notes"]
    assert rows["frank"]["status"] == "timeout"
    assert f"longer than {TIMEOUT_S} s" in rows["frank"]["notes"]
    assert rows["gina"]["status"] == "error" and "NameError" in rows["gina"]["notes"]
    assert rows["hank"]["status"] == "not a notebook" and "not a notebook" in rows["hank"]["notes"]
    assert rows["ivan"]["status"] == "not a notebook" and ".pdf" in rows["ivan"]["notes"]
    assert rows["judy"]["status"] == "no submission" and rows["judy"]["total"] == "0"
    for row in rows.values():
        assert "Traceback" not in row["notes"]


def test_html_summary(graded):
    _, _, html = graded
    assert "Most common wrong answers, per mechanism" in html
    assert "each part: right / wrong / unanswered" in html and "total marks" in html
    assert "Bokeh" in html and "cdn.bokeh.org" not in html  # BokehJS inlined: opens offline
    assert html.index("<h1>labkit grade") > html.rfind("</head>")  # in the page, not inside BokehJS
    for student in ("alice", "judy", "hank"):
        assert f"<td>{student}</td>" in html


# --- the pieces ------------------------------------------------------------------------------------
def test_template_knows_its_exercises_and_locked_cells():
    t = submissions.Template.read(TEMPLATE)
    assert t.exercises == ("balloon_requests", "dommemstat")
    assert not any(submissions.ANSWER_MARK in src for src in t.locked)
    assert any("ex1.check(answer1" in src for src in t.locked)
    assert {"student", "seed", "solution", "out_json"} <= set(t.parameters)


def test_inspect_flags(tmp_path):
    templates = submissions.read_templates(TEMPLATE.parent)

    def edit(nb):
        for cell in nb.cells:
            if 'exercises.make("dommemstat", student, seed)' in cell.source:
                cell.source = cell.source.replace("student, seed", '"bob", seed')

    path = write_submission(tmp_path, "mallory", {"answer1": "answer1 = ex1.solve()"},
                            {"student": "bob"}, edit=edit)
    sub = submissions.inspect("mallory", path, tmp_path, templates, {"alice": 0}, 0)
    text = " | ".join(sub.flags)
    assert "not on the roster" in text
    assert "student changed to 'bob' (graded as 'mallory')" in text
    assert "locked cell(s) changed" in text and "dommemstat" in text
    assert ".solve()" in text
    assert sub.template == "ex01_balloon" and sub.runnable


def test_a_renamed_notebook_is_matched_by_its_exercises(tmp_path):
    templates = submissions.read_templates(TEMPLATE.parent)
    path = write_submission(tmp_path, "zoe", {})
    renamed = path.with_name("my work (1).ipynb")
    path.rename(renamed)
    sub = submissions.inspect("zoe", renamed, tmp_path, templates, None, 0)
    assert sub.template == "ex01_balloon" and sub.flags == []


def test_roster_errors(tmp_path):
    bad = tmp_path / "r.csv"
    bad.write_text("name\nalice\n")
    with pytest.raises(ValueError, match="needs a 'student' column"):
        submissions.read_roster(bad)
    bad.write_text("student,seed\nalice,x\n")
    with pytest.raises(ValueError, match="seed 'x' is not an int"):
        submissions.read_roster(bad)
    bad.write_text("student,seed\nalice,1\nalice,2\n")
    with pytest.raises(ValueError, match="two seeds"):
        submissions.read_roster(bad)


def test_verify_rechecks_and_never_trusts_the_kernel():
    right = solved("alice")["dommemstat"]
    rows = [{"exercise": "dommemstat", "student": "alice", "seed": 0, "answer": {"actual": "a lot"}},
            {"exercise": "dommemstat", "student": "bob", "seed": 0, "answer": right},
            {"exercise": "balloon_requests", "student": "alice", "seed": 0, "answer": 7}]
    out = marks.verify("alice", 0, ["dommemstat", "balloon_requests"], rows)
    assert out["dommemstat"]["actual"]["verdict"] is False
    assert "malformed" in out["dommemstat"]["actual"]["hint"]
    assert out["dommemstat"]["usable"]["verdict"] is None  # left unanswered
    assert all(v["verdict"] is False for v in out["balloon_requests"].values())  # not a dict
    assert marks.other_variants("alice", 0, ["dommemstat"], rows[1:2]) == ["dommemstat as 'bob', seed 0"]


def test_recorder_keeps_checks_that_raise(tmp_path):
    path = tmp_path / "checks.jsonl"
    record.start(path)
    try:
        ex = exercises.make("balloon_requests", "alice")
        wrong = {**ex.solve(), "requests": ex.solve()["requests"] + 1}
        with pytest.raises(AssertionError):
            ex.check(wrong, strict=True)  # a wrong answer prints ✗ unless strict (graders)
    finally:
        record.stop()
    ex.check(ex.solve())  # after stop(): not recorded
    rows = record.read(path)
    assert [r["answer"] for r in rows] == [json.loads(json.dumps(record.jsonable(wrong)))]


def test_answer_key_is_the_model(tmp_path):
    cols, rows = answer_key(["dommemstat"], ["alice", "bob"], roster={"bob": 3})
    assert [(r["student"], r["seed"]) for r in rows] == [("alice", 0), ("bob", 3)]
    assert rows[1]["expected.actual"] == exercises.make("dommemstat", "bob", 3).solve()["actual"]
    out = tmp_path / "key.csv"
    assert main(["answer-key", "--students", "alice,bob", "--exercises", "dommemstat",
                 "--out", str(out)]) == 0
    assert submissions.read_roster(out) == {"alice": 0, "bob": 0}  # the key doubles as a roster


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "SUBMISSIONS_DIR must be a folder" in err and "Traceback" not in err
    assert main(["grade", str(tmp_path), "--templates", str(tmp_path)]) == 1
    assert "no exercise notebook" in capsys.readouterr().err
    assert main(["answer-key", "--students", "a", "--exercises", "nope"]) == 1
    assert "unknown exercise 'nope'" in capsys.readouterr().err
    assert main(["grade", str(tmp_path), "--timeout", "0"]) == 2  # argparse: usage line
