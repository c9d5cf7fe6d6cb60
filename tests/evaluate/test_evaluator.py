"""Evaluator behaviour on tiny char-level Llamas: fitness, splits, batching invariance, generation, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.spec import TaskSpec
from evomerge.models.tiny import char_tokenizer, random_model, tiny_config


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    model = random_model(tiny_config("llama", vocab_size=len(tok)), seed=0)
    return model, tok


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    with open(d / "k.csv", "w") as f:
        f.write("question,A,B,C,D,answer,Category\n")
        for i in range(24):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            opts = [str(a + b + k) for k in range(4)]
            f.write(f"what is {a}+{b}?,{opts[0]},{opts[1]},{opts[2]},{opts[3]},1,{'xyz'[i % 3]}\n")
    with open(d / "dev.csv", "w") as f:
        f.write("question,A,B,C,D,answer,Category\nwhat is 1+1?,2,3,4,5,1,x\nwhat is 2+2?,3,4,5,6,2,y\n")
    with open(d / "m.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"question": f"pick the right one, number {i}:", "choices": ["aa", "b", "cccc"],
                                "answer": i % 3, "category": "ab"[i % 2]}) + "\n")
    with open(d / "g.jsonl", "w") as f:
        for i in range(16):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=" + "x" * (i % 5), "answer": str(a + b)}) + "\n")
    return d


def test_weighted_and_vector_fitness(tiny, files):
    model, tok = tiny
    specs = [TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), n_search=12, weight=2.0, continuous=0.0),
             TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"), weight=0.5, loss_tiebreak=0.1,
                      continuous=0.0)]
    r = Evaluator(specs, tok, split="search").evaluate(model)
    m = r.metrics
    assert m["m"]["objective"] == pytest.approx(m["m"]["acc"] - 0.1 * m["m"]["loss"])
    assert r.fitness == pytest.approx(2.0 * m["k"]["acc"] + 0.5 * m["m"]["objective"])
    assert r.objectives == [r.fitness]
    v = Evaluator(specs, tok, split="search", objectives="vector").evaluate(model)
    assert v.objectives == pytest.approx([m["k"]["acc"], m["m"]["objective"]]) and v.fitness == pytest.approx(r.fitness)
    assert set(m["m"]) >= {"acc", "acc_norm", "loss"} and r.seconds > 0


def test_continuous_share_blends_the_gold_answers_probability(tiny, files):
    """Multiple choice: the gold choice's softmax probability among the choices; generation: the geometric mean
    probability of the gold answer's tokens (+ EOS), teacher-forced; blended 1:3 with accuracy by default."""
    import math

    model, tok = tiny
    mcq = TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"))
    gen = TaskSpec(name="g", kind="generation", path=str(files / "g.jsonl"), max_new_tokens=4)
    r = Evaluator([mcq, gen], tok, split="all").evaluate(model, per_item=True)
    probs = []
    for item in r.per_item["m"].values():
        lls = item["loglik"]
        probs.append(math.exp(lls[item["gold"]]) / sum(math.exp(x) for x in lls))
    m = r.metrics["m"]
    assert m["gold_prob"] == pytest.approx(sum(probs) / len(probs), rel=1e-9)
    assert m["objective"] == pytest.approx(0.75 * m["acc"] + 0.25 * m["gold_prob"], rel=1e-12)

    rows = [json.loads(x) for x in (files / "g.jsonl").read_text().splitlines()]
    want = []
    for row in rows:  # teacher-forced by hand: full-sequence logits of prompt + answer + EOS
        prompt = tok(row["prompt"])["input_ids"]
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        lp = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
        want.append(math.exp(lp / len(answer)))
    g = r.metrics["g"]
    assert g["gold_prob"] == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert g["objective"] == pytest.approx(0.75 * g["exact_match"] + 0.25 * g["gold_prob"], rel=1e-12)
    assert r.fitness == pytest.approx(m["objective"] + g["objective"])

    cot = TaskSpec(name="c", kind="generation", path=str(files / "g.jsonl"), answer_regex=r"(\d+)")
    assert cot.continuous_share == 0.0  # chain of thought: the bare answer is not what the model says first
    assert TaskSpec(name="x", kind="mcq", path="m.jsonl", continuous=0.6).continuous_share == 0.6
    with pytest.raises(ValueError, match="continuous"):
        TaskSpec(name="x", kind="mcq", path="m.jsonl", continuous=1.5)


