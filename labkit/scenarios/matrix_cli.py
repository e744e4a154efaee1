"""``labkit matrix``: print the "which mechanism for which job" matrix and the talk's claims.

The logic lives in :mod:`labkit.scenarios.matrix`; this module only declares the command (``CLI_COMMANDS``).
"""

from __future__ import annotations

import argparse

from labkit.cli_args import size


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", type=size, default="1G", help="each guest's memory (default 1G)")
    parser.add_argument("--guests", type=int, default=3, help="guests sharing one image (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="shorter cost-model runs (same verdicts)")


def matrix(args: argparse.Namespace) -> int:
    from labkit.scenarios.matrix import MatrixParams, format_matrix, run_matrix

    result = run_matrix(MatrixParams(memory=args.memory, n_guests=args.guests, seed=args.seed,
                                     quick=args.quick))
    print(format_matrix(result))
    return 0


# (name, help, run, arguments) for labkit.cli
CLI_COMMANDS = (
    ("matrix", "which mechanism for which job: run the talk's four jobs and print the matrix", matrix,
     _arguments),
)
