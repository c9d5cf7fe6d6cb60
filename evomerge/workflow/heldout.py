"""The final table, on the held-out (report) split: source models, hand-made uniform merges (each chosen on
the search split, its settings in its label) and the top evolved recipes, all in one metric: the mean over
tasks of each task's reported metric. Every row has a 95 % interval (bootstrap over items, stratified by
task), and the exported recipe is tested against the best baseline and the best source on the same items
(exact McNemar when every task scores items 0/1, else a paired bootstrap)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import EvomergeError
from evomerge.evaluate.spec import DEFAULT_METRIC
from evomerge.evaluate.stats import bootstrap_ci_tasks, compare
from evomerge.recipe import Recipe
from evomerge.store import TrialRecord
from evomerge.tables import fmt
from evomerge.workflow.context import RunContext

METRIC = "mean over tasks of each task's metric"


def _metric(ctx: RunContext, task: str) -> str:
    spec = next(s for s in ctx.config.tasks if s.name == task)
    return spec.metric or DEFAULT_METRIC[spec.kind]


def score_row(ctx: RunContext, model: torch.nn.Module, split: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(row, per-task item scores): each task's metric and their mean, and the items' scores in a fixed
    order (empty for tasks that score no single items, e.g. a custom function). A non-evomerge failure of
    the model (out of memory, NaN) becomes the row's error; the search's results stand."""
    try:
        result = ctx.evaluator(split).evaluate(model, per_item=True)
    except EvomergeError:
        raise
    except Exception as exc:
        return {"mean": float("nan"), "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}, {}
    row: dict[str, Any] = {}
    items: dict[str, np.ndarray] = {}
    for task, metrics in result.metrics.items():
        metric = _metric(ctx, task)
        row[task] = round(float(metrics.get(metric, float("nan"))), 4)
        details = result.per_item.get(task, {})
        scores = [float(d[metric]) for _, d in sorted(details.items()) if isinstance(d, dict) and metric in d]
        if scores and len(scores) == len(details):
            items[task] = np.asarray(scores)
    row["mean"] = round(float(np.mean(list(row.values()))), 4)
    if items and len(items) == len(result.metrics):
        lo, hi = bootstrap_ci_tasks(items, n_boot=2000, seed=0)
        row["ci95"] = [round(lo, 4), round(hi, 4)]
    return row, items


def _settings(recipe: Recipe) -> str:
    """What a uniform baseline is, in a few words: its method and the values it uses."""
    params: dict[str, Any] = {}
    for entry in recipe.models or []:
        for k, v in (entry.parameters or {}).items():
            params.setdefault(k, v)
    params |= dict(recipe.parameters or {})
    return recipe.merge_method + (" " + ", ".join(f"{k} {fmt(v)}" for k, v in params.items()) if params else "")


def heldout_table(ctx: RunContext, best: list[TrialRecord]) -> dict[str, Any]:
    """The rows and the paired tests of the exported recipe (best[0]) against the best baseline and source."""
    cfg = ctx.config
    rows: list[dict[str, Any]] = []
    scores: list[dict[str, np.ndarray]] = []

    def add(row: dict[str, Any], model: torch.nn.Module, split: str = "heldout", **extra: Any) -> None:
        values, items = score_row(ctx, model, split)
        rows.append(row | values | extra)
        scores.append(items)

    if cfg.heldout.sources:
        from evomerge.models.causal_lm import load_causal_lm

        for name, src in ctx.sources.items():  # already open: a GGUF is not dequantized again
            model, _ = load_causal_lm(src, dtype=DTYPES[cfg.dtype], device=cfg.device)
            add({"name": f"source: {name}", "kind": "source"}, model)
            del model
    if cfg.heldout.baselines and cfg.stacking is None:
        from evomerge.merge.resident import ResidentMerger
        from evomerge.spaces.baselines import uniform_baselines

        mergers: dict[str, ResidentMerger] = {}
        for label, recipes in uniform_baselines(cfg, ctx.refs).items():
            chosen: Recipe | None = None
            chosen_score = -np.inf
            for recipe in recipes:
                if recipe.merge_method not in mergers:
                    mergers[recipe.merge_method] = ResidentMerger(recipe, device=cfg.device, source=ctx.source)
                score = score_row(ctx, mergers[recipe.merge_method].merge(recipe), "search")[0]["mean"]
                if np.isfinite(score) and score > chosen_score:
                    chosen, chosen_score = recipe, score
            if chosen is None:  # every setting failed: say so instead of reporting one at random
                rows.append({"name": f"baseline: {label}", "kind": "baseline", "mean": float("nan"),
                             "error": "every setting failed on the search split"})
                scores.append({})
                continue
            add({"name": f"baseline: {label}: {_settings(chosen)}", "kind": "baseline"},
                mergers[chosen.merge_method].merge(chosen), search_mean=round(chosen_score, 4))
        del mergers
    for rank, rec in enumerate(best):
        assert rec.genome is not None and rec.values
        add({"name": f"evolved #{rank + 1} (trial {rec.number})", "kind": "evolved"}, ctx.live_model(rec.genome),
            search_fitness=round(float(rec.values[0]), 4))
    return {"metric": METRIC, "split": "heldout", "rows": rows, "tests": _tests(rows, scores)}


def _tests(rows: list[dict[str, Any]], scores: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    evolved = next((i for i, r in enumerate(rows) if r["kind"] == "evolved"), None)
    if evolved is None or not scores[evolved]:
        return []
    out = []
    for kind in ("baseline", "source"):
        cands = [i for i, r in enumerate(rows) if r["kind"] == kind and np.isfinite(r["mean"]) and scores[i]]
        if not cands:
            continue
        other = max(cands, key=lambda i: rows[i]["mean"])
        a, b = scores[evolved], scores[other]
        if set(a) != set(b) or any(len(a[t]) != len(b[t]) for t in a):
            continue
        flat = all(set(np.unique(a[t])) <= {0.0, 1.0} and set(np.unique(b[t])) <= {0.0, 1.0} for t in a)
        # pooled items for 0/1 scores (exact McNemar); otherwise a bootstrap stratified by task
        result = compare(np.concatenate([a[t] for t in sorted(a)]), np.concatenate([b[t] for t in sorted(b)]),
                         n_boot=2000) if flat else compare(a, b, n_boot=2000)
        out.append({"evolved": rows[evolved]["name"], "against": rows[other]["name"]} | result)
    return out


def heldout_markdown(table: dict[str, Any]) -> str:
    rows = table.get("rows", [])
    if not rows:
        return ""
    tasks = [k for k in rows[0] if k not in ("name", "kind", "mean", "ci95", "error", "search_mean",
                                             "search_fitness")]
    lines = [f"Held-out split; every row: {table['metric']} (95 % interval: bootstrap over items).", "",
             "| model | " + " | ".join(tasks) + " | mean | 95 % interval |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        ci = r.get("ci95")
        cells = [fmt(r.get(t)) for t in tasks] + [fmt(r.get("mean")), f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"]
        name = r["name"] + (f" ({r['error']})" if r.get("error") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for t in table.get("tests", []):
        lines.append("")
        lines.append(f"{t['evolved']} vs {t['against']}: difference {t['diff']:+.4f} "
                     f"(95 % {t['ci_low']:+.4f} to {t['ci_high']:+.4f}), {t['test']} p = {t['p_value']:.3g}")
    return "\n".join(lines) + "\n"
