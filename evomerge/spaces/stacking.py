"""The layer-stacking (data-flow space) part of a search: genome -> (path, scales) -> stacked live model.

- `dfs`: Sakana's DFS genome over the stacking models' layers (evomerge/merge/dfs.py).
- `dus`: SOLAR-style depth up-scaling of one model: two genes choose where the first copy ends and
  where the second begins; with `drop` fixed the space is the single DUS recipe (its one gene unused,
  every trial after the first is answered from the store).
- PS+DFS: with `ps_recipe`, the parameter-space merge is materialized once into the run folder
  (`ps_model/`) and becomes stacking source 0, so the exported passthrough recipe refers to a real folder.
Candidates export as mergekit passthrough recipes whose `scale` parameters fold the transition scales; the
live model a candidate is scored with is built from that very recipe (`build_recipe_model`), so the search
scores exactly what `evomerge merge` (and mergekit) make of the exported recipe.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.dfs import DfsSpace, check_stackable
from evomerge.merge.stacking import build_recipe_model, to_passthrough_recipe
from evomerge.models.sources import WeightSource
from evomerge.recipe import Recipe
from evomerge.spaces.genes import GeneLayout


@dataclass
class StackCandidate:
    path: list[tuple[int, int]]
    scales: list[float]
    recipe: Recipe

    def to_yaml(self) -> str:
        return self.recipe.to_yaml()


class StackSpace:
    def __init__(self, config: SearchConfig, refs: dict[str, str], sources: dict, *, source: str = "<space>",
                 run_dir: Path | None = None, base_dir: Path = Path(".")):
        st = config.stacking
        assert st is not None
        self.config, self.st, self.source = config, st, source
        names = list(st.models or config.models)
        for n in names + ([st.target] if st.target else []):
            if n not in config.models:
                raise ConfigError(f"'{n}' is not one of models: {sorted(config.models)}", file=source,
                                  key="stacking.models")
        target = st.target or config.base_model or names[0]
        if st.mode == "dus":
            names = [target]
        if target not in names:
            names.insert(0, target)
        self.names = names
        self.refs = [refs[n] for n in names]
        self.sources = [sources[n] for n in names]
        if st.ps_recipe:
            if run_dir is None:
                raise ConfigError("PS+DFS needs the run folder to hold the parameter-space merge", file=source,
                                  key="stacking.ps_recipe")
            ps_ref = self._materialize_ps(run_dir, base_dir)
            from evomerge.models.sources import open_model

            self.names.insert(0, "ps_merge")
            self.refs.insert(0, ps_ref)
            self.sources.insert(0, open_model(ps_ref))
            if not st.target:
                target = "ps_merge"
        self.target_index = self.names.index(target)
        try:
            check_stackable([s.config for s in self.sources], self.names)
        except EvomergeError as exc:
            raise ConfigError(exc.detail, file=source, key="stacking.models", allowed=exc.allowed) from None
        self.layer_counts = [s.num_layers() for s in self.sources]
        if st.mode == "dfs":
            self.dfs = DfsSpace(self.layer_counts, repeats=st.repeats, target=self.target_index,
                                max_len=st.max_length, scale_bounds=st.scale_range)
            self.dim = self.dfs.genome_size
        else:
            n = self.layer_counts[0]
            if st.drop is not None and not 0 < st.drop < n:
                raise ConfigError(f"drop {st.drop} for a {n}-layer model", file=source, key="stacking.drop",
                                  allowed=f"1..{n - 1}")
            self.dim = 1 if st.drop is not None else 2

    def _materialize_ps(self, run_dir: Path, base_dir: Path) -> str:
        from evomerge.merge.materialize import materialize

        folder = Path(run_dir) / "ps_model"
        if not (folder / "config.json").exists():
            assert self.st.ps_recipe is not None  # only called with a ps_recipe
            recipe_path = Path(self.st.ps_recipe)
            if not recipe_path.is_absolute():
                recipe_path = base_dir / recipe_path
            materialize(Recipe.load(recipe_path), folder, device="cpu", progress=False, overwrite=True,
                        recipe_source=str(recipe_path))
        return str(folder.resolve())

    # -- genome -> candidate ---------------------------------------------------------------------
    def path_of(self, genome: np.ndarray) -> tuple[list[tuple[int, int]], list[float]]:
        genome = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if self.st.mode == "dfs":
            return self.dfs.decode(genome, strict=False)
        n = self.layer_counts[0]
        if self.st.drop is not None:
            end, start = n - self.st.drop, self.st.drop
        else:  # first copy keeps [0, end), second copy [start, n); end in [n/2, n], start in [0, n/2]
            end = int(round(math.ceil(n / 2) + genome[0] * (n - math.ceil(n / 2))))
            start = int(round(genome[1] * (n // 2)))
        path = [(0, i) for i in range(end)] + [(0, i) for i in range(start, n)]
        return path, [1.0] * len(path)

    def decode(self, genome: np.ndarray) -> StackCandidate:
        path, scales = self.path_of(genome)
        recipe = to_passthrough_recipe(path, scales, self.refs, self.target_index, dtype=self.config.dtype)
        return StackCandidate(path, scales, Recipe.from_dict(recipe, source=self.source))

    def encode(self, recipe: Recipe) -> np.ndarray:
        raise ConfigError("seed_recipes are not supported for stacking searches", file=self.source,
                          key="seed_recipes")

    def initial_genome(self) -> np.ndarray | None:
        if self.st.mode == "dfs":
            return self.dfs.encode(self.dfs.identity_path())
        return np.full(self.dim, 0.5)

    def layer_params(self, genome: np.ndarray) -> dict[str, list[float]]:
        path, scales = self.path_of(genome)
        offsets = np.cumsum([0] + self.layer_counts[:-1])
        return {"layer (global index)": [float(offsets[s] + li) for s, li in path], "scale": list(scales)}

    def dedupe_key(self, genome: np.ndarray) -> str:
        path, scales = self.path_of(genome)
        text = repr((path, [round(s, 4) for s in scales]))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def gene_layout(self) -> GeneLayout:
        return GeneLayout.unit(self.dim)  # layer indicators and transition scales: positions, not units

    def baseline_genomes(self) -> list[tuple[str, np.ndarray]]:
        return []  # a layer stack has no uniform hand-made counterpart to start from

    def tokenizer_source(self) -> WeightSource:
        return self.sources[self.target_index]

    def make_merger(self, *, device: str, offload: str) -> StackMerger:
        return StackMerger(self, device=device)


class StackMerger:
    """Source models live on the device; a candidate is the live model of its exported passthrough recipe: a
    stack of the sources' layers sharing their tensors, with only the tensors the recipe scales (o_proj and
    down_proj after a transition scale) computed anew, exactly as `evomerge merge` writes them.

    Memory: a candidate holds one new o_proj and down_proj per position whose cumulative scale is not 1
    (about 30% of a Llama layer's weights each), freed with the candidate; the scaled-residual pre-hooks this
    replaced cost nothing but scored a model ~eps/ms(activations) away from the exported one."""

    def __init__(self, space: StackSpace, *, device: str):
        from evomerge.models.causal_lm import load_causal_lm
        from evomerge.models.layout import ModelLayout

        dtype = getattr(torch, space.config.dtype)
        self.source = space.source
        self.models = {ref: load_causal_lm(src, dtype=dtype, device=device)[0].eval()
                       for ref, src in zip(space.refs, space.sources)}
        self.layouts = {ref: ModelLayout.from_source(src) for ref, src in zip(space.refs, space.sources)}

    def merge(self, candidate: StackCandidate):
        return build_recipe_model(candidate.recipe, self.models, self.layouts, source=self.source).eval()
