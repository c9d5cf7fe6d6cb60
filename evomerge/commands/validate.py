"""`evomerge validate SPACE.yaml`: the preflight of `evomerge run` (schema, model configs, method parameters,
genome, task data and splits, recipes, budget) without loading any weights, and a summary of what it found."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a search-space YAML as `evomerge run` would, without loading weights",
                       description="Run the checks `evomerge run` makes before it writes anything (model configs, "
                                   "merge parameters, task files and splits, recipes, budget) and print what the "
                                   "space amounts to: models, method, genome size, split sizes, optimizer, budget.")
    p.add_argument("space", nargs="+", help="search-space YAML file(s) (see search_spaces/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from evomerge.validate import check_space
    from evomerge.yamlio import validation_error

    for path in args.space:
        try:
            report = check_space(path)
        except ValidationError as exc:  # a pydantic model built while checking (a plan's slices, ...)
            raise validation_error(exc, path) from None
        print(f"{path}: ok")
        for line in report.summary_lines():
            print(f"  {line}")
    return 0
