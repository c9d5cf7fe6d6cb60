"""`evomerge report runs/NAME`: plots and a markdown summary of a run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write plots and report.md for a run folder",
                       description="Write report.md and the plots (fitness per trial and generation, per-layer "
                                   "parameter heatmap) of a run, finished or not.")
    p.add_argument("run_dir", help="the run folder (runs/NAME)")
    p.set_defaults(func=run, input_arg="run_dir")


def run(args: argparse.Namespace) -> int:
    from evomerge.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0
