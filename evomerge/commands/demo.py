"""`evomerge demo`: the embedded default, offline on CPU in minutes."""

from __future__ import annotations

import argparse

from evomerge.threads import CLI_HELP, cli_count, request_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a tiny model zoo (once), evolve a merge, print the held-out table",
                       description="Offline on CPU: build a tiny model zoo (cached), evolve a TIES recipe and print "
                                   "the held-out table of parents, hand-made merges and the evolved recipe.")
    p.add_argument("--zoo-dir", help="where the zoo is built and cached (default ~/.cache/evomerge/zoo)")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed")
    p.add_argument("--trials", type=int, help="override the preset's trial budget")
    p.add_argument("--space", help="another search space to run on the zoo (default search_spaces/demo.yaml)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--threads", type=cli_count, metavar="N", help=CLI_HELP)
    p.set_defaults(func=run, input_arg="space")


def run(args: argparse.Namespace) -> int:
    from evomerge.demo.run import run_demo

    request_threads(args.threads)
    run_demo(zoo_dir=args.zoo_dir, run_dir=args.run_dir, seed=args.seed, trials=args.trials, quiet=args.quiet,
             space=args.space)
    return 0