def test_split_ids_disjoint_and_reproducible(tiny, files):
    _, tok = tiny
    spec = TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), per_category=3, seed=7)
    s = Evaluator([spec], tok, split="search").split_ids()["k"]
    h = Evaluator([spec], tok, split="heldout").split_ids()["k"]
    assert len(s) == 9 and len(h) == 9 and not set(s) & set(h)
    assert Evaluator([spec], tok, split="search").split_ids()["k"] == s


def test_batching_does_not_change_scores(tiny, files):
    model, tok = tiny
    specs = [TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv")),
             TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"))]
    big = Evaluator(specs, tok, split="all", batch_tokens=4096).evaluate(model, per_item=True)
    one = Evaluator(specs, tok, split="all", batch_tokens=1).evaluate(model, per_item=True)  # one row per forward
    for t in ("k", "m"):
        for i, d in big.per_item[t].items():
            assert d["loglik"] == pytest.approx(one.per_item[t][i]["loglik"], rel=1e-5)


def test_fast_path_equals_full_logits(tiny, files):
    """Scoring only at the answer position (one row per question) equals log_softmax of the full forward."""
    model, tok = tiny
    # no delimiter: each letter is one char token, so each question is one row read at its last position
    ev = Evaluator([TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), target_delimiter="")], tok, split="all")
    assert sum(b.input_ids.shape[0] for b in ev.tasks["k"].plan.batches) == 24
    res = ev.evaluate(model, per_item=True)
    task = ev.tasks["k"]
    item = task.items[5]
    from evomerge.evaluate.prompts import kmmlu_prompt

    ids = tok(kmmlu_prompt(item))["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    ref = [float(logp[tok.convert_tokens_to_ids(c)]) for c in "ABCD"]
    assert res.per_item["k"][item.id]["loglik"] == pytest.approx(ref, rel=1e-5)


def test_fewshot_prompt_uses_dev_items(tiny, files):
    _, tok = tiny
    spec = TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), num_fewshot=2,
                    fewshot_path=str(files / "dev.csv"), target_delimiter="", fewshot_order="file")
    ev = Evaluator([spec], tok, split="all", share_prefix=False)
    zero = Evaluator([TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), target_delimiter="")], tok,
                     split="all")
    shot = "what is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\n정답：A\n\nwhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\n정답：B\n\n"
    extra = len(tok(shot, add_special_tokens=False)["input_ids"])
    assert ev.tasks["k"].plan.n_tokens == zero.tasks["k"].plan.n_tokens + extra * 24


def test_lm_eval_shots_do_not_depend_on_the_split(tiny, files, tmp_path):
    """lm-eval order (the default): an item's shots are those of a run over the whole file, so a subset scores each
    of its items exactly as the full run does (a stream drawn over the subset only would not)."""
    model, tok = tiny
    dev = tmp_path / "dev3.csv"
    dev.write_text("question,A,B,C,D,answer,Category\n" + "".join(
        f"what is {k}+{c}?,{k},{k + 1},{k + 2},{k + 3},{1 + k % 4},{cat}\n" for k in range(3) for c, cat in
        enumerate("xyz")))
    spec = TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), num_fewshot=2, fewshot_path=str(dev),
                    per_category=3, seed=5)
    full = Evaluator([spec], tok, split="all").evaluate(model, per_item=True).per_item["k"]
    for split in ("search", "heldout"):
        part = Evaluator([spec], tok, split=split).evaluate(model, per_item=True).per_item["k"]
        assert len(part) == 9
        for i, d in part.items():
            assert d["loglik"] == pytest.approx(full[i]["loglik"], rel=1e-5)


