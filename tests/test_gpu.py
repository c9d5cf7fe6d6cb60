"""CUDA paths (skipped without a GPU; CI has none). Each has a CPU twin elsewhere in the suite."""

from __future__ import annotations

import pytest
import torch

from evomerge.recipe import Recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _recipe(fam, method="ties") -> Recipe:
    return Recipe.from_dict({
        "merge_method": method, "base_model": str(fam["base"]), "dtype": "float32", "evomerge": {"seed": 1},
        "models": [{"model": str(fam["a"]), "parameters": {"weight": [0.2, 0.9], "density": 0.4}},
                   {"model": str(fam["b"]), "parameters": {"weight": 0.7, "density": [0.3, 0.8]}}]})


@pytest.mark.parametrize("offload", ["never", "always"])
def test_resident_merge_on_cuda_equals_cpu(llama_family, offload):
    from evomerge.merge.resident import ResidentMerger

    recipe = _recipe(llama_family)
    cpu = ResidentMerger(recipe, device="cpu").merge(recipe).state_dict()
    gpu = ResidentMerger(recipe, device="cuda", offload=offload).merge(recipe).state_dict()
    for name, value in cpu.items():
        assert (gpu[name].cpu() - value).abs().max() <= 1e-6, name


def test_materialize_on_cuda(llama_family, tmp_path):
    from safetensors.torch import load_file

    from evomerge.merge.materialize import materialize

    recipe = _recipe(llama_family)
    a = load_file(str(materialize(recipe, tmp_path / "cpu", progress=False) / "model.safetensors"))
    b = load_file(str(materialize(recipe, tmp_path / "gpu", device="cuda", progress=False) / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name


# ---- greedy decoding on CUDA (CPU twins: tests/evaluate/test_generate_static.py) ----------------------------------
_PROMPTS = ["what is 3+4?", "a", "count: abcabc", "zz", "the quick brown fox jumps", "12+30="]


def _decode_setup(dtype=torch.float32):
    from evomerge.models.tiny import char_tokenizer, perturbed, random_model, tiny_config

    tok = char_tokenizer()
    model = random_model(tiny_config("llama", vocab_size=len(tok), num_layers=2), seed=3)
    other = perturbed(model, seed=5, scale=0.5)  # another candidate's weights
    return model.to("cuda", dtype), other.to("cuda", dtype), tok, [tok(p)["input_ids"] for p in _PROMPTS]


def _generate(model, tok, n):
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(_PROMPTS, return_tensors="pt", padding=True).to("cuda")
    tok.padding_side = side
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [r[: r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in rows]


def test_static_decode_on_cuda_equals_dynamic_and_generate():
    from evomerge.evaluate.generate import GenPlan

    model, _, tok, ids = _decode_setup()
    ref = _generate(model, tok, 8)
    for decode, compile_ in (("dynamic", "never"), ("static", "never"), ("static", "always")):
        plan = GenPlan(ids, tok, max_new_tokens=8, stop=[], device="cuda", decode=decode, compile=compile_)
        assert plan.tokens(model) == ref, (decode, compile_)
        assert plan.tokens(model) == ref, (decode, compile_)  # replayed
    assert plan.last_path == "static+graph"


def test_cuda_graph_decode_follows_in_place_merges_without_recompiling():
    """compile="auto": eager on a model object's first call, CUDA graphs from its second; weights rewritten in place
    (as the resident merger does) are read by the replayed graphs: no recompilation, no re-recording, no skips."""
    from torch._dynamo.utils import counters

    from evomerge.evaluate.generate import GenPlan

    model, other, tok, ids = _decode_setup()
    plan = GenPlan(ids, tok, max_new_tokens=8, stop=["+"], device="cuda")
    eager = GenPlan(ids, tok, max_new_tokens=8, stop=["+"], device="cuda", compile="never")
    first = plan.run(model)
    assert plan.last_path == "static" and first == eager.run(model)
    assert plan.run(model) == first and plan.last_path == "static+graph"
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
    assert plan.run(model) == eager.run(model) and plan.last_path == "static+graph"
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["inductor"].get("cudagraph_skips")
    assert plan.decoder.cache_bytes() > 0


def test_bf16_graph_decode_runs():
    from evomerge.evaluate.generate import GenPlan

    model, _, tok, ids = _decode_setup(torch.bfloat16)
    plan = GenPlan(ids, tok, max_new_tokens=8, stop=[], device="cuda", compile="always")
    out = plan.tokens(model)
    assert plan.last_path == "static+graph" and len(out) == len(ids) and all(len(r) <= 8 for r in out)
