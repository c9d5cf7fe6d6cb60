"""`Evaluator`: data loaded, split chosen and prompts tokenized ONCE; `evaluate(model)` scores a live model.

Fitness = sum over tasks of weight x objective, where a task's objective is its chosen metric blended with the
mean probability of the gold answer (``continuous`` share: a continuous score, so ranking candidates does not
hinge on a few flipped items), plus ``loss_tiebreak x (-mean answer log-loss)``.
With ``objectives="vector"`` the per-task objectives are returned as a vector for multi-objective search.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.errors import ConfigError
from evomerge.evaluate.spec import TaskSpec
from evomerge.evaluate.tasks import PreparedTask, prepare_task


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # task -> metric -> value
    objectives: list[float]  # one per task ("vector") or [weighted sum] ("weighted")
    fitness: float  # weighted sum of task objectives
    seconds: float
    per_item: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> item id -> details

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "objectives": self.objectives, "fitness": self.fitness,
                "seconds": self.seconds}


class Evaluator:
    """Scores live causal LMs on fixed, pre-tokenized task subsets (see module docstring)."""

    def __init__(self, specs: list[TaskSpec], tokenizer, *,
                 split: Literal["search", "selection", "heldout", "all"] = "search",
                 device: str | torch.device = "cpu", batch_tokens: int = 16384,
                 objectives: Literal["weighted", "vector"] = "weighted", base_dir: str | Path | None = None,
                 max_length: int | None = None, share_prefix: bool = True, max_padding: float | None = None):
        if split not in ("search", "selection", "heldout", "all"):
            raise ConfigError(f"unknown split '{split}'", key="split", allowed="search, selection, heldout, all")
        if objectives not in ("weighted", "vector"):
            raise ConfigError(f"unknown objectives mode '{objectives}'", key="objectives", allowed="weighted, vector")
        if not specs:
            raise ConfigError("no tasks to evaluate", key="tasks")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate task name in {names}", key="tasks.name")
        self.specs = list(specs)
        self.split = split
        self.objectives_mode = objectives
        self.tokenizer = tokenizer
        self.tasks: dict[str, PreparedTask] = {
            s.name: prepare_task(s, tokenizer, split=split, device=device, batch_tokens=batch_tokens, base_dir=base_dir,
                                 max_length=max_length, share_prefix=share_prefix, max_padding=max_padding)
            for s in self.specs
        }

    def split_ids(self) -> dict[str, list[str]]:
        """Item ids of the chosen split per task (record them so a run can be re-scored later)."""
        return {name: list(t.ids) for name, t in self.tasks.items()}

    def evaluate(self, model, *, per_item: bool = False) -> EvalResult:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        metrics: dict[str, dict[str, float]] = {}
        details: dict[str, dict[str, Any]] = {}
        objs: list[float] = []
        try:
            for spec in self.specs:
                m, items = self.tasks[spec.name].score(model)
                key = spec.objective_metric
                if key not in m:
                    raise ConfigError(f"task '{spec.name}' has no metric '{key}'", key="metric",
                                      allowed=", ".join(sorted(m)))
                obj = m[key]
                share = spec.continuous_share
                if share and "gold_prob" in m:
                    obj = (1 - share) * obj + share * m["gold_prob"]
                if spec.loss_tiebreak and "loss" in m:
                    obj = obj - spec.loss_tiebreak * m["loss"]
                m["objective"] = obj
                metrics[spec.name] = m
                objs.append(obj)
                if per_item:
                    details[spec.name] = items
        finally:
            if was_training:
                model.train()
        fitness = float(sum(s.weight * o for s, o in zip(self.specs, objs)))
        objectives = list(objs) if self.objectives_mode == "vector" else [fitness]
        return EvalResult(metrics, objectives, fitness, time.perf_counter() - t0, details)
