"""`evomerge validate SPACE.yaml`: check a search space (schema, method parameters, tasks) without loading weights."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a search-space YAML without loading any weights")
    p.add_argument("space", nargs="+")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evomerge.validate import validate_space

    for path in args.space:
        summary = validate_space(path)
        print(f"{path}: ok ({summary})")
    return 0
