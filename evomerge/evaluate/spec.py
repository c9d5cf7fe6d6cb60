"""`TaskSpec`: one benchmark task as a search-space YAML's `tasks:` list holds it.

Kinds (see evomerge/evaluate/README.md for the data formats):
- ``kmmlu``: KMMLU layout (question, A, B, C, D, answer 1-4, Category), scored by log-likelihood of the letter.
- ``mcq``: generic multiple choice with arbitrary choice texts (acc and length-normalized acc_norm).
- ``generation``: greedy decoding, answer extraction and exact match.
- ``lm_eval``: any lm-eval task (by name or local YAML) run on the in-memory model.
- ``custom``: a user function ``module:function`` receiving (model, tokenizer).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.yamlio import KeyedValueError

TaskKind = Literal["kmmlu", "mcq", "generation", "lm_eval", "custom"]

DEFAULT_METRIC: dict[str, str] = {
    "kmmlu": "acc",
    "mcq": "acc",
    "generation": "exact_match",
    "lm_eval": "acc",
    "custom": "score",
}


AUTO_CONTINUOUS = 0.25  # accuracy stays three quarters of the objective: the report measures accuracy
BLENDABLE = ("acc", "acc_norm", "exact_match")  # metrics on the probability's [0, 1] scale


def _looks_like_file(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith((".csv", ".jsonl", ".ndjson", ".json"))


class TaskSpec(BaseModel):
    """One task: where its data lives, which subset to score, and how it counts toward fitness."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: TaskKind
    # data: a local file (CSV or JSONL) or a Hugging Face data set (online users only)
    path: str | None = None
    dataset: str | None = None
    subjects: list[str] | None = None
    split: str = "test"
    # subsets: totals and/or per-category stratification; disjoint search / held-out splits
    n_search: int | None = Field(default=None, ge=1)
    n_heldout: int | None = Field(default=None, ge=1)
    # items that re-score the best candidates to pick the exported recipe (none: the best on search is exported)
    n_selection: int | None = Field(default=None, ge=1)
    # fixed files for a split instead of carving it out of `path` (every item of the file, same format)
    heldout_path: str | None = None
    selection_path: str | None = None
    per_category: int | None = Field(default=None, ge=1)
    seed: int = 0
    # fitness
    weight: float = 1.0
    metric: str | None = None
    loss_tiebreak: float = Field(default=0.0, ge=0.0)
    # share of the objective taken by the gold answer's probability (continuous, so one flipped item moves the
    # fitness a little rather than a whole step); "auto": 0.25 where that probability is the answer's own
    # (multiple choice, generation without answer_regex), 0 otherwise (chain of thought, lm-eval, custom)
    continuous: Union[float, Literal["auto"]] = "auto"
    # prompting
    num_fewshot: int = Field(default=0, ge=0)
    fewshot_path: str | None = None
    # "lm_eval": the dev items (same subject / category) and order lm-eval's default sampler draws, seeded with
    # fewshot_seed (simple_evaluate's fewshot_random_seed); "file": the first num_fewshot dev items of the item's
    # category in file order, topped up from the other categories
    fewshot_order: Literal["lm_eval", "file"] = "lm_eval"
    fewshot_seed: int = 1234
    chat_template: bool = False
    target_delimiter: str = " "
    # generation
    max_new_tokens: int = Field(default=32, ge=1)
    stop: list[str] = Field(default_factory=list)
    answer_regex: str | None = None
    # lm-eval and custom
    lm_eval_task: str | None = None
    lm_eval_yaml: str | None = None
    function: str | None = None

    @model_validator(mode="after")
    def _check_kind_fields(self) -> "TaskSpec":
        if self.kind in ("kmmlu", "mcq", "generation"):
            if not self.path and not self.dataset:
                raise ValueError(f"task '{self.name}' (kind {self.kind}) needs `path` (local file) "
                                 "or `dataset` (HF id)")
            if self.path and self.dataset:
                raise ValueError(f"task '{self.name}': give either `path` or `dataset`, not both")
            if self.num_fewshot and not self.fewshot_path and not self.dataset and _looks_like_file(self.path):
                raise ValueError(f"task '{self.name}': num_fewshot={self.num_fewshot} needs `fewshot_path` "
                                 "(a dev split) or a KMMLU folder as `path` (its {Subject}-dev.csv files)")
        for key in ("heldout_path", "selection_path"):
            if getattr(self, key) is not None:
                if self.kind not in ("kmmlu", "mcq", "generation"):
                    raise KeyedValueError(f"task '{self.name}': {key} is for file tasks (kmmlu, mcq, generation)",
                                          key)
                count = {"heldout_path": "n_heldout", "selection_path": "n_selection"}[key]
                if getattr(self, count) is not None:
                    raise KeyedValueError(f"task '{self.name}': give {key} (every item of the file) or {count}, "
                                          "not both", key)
        if self.kind == "lm_eval" and not (self.lm_eval_task or self.lm_eval_yaml):
            raise ValueError(f"task '{self.name}' (kind lm_eval) needs `lm_eval_task` (a name) "
                             "or `lm_eval_yaml` (a file)")
        if self.kind == "custom" and (not self.function or ":" not in self.function):
            raise ValueError(f"task '{self.name}' (kind custom) needs `function: module:function`")
        if self.answer_regex is not None:
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                raise ValueError(f"task '{self.name}': answer_regex is not a valid regex: {exc}") from exc
        return self

    @field_validator("continuous")
    @classmethod
    def _share(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"continuous is a share of the objective in [0, 1], got {v}")
        return v

    @property
    def continuous_share(self) -> float:
        """The share of the gold answer's probability in the objective (see `continuous`)."""
        if self.continuous != "auto":
            return float(self.continuous)
        direct = self.kind in ("kmmlu", "mcq") or (self.kind == "generation" and self.answer_regex is None)
        return AUTO_CONTINUOUS if direct and self.objective_metric in BLENDABLE else 0.0

    @property
    def objective_metric(self) -> str:
        """The metric this task contributes to fitness."""
        return self.metric or DEFAULT_METRIC[self.kind]
