"""Layer stacking: the scaled in-memory stack, its folded plain model and mergekit's passthrough merge agree.

Tolerances: the models here are tiny random Llamas whose activations are near 0.02 (mean square
about 4e-4). Folding turns each RMSNorm's eps into eps / c^2 (see evomerge/merge/stacking.py), a
relative change of about eps / ms ~ 2.5e-3 * eps / 1e-6, so the exactness tests use rms_norm_eps=1e-12
where the only differences are float32 rounding over 7 layers: logits (max |logit| ~ 0.5) agree
to 2e-6 absolute (measured 2e-7). The eps=1e-6 test documents the size of the eps effect instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.merge.dfs import DfsSpace
from evomerge.merge.stacking import (
    build_recipe_model,
    build_stacked_model,
    cumulative_scales,
    dus_path,
    dus_recipe,
    fold_scales,
    stacked_config,
    to_passthrough_recipe,
)
from evomerge.models.tiny import char_tokenizer, perturbed, random_model, save_model, tiny_config

ATOL = 2e-6
# two models, layer 1 of A used twice, starts and ends on B (so embeddings / lm_head must come
# from the target A through mergekit's empty slices), scales 0.7-1.3
PATH = [(1, 0), (0, 1), (1, 1), (1, 2), (0, 1), (0, 2), (1, 3)]
SCALES = [1.0, 0.8, 1.3, 0.7, 1.2, 0.9, 1.1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tok = char_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok), rms_norm_eps=1e-12)
    a = random_model(cfg, seed=0)
    b = perturbed(a, seed=1, scale=0.3)  # a "fine-tune" far enough that a wrong source shows
    root = tmp_path_factory.mktemp("stack")
    return {"a": a, "b": b, "tok": tok, "dir_a": save_model(a, tok, root / "a"),
            "dir_b": save_model(b, tok, root / "b"), "root": root}


def _ids(model, n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (n, length), generator=g)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _mergekit(recipe: dict, out, **options):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    text = yaml.safe_dump(recipe)  # what a user would write to recipe.yaml
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(copy_tokenizer=True, quiet=True, **options))
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def test_stacked_folded_and_mergekit_logits_agree(pair):
    a, b = pair["a"], pair["b"]
    stacked = build_stacked_model(a, PATH, SCALES, [a, b])
    folded = fold_scales(stacked)
    recipe = to_passthrough_recipe(PATH, SCALES, [str(pair["dir_a"]), str(pair["dir_b"])], target_index=0)
    merged = _mergekit(recipe, pair["root"] / "merged")
    assert merged.config.num_hidden_layers == len(PATH) == stacked.config.num_hidden_layers
    assert torch.equal(merged.model.embed_tokens.weight, a.model.embed_tokens.weight)
    assert torch.equal(merged.lm_head.weight, a.lm_head.weight)
    assert torch.equal(merged.model.norm.weight, a.model.norm.weight)

    ids = _ids(a)
    ls, lf, lm = _logits(stacked, ids), _logits(folded, ids), _logits(merged, ids)
    assert ls.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(lf, ls, atol=ATOL, rtol=0)
    torch.testing.assert_close(lm, ls, atol=ATOL, rtol=0)
    # the scales matter: the same path without them is far away
    plain = build_stacked_model(a, PATH, [1.0] * len(PATH), [a, b])
    assert (_logits(plain, ids) - ls).abs().max() > 100 * ATOL


def test_recipe_slices_and_per_layer_scale_lists(pair):
    path = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (0, 1), (0, 2), (0, 3)]
    scales = [1.0, 1.0, 1.0, 1.25, 1.0, 0.8, 1.1, 1.0]
    recipe = to_passthrough_recipe(path, scales, ["A", "B"], target_index=0)
    slices = [s["sources"][0] for s in recipe["slices"]]
    assert [(s["model"], s["layer_range"]) for s in slices] == [("A", [0, 3]), ("B", [2, 4]), ("A", [1, 4])]
    assert recipe["base_model"] == "A" and recipe["merge_method"] == "passthrough"
    assert "parameters" not in slices[0]  # cumulative scale 1 throughout: untouched
    c = cumulative_scales(scales)
    assert slices[1]["parameters"]["scale"] == [{"filter": "o_proj", "value": 1 / c[3]},
                                                {"filter": "down_proj", "value": 1 / c[3]}]
    assert slices[2]["parameters"]["scale"][0]["value"] == pytest.approx([1 / c[5], 1 / c[6], 1 / c[7]])
    # mergekit merges it and the per-layer list lands on the right layers
    merged = _mergekit(to_passthrough_recipe(path, scales, [str(pair["dir_a"]), str(pair["dir_b"])], 0),
                       pair["root"] / "lists")
    ref = fold_scales(pair["a"], path, scales, [pair["a"], pair["b"]])
    ids = _ids(pair["a"], seed=1)
    torch.testing.assert_close(_logits(merged, ids), _logits(ref, ids), atol=ATOL, rtol=0)


def test_generation_with_kv_cache_equals_without(pair):
    a, b = pair["a"], pair["b"]
    stacked = build_stacked_model(a, PATH, SCALES, [a, b])
    prompt = _ids(a, n=1, length=6, seed=2)
    with_cache = stacked.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    without = stacked.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.tolist() == without.tolist()

    # stronger than greedy tokens: step-by-step logits with the cache equal one full forward
    ids = _ids(a, n=1, length=10, seed=3)

    @torch.no_grad()
    def incremental(model):
        out = model(ids[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        return torch.cat(steps, dim=1)

    full = _logits(stacked, ids)
    torch.testing.assert_close(incremental(stacked), full, atol=1e-5, rtol=0)
    # the check has teeth: positions 1 and 4 (the same layer) sharing one cache slot break it
    stacked.model.layers[4].self_attn.layer_idx = 1
    assert (incremental(stacked) - full).abs().max() > 1e-3


def test_weights_are_shared_not_copied(pair):
    a, b = pair["a"], pair["b"]
    before = _logits(a, _ids(a))
    stacked = build_stacked_model(a, PATH, SCALES, [a, b])
    layers = stacked.model.layers
    for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight"):
        src = a.model.layers[1].get_parameter(name)
        assert layers[1].get_parameter(name).data_ptr() == layers[4].get_parameter(name).data_ptr() == src.data_ptr()
    assert layers[1].self_attn is not layers[4].self_attn
    assert (layers[1].self_attn.layer_idx, layers[4].self_attn.layer_idx) == (1, 4)
    assert [layer.self_attn.layer_idx for layer in a.model.layers] == [0, 1, 2, 3]  # sources untouched
    assert stacked.model.embed_tokens.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    assert stacked.lm_head.weight.data_ptr() == a.lm_head.weight.data_ptr()
    # the stack owns no tensor of its own: its parameters are exactly those of the layers it uses + A's ends
    used = ([a.model.layers[1], a.model.layers[2]] + list(b.model.layers)
            + [a.model.embed_tokens, a.model.norm, a.lm_head])
    assert {id(p) for p in stacked.parameters()} == {id(p) for m in used for p in m.parameters()}
    torch.testing.assert_close(_logits(a, _ids(a)), before, atol=0, rtol=0)  # no hooks leaked into a

    down_before = a.model.layers[1].mlp.down_proj.weight.detach().clone()
    folded = fold_scales(stacked)
    fl = folded.model.layers
    # unchanged tensors stay shared; only residual outputs of positions with c != 1 are new
    assert fl[4].self_attn.q_proj.weight.data_ptr() == a.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert fl[0].self_attn.o_proj.weight.data_ptr() == b.model.layers[0].self_attn.o_proj.weight.data_ptr()  # c=1
    assert fl[4].self_attn.o_proj.weight.data_ptr() != a.model.layers[1].self_attn.o_proj.weight.data_ptr()
    assert torch.equal(a.model.layers[1].mlp.down_proj.weight, down_before)  # folding wrote new tensors
    torch.testing.assert_close(fl[4].mlp.down_proj.weight, down_before / cumulative_scales(SCALES)[4])


@pytest.mark.parametrize("tied", [False, True])
def test_clone_fold_saves_and_reloads(pair, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    a, b = pair["a"], pair["b"]
    if tied:
        a = random_model(tiny_config("llama", rms_norm_eps=1e-12, tie_embeddings=True), seed=0)
        b = perturbed(a, seed=1, scale=0.3)
    folded = fold_scales(a, PATH, SCALES, [a, b], clone=True)
    ptrs = {p.data_ptr() for p in a.parameters()} | {p.data_ptr() for p in b.parameters()}
    assert not ptrs & {p.data_ptr() for p in folded.parameters()}
    assert (folded.lm_head.weight.data_ptr() == folded.model.embed_tokens.weight.data_ptr()) == tied
    folded.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(a)
    torch.testing.assert_close(_logits(again, ids), _logits(build_stacked_model(a, PATH, SCALES, [a, b]), ids),
                               atol=ATOL, rtol=0)


def test_mergekit_on_a_model_with_layer_types(tmp_path):
    """Qwen2 configs carry layer_types: mergekit 0.1.5 + transformers 5 write the tensors but fail to
    save a config with a new layer count; stacked_config() is the config to write in its place."""
    tok = char_tokenizer()
    a = random_model(tiny_config("qwen2", vocab_size=len(tok), rms_norm_eps=1e-12), seed=0)
    b = perturbed(a, seed=1, scale=0.3)
    recipe = to_passthrough_recipe(PATH, SCALES, [str(save_model(a, tok, tmp_path / "a")),
                                                  str(save_model(b, tok, tmp_path / "b"))], target_index=0)
    try:
        merged = _mergekit(recipe, tmp_path / "out")
    except Exception:  # noqa: BLE001 - mergekit's own config validation error
        stacked_config(a.config, PATH, [a.config, b.config]).save_pretrained(tmp_path / "out")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids(a)
    torch.testing.assert_close(_logits(merged, ids), _logits(build_stacked_model(a, PATH, SCALES, [a, b]), ids),
                               atol=ATOL, rtol=0)


def test_identity_path_is_the_target_model(pair):
    a = pair["a"]
    ident = build_stacked_model(a, [(0, i) for i in range(4)], [1.0] * 4, [a])
    ids = _ids(a)
    assert torch.equal(_logits(ident, ids), _logits(a, ids))


def test_eps_makes_folding_approximate_on_tiny_models():
    cfg = tiny_config("llama", rms_norm_eps=1e-6)
    a = random_model(cfg, seed=0)
    b = perturbed(a, seed=1, scale=0.3)
    ids = _ids(a)
    ls = _logits(build_stacked_model(a, PATH, SCALES, [a, b]), ids)
    lf = _logits(fold_scales(a, PATH, SCALES, [a, b]), ids)
    rel = float((lf - ls).abs().max() / ls.abs().max())
    # eps / c^2 instead of eps at each norm: ~1e-4 relative here (activations ~0.02); 1e-2 is the bound
    assert rel < 1e-2


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_fold_other_architectures(family):
    """Qwen2 (q/k/v biases, config.layer_types) and Gemma 2 (sandwich norms with (1 + w) gains)."""
    cfg = tiny_config(family, rms_norm_eps=1e-12)
    a = random_model(cfg, seed=0)
    b = perturbed(a, seed=1, scale=0.3)
    path = [(0, 0), (1, 1), (0, 1), (0, 1), (0, 3)]
    scales = [1.0, 1.3, 0.7, 1.2, 0.9]
    stacked = build_stacked_model(a, path, scales, [a, b])
    assert stacked.config.layer_types == [cfg.layer_types[layer] for _, layer in path]
    ids = _ids(a)
    ls = _logits(stacked, ids)
    torch.testing.assert_close(_logits(fold_scales(stacked), ids), ls, atol=ATOL, rtol=0)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = stacked.generate(ids[:1], use_cache=True, **gen).tolist()
    assert cached == stacked.generate(ids[:1], use_cache=False, **gen).tolist()


def test_dus_recipe_and_path(pair):
    n, drop = 4, 1
    assert dus_path(n, drop) == [(0, 0), (0, 1), (0, 2), (0, 1), (0, 2), (0, 3)]
    recipe = dus_recipe(str(pair["dir_a"]), n, drop=drop)
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 3], [1, 4]]
    merged = _mergekit(recipe, pair["root"] / "dus")
    assert merged.config.num_hidden_layers == 2 * n - 2 * drop
    a = pair["a"]
    stacked = build_stacked_model(a, dus_path(n, drop), [1.0] * 6, [a])
    ids = _ids(a)
    torch.testing.assert_close(_logits(merged, ids), _logits(stacked, ids), atol=ATOL, rtol=0)
    assert len(dus_path(32, 8)) == 48
    with pytest.raises(ConfigError, match="drop"):
        dus_recipe("m", 4, drop=4)


def test_dfs_genome_to_stacked_model(pair):
    a, b = pair["a"], pair["b"]
    space = DfsSpace([4, 4], repeats=2, target=0, max_len=8, scale_bounds=(0.7, 1.3))
    path, scales = space.decode(np.random.default_rng(4).random(space.genome_size), strict=False)
    stacked = build_stacked_model(a, path, scales, [a, b])
    ids = _ids(a)
    torch.testing.assert_close(_logits(fold_scales(stacked), ids), _logits(stacked, ids), atol=ATOL, rtol=0)


def test_errors_are_config_errors(pair):
    a = pair["a"]
    with pytest.raises(ConfigError, match="uses no layer"):
        build_stacked_model(a, [], [], [a])
    with pytest.raises(ConfigError, match="layer 4"):
        build_stacked_model(a, [(0, 4)], [1.0], [a])
    with pytest.raises(ConfigError, match="scale"):
        build_stacked_model(a, [(0, 0), (0, 1)], [1.0, -1.0], [a])
    with pytest.raises(ConfigError, match="source 2"):
        to_passthrough_recipe([(2, 0)], [1.0], ["A", "B"], 0)
    other = random_model(tiny_config("llama", hidden=32, heads=2, kv_heads=1), seed=0)
    with pytest.raises(ConfigError) as err:
        build_stacked_model(a, [(0, 0), (1, 0)], [1.0, 1.0], [a, other])
    assert err.value.key == "hidden_size"
    with pytest.raises(ConfigError, match="stacked model"):
        fold_scales(a)


@pytest.fixture(scope="module")
def realistic_pair(tmp_path_factory):
    """Two tiny Llamas with a realistic norm eps (1e-5), where scaled and folded stacks visibly differ."""
    tok = char_tokenizer()
    a = random_model(tiny_config("llama", vocab_size=len(tok), rms_norm_eps=1e-5), seed=0)
    b = perturbed(a, seed=1, scale=0.3)
    root = tmp_path_factory.mktemp("stack_eps")
    return {"a": a, "b": b, "dir_a": save_model(a, tok, root / "a"), "dir_b": save_model(b, tok, root / "b"),
            "root": root}


def _recipe_model(p, path=PATH, scales=SCALES):
    from evomerge.models.layout import ModelLayout
    from evomerge.models.sources import open_model
    from evomerge.recipe import Recipe

    refs = [str(p["dir_a"]), str(p["dir_b"])]
    recipe = Recipe.from_dict(to_passthrough_recipe(path, scales, refs, target_index=0))
    layouts = {r: ModelLayout.from_source(open_model(r)) for r in refs}
    return recipe, build_recipe_model(recipe, dict(zip(refs, [p["a"], p["b"]])), layouts)


def test_recipe_model_is_what_evomerge_merge_writes(realistic_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import materialize

    p = realistic_pair
    recipe, live = _recipe_model(p)
    written = AutoModelForCausalLM.from_pretrained(materialize(recipe, tmp_path / "out", progress=False)).eval()
    state = live.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.state_dict().items())
    ids = _ids(p["a"])
    lr, lw = _logits(live, ids), _logits(written, ids)
    assert float((lr - lw).abs().max() / lw.abs().max()) <= 1e-6
    # the scaled-residual stack differs by the eps effect (~1e-3 relative here): not what is shipped
    hooked = _logits(build_stacked_model(p["a"], PATH, SCALES, [p["a"], p["b"]]), ids)
    assert float((hooked - lw).abs().max() / lw.abs().max()) > 1e-4
    # only the scaled tensors are new; the rest is shared with the sources, which stay untouched
    layers, src = live.model.layers, p["a"].model.layers[1]
    assert layers[4].self_attn.q_proj.weight.data_ptr() == src.self_attn.q_proj.weight.data_ptr()
    assert layers[4].self_attn.o_proj.weight.data_ptr() != src.self_attn.o_proj.weight.data_ptr()
    assert layers[0].self_attn.o_proj.weight.data_ptr() == p["b"].model.layers[0].self_attn.o_proj.weight.data_ptr()
    assert live.model.embed_tokens.weight.data_ptr() == p["a"].model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(layers[4].mlp.down_proj.weight, src.mlp.down_proj.weight / cumulative_scales(SCALES)[4])


def test_recipe_model_kv_cache_with_repeated_layers(realistic_pair):
    p = realistic_pair
    _, live = _recipe_model(p)
    assert [layer.self_attn.layer_idx for layer in live.model.layers] == list(range(len(PATH)))
    assert [layer.self_attn.layer_idx for layer in p["a"].model.layers] == [0, 1, 2, 3]  # sources untouched
    prompt = _ids(p["a"], n=1, length=6, seed=2)
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = live.generate(prompt, use_cache=True, **gen).tolist()
    assert cached == live.generate(prompt, use_cache=False, **gen).tolist()
    ids = _ids(p["a"], n=1, length=10, seed=3)

    @torch.no_grad()
    def incremental(model):
        out = model(ids[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache, steps = out.past_key_values, steps + [out.logits]
        return torch.cat(steps, dim=1)

    full = _logits(live, ids)
    torch.testing.assert_close(incremental(live), full, atol=1e-5, rtol=0)
    live.model.layers[4].self_attn.layer_idx = 1  # positions 1 and 4 (one source layer) sharing a cache slot
    assert (incremental(live) - full).abs().max() > 1e-3


def test_recipe_model_needs_a_stacking_recipe(realistic_pair):
    from evomerge.models.layout import ModelLayout
    from evomerge.models.sources import open_model
    from evomerge.recipe import Recipe

    p = realistic_pair
    ref = str(p["dir_a"])
    layouts = {ref: ModelLayout.from_source(open_model(ref))}
    linear = Recipe.from_dict({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]})
    with pytest.raises(ConfigError, match="passthrough"):
        build_recipe_model(linear, {ref: p["a"]}, layouts)
    scaled_head = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": ref, "layer_range": [0, 4], "parameters": {"scale": 0.5}}]}]})
    with pytest.raises(ConfigError, match="unscaled"):
        build_recipe_model(scaled_head, {ref: p["a"]}, layouts)

