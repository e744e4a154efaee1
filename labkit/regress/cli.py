"""``labkit regress`` (listed in ``CLI_COMMANDS`` for :mod:`labkit.cli`)."""

from __future__ import annotations

import argparse

from labkit.grading.cli import cluster_arguments


def _arguments(parser: argparse.ArgumentParser) -> None:
    from labkit.regress.runner import DEFAULT_GRID

    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), metavar="NAME=V1,V2",
                        help=f"parameter grid (default: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("--notebook", action="append", default=None, dest="notebooks",
                        help="only this notebook (relative to notebooks/, e.g. regression/balloon.ipynb); "
                             "repeat for more (default: every notebook with facts)")
    parser.add_argument("--store", default="out/regress",
                        help="where runs are stored and compared (default out/regress)")
    parser.add_argument("--html", default=None, help="the report (default <store>/report.html)")
    cluster_arguments(parser)


def run_regress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labkit.cluster import stderr_progress
    from labkit.regress.runner import parse_grid, regress

    run = regress(parse_grid(args.grid), notebooks=args.notebooks, store=args.store, report=args.html,
                  scheduler=args.scheduler, workers=args.workers, progress=stderr_progress)
    failed = [r for r in run["checks"] if not r["ok"]]
    report = args.html or str(Path(args.store) / "report.html")
    print(f"labkit regress: {len(run['results'])} notebook runs, {len(run['checks'])} checks, "
          f"{len(failed)} failing; report {report}")
    for r in failed[:20]:
        print(f"  FAIL {r['check']} at {r['point']}: {r['value']} {r['note']}")
    return 1 if failed else 0


# (name, help, run, arguments) for labkit.cli
CLI_COMMANDS = (
    ("regress", "run the regression notebooks over a parameter grid; check every fact; "
     "HTML report with drift against the last run", run_regress, _arguments),
)
