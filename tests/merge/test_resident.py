"""The resident merger writes, in place into one live model, exactly what `evomerge merge` writes (bit for bit)
and what mergekit writes (float32 <= 1e-6) for the same recipe, for candidate after candidate."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.merge.materialize import materialize
from evomerge.merge.resident import ResidentMerger
from evomerge.recipe import Recipe


def _recipe(fam, method: str, w=(0.3, 0.9), d=(0.35, 0.8), seed=7) -> Recipe:
    models = [
        {"model": str(fam["a"]), "parameters": {"weight": list(w), "density": [{"filter": "mlp", "value": list(d)},
                                                                               {"value": 0.5}]}},
        {"model": str(fam["b"]), "parameters": {"weight": 0.6, "density": 0.421}},
        {"model": str(fam["c"]), "parameters": {"weight": [0.1, 0.4], "density": [0.9, 0.2]}},
    ]
    if method in ("task_arithmetic", "linear"):
        for m in models:
            m["parameters"].pop("density")
    if method.startswith("della"):
        for m in models:
            m["parameters"]["epsilon"] = 0.05
    return Recipe.from_dict({"merge_method": method, "base_model": str(fam["base"]) if method != "linear" else None,
                             "models": models, "parameters": {"lambda": 0.9} if method != "linear" else None,
                             "dtype": "float32", "evomerge": {"seed": seed}})


def _mergekit(recipe: Recipe, out) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe.to_dict()), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method,fused", [(m, "eager") for m in ("ties", "dare_ties", "task_arithmetic", "della",
                                                                  "linear")] + [("ties", "compile"),
                                                                                ("dare_ties", "compile")])
def test_live_weights_equal_evomerge_merge_and_mergekit(method, fused, llama_family, tmp_path):
    first = _recipe(llama_family, method)
    merger = ResidentMerger(first, device="cpu", fused=fused)
    assert merger.fast == (method == "ties")
    for i, recipe in enumerate([first, _recipe(llama_family, method, w=(0.8, -0.2), d=(0.9, 0.123), seed=11)]):
        live = {k: v.clone() for k, v in merger.merge(recipe).state_dict().items()}
        ours = load_file(str(materialize(recipe, tmp_path / f"ours{i}", progress=False,
                                         copy_tokenizer=False) / "model.safetensors"))
        assert set(ours) <= set(live)
        for name, value in ours.items():
            assert torch.equal(live[name], value), (i, name)
        if method not in ("dare_ties", "della") and fused == "eager":  # mergekit draws from the global RNG
            theirs = _mergekit(recipe, tmp_path / f"mk{i}")
            for name, value in theirs.items():
                assert (live[name] - value).abs().max() <= 1e-6, (i, name)


def test_dare_reproduces_and_seed_matters(llama_family):
    merger = ResidentMerger(_recipe(llama_family, "dare_ties"), device="cpu")
    a = {k: v.clone() for k, v in merger.merge(_recipe(llama_family, "dare_ties", seed=1)).state_dict().items()}
    _ = merger.merge(_recipe(llama_family, "dare_ties", seed=2))
    b = {k: v.clone() for k, v in merger.model.state_dict().items()}
    c = merger.merge(_recipe(llama_family, "dare_ties", seed=1)).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a[name], c[name])
    assert not torch.equal(a[name], b[name])


def test_nan_candidate_raises(llama_family):
    merger = ResidentMerger(_recipe(llama_family, "task_arithmetic"), device="cpu")
    bad = _recipe(llama_family, "task_arithmetic", w=(1e38, 1e38)).model_copy(update={"parameters": {"lambda": 1e38}})
    with pytest.raises(FloatingPointError):
        merger.merge(bad)


def test_another_method_of_the_family_merges_from_the_same_deltas(llama_family, tmp_path):
    """A TIES run's base + deltas also serve a DARE-TIES or DELLA candidate (their masks drawn per merge)."""
    merger = ResidentMerger(_recipe(llama_family, "ties"), device="cpu", fused="eager")
    for method in ("dare_ties", "della", "task_arithmetic"):
        recipe = _recipe(llama_family, method)
        live = {k: v.clone() for k, v in merger.merge(recipe).state_dict().items()}
        ours = load_file(str(materialize(recipe, tmp_path / method, progress=False,
                                         copy_tokenizer=False) / "model.safetensors"))
        for name, value in ours.items():
            assert torch.equal(live[name], value), (method, name)
    with pytest.raises(ConfigError, match="other resident tensors"):
        merger.merge(_recipe(llama_family, "linear"))
