"""Quality benchmark: does the evolved recipe beat the sources, every hand-made baseline and random search?

For every zoo (`evomerge.demo.zoos`: demo, three, disagree) x seed x optimizer (cmaes, random), a search space
is written by `zoos.write_space`: only what a user must give (models, base model, ties, tasks with n_search /
n_heldout, optimizer name, budget, seed) and the schema's defaults for the rest, never a preset tuned to this
benchmark. Both optimizers get the same number of candidates. Each run is an ordinary `evomerge run`
(`start_run`); its `heldout.json` gives the held-out rows. Sources and baselines do not depend on the search
seed, so they are scored once per zoo (in its first CMA-ES run); the other runs skip those rows.

    python benchmarks/quality.py                                   # 3 zoos x 3 seeds x 2 optimizers
    python benchmarks/quality.py --zoos demo,three,disagree --seeds 0,1,2 --budget 96
    python benchmarks/quality.py --zoos three --quick               # smoke test: 1 seed, a small budget

Prints one table per zoo (held-out exact match per task and mean; searches as mean ± std over seeds, with the
items scored and the wall time per run) and a verdict line: CMA-ES vs the best source or baseline (+3 points?)
and vs random search (+2 points?). Every run is kept under --out; --reuse reads finished runs instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

OPTIMIZERS = ("random", "cmaes")
LABELS = {"random": "random search", "cmaes": "CMA-ES (evolved)"}
MARGIN_BASELINE, MARGIN_RANDOM = 0.03, 0.02
BUDGET, QUICK_BUDGET = 96, 16


def value(x: Any) -> float:
    """A number out of a table cell, whatever shape it takes: 0.91, {"value": 0.91, "ci": [...]}, [0.91, ...],
    "0.910 [0.88, 0.93]"; NaN when there is none."""
    if isinstance(x, bool):
        return float("nan")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, dict):
        for key in ("value", "mean", "point", "estimate", "score"):
            if key in x:
                return value(x[key])
        return float("nan")
    if isinstance(x, (list, tuple)) and x:
        return value(x[0])
    if isinstance(x, str):
        m = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", x)
        return float(m.group()) if m else float("nan")
    return float("nan")


def read_rows(run: Path) -> list[dict[str, Any]]:
    data = json.loads((run / "heldout.json").read_text(encoding="utf-8"))
    rows = data.get("rows", data) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("name"), str)]


def evolved_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The top evolved recipe: the row named "evolved #1 ...", else the first evolved row."""
    evolved = [r for r in rows if r["name"].lower().startswith("evolved")]
    if not evolved:
        raise SystemExit(f"no evolved row in the held-out table: {[r['name'] for r in rows]}")
    return next((r for r in evolved if r["name"].lower().startswith("evolved #1")), evolved[0])


def run_stats(run: Path, budget: int, search_items: int) -> dict[str, Any]:
    """Candidates evaluated and search seconds as the run recorded them (the budget if it cannot be read)."""
    out: dict[str, Any] = {"candidates": budget, "search_seconds": float("nan")}
    try:
        from evomerge.store import RunStore

        store = RunStore.open(run)
        try:
            done = [t for t in store.trials(include_unfinished=False)
                    if getattr(t, "status", "ok") in ("ok", "failed") and getattr(t, "duplicate_of", None) is None]
            out["candidates"] = len(done)
            out["search_seconds"] = float(store.search_seconds())
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - the run's own layout is not this benchmark's business
        print(f"  (could not read the run store of {run}: {type(exc).__name__}: {exc}; using the budget)")
    out["items"] = out["candidates"] * search_items
    return out


def run_one(zoo: Any, name: str, *, seed: int, optimizer: str, budget: int, out: Path, reference: bool,
            reuse: bool) -> dict[str, Any]:
    """One `evomerge run` on the zoo's default space; returns the held-out rows and what the search cost."""
    import yaml

    from evomerge.demo.zoos import write_space
    from evomerge.workflow.run import start_run

    run = out / name / f"{optimizer}-{seed}"
    space = out / name / f"{optimizer}-{seed}.yaml"
    write_space(zoo, space, name=f"{name}-{optimizer}-{seed}", optimizer=optimizer, seed=seed, trials=budget)
    data = yaml.safe_load(space.read_text(encoding="utf-8"))
    search_items = sum(int(t.get("n_search") or 0) for t in data["tasks"])
    if not reference:  # sources and baselines do not depend on the search: scored once per zoo
        data["heldout"] = {"sources": False, "baselines": False}
        space.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    wall = float("nan")
    meta = run / "bench.json"
    if reuse and (run / "heldout.json").is_file() and meta.is_file():
        wall = json.loads(meta.read_text())["wall_seconds"]
    else:
        t0 = time.perf_counter()
        start_run(space, run_dir=run, overwrite=True, quiet=True)
        wall = time.perf_counter() - t0
        meta.write_text(json.dumps({"wall_seconds": wall}))
    return {"rows": read_rows(run), "wall_seconds": wall, **run_stats(run, budget, search_items)}


