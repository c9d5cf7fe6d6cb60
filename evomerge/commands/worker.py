"""`evomerge worker URL NAME`: one more worker on a run kept on a database server (`evomerge run --storage`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="join a run kept on a database server as one more worker",
                       description="Join run NAME on the database at URL (started with `evomerge run SPACE --storage "
                                   "URL`): the search space, seed and budget come from the storage; the models must "
                                   "be at the same paths on this machine. Results are written to RUNS_DIR/NAME by "
                                   "the worker that finishes the search.")
    p.add_argument("storage", metavar="URL", help="the database URL the run was started with")
    p.add_argument("name", help="the run's name (the search space's `name`, or its run folder's name)")
    p.add_argument("--runs-dir", default="runs", help="where this machine keeps the run's folder (default: runs)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.set_defaults(func=run, input_arg="storage")


def run(args: argparse.Namespace) -> int:
    from evomerge.workflow.run import join_run

    join_run(args.storage, args.name, runs_dir=args.runs_dir, quiet=args.quiet)
    return 0
