"""`evomerge export runs/NAME OUT.yaml`: the recipe of the best (or a given) trial as mergekit YAML."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trial's recipe (default: the best) as mergekit YAML",
                       description="Write the recipe of the best trial of a run (or of --trial N) as a mergekit "
                                   "YAML that `evomerge merge` and `mergekit-yaml` accept.")
    p.add_argument("run_dir", help="the run folder (runs/NAME)")
    p.add_argument("out", help="output YAML path")
    p.add_argument("--trial", type=int, help="trial number (default: the best)")
    p.set_defaults(func=run, input_arg="run_dir")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.errors import ConfigError
    from evomerge.store import RunStore, TrialRecord

    store = RunStore.open(args.run_dir, verify_config=False)
    rec: TrialRecord | None
    if args.trial is not None:
        numbers = [t.number for t in store.trials()]
        if args.trial not in numbers:
            raise ConfigError(f"the run has no trial {args.trial}", file=str(args.run_dir), key="--trial",
                              allowed=f"{min(numbers)}..{max(numbers)}" if numbers else "none yet: no trial ran")
        rec = store.trial(args.trial)
        if not rec.recipe_yaml:
            raise ConfigError(f"trial {args.trial} has no recipe (status {rec.status})", file=str(args.run_dir),
                              key="--trial", allowed="a finished trial; leave --trial out for the best")
    else:
        best = store.best(1)
        rec = best[0] if best else None
    if rec is None or not rec.recipe_yaml:
        raise ConfigError("no finished trial with a recipe", file=str(args.run_dir))
    try:
        Path(args.out).write_text(rec.recipe_yaml, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the recipe: {exc.strerror or exc}", file=str(args.out), key="OUT") from None
    print(f"wrote {args.out} (trial {rec.number}, values {rec.values})")
    return 0