def fmt(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.mean(xs) if xs else float("nan")


def zoo_table(name: str, tasks: list[str], reference: list[dict[str, Any]],
              searches: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: sources and baselines (one run), then each optimizer as mean ± std over seeds."""
    cols = [*tasks, "mean"]
    lines = [f"| model | {' | '.join(cols)} | items scored per run | wall time per run |",
             "|" + "---|" * (len(cols) + 3)]
    for r in reference:
        if r["name"].startswith(("source:", "baseline:")):
            cells = [fmt([value(r.get(c))]) for c in cols]
            lines.append(f"| {r['name']} | {' | '.join(cells)} | | |")
    for opt in OPTIMIZERS:
        runs = searches.get(opt, [])
        if not runs:
            continue
        rows = [evolved_row(r["rows"]) for r in runs]
        cells = [fmt([value(r.get(c)) for r in rows]) for c in cols]
        items = statistics.mean(r["items"] for r in runs)
        secs = mean([r["search_seconds"] for r in runs])
        wall = mean([r["wall_seconds"] for r in runs])
        cost = f"{secs:.0f} s search, {wall:.0f} s in all" if not math.isnan(secs) else f"{wall:.0f} s in all"
        label = f"{LABELS[opt]}, {len(runs)} seed(s)"
        if opt == "cmaes":
            label, cells[-1] = f"**{label}**", f"**{cells[-1]}**"
        lines.append(f"| {label} | {' | '.join(cells)} | {items:,.0f} | {cost} |")
    return "\n".join(lines)


def verdict(name: str, reference: list[dict[str, Any]], searches: dict[str, list[dict[str, Any]]]) -> str:
    others = [r for r in reference if r["name"].startswith(("source:", "baseline:"))]
    evolved = mean([value(evolved_row(r["rows"]).get("mean")) for r in searches.get("cmaes", [])])
    rand = mean([value(evolved_row(r["rows"]).get("mean")) for r in searches.get("random", [])])
    parts = [f"{name}: CMA-ES {evolved:.3f}"]
    if others:
        best = max(others, key=lambda r: value(r.get("mean")))
        gap = 100 * (evolved - value(best.get("mean")))
        parts.append(f"vs best source/baseline ({best['name']}) {value(best.get('mean')):.3f}: {gap:+.1f} points "
                     f"({'wins' if gap >= 100 * MARGIN_BASELINE else 'does NOT win'} by +{100 * MARGIN_BASELINE:.0f})")
    if not math.isnan(rand):
        gap = 100 * (evolved - rand)
        parts.append(f"vs random search {rand:.3f}: {gap:+.1f} points "
                     f"({'wins' if gap >= 100 * MARGIN_RANDOM else 'does NOT win'} by +{100 * MARGIN_RANDOM:.0f})")
    return "verdict: " + "; ".join(parts)


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from evomerge.demo.zoos import ZOOS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoos", type=lambda s: _csv(str, s), default=list(ZOOS), help="comma-separated zoo names")
    ap.add_argument("--seeds", type=lambda s: _csv(int, s), default=[0, 1, 2], help="comma-separated search seeds")
    ap.add_argument("--budget", type=int, help=f"candidates per run, the same for both optimizers (default {BUDGET})")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: the first seed only and a budget of {QUICK_BUDGET} unless --budget is given")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_quality"))
    ap.add_argument("--reuse", action="store_true", help="read finished runs found in --out instead of rerunning")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.budget is None:
        args.budget = QUICK_BUDGET if args.quick else BUDGET
    bad = [z for z in args.zoos if z not in ZOOS]
    if bad or not args.seeds or args.budget < 1:
        ap.error(f"unknown zoo(s) {bad} (allowed: {', '.join(ZOOS)})" if bad else "need seeds and a budget >= 1")

    os.environ.setdefault("EVOMERGE_THREADS", "1")  # fastest for these models on a shared 2-core machine
    import torch

    from evomerge.demo import zoos

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    report = []
    for name in args.zoos:
        t0 = time.perf_counter()
        zoo = zoos.build(name)
        print(f"[{name}] zoo ready ({time.perf_counter() - t0:.0f}s): {zoo.root}", flush=True)
        reference: list[dict[str, Any]] = []
        searches: dict[str, list[dict[str, Any]]] = {}
        for i, seed in enumerate(args.seeds):
            for opt in ("cmaes", "random"):
                first = i == 0 and opt == "cmaes"
                res = run_one(zoo, name, seed=seed, optimizer=opt, budget=args.budget, out=args.out, reference=first,
                              reuse=args.reuse)
                if first:
                    reference = res["rows"]
                searches.setdefault(opt, []).append(res)
                ev = evolved_row(res["rows"])
                print(f"[{name}] seed {seed} {opt}: held-out mean {value(ev.get('mean')):.3f}, "
                      f"{res['candidates']} candidates, {res['items']:,} items, {res['wall_seconds']:.0f}s",
                      flush=True)
        tasks = list(zoo.experts)
        text = (f"\n### zoo `{name}`: {ZOOS[name].about}\n\nheld-out exact match ({', '.join(tasks)}); seeds "
                f"{args.seeds}; budget {args.budget} candidates per run; search space: zoos.write_space defaults\n\n"
                + zoo_table(name, tasks, reference, searches) + "\n\n" + verdict(name, reference, searches))
        print(text, flush=True)
        report.append(text)
    summary = "\n".join(report) + f"\n\ntotal {time.perf_counter() - t_all:.0f}s\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(summary, encoding="utf-8")
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s; tables in {args.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