def test_shared_prefix_scores_equal_unshared(tiny, files):
    """k-shot blocks and multi-token choices run their common prefix once (KV cache reused): same numbers."""
    model, tok = tiny
    specs = [TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), num_fewshot=2,
                      fewshot_path=str(files / "dev.csv"), fewshot_order="file"),
             TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"))]
    shared = Evaluator(specs, tok, split="all", batch_tokens=256)
    plain = Evaluator(specs, tok, split="all", batch_tokens=256, share_prefix=False)
    for t in ("k", "m"):
        assert any(b.prefix is not None for b in shared.tasks[t].plan.batches)
        assert shared.tasks[t].plan.n_tokens < plain.tasks[t].plan.n_tokens
    a, b = shared.evaluate(model, per_item=True), plain.evaluate(model, per_item=True)
    for t in ("k", "m"):
        for i, d in a.per_item[t].items():
            assert d["loglik"] == pytest.approx(b.per_item[t][i]["loglik"], rel=1e-5, abs=1e-6)


def test_generation_batched_equals_generate(tiny, files):
    model, tok = tiny
    spec = TaskSpec(name="g", kind="generation", path=str(files / "g.jsonl"), max_new_tokens=6, stop=["+"])
    res = Evaluator([spec], tok, split="all", batch_tokens=64).evaluate(model, per_item=True)
    ev1 = Evaluator([spec], tok, split="all", batch_tokens=1)
    assert ev1.evaluate(model, per_item=True).per_item == res.per_item
    rows = [json.loads(x) for x in (files / "g.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        enc = tok(row["prompt"], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).split("+")[0]
        assert res.per_item["g"][str(i)]["output"] == text


def test_generation_stops_at_eos_and_scores_exact_match(files):
    """A model that always says '1', '2', EOS: exact match is 1 for gold '12' and decoding stops at EOS."""
    tok = char_tokenizer()
    model = random_model(tiny_config("llama", vocab_size=len(tok), num_layers=1), seed=1)
    seq = {tok.convert_tokens_to_ids("1"): tok.convert_tokens_to_ids("2"),
           tok.convert_tokens_to_ids("2"): tok.eos_token_id}

    class Scripted(torch.nn.Module):  # wraps the real model, overriding its logits by the previous token
        def __init__(self, inner):
            super().__init__()
            self.inner, self.generation_config = inner, inner.generation_config

        def forward(self, input_ids, **kw):
            out = self.inner(input_ids=input_ids, **kw)
            last = input_ids[:, -1]
            nxt = torch.tensor([seq.get(int(t), tok.convert_tokens_to_ids("1")) for t in last])
            out.logits = torch.nn.functional.one_hot(nxt, len(tok)).float()[:, None, :] * 10
            return out

    (files / "e.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "12"}) + "\n"
                                           for p in ["a", "bbb", "cc"]))
    spec = TaskSpec(name="e", kind="generation", path=str(files / "e.jsonl"), max_new_tokens=20,
                    continuous=0.0)  # the script overrides what generation sees only
    res = Evaluator([spec], tok, split="all").evaluate(Scripted(model), per_item=True)
    assert res.metrics["e"]["exact_match"] == 1.0
    assert {d["output"] for d in res.per_item["e"].values()} == {"12"}


def test_custom_function(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "myscore.py").write_text("def score(model, tok):\n    return {'score': 0.25, 'n': len(tok)}\n")
    spec = TaskSpec(name="c", kind="custom", function="myscore.py:score", weight=4)
    r = Evaluator([spec], tok, split="search", base_dir=tmp_path).evaluate(model)
    assert r.fitness == 1.0 and r.metrics["c"]["n"] == len(tok)
    with pytest.raises(ConfigError, match="cannot import"):
        Evaluator([TaskSpec(name="c", kind="custom", function="no_such_mod:f")], tok, split="search")


def test_cli_eval_prints_table(llama_family, files, capsys, tmp_path):
    from evomerge.cli import main

    out_json = tmp_path / "r.json"
    rc = main(["eval", str(llama_family["base"]), str(files / "k.csv"), str(files / "g.jsonl"), "--n", "6",
               "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "acc" in text and "exact_match" in text and "fitness" in text
    saved = json.loads(out_json.read_text())
    assert len(saved["split_ids"]["k"]) == 6 and saved["split"] == "search"
    rc = main(["eval", str(llama_family["base"]), "kind=mcq,path=" + str(files / "nope.jsonl")])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err


def test_padding_cap_bounds_batches_and_keeps_scores(tiny, files):
    """`max_padding` bounds the padding share of every batch; the scores do not depend on it."""
    model, tok = tiny
    specs = [TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv")),
             TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"))]
    tight = Evaluator(specs, tok, split="all", batch_tokens=4096, max_padding=0.0)
    loose = Evaluator(specs, tok, split="all", batch_tokens=4096, max_padding=1.0)
    for t in ("k", "m"):
        p = tight.tasks[t].plan
        assert p.n_padded == 0 and len(p.batches) >= len(loose.tasks[t].plan.batches)
        # no padding: the batch tensors (+ each shared prefix once) hold exactly the real tokens
        prefixes = {id(b.prefix): b.prefix.numel() for b in p.batches if b.prefix is not None}
        assert sum(b.input_ids.numel() for b in p.batches) + sum(prefixes.values()) == p.n_tokens
    assert sum(loose.tasks[t].plan.n_padded for t in ("k", "m")) > 0  # the cap is what removed it
    a, b = tight.evaluate(model, per_item=True), loose.evaluate(model, per_item=True)
    for t in ("k", "m"):
        for i, d in a.per_item[t].items():
            assert d["loglik"] == pytest.approx(b.per_item[t][i]["loglik"], rel=1e-5, abs=1e-6)


def test_last_mlp_runs_only_at_scored_positions(tiny, files):
    """The last layer's MLP sees only the scored positions (none during a shared-prefix pass); same scores."""
    from evomerge.evaluate.loglik import last_mlp

    model, tok = tiny
    specs = [TaskSpec(name="k", kind="kmmlu", path=str(files / "k.csv"), num_fewshot=2,
                      fewshot_path=str(files / "dev.csv"), fewshot_order="file"),
             TaskSpec(name="m", kind="mcq", path=str(files / "m.jsonl"))]
    ev = Evaluator(specs, tok, split="all", batch_tokens=256)
    mlp = last_mlp(model)
    assert mlp is model.model.layers[-1].mlp
    seen = []
    h = mlp.register_forward_hook(lambda mod, args, out: seen.append(out.shape[:-1]))  # runs before our scatter
    try:
        trimmed = ev.evaluate(model, per_item=True)
    finally:
        h.remove()
    batches = [b for t in ("k", "m") for b in ev.tasks[t].plan.batches]
    n_prefix_passes = sum(1 for t in ("k", "m") for _ in {id(b.prefix) for b in ev.tasks[t].plan.batches
                                                          if b.prefix is not None})
    assert sorted(s[1] for s in seen if s[1] > 0) == sorted(b.row_idx.numel() for b in batches)
    assert sum(1 for s in seen if s[1] == 0) == n_prefix_passes > 0
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks  # ours are removed after scoring
    for t in ("k", "m"):
        ev.tasks[t].plan.trim_last_mlp = False
    full = ev.evaluate(model, per_item=True)
    for t in ("k", "m"):
        for i, d in trimmed.per_item[t].items():
            assert d["loglik"] == pytest.approx(full.per_item[t][i]["loglik"], rel=1e-5, abs=1e-6)
