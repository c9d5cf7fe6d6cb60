"""`evomerge report runs/NAME`: plots and a markdown summary of a run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write plots and report.md for a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evomerge.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0
