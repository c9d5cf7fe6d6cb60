"""The parameter space lays out genes for every searchable merge method, and a decoded candidate merged
in place by the resident merger equals `evomerge merge` and mergekit of its recipe (tiny Llamas, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.config import SEARCH_METHODS, parse_search_space
from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS
from evomerge.models.sources import open_model
from evomerge.spaces.parameter import ParameterSpace
from tests.workflow.test_run import _mcq_file

# per searchable method added with mergekit 0.1.5's list: the parameters a space evolves or fixes
SPACES = {
    "multislerp": ({"weight": {"range": [0.1, 1.0]}}, ["a", "b", "c"]),
    "nearswap": ({"t": {"range": [1e-4, 8e-4]}}, ["a"]),
    "sce": ({"select_topk": {"range": [0.2, 1.0]}}, ["a", "b", "c"]),
    "ramplus_tl": ({"r": {"range": [0.0, 2.0]}, "alpha": {"range": [0.1, 1.0]}, "epsilon": 4e-4}, ["a", "b", "c"]),
}


def _config(fam, tmp_path, method, params, members, *, base=True, **over):
    names = (["base"] if base else []) + members
    data = {
        "name": f"ps-{method}",
        "models": {n: str(fam[n]) for n in names},
        "merge_method": method,
        "parameters": params,
        "granularity": "block", "block_size": 2,
        "tasks": [{"name": "add", "kind": "mcq", "path": str(_mcq_file(tmp_path / "mcq.jsonl")), "n_search": 4}],
        "dtype": "float32",
    } | ({"base_model": "base"} if base else {}) | over
    return parse_search_space(yaml.safe_dump(data), source="space.yaml")


def _space(fam, config):
    refs = {n: str(p) for n, p in config.models.items()}
    sources = {n: open_model(r) for n, r in refs.items()}
    return ParameterSpace(config, refs, 4, source="space.yaml", sources=sources)


def test_every_searchable_method_is_allowed_in_a_space():
    assert set(SEARCH_METHODS) == {n for n, s in METHODS.items() if s.searchable}
    assert set(SPACES) <= set(SEARCH_METHODS)


@pytest.mark.parametrize("method", sorted(SPACES))
def test_genes_decode_merge_and_equal_evomerge_merge_and_mergekit(method, llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge.merge.materialize import materialize

    params, members = SPACES[method]
    space = _space(llama_family, _config(llama_family, tmp_path, method, params, members))
    evolved = [k for k, v in params.items() if isinstance(v, dict)]
    per_model = [k for k in evolved if k in METHODS[method].per_model_params]
    assert space.members == members  # the base is the origin of task vectors, never a member
    groups = 2 * (len(per_model) * len(members) + len(evolved) - len(per_model))
    assert space.dim == groups and {g.param for g in space.genes} == set(evolved)

    genome = np.random.default_rng(3).random(space.dim)
    recipe = space.decode(genome)
    assert recipe.merge_method == method and recipe.base_model == str(llama_family["base"])
    assert space.decode(space.encode(recipe)).to_yaml() == recipe.to_yaml()  # a recipe seeds the search

    out = materialize(recipe, tmp_path / "ours", progress=False, copy_tokenizer=False)
    ours = load_file(str(out / "model.safetensors"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    for name, ref in theirs.items():
        assert torch.equal(ours[name], ref), name

    merger = space.make_merger(device="cpu", offload="never")
    state = merger.merge(recipe).state_dict()
    for name, ref in theirs.items():
        assert torch.equal(state[name], ref), name


def test_multislerp_without_a_base_merges_every_model(llama_family, tmp_path):
    config = _config(llama_family, tmp_path, "multislerp", {"weight": {"range": [0.1, 1.0]}}, ["a", "b"], base=False)
    space = _space(llama_family, config)
    assert space.members == ["a", "b"] and space.decode(np.full(space.dim, 0.5)).base_model is None


def test_model_counts_are_checked_per_method(llama_family, tmp_path):
    config = _config(llama_family, tmp_path, "nearswap", {"t": {"range": [1e-4, 8e-4]}}, ["a", "b"])
    with pytest.raises(ConfigError, match="nearswap merges exactly 1 model") as err:
        _space(llama_family, config)
    assert err.value.key == "models" and err.value.file == "space.yaml"
