"""``labkit grade`` and ``labkit answer-key`` (listed in ``CLI_COMMANDS`` for :mod:`labkit.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0, e.g. 120")
    return value


def cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` / ``--workers``: where the notebooks run (shared with ``labkit regress``)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a "
                            "LocalCluster on this machine)")
    where.add_argument("--workers", type=int, default=None,
                       help="worker processes of the LocalCluster (default: one per core)")


def _grade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submissions", metavar="SUBMISSIONS_DIR",
                        help="one folder (or notebook) per student: DIR/<student>/.../*.ipynb")
    parser.add_argument("--out", default="marks.csv", help="the marks CSV (default marks.csv)")
    parser.add_argument("--html", default=None, help="also write the HTML summary here")
    parser.add_argument("--roster", default=None,
                        help="CSV with 'student' (and 'seed') columns, e.g. the answer key; "
                             "students not on it are flagged, those missing get a row")
    parser.add_argument("--seed", type=int, default=0, help="the class's seed when no roster gives one")
    parser.add_argument("--templates", default=None,
                        help="the exercise notebooks as handed out (default notebooks/exercises)")
    parser.add_argument("--timeout", type=positive_seconds, default=120.0,
                        help="seconds a cell may run (default 120)")
    parser.add_argument("--executed", default=None,
                        help="keep each executed notebook under this folder")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3)")
    cluster_arguments(parser)


def run_grade(args: argparse.Namespace) -> int:
    from labkit.cluster import stderr_progress
    from labkit.grading import grade, report

    grades = grade(args.submissions, roster=args.roster, seed=args.seed, templates=args.templates,
                   timeout=args.timeout, kernel=args.kernel, executed_dir=args.executed,
                   scheduler=args.scheduler, workers=args.workers, progress=stderr_progress)
    grades.to_csv(args.out)
    if args.html:
        report.write(args.html, grades.results, grades.columns, grades.rows,
                     title=f"labkit grade: {Path(args.submissions).name}")
    counts: dict[str, int] = {}
    for row in grades.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"labkit grade: {len(grades.rows)} students ("
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"); marks in {args.out}"
          + (f", summary in {args.html}" if args.html else ""))
    return 0


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--students", required=True,
                        help="comma-separated ids, or a roster CSV with a 'student' (and 'seed') column")
    parser.add_argument("--exercises", default=None,
                        help="comma-separated exercise names (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for students the roster gives none")
    parser.add_argument("--out", default="answer_key.csv", help="where to write it (default answer_key.csv)")


def run_answer_key(args: argparse.Namespace) -> int:
    from labkit import exercises
    from labkit.grading import answer_key_csv
    from labkit.grading.submissions import read_roster

    if args.students.endswith(".csv"):
        roster = read_roster(args.students, args.seed)
        students = list(roster)
    else:
        roster = None
        students = [s.strip() for s in args.students.split(",") if s.strip()]
    if not students:
        raise ValueError(f"--students names nobody: {args.students!r}")
    names = [n.strip() for n in args.exercises.split(",")] if args.exercises else exercises.names()
    for name in names:
        exercises.spec(name)  # an unknown name: ValueError naming the accepted ones
    answer_key_csv(names, students, args.seed, roster, path=args.out)
    print(f"labkit answer-key: {len(students)} students x {len(names)} exercises in {args.out}",
          file=sys.stderr)
    return 0


# (name, help, run, arguments) for labkit.cli
CLI_COMMANDS = (
    ("grade", "execute and grade handed-in exercise notebooks; write marks (CSV) and a "
     "summary (HTML)", run_grade, _grade_arguments),
    ("answer-key", "every student's numbers and expected answers (for instructors; also a "
     "roster for labkit grade)", run_answer_key, _key_arguments),
)
