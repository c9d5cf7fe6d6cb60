"""A trial as read back from the storage: plain Python, no Optuna objects.

Every trial carries user attrs: genome, generation, gen_index, key, worker, status ("running", "ok",
"failed", "stale", "cancelled", "interrupted"), error, recipe, metrics, merge_seconds, eval_seconds,
layer_params, duplicate_of.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

FINISHED_STATUSES = ("ok", "failed")  # count toward the budget; "stale"/"cancelled"/"interrupted" do not


@dataclass
class TrialRecord:
    number: int
    state: str  # Optuna state name
    status: str
    values: list[float] | None
    genome: np.ndarray | None
    generation: int | None = None
    gen_index: int | None = None
    key: str | None = None
    recipe_yaml: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    error: str = ""
    layer_params: dict[str, list[float]] | None = None
    duplicate_of: int | None = None
    worker: dict[str, Any] | None = None
    started: _dt.datetime | None = None
    completed: _dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def value(self) -> float | None:
        return None if not self.values else self.values[0]

    @classmethod
    def from_frozen(cls, ft: optuna.trial.FrozenTrial) -> TrialRecord:
        ua = ft.user_attrs
        state = ft.state
        status = ua.get("status")
        if state in (TrialState.RUNNING, TrialState.WAITING):
            status = "running" if state == TrialState.RUNNING else "waiting"
        elif status in (None, "running"):
            status = "ok" if state == TrialState.COMPLETE else "stale"
        genome = ua.get("genome")
        if genome is None and ft.params:
            genome = [ft.params[k] for k in sorted(ft.params)]
        return cls(
            number=ft.number,
            state=state.name,
            status=status,
            values=list(ft.values) if ft.values is not None else None,
            genome=None if genome is None else np.asarray(genome, dtype=float),
            generation=ua.get("generation"),
            gen_index=ua.get("gen_index"),
            key=ua.get("key"),
            recipe_yaml=ua.get("recipe", ""),
            metrics=ua.get("metrics") or {},
            merge_seconds=ua.get("merge_seconds"),
            eval_seconds=ua.get("eval_seconds"),
            error=ua.get("error", ""),
            layer_params=ua.get("layer_params"),
            duplicate_of=ua.get("duplicate_of"),
            worker=ua.get("worker"),
            started=ft.datetime_start,
            completed=ft.datetime_complete,
        )


def jsonable(obj: Any) -> Any:
    """Metrics as JSON: numpy scalars/arrays to Python, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
