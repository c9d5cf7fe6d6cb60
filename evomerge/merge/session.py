"""A merge session: the recipe's models opened lazily, checked, planned, and merged tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, EvomergeError, ModelLoadError
from evomerge.merge.execute import compute_tensor
from evomerge.merge.plan import MergePlan, build_plan
from evomerge.models.compat import check_mergeable
from evomerge.models.layout import ModelLayout
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
        if recipe.options.embeddings == "align":
            session.aligners = _build_aligners(plan.target, sources)
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

    def iter_merged(self, *, progress: bool = False,
                    description: str = "merging") -> Iterator[tuple[str, torch.Tensor]]:
        from rich.progress import track

        for tp in track(self.plan.tensors, description=description, disable=not progress, transient=True):
            try:
                yield tp.out_name, compute_tensor(self.plan, tp, self.fetch, aligners=self.aligners)
            except EvomergeError:
                raise
            except torch.OutOfMemoryError:
                raise ModelLoadError(f"out of memory while merging {tp.out_name} on {self.device}; "
                                     "try --device cpu or a smaller dtype") from None


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
