"""The held-out table: source models, hand-made uniform merges (chosen on the search split) and the top-k
evolved recipes, each scored on the held-out split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import EvomergeError
from evomerge.evaluate.spec import DEFAULT_METRIC
from evomerge.store import TrialRecord
from evomerge.tables import rows_table
from evomerge.workflow.context import RunContext


def score_row(ctx: RunContext, model: torch.nn.Module, split: str) -> dict[str, Any]:
    """Per-task metric (each task's reported metric) and their mean; a failure becomes the row's error."""
    try:
        result = ctx.evaluator(split).evaluate(model)
    except EvomergeError:
        raise
    except Exception as exc:  # a held-out row that fails is reported, not fatal: the search results stand
        return {"mean": float("nan"), "error": f"{type(exc).__name__}: {exc}"}
    row: dict[str, Any] = {}
    for task, metrics in result.metrics.items():
        spec = next(s for s in ctx.config.tasks if s.name == task)
        metric = spec.metric or DEFAULT_METRIC[spec.kind]
        row[task] = round(float(metrics.get(metric, float("nan"))), 4)
    row["mean"] = round(float(np.mean(list(row.values()))), 4)
    return row


def heldout_rows(ctx: RunContext, best: list[TrialRecord]) -> list[dict[str, Any]]:
    """Held-out scores of the source models, the baselines (chosen on the search split) and the top-k."""
    rows: list[dict[str, Any]] = []
    cfg = ctx.config
    if cfg.heldout.sources:
        from evomerge.models.causal_lm import load_causal_lm

        for name, src in ctx.sources.items():  # already open: a GGUF is not dequantized again
            model, _ = load_causal_lm(src, dtype=DTYPES[cfg.dtype], device=cfg.device)
            rows.append({"name": f"source: {name}"} | score_row(ctx, model, "heldout"))
            del model
    if cfg.heldout.baselines and cfg.stacking is None:
        from evomerge.merge.resident import ResidentMerger
        from evomerge.workflow.baselines import uniform_baselines

        mergers: dict[str, ResidentMerger] = {}
        for label, recipes in uniform_baselines(cfg, ctx.refs).items():
            chosen, chosen_score = recipes[0], -np.inf
            for recipe in recipes:
                if recipe.merge_method not in mergers:
                    mergers[recipe.merge_method] = ResidentMerger(recipe, device=cfg.device, source=ctx.source)
                score = score_row(ctx, mergers[recipe.merge_method].merge(recipe), "search")["mean"]
                if score > chosen_score:
                    chosen, chosen_score = recipe, score
            model = mergers[chosen.merge_method].merge(chosen)
            rows.append({"name": f"baseline: {label}"} | score_row(ctx, model, "heldout")
                        | {"search_mean": round(chosen_score, 4)})
        del mergers
    for rank, rec in enumerate(best):
        assert rec.genome is not None and rec.values
        model = ctx.live_model(rec.genome)
        rows.append({"name": f"evolved #{rank + 1} (trial {rec.number})"} | score_row(ctx, model, "heldout")
                    | {"search_fitness": round(float(rec.values[0]), 4)})
    return rows


def heldout_markdown(rows: list[dict[str, Any]]) -> str:
    return "Held-out split:\n\n" + rows_table(rows) + "\n" if rows else ""
