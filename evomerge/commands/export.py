"""`evomerge export runs/NAME OUT.yaml`: the recipe of the best (or a given) trial as mergekit YAML."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trial's recipe (default: the best) as mergekit YAML")
    p.add_argument("run_dir")
    p.add_argument("out", help="output YAML path")
    p.add_argument("--trial", type=int, help="trial number (default: the best)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.errors import ConfigError
    from evomerge.store import RunStore, TrialRecord

    store = RunStore.open(args.run_dir, verify_config=False)
    rec: TrialRecord | None
    if args.trial is not None:
        rec = store.trial(args.trial)
    else:
        best = store.best(1)
        rec = best[0] if best else None
    if rec is None or not rec.recipe_yaml:
        raise ConfigError("no finished trial with a recipe", file=str(args.run_dir))
    Path(args.out).write_text(rec.recipe_yaml)
    print(f"wrote {args.out} (trial {rec.number}, values {rec.values})")
    return 0
