"""Static-cache greedy decoding (evomerge/evaluate/decode.py) == the dynamic-cache loop == transformers `generate`,
token for token, on CPU: left padding (prompts of different lengths in one batch), stop strings, max_new_tokens,
EOS as the first generated token, stacked models with repeated layers, and the fallback for models the static cache
cannot take."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from evomerge.evaluate.generate import GenPlan, cut_at_stop, eos_ids
from evomerge.models.tiny import char_tokenizer, perturbed, random_model, tiny_config

PROMPTS = ["what is 3+4?", "a", "count: abcabc", "zz", "the quick brown fox jumps", "12+30=", "b?"]


def _ids(tok, prompts):
    return [tok(p)["input_ids"] for p in prompts]


def _generate(model, tok, prompts, max_new_tokens):
    """transformers' own greedy decoding of the prompts as ONE left-padded batch: token ids up to (not including)
    the first EOS."""
    eos = eos_ids(model, tok)
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def _plans(tok, prompts, **kw):
    return {mode: GenPlan(_ids(tok, prompts), tok, decode=mode, **kw) for mode in ("static", "dynamic")}


def _bigram_llama(tok, table: dict[str, str], default: str = "z"):
    """A real LlamaForCausalLM that is a bigram table: attention and MLP outputs are zero (o_proj, down_proj = 0),
    the embeddings are one-hot, so the next token depends only on the current one: table[current] (default
    `default`). Scripts EOS as the first token, stop strings and endless rows exactly."""
    ids = {c: tok.convert_tokens_to_ids(c) for c in set(table) | set(table.values()) | {default}}
    model = random_model(tiny_config("llama", vocab_size=len(tok), hidden=64), seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tok), 64))
        head = torch.zeros(len(tok), 64)
        head[ids[default], : len(tok)] = 0.5
        for cur, nxt in table.items():
            head[ids[nxt], ids[cur]] = 1.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_static_equals_dynamic_and_generate(tok, family):
    """Random tiny models, 7 prompts of 1-25 tokens in one left-padded batch and in batches of 2 (several cache
    shapes). Gemma 2 (sliding and full layers: a hybrid static cache) and Mistral get a 6-token sliding window, shorter
    than most prompts."""
    cfg = tiny_config(family, vocab_size=len(tok))
    if family in ("gemma2", "mistral"):
        cfg.sliding_window = 6
    model = random_model(cfg, seed=3)
    ref = _generate(model, tok, PROMPTS, 10)
    for batch_tokens in (16384, 64):
        plans = _plans(tok, PROMPTS, max_new_tokens=10, stop=[], batch_tokens=batch_tokens)
        static, dynamic = plans["static"].tokens(model), plans["dynamic"].tokens(model)
        assert plans["static"].last_path == "static" and plans["dynamic"].last_path == "dynamic"
        assert static == dynamic == ref
    assert len(plans["static"].batches) > 1 and len({b[1].shape[1] for b in plans["static"].batches}) > 1


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_finished_rows_dropped_keep_tokens(tok, family, monkeypatch):
    """Rows ending early (EOS after 1-3 tokens) leave the batch and its cache (Gemma 2: sliding-window cache layers
    too); the rest decode on unchanged."""
    from transformers import StaticCache

    cfg = tiny_config(family, vocab_size=len(tok))
    if family == "gemma2":
        cfg.sliding_window = 6
    model = random_model(cfg, seed=3)
    drops = []
    reorder = StaticCache.reorder_cache
    monkeypatch.setattr(StaticCache, "reorder_cache", lambda self, idx: (drops.append(len(idx)), reorder(self, idx)))
    model.generation_config.eos_token_id = [tok.eos_token_id]
    # make a few frequent tokens EOS too, so rows finish at different steps
    ref_free = _generate(model, tok, PROMPTS, 12)
    firsts = sorted({r[k] for r in ref_free for k in (1, 3) if len(r) > k})[:3]
    model.generation_config.eos_token_id = [tok.eos_token_id] + firsts
    ref = _generate(model, tok, PROMPTS, 12)
    assert len({len(r) for r in ref}) > 2  # rows really end at different steps
    plans = _plans(tok, PROMPTS, max_new_tokens=12, stop=[])
    assert plans["static"].tokens(model) == plans["dynamic"].tokens(model) == ref
    assert len(drops) >= 2 and drops == sorted(drops, reverse=True) and drops[-1] >= 1


def test_scripted_eos_first_stop_strings_and_max_new_tokens(tok):
    table = {"b": "</s>", "a": "1", "1": "2", "2": "</s>", "c": "d", "d": "+", "+": "e", "e": "f", "f": "e",
             "z": "z"}
    model = _bigram_llama(tok, table)
    prompts = ["xyzab", "xa", "ccc", "zz"]
    expected = {"xyzab": "", "xa": "12", "ccc": "d", "zz": "z" * 7}
    plans = _plans(tok, prompts, max_new_tokens=7, stop=["+"])
    outs = {mode: plan.run(model) for mode, plan in plans.items()}
    ref = [cut_at_stop(tok.decode(t), ["+"]) for t in _generate(model, tok, prompts, 7)]
    assert outs["static"] == outs["dynamic"] == ref == [expected[p] for p in prompts]
    assert plans["static"].tokens(model) == plans["dynamic"].tokens(model)
    # every row's first token is EOS: empty outputs, one step
    prompts = ["b", "xyzb", "ab"]
    for mode, plan in _plans(tok, prompts, max_new_tokens=5, stop=["+"]).items():
        assert plan.run(model) == ["", "", ""], mode
    assert _generate(model, tok, prompts, 5) == [[], [], []]
    # max_new_tokens = 1
    for mode, plan in _plans(tok, ["zz", "xa"], max_new_tokens=1, stop=[]).items():
        assert plan.run(model) == ["z", "1"], mode


def test_smollm2_mgsm_prompts(smol):
    """The real SmolLM2-135M on the shipped MGSM-style prompts (left padding from 21 to 39 tokens): tokens equal to
    `generate` without stop strings; texts equal with MGSM's stop strings."""
    from pathlib import Path

    model, tok = smol
    path = Path(__file__).resolve().parents[2] / "evomerge" / "data" / "tasks" / "math_mgsm_style.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows[::3]] + [rows[-4]["prompt"]]  # 9 prompts, shortest and longest included
    plans = _plans(tok, prompts, max_new_tokens=12, stop=[])
    ref = _generate(model, tok, prompts, 12)
    assert plans["static"].tokens(model) == plans["dynamic"].tokens(model) == ref
    stop = ["\n\n", "Question:"]
    plans = _plans(tok, prompts, max_new_tokens=12, stop=stop)
    texts = [cut_at_stop(tok.decode(t, skip_special_tokens=True), stop) for t in ref]
    assert plans["static"].run(model) == plans["dynamic"].run(model) == texts
    assert any("\n\n" in tok.decode(t) for t in ref)  # a stop string really cut something


