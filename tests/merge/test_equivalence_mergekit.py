"""Whole-model equivalence with mergekit 0.1.5: the same recipe through `evomerge.merge.materialize.materialize` and
mergekit's `run_merge` gives the same tensors (float32: <= 1e-6 abs; bfloat16: <= 1 ulp; the methods mergekit 0.1.5
added, measured bit-equal in both, are held to bit equality)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.materialize import materialize
from evomerge.recipe import Recipe

RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": [1.0, 0.5, 0.2]}},
            {"model": "b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}},
            {"model": "c", "parameters": {"weight": 0.4}},
        ],
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": [0.2, 1.0]}},
            {"model": "b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.6, "density": [0.3, 0.7]}},
            {"model": "b", "parameters": {"weight": [0.2, 0.9],
                                          "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}},
            {"model": "c", "parameters": {"weight": 0.3, "density": 0.4}},
        ],
        "parameters": {"lambda": 1.1, "normalize": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}},
            {"model": "b", "parameters": {"weight": [0.3, 0.6], "density": [0.9, 0.6], "gamma": 0.02}},
        ],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}},
            {"model": "b", "parameters": {"weight": 0.7, "density": [0.5, 0.8]}},
            {"model": "c", "parameters": {"weight": 0.4, "density": 0.6}},
        ],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "a"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": 0.7},
                             {"value": 0.4}]},
    },
    "passthrough": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                   {"filter": "down_proj", "value": 0.8}, {"value": 1.0}]}}]},
        ],
    },
    # mergekit 0.1.5's other methods, with gradients and filters on their parameters
    "nuslerp_base": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0.3, 0.8]}},
                   {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.6}, {"value": 0.4}]}}],
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "a"}],
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
        "parameters": {"max_iter": [{"filter": "self_attn", "value": 2}, {"value": 10}], "tol": 1e-6},
    },
    "karcher_base": {  # the base is one more model, in mergekit as here
        "merge_method": "karcher",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": [{"model": "a", "parameters": {"weight": [0.2, 0.9]}},
                   {"model": "b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 0.3}]}},
                   {"model": "c", "parameters": {"weight": 0.4}}],
    },
    "multislerp_base": {  # two models: bf16 norms have zero task vectors, where 3+ models raise (in mergekit too)
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0.2, 0.9]}}, {"model": "b", "parameters": {"weight": 0.5}}],
        "parameters": {"normalize_weights": False},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "models": [{"model": "a"}],
        "parameters": {"t": [{"filter": "mlp", "value": [1e-4, 6e-4]}, {"value": 3e-4}]},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
        "parameters": {"select_topk": [{"filter": "self_attn", "value": [0.3, 0.9]}, {"value": 0.6}]},
    },
    "ram": {  # deltas here are ~4e-4: epsilon near it splits unique from shared changes
        "merge_method": "ram",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
        "parameters": {"epsilon": [{"filter": "mlp", "value": [2e-4, 6e-4]}, {"value": 4e-4}]},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
        "parameters": {"r": [0.5, 2.0], "alpha": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}],
                       "epsilon": 4e-4},
    },
}
NEW_METHODS = ["arcee_fusion", "karcher", "karcher_base", "multislerp", "multislerp_base", "nearswap", "sce", "ram",
               "ramplus_tl", "nuslerp_base"]
FLOAT32_KERNELS = ("arcee_fusion", "ramplus_tl")  # mergekit writes float32 for half inputs unless out_dtype is set


def _bind(recipe: dict, paths: dict) -> dict:
    """Replace model names by folder paths."""
    r = copy.deepcopy(recipe)

    def fix(x):
        if isinstance(x, dict):
            return {k: (str(paths[v]) if k in ("model", "base_model") and v in paths else fix(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(e) for e in x]
        return x

    return fix(r)


def _mergekit(recipe: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    try:
        run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(out),
                  options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    except Exception as exc:  # mergekit 0.1.5 writes every tensor, then fails to save a config whose
        # layer count changed when the config has `layer_types` (Qwen2): tensors are still comparable.
        if "layer_types" not in str(exc):
            raise
    return _read_dir(out)


def _read_dir(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at |x|."""
    x = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(x)) - 7)


