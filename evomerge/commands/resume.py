"""`evomerge resume runs/NAME`: continue a run that was stopped or killed, losing no finished trial."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue a stopped or killed run",
                       description="Continue a run from its folder: finished trials are kept, none is repeated.")
    p.add_argument("run_dir", help="the run folder (runs/NAME)")
    p.add_argument("--trials", type=int, help="raise the trial budget (total, counted across sessions)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.set_defaults(func=run, input_arg="run_dir")


def run(args: argparse.Namespace) -> int:
    from evomerge.workflow.run import resume_run

    resume_run(args.run_dir, quiet=args.quiet, max_trials=args.trials)
    return 0