def test_stacked_model_with_repeated_layers(tok):
    """A layer-stacking candidate (Sakana DFS: layer 1 of A twice, layers of B, scales as input hooks) and the
    folded plain model: each position has its own cache slot, so the static path applies and agrees."""
    from evomerge.merge.stacking import build_stacked_model, fold_scales

    a = random_model(tiny_config("llama", vocab_size=len(tok)), seed=0)
    b = perturbed(a, seed=1, scale=0.3)
    path = [(1, 0), (0, 1), (1, 1), (0, 1), (0, 2), (1, 3)]
    stacked = build_stacked_model(a, path, [1.0, 0.8, 1.3, 1.2, 0.9, 1.1], [a, b])
    for model in (stacked, fold_scales(stacked)):
        ref = _generate(model, tok, PROMPTS, 8)
        plans = _plans(tok, PROMPTS, max_new_tokens=8, stop=[])
        assert plans["static"].tokens(model) == plans["dynamic"].tokens(model) == ref
        assert plans["static"].last_path == "static"


def test_fallback_for_models_the_static_cache_cannot_take(tok, caplog):
    model = random_model(tiny_config("llama", vocab_size=len(tok)), seed=3)
    ref = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], decode="dynamic").run(model)

    class Wrapped(torch.nn.Module):  # not a PreTrainedModel: no config to size a static cache from
        def __init__(self, inner):
            super().__init__()
            self.inner, self.generation_config = inner, inner.generation_config

        def forward(self, input_ids, **kw):
            return self.inner(input_ids=input_ids, **kw)

    plan = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[])
    assert plan.run(Wrapped(model)) == ref and plan.last_path == "dynamic"
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], decode="static").run(Wrapped(model))

    # a layer list that disagrees with the config (a hand-built stack): dynamic loop
    short = random_model(tiny_config("llama", vocab_size=len(tok)), seed=3)
    short.model.layers = short.model.layers[:3]
    assert "num_hidden_layers" in (plan.decoder.unsupported(short) or "")

    # the static path raising on an architecture: warned once, the batch and later runs use the dynamic loop
    plan = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[])

    def boom(*a, **k):
        raise NotImplementedError("no static cache here")

    plan.decoder._decode = boom  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="evomerge.evaluate.decode"):
        assert plan.run(model) == ref
    assert plan.last_path == "dynamic" and "no static cache here" in caplog.text
    assert plan.run(model) == ref and "failed on LlamaForCausalLM before" in plan.decoder.unsupported(model)