def _assert_same(ours: dict, theirs: dict, dtype: str, exact: bool = False):
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape, name
        if exact:  # measured bit-equal: hold them to it
            assert a.dtype == b.dtype and torch.equal(a, b), name
        if dtype == "float32":
            diff = (a.float() - b.float()).abs().max().item()
            assert diff <= 1e-6, f"{name}: max abs diff {diff}"
        else:
            assert a.dtype == b.dtype == torch.bfloat16, name
            excess = ((a.float() - b.float()).abs() - _ulp(b)).max().item()
            assert excess <= 0, f"{name}: differs by more than 1 ulp"


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_equals_mergekit_float32(method, family, request, tmp_path):
    paths = request.getfixturevalue(f"{family}_family")
    recipe = _bind(RECIPES[method] | {"dtype": "float32"}, paths)
    theirs = _mergekit(recipe, tmp_path / "mk")
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False, copy_tokenizer=False)
    _assert_same(_read_dir(tmp_path / "ours"), theirs, "float32", exact=method in NEW_METHODS)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    n_layers = 1 + max(int(k.split(".")[2]) for k in theirs if k.startswith("model.layers."))
    assert cfg["num_hidden_layers"] == n_layers
    assert len(cfg.get("layer_types", [None] * n_layers)) == n_layers


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "passthrough"] + NEW_METHODS)
def test_equals_mergekit_bfloat16(method, llama_family, tmp_path):
    out = {"out_dtype": "bfloat16"} if method in FLOAT32_KERNELS else {}
    recipe = _bind(RECIPES[method] | {"dtype": "bfloat16"} | out, llama_family)
    theirs = _mergekit(recipe, tmp_path / "mk")
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False, copy_tokenizer=False)
    _assert_same(_read_dir(tmp_path / "ours"), theirs, "bfloat16", exact=method in NEW_METHODS)


@pytest.mark.parametrize("method", FLOAT32_KERNELS)
def test_float32_kernels_in_bfloat16_are_mergekits_rounded(method, llama_family, tmp_path):
    """Without out_dtype mergekit writes these kernels' float32 results; evomerge writes the recipe's dtype:
    exactly mergekit's tensors rounded to bfloat16 (documented in methods_selective)."""
    recipe = _bind(RECIPES[method] | {"dtype": "bfloat16"}, llama_family)
    theirs = _mergekit(recipe, tmp_path / "mk")
    assert {t.dtype for n, t in theirs.items() if "layers" in n} == {torch.float32}
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False, copy_tokenizer=False)
    ours = _read_dir(tmp_path / "ours")
    for name, ref in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], ref.to(torch.bfloat16)), name


@pytest.fixture(scope="module")
def far_expert(llama_family, tmp_path_factory):
    """The base plus noise as large as each tensor's spread: weight matrices at cosine ~0.7 from the base, where
    slerp is spherical (the family's own experts sit at cosine > 0.9995, where slerp falls back to lerp)."""
    from transformers import AutoModelForCausalLM

    from evomerge.models.tiny import perturbed, save_model

    base = AutoModelForCausalLM.from_pretrained(llama_family["base"]).eval()
    return save_model(perturbed(base, seed=11, scale=1.0), None, tmp_path_factory.mktemp("far") / "far")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slerp_of_far_apart_models_equals_mergekit(dtype, llama_family, far_expert, tmp_path):
    """Real spherical interpolation, not its lerp fallback: replacing evomerge's slerp by lerp fails this test."""
    recipe = _bind({"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "far"}],
                    "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}]}, "dtype": dtype},
                   {"base": llama_family["base"], "far": far_expert})
    theirs = _mergekit(recipe, tmp_path / "mk")
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False, copy_tokenizer=False)
    _assert_same(_read_dir(tmp_path / "ours"), theirs, dtype)

    a_all, b_all = _read_dir(llama_family["base"]), _read_dir(far_expert)
    spherical = 0
    for name, merged in theirs.items():
        a, b = a_all[name].double().flatten(), b_all[name].double().flatten()
        cos = float(a @ b / (a.norm() * b.norm()))
        if abs(cos) > 0.9995:
            continue  # norms: near-collinear, lerp in mergekit as here
        t = 0.3 if "self_attn" in name else 0.6
        lerp = (1 - t) * a + t * b
        assert (merged.double().flatten() - lerp).abs().max() > 1e-3, f"{name}: slerp equals lerp (cos {cos:.3f})"
        spherical += 1
    assert spherical >= len(theirs) // 2, f"only {spherical} of {len(theirs)} tensors are far apart"
