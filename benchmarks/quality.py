"""Quality benchmark on the demo zoo: evolved recipe vs the best uniform merge chosen on the search split
vs random search with the same budget, held-out mean over 3 seeds, for parameter-space (PS) and PS+DFS.

    python benchmarks/quality.py                 # 3 seeds, the presets' budgets (about 15-25 min on 2 cores)
    python benchmarks/quality.py --seeds 0 --trials 24   # a quick look

Prints one table (held-out mean exact match over sort+count, mean ± std over seeds). PS+DFS stacks
layers of the evolved PS merge (the PS CMA-ES run of the same seed) and of the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(preset: str, out: Path, *, seed: int, optimizer: str, trials: int | None, baselines: bool,
         ps_recipe: Path | None = None, reuse: bool = False) -> list[dict]:
    from evomerge.workflow.run import start_run

    if reuse and (out / "heldout.json").exists():
        return json.loads((out / "heldout.json").read_text())["rows"]
    data = yaml.safe_load((ROOT / "search_spaces" / preset).read_text())
    data.update(seed=seed, optimizer={"name": optimizer}, run_dir=str(out))
    data["heldout"] = {"top_k": 1, "sources": baselines, "baselines": baselines}
    if trials:
        data["budget"] = {"trials": trials}
    st = data.get("stacking")
    if st and st.get("ps_recipe"):
        st["ps_recipe"] = str(Path(ps_recipe).resolve() if ps_recipe else ROOT / "search_spaces" / st["ps_recipe"])
    out.mkdir(parents=True, exist_ok=True)
    space = out.parent / f"{out.name}.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    start_run(space, overwrite=True, quiet=True)
    return json.loads((out / "heldout.json").read_text())["rows"]


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, help="override the presets' trial budgets")
    ap.add_argument("--out", default="runs/bench_quality")
    ap.add_argument("--zoo-dir")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs found in --out")
    args = ap.parse_args()

    import torch

    from evomerge.demo.run import default_zoo_dir
    from evomerge.demo.zoo import build_zoo

    torch.set_num_threads(1)
    zoo = build_zoo(Path(args.zoo_dir) if args.zoo_dir else default_zoo_dir())
    os.environ["EVOMERGE_ZOO"] = str(zoo.root.resolve())
    out = Path(args.out)
    results: dict[str, list[float]] = {}
    t0 = time.time()
    for seed in args.seeds:
        for label, preset in (("PS", "demo.yaml"), ("PS+DFS", "demo_ps_dfs.yaml")):
            for opt in ("cmaes", "random"):
                first = label == "PS" and opt == "cmaes"
                # PS+DFS stacks on the evolved PS recipe of the same seed, as Sakana's EvoLLM-JP-v1-10B did
                ps = out / f"PS-cmaes-{seed}" / "best.yaml" if label == "PS+DFS" else None
                rows = _run(preset, out / f"{label.replace('+', '_')}-{opt}-{seed}", seed=seed, optimizer=opt,
                            trials=args.trials, baselines=first, ps_recipe=ps, reuse=args.reuse)
                evolved = next(r for r in rows if r["name"].startswith("evolved"))
                name = f"{label}: {'CMA-ES (evolved)' if opt == 'cmaes' else 'random search, same budget'}"
                results.setdefault(name, []).append(evolved["mean"])
                if first:
                    for r in rows:
                        if r["name"].startswith(("source:", "baseline:")):
                            results.setdefault(r["name"], []).append(r["mean"])
            print(f"seed {seed} {label} done ({time.time() - t0:.0f}s)", flush=True)
    width = max(len(k) for k in results)
    print(f"\nheld-out mean exact match (sort + count), {len(args.seeds)} seed(s): {args.seeds}")
    print(f"{'model':<{width}}  mean ± std")
    for name, xs in results.items():
        print(f"{name:<{width}}  {_mean_std(xs)}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
