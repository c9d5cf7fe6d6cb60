"""Run (or resume) a search on -||x-0.3||^2 in a run folder; used by the kill -9 and two-worker tests.

    python quadratic_search.py RUN_DIR --optimizer cmaes --seed 0 --max-trials 40 --sleep 0.05

Creates the run when RUN_DIR has none, else resumes it. Deterministic failures: a genome with
x[0] > 0.75 raises, one with x[1] > 0.8 returns NaN.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402

from evomerge.errors import ConfigError  # noqa: E402
from evomerge.search.driver import Outcome, run_search  # noqa: E402
from evomerge.search.optimizers import make_optimizer  # noqa: E402
from evomerge.store import RunStore  # noqa: E402

CONFIG = "name: quadratic\n"


def objective_factory(sleep: float):
    def objective(x: np.ndarray) -> Outcome:
        time.sleep(sleep)
        if x[0] > 0.75:
            raise RuntimeError(f"injected failure at x0={x[0]:.3f}")
        value = -float(np.sum((x - 0.3) ** 2))
        if x[1] > 0.8:
            value = float("nan")
        return Outcome(values=[value], metrics={"dist": -value}, recipe_yaml=f"x0: {x[0]!r}\n",
                       layer_params={"x": [float(v) for v in x]}, merge_seconds=sleep / 2, eval_seconds=sleep / 2)

    return objective


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--optimizer", default="cmaes")
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-trials", type=int, default=40)
    ap.add_argument("--sleep", type=float, default=0.05)
    ap.add_argument("--sigma0", type=float, default=0.3)
    ap.add_argument("--storage", help="a database URL (the run is named after RUN_DIR's last part)")
    args = ap.parse_args()
    if args.storage:
        try:
            store = RunStore.create(args.run_dir, CONFIG, directions=["maximize"], storage_url=args.storage)
        except ConfigError:  # another worker created it first
            store = RunStore.open(args.run_dir, CONFIG, storage_url=args.storage)
    elif RunStore.exists(args.run_dir):
        store = RunStore.open(args.run_dir, CONFIG)
    else:
        store = RunStore.create(args.run_dir, CONFIG, directions=["maximize"], meta={"test": "quadratic"})
    slot = store.register_worker()
    opt = make_optimizer(args.optimizer, args.dim, seed=args.seed, sigma0=args.sigma0, slot=slot)
    summary = run_search(store, opt, objective_factory(args.sleep), max_trials=args.max_trials, slot=slot)
    print(f"done {summary.stop_reason} finished={summary.finished} evaluated={summary.evaluated} "
          f"worker={summary.worker} idle={summary.idle_seconds:.2f} stale={summary.stale}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
