"""`evomerge resume runs/NAME`: continue a run that was stopped or killed, losing no finished trial."""

from __future__ import annotations

import argparse

from evomerge.threads import CLI_HELP, cli_count, request_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue a stopped or killed run, or add a worker to it",
                       description="Continue a run from its folder: finished trials are kept, none is repeated. "
                                   "Started again while the run is going, it is one more worker on the same run.")
    p.add_argument("run_dir", help="the run folder (runs/NAME)")
    p.add_argument("--trials", type=int, help="raise the trial budget (total, counted across sessions)")
    p.add_argument("--from-backup", action="store_true",
                   help="first put the newest intact backup (runs/NAME/backups) in place of a damaged study.db; "
                        "the damaged file is kept beside it")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--threads", type=cli_count, metavar="N", help=CLI_HELP)
    p.set_defaults(func=run, input_arg="run_dir")


def run(args: argparse.Namespace) -> int:
    from evomerge.workflow.run import resume_run

    request_threads(args.threads)
    resume_run(args.run_dir, quiet=args.quiet, max_trials=args.trials, from_backup=args.from_backup)
    return 0
