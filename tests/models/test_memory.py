"""The memory plan's byte arithmetic, against real shapes (published configs on the meta device, no weights)
and against real tensors of a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.models.memory import (
    H100_80GB_BYTES,
    RANK_BYTES,
    THRESHOLD_VALUES,
    TIE_BOUND_BYTES,
    TIE_CUTOFF_BYTES,
    GiB,
    TieBytes,
    load_config,
    param_shapes,
    plan_from_folder,
    plan_memory,
)

# the published config.json of each model (as on the hub; no weights needed)
CONFIGS = {
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
    },
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    },
    "gemma-2-9b": {  # no tie_word_embeddings key: Gemma ties them by default
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
        "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "sliding_window_size": 4096, "torch_dtype": "float32", "use_cache": True, "vocab_size": 256000,
    },
}
PUBLISHED_PARAMS = {"mistral-7b": 7_241_732_096, "llama-3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512,
                    "gemma-2-9b": 9_241_705_984}
# KV bytes per cached token in bfloat16: 2 (K and V) x layers x kv_heads x head_dim x 2 bytes
# (Gemma-2's head_dim is 256, not hidden / heads = 224)
KV_PER_TOKEN = {"mistral-7b": 2 * 32 * 8 * 128 * 2, "llama-3-8b": 2 * 32 * 8 * 128 * 2,
                "qwen2.5-7b": 2 * 28 * 4 * 128 * 2, "gemma-2-9b": 2 * 42 * 8 * 256 * 2}
MISTRAL_BF16 = 14_483_464_192  # 7,241,732,096 x 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder with config.json, config, param_shapes, unique-parameter bytes of a bf16 meta model)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, data in CONFIGS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "config.json").write_text(json.dumps(data))
        cfg = load_config(folder)
        with torch.device("meta"):  # built here, independently of the module under test
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
        out[name] = (folder, cfg, param_shapes(cfg), nbytes)
    return out


def _plan(models, name, **kw):
    folder, cfg, shapes, _ = models[name]
    kw = {"n_experts": 3, "method": "dare_ties", "dtype": "bfloat16", **kw}
    return plan_memory(cfg, shapes=shapes, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_bytes_match_meta_model_and_published_counts(models, name):
    folder, _, shapes, meta_bytes = models[name]
    plan = plan_from_folder(folder, n_experts=3, method="dare_ties", dtype="bfloat16", shapes=shapes)
    assert plan.n_params == PUBLISHED_PARAMS[name]
    assert plan.model_bytes == meta_bytes == PUBLISHED_PARAMS[name] * 2
    assert plan["base"] == plan["live model"] == meta_bytes
    assert plan["deltas"] == 3 * meta_bytes  # bfloat16 sources -> bfloat16 deltas
    assert plan.total == sum(it.bytes for it in plan.items)


def test_tied_embeddings_counted_once(models):
    shapes = models["gemma-2-9b"][2]
    assert "lm_head.weight" not in shapes and shapes["model.embed_tokens.weight"] == (256000, 3584)
    assert models["mistral-7b"][2]["lm_head.weight"] == (32000, 4096)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_and_activations(models, name):
    data = CONFIGS[name]
    plan = _plan(models, name, batch_tokens=8192, max_batch=4, max_seq_len=1000, max_new_tokens=24)
    assert plan["KV cache"] == KV_PER_TOKEN[name] * 4 * (1000 + 24)
    h, i, v = data["hidden_size"], data["intermediate_size"], data["vocab_size"]
    # 4 hidden + 3 intermediate sized bf16 tensors per prefill token; logits at 4 scored positions (bf16 + 2 x fp32)
    assert plan["activations"] == 8192 * 2 * (4 * h + 3 * i) + 4 * v * (2 + 4 + 4)
    if name == "mistral-7b":
        assert plan["KV cache"] == 536_870_912 and plan["activations"] == 973_078_528 + 1_280_000


def test_sakana_ps_fits_an_h100_without_offload(models):
    # EvoLLM-JP PS: Mistral-7B base + 3 experts, dare_ties, per-layer weights and densities, bfloat16.
    # Device budget: 79.2 GiB, the total an 80 GB H100 reports (the CUDA context is a separate item).
    assert H100_80GB_BYTES == int(79.2 * GiB)
    plan = _plan(models, "mistral-7b")
    assert plan.fits and not plan.offload and plan.layout == "base + deltas"
    assert plan["base"] == plan["live model"] == MISTRAL_BF16
    assert plan["deltas"] == 3 * MISTRAL_BF16
    assert "thresholds" not in plan and "ranks" not in plan and "sources" not in plan  # DARE: random masks
    assert plan["workspace"] == 32000 * 4096 * (16 + 3 * (2 * 2 + 1))  # the embedding is the largest tensor
    assert plan.total == sum(it.bytes for it in plan.items) <= H100_80GB_BYTES
    assert plan.stream_bytes == 0 and plan.host_items == []
    text = plan.describe()
    assert "13.49 GiB" in text and "40.47 GiB" in text and "(fits)" in text and "OFFLOAD" not in text


def test_ties_exact_tie_ranks_fall_back_to_thresholds_before_offloading(models):
    plan = _plan(models, "mistral-7b", method="ties", ties_exact="ranks")
    n_deltas = 3 * 291
    tied = 3 * PUBLISHED_PARAMS["mistral-7b"] * RANK_BYTES + n_deltas * TIE_BOUND_BYTES  # upper bound before loading
    assert "ranks" not in plan and plan["thresholds"] == n_deltas * THRESHOLD_VALUES * 4
    assert plan["tie cutoffs"] == n_deltas * TIE_CUTOFF_BYTES
    assert plan.fits and not plan.offload and plan.layout == "base + deltas, thresholds"
    exact_total = plan.total - plan["tie cutoffs"] + tied
    assert plan.rejected == [f"base + deltas, thresholds + tied ranks: {exact_total / GiB:.2f} GiB > 79.20 GiB"]
    assert any("broken by flat index" in n for n in plan.notes)


def test_ties_prefers_exact_tie_ranks_and_measured_ties_make_them_fit(models):
    big = _plan(models, "mistral-7b", method="ties", device_bytes=200 * GiB)
    n_deltas = 3 * 291
    assert big["ranks"] == 3 * PUBLISHED_PARAMS["mistral-7b"] * 4 + n_deltas * TIE_BOUND_BYTES and big.fits
    assert big["thresholds"] == n_deltas * THRESHOLD_VALUES * 4 and "tie cutoffs" not in big
    assert big.layout == "base + deltas, thresholds + tied ranks"
    assert any("bit for bit" in n for n in big.notes)
    f32 = _plan(models, "mistral-7b", method="ties", dtype="float32", device_bytes=300 * GiB)
    assert "ranks" in f32 and f32["deltas"] == 3 * PUBLISHED_PARAMS["mistral-7b"] * 4
    assert f32["base"] == 2 * MISTRAL_BF16 and f32["thresholds"] == n_deltas * THRESHOLD_VALUES * 4
    asked = _plan(models, "mistral-7b", method="ties", device_bytes=200 * GiB, ties_exact="thresholds")
    assert "ranks" not in asked and "thresholds" in asked
    # measured at load: few ties -> the exact layout fits an H100 where the upper bound did not
    measured = _plan(models, "mistral-7b", method="ties", ties=TieBytes(exact=123_456_789))
    assert measured.layout == "base + deltas, thresholds + tied ranks" and measured["ranks"] == 123_456_789
    sort = _plan(models, "mistral-7b", method="ties", ties_exact="sort")
    assert "ranks" not in sort and "thresholds" not in sort and sort.layout == "base + deltas"


def test_della_ranks_are_in_its_work_dtype(models):
    bf16 = _plan(models, "mistral-7b", method="della", device_bytes=200 * GiB)
    assert bf16["ranks"] == 3 * MISTRAL_BF16 and "thresholds" not in bf16
    f16_cpu = _plan(models, "mistral-7b", method="della", dtype="float16", device_bytes=200 * GiB, device_type="cpu")
    assert f16_cpu["ranks"] == 3 * PUBLISHED_PARAMS["mistral-7b"] * 4  # mergekit works in float32 there


def test_offload_never_and_always(models):
    never = _plan(models, "mistral-7b", device_bytes=24 * GiB, offload="never")
    assert not never.offload and not never.fits and "DOES NOT FIT" in never.describe()
    always = _plan(models, "mistral-7b", method="ties", offload="always", device_bytes=200 * GiB)
    assert always.offload and {it.key for it in always.host_items} == {"ranks", "deltas", "base"}
    assert "tied ranks" in always.layout and "HOST OFFLOAD" in always.describe()


def test_methods_without_sparsification_data(models):
    ta = _plan(models, "mistral-7b", method="task_arithmetic")
    assert "thresholds" not in ta and "ranks" not in ta and ta.fits
    lin = _plan(models, "mistral-7b", method="linear")
    assert lin["sources"] == 4 * MISTRAL_BF16 and "deltas" not in lin
    with pytest.raises(ValueError, match="unknown merge method"):
        _plan(models, "mistral-7b", method="frankenmerge")


def test_small_devices_offload_as_the_last_resort_and_say_so(models):
    full = _plan(models, "mistral-7b")
    a100_40 = _plan(models, "mistral-7b", device_bytes=40 * GiB)
    assert a100_40.fits and a100_40.offload and a100_40.layout == "base + deltas, host offload of deltas"
    assert a100_40.stream_bytes == 3 * MISTRAL_BF16 == a100_40["deltas"]
    assert [it.key for it in a100_40.host_items] == ["deltas"]
    assert a100_40.total == full.total - 3 * MISTRAL_BF16
    text = a100_40.describe()
    assert "HOST OFFLOAD" in text and "EVERY candidate" in text and "40.47 GiB stream" in text

    gpu_24 = _plan(models, "mistral-7b", device_bytes=24 * GiB)
    assert gpu_24.fits and gpu_24.offload and gpu_24.stream_bytes == 4 * MISTRAL_BF16
    assert gpu_24.total == full.total - 4 * MISTRAL_BF16
    assert len(gpu_24.rejected) == 2

    tiny = _plan(models, "mistral-7b", device_bytes=8 * GiB)
    assert not tiny.fits and tiny.offload
    assert "DOES NOT FIT" in tiny.describe() and "HOST OFFLOAD" in tiny.describe()


def test_gemma_plan_uses_its_head_dim_and_largest_tensor(models):
    plan = _plan(models, "gemma-2-9b", n_experts=2, max_batch=1, max_seq_len=100, max_new_tokens=0)
    assert plan["KV cache"] == 2 * 42 * 8 * 256 * 100 * 2
    assert plan["workspace"] == 256000 * 3584 * (16 + 2 * 5)
    assert plan["deltas"] == 2 * PUBLISHED_PARAMS["gemma-2-9b"] * 2


def test_resident_bytes_equal_real_tensors_of_a_tiny_model(tmp_path):
    from evomerge.merge.thresholds import GridThresholds
    from evomerge.models.tiny import perturbed, random_model, tiny_config

    cfg = tiny_config("llama")
    base = random_model(cfg, dtype=torch.bfloat16)
    experts = [perturbed(base, seed=s) for s in (1, 2, 3)]
    live = random_model(cfg, dtype=torch.bfloat16)
    params = dict(base.named_parameters())
    assert param_shapes(cfg) == {n: tuple(p.shape) for n, p in params.items()}
    deltas = [e_p.detach() - params[n].detach() for e in experts for n, e_p in e.named_parameters()]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731

    plan = plan_memory(cfg, n_experts=3, method="ties", dtype="bfloat16", device_bytes=4 * GiB)
    assert plan["base"] == nbytes(params.values())
    assert plan["live model"] == nbytes(live.parameters())
    assert plan["deltas"] == nbytes(deltas) and deltas[0].dtype == torch.bfloat16
    tables = [GridThresholds(d.contiguous()) for d in deltas]
    assert plan["thresholds"] == nbytes(t.thresholds for t in tables) == len(deltas) * THRESHOLD_VALUES * 4
    tied = sum(t.nbytes()["ranks"] for t in tables)
    assert 0 < tied <= plan["ranks"]  # the plan's bound before loading: a full rank table + bounds per delta
    measured = plan_memory(cfg, n_experts=3, method="ties", dtype="bfloat16", device_bytes=4 * GiB,
                           ties=TieBytes(exact=tied))
    assert measured["ranks"] == tied

    thr = plan_memory(cfg, n_experts=3, method="ties", dtype="bfloat16", device_bytes=4 * GiB, ties_exact="thresholds")
    index = [GridThresholds(d.contiguous(), ties="index") for d in deltas]
    assert thr["thresholds"] == nbytes(t.thresholds for t in index)
    assert thr["tie cutoffs"] >= sum(t.nbytes()["tie cutoffs"] for t in index)  # upper bound: every delta ties

    f32 = plan_memory(cfg, n_experts=3, method="dare_linear", dtype="float32", device_bytes=4 * GiB)
    assert f32["deltas"] == 2 * plan["deltas"] and f32["base"] == 2 * plan["base"]


def test_tied_tiny_model_shapes_are_what_save_pretrained_writes(tmp_path):
    from safetensors import safe_open

    from evomerge.models.tiny import random_model, save_model, tiny_config

    cfg = tiny_config("llama", tie_embeddings=True)
    folder = save_model(random_model(cfg), None, tmp_path / "tied")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert param_shapes(cfg) == written and "lm_head.weight" not in written
    plan = plan_from_folder(folder / "config.json", n_experts=1, method="task_arithmetic", device_bytes=4 * GiB)
    assert plan.dtype == "float32" and plan["base"] == 4 * sum(torch.Size(s).numel() for s in written.values())


def test_the_plan_knows_every_method_of_the_registry():
    """Task-vector methods hold base + deltas, every other method holds the sources, as the resident merger does."""
    from evomerge.merge.registry import GTA_METHODS, METHODS
    from evomerge.models.memory import SOURCE_METHODS, TASK_VECTOR_METHODS

    assert set(TASK_VECTOR_METHODS) == set(GTA_METHODS)
    assert set(SOURCE_METHODS) == set(METHODS) - set(GTA_METHODS)