def test_compile_failure_falls_back_to_eager(tok, caplog):
    """A compiled step that cannot run (no compiler, a CUDA graph error): warned once, eager static from then on."""
    model = random_model(tiny_config("llama", vocab_size=len(tok)), seed=3)
    ref = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], decode="dynamic").tokens(model)
    plan = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], compile="always")

    def broken(config):
        raise RuntimeError("inductor unavailable")

    model.get_compiled_call = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="evomerge.evaluate.decode"):
        assert plan.tokens(model) == ref
    assert plan.last_path == "static" and plan.decoder.compile == "never" and "inductor unavailable" in caplog.text


def test_compile_policy(tok):
    """auto: compiled on CUDA from a model object's second consecutive call; never on CPU; a new object resets."""
    from evomerge.evaluate.decode import StaticDecoder

    a = random_model(tiny_config("llama", vocab_size=len(tok), num_layers=1), seed=0)
    b = random_model(tiny_config("llama", vocab_size=len(tok), num_layers=1), seed=1)
    d = StaticDecoder(compile="auto")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    d.begin(a)
    assert not d._graph_mode(a, cuda)
    d.begin(a)
    assert d._graph_mode(a, cuda) and not d._graph_mode(a, cpu)
    d.begin(b)
    assert not d._graph_mode(b, cuda)
    assert StaticDecoder(compile="always")._graph_mode(a, cpu)
    assert not StaticDecoder(compile="never")._graph_mode(a, cuda)


@pytest.mark.slow
def test_compiled_step_on_cpu_follows_in_place_merges(tok):
    """compile="always" on CPU (inductor, no CUDA graphs): the same tokens as eager; weights changed in place (as
    the resident merger does) are read by the compiled step without recompiling."""
    from torch._dynamo.utils import counters

    model = random_model(tiny_config("llama", vocab_size=len(tok), num_layers=2), seed=3)
    other = perturbed(model, seed=5, scale=0.5)
    eager = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], compile="never")
    graph = GenPlan(_ids(tok, PROMPTS), tok, max_new_tokens=6, stop=[], compile="always")
    first = graph.tokens(model)
    assert graph.last_path == "static+graph" and first == eager.tokens(model)
    frames = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)
    second = graph.tokens(model)
    assert second == eager.tokens(model) == _generate(other, tok, PROMPTS, 6) and second != first
    assert counters["stats"]["unique_graphs"] == frames  # no recompilation for new weight values
