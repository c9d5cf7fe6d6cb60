"""`evomerge run SPACE.yaml`: evolve a merge recipe; leaves runs/NAME/ with best.yaml, held-out scores, report."""

from __future__ import annotations

import argparse

from evomerge.threads import CLI_HELP, cli_count, request_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="evolve a merge recipe from a search-space YAML",
                       description="Check the search space (as `evomerge validate`), then evolve a merge recipe; "
                                   "leaves runs/NAME/ with best.yaml, the held-out table and a report.")
    p.add_argument("space", help="search-space YAML (see search_spaces/)")
    p.add_argument("--run-dir", help="run folder (default: the space's run_dir or runs/<name>)")
    p.add_argument("--trials", type=int, help="override the trial budget")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the run folder")
    p.add_argument("--storage", metavar="URL",
                   help="keep the run's trials on a database server (e.g. postgresql://user@host/db) so that "
                        "workers on other machines can join with `evomerge worker URL NAME`; default: "
                        "SQLite in the run folder")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--threads", type=cli_count, metavar="N", help=CLI_HELP)
    p.set_defaults(func=run, input_arg="space")


def run(args: argparse.Namespace) -> int:
    from evomerge.workflow.run import start_run

    request_threads(args.threads)
    start_run(args.space, run_dir=args.run_dir, overwrite=args.overwrite, quiet=args.quiet, max_trials=args.trials,
              storage=args.storage)
    return 0
