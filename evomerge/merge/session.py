"""A merge session: the recipe's models opened lazily, checked, planned, and merged tensor by tensor."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, EvomergeError, ModelLoadError
from evomerge.merge.execute import compute_tensor
from evomerge.merge.plan import MergePlan, TensorPlan, build_plan
from evomerge.models.compat import check_mergeable
from evomerge.models.layout import ModelLayout, ParamKind
from evomerge.models.sources import WeightSource, open_model
from evomerge.recipe import Recipe


@dataclass
class MergeSession:
    recipe: Recipe
    plan: MergePlan
    sources: dict[str, WeightSource]
    layouts: dict[str, ModelLayout]
    device: torch.device
    compute_dtype: torch.dtype | None
    aligners: dict[str, Callable] = field(default_factory=dict)
    token_rows: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (model, target ids, its ids)

    @classmethod
    def open(cls, recipe: Recipe, *, device: str = "cpu", source: str = "<recipe>",
             trust_remote_code: bool = False, sources: dict[str, WeightSource] | None = None) -> "MergeSession":
        sources = dict(sources or {})
        try:
            for ref in recipe.referenced_models():
                if ref not in sources:
                    sources[ref] = open_model(ref, trust_remote_code=trust_remote_code)
            check_mergeable(sources, same_layers=False)
        except EvomergeError as exc:
            raise exc.located(source, "models") from None
        layouts = {ref: ModelLayout.from_source(src) for ref, src in sources.items()}
        plan = build_plan(recipe, layouts, source=source)
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"unknown device '{device}'", key="device", allowed="cpu, cuda, cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", key="device", allowed="cpu")
        session = cls(recipe, plan, sources, layouts, dev, DTYPES.get(recipe.dtype) if recipe.dtype else None)
        try:
            if recipe.options.embeddings == "align":
                session.aligners = _build_aligners(plan.target, sources)
            if recipe.options.token_rows is not None:
                session.token_rows = _token_row_ids(recipe, plan, sources, layouts)
        except EvomergeError as exc:
            raise exc.located(source, "evomerge") from None
        return session

    def source(self, ref: str) -> WeightSource:
        if ref not in self.sources:
            self.sources[ref] = open_model(ref)
        return self.sources[ref]

    def fetch(self, model: str, name: str) -> torch.Tensor:
        src = self.sources[model]
        try:
            return src.get(name, dtype=self.compute_dtype, device=self.device)
        except KeyError:
            raise ModelLoadError(f"model '{model}' has no tensor '{name}'") from None

    def rows_for(self, tp: TensorPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(target row ids, rows) that `token_rows` puts into `tp` after the merge, or None (not a token table)."""
        if self.token_rows is None or not is_token_table(tp):
            return None
        model, target_ids, ids = self.token_rows
        layout = self.layouts[model]
        name = tp.out_name
        if name not in layout.params:  # a tied model's head is its embedding table
            embed = token_embedding(layout)
            assert embed is not None  # checked when the session opened
            name = embed
        return target_ids.to(self.device), self.fetch(model, name)[ids.to(self.device)]

    def iter_merged(self, *, progress: bool = False,
                    description: str = "merging") -> Iterator[tuple[str, torch.Tensor]]:
        from rich.progress import track

        for tp in track(self.plan.tensors, description=description, disable=not progress, transient=True):
            try:
                yield tp.out_name, compute_tensor(self.plan, tp, self.fetch, aligners=self.aligners,
                                                  rows=self.rows_for(tp))
            except EvomergeError:
                raise
            except torch.OutOfMemoryError:
                raise ModelLoadError(f"out of memory while merging {tp.out_name} on {self.device}; "
                                     "try --device cpu or a smaller dtype") from None


_POSITIONS = re.compile(r"(wpe|position)", re.IGNORECASE)


def is_token_table(tp: TensorPlan) -> bool:
    """An embedding or head table with one row per token (not a position table)."""
    return tp.kind in (ParamKind.EMBED, ParamKind.LM_HEAD) and not _POSITIONS.search(tp.out_name)


def token_embedding(layout: ModelLayout) -> str | None:
    """The name of a model's token embedding table (not a position table), or None."""
    return next((n for n, info in layout.params.items()
                 if info.kind is ParamKind.EMBED and not _POSITIONS.search(n)), None)


def _token_row_ids(recipe: Recipe, plan: MergePlan, sources: dict[str, WeightSource],
                   layouts: dict[str, ModelLayout]) -> tuple[str, torch.Tensor, torch.Tensor]:
    from evomerge.models.vocab import token_row_ids

    spec = recipe.options.token_rows
    assert spec is not None
    tables = [tp for tp in plan.tensors if is_token_table(tp)]
    if not tables:
        raise ConfigError("the output has no embedding table to put token rows into", key="evomerge.token_rows")
    target_rows = min((sources[plan.target].shape(tp.out_name)[0] for tp in tables
                       if tp.out_name in layouts[plan.target].params), default=0)
    model = spec.model
    embed = token_embedding(layouts[model])
    if embed is None:
        raise ConfigError(f"model '{model}' has no embedding table to take token rows from", key="evomerge.token_rows")
    t_ids, s_ids = token_row_ids(spec.tokens, sources[plan.target].tokenizer(), sources[model].tokenizer(),
                                 target_rows=int(target_rows), source_rows=sources[model].shape(embed)[0],
                                 target=plan.target, source=model)
    return model, t_ids, s_ids


def _build_aligners(target: str, sources: dict[str, WeightSource]) -> dict[str, Callable]:
    """Per model with a different vocabulary: rows -> rows in the target's token order."""
    from evomerge.models.vocab import align_rows, vocab_index_map

    target_tok = sources[target].tokenizer()
    if target_tok is None:
        raise ModelLoadError(f"model '{target}' has no tokenizer, so rows cannot be aligned by token string")
    aligners = {}
    for ref, src in sources.items():
        if ref == target:
            continue
        tok = src.tokenizer()
        if tok is None:
            raise ModelLoadError(f"model '{ref}' has no tokenizer, so rows cannot be aligned by token string")
        if tok.get_vocab() == target_tok.get_vocab():
            continue
        index_map = vocab_index_map(target_tok, tok)
        aligners[ref] = lambda rows, fill, m=index_map: align_rows(rows, m.to(rows.device), fill)
    return aligners
