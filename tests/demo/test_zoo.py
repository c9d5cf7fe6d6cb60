"""The demo zoo builds (tiny step counts), saves loadable HF folders, writes disjoint task files and caches."""

from __future__ import annotations

import json
import random

import pytest
import torch

from evomerge.demo import tasks as T
from evomerge.demo.zoo import build_zoo, encode_items, exact_match, load_zoo
from evomerge.errors import ConfigError, DataError

SMALL = {"base_steps": 20, "expert_steps": 10, "batch_size": 24, "train_size": 300, "search_size": 16,
         "heldout_size": 24, "log_every": 10}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=3, **SMALL)


def test_task_generators_are_correct_and_fixed_length():
    rng = random.Random(0)
    for task in T.TASKS:
        items = [T.make_item(task, rng) for _ in range(50)]
        assert len({len(p) for p, _ in items}) == 1, task  # fixed-length prompts
        for prompt, answer in items:
            assert T.solve(prompt) == answer
    assert T.solve("add:123+456=") == "579"
    assert T.solve("sort:hdbacgfe=") == "abcdefgh"
    assert T.solve("cnt:abcaabfdd=") == "3a2b1c2d1f"
    with pytest.raises(ConfigError, match="allowed: add, sort, count"):
        T.make_item("divide", rng)


def test_splits_are_seeded_and_disjoint():
    a = T.generate_splits(seed=1, train=200, search=20, heldout=30)
    b = T.generate_splits(seed=1, train=200, search=20, heldout=30)
    c = T.generate_splits(seed=2, train=200, search=20, heldout=30)
    assert a == b and a != c
    only_sort = T.generate_splits(["sort"], seed=1, train=200, search=20, heldout=30)
    assert only_sort["heldout"]["sort"] == a["heldout"]["sort"]  # a task's items do not depend on the others
    for task in T.TASKS:
        prompts = [{i.prompt for i in a[s][task]} for s in T.SPLITS]
        assert [len(p) for p in prompts] == [200, 20, 30]
        assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


def test_zoo_folders_load_with_auto_classes(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(zoo.experts) == {"sort", "count"} and not zoo.reused
    for name, folder in zoo.models().items():
        assert any(folder.glob("*.safetensors")), name
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        cfg = model.config
        assert cfg.model_type == "llama" and cfg.num_hidden_layers == 4 and cfg.hidden_size == 128
        assert cfg.intermediate_size == 256 and cfg.num_attention_heads == 4 and not cfg.tie_word_embeddings
        assert model.get_input_embeddings().weight.shape[0] == len(tok)
        assert tok.eos_token_id == cfg.eos_token_id
    # Experts are fine-tunes of the base: same shapes, different (but nearby) weights.
    base = AutoModelForCausalLM.from_pretrained(zoo.base).state_dict()
    exp = AutoModelForCausalLM.from_pretrained(zoo.experts["sort"]).state_dict()
    assert base.keys() == exp.keys()
    w = "model.layers.0.mlp.down_proj.weight"
    rel = float((exp[w] - base[w]).norm() / base[w].norm())
    assert 0 < rel < 0.5


def test_tokenizer_round_trips_task_strings(zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    for task in T.TASKS:
        for item in zoo.items("search", task)[:5]:
            text = item.prompt + item.answer
            ids = tok(text, add_special_tokens=False).input_ids
            assert len(ids) == len(text) and tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    ids, labels = encode_items(tok, zoo.items("search", "count")[:4])
    # Loss only on answer + EOS: every labelled row ends with EOS and the prompt is unlabelled.
    for lab, item in zip(labels, zoo.items("search", "count")[:4]):
        n = int((lab != -100).sum())
        assert n == len(item.answer) + 1 and tok.eos_token_id in lab.tolist()
        assert (lab[: len(item.prompt)] == -100).all()


def test_task_files_are_disjoint_jsonl(zoo):
    seen_ids, seen_prompts = {}, {}
    for split in T.SPLITS:
        for task in T.TASKS:
            path = zoo.tasks[split][task]
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert rows and all(set(r) >= {"id", "prompt", "answer", "category"} for r in rows)
            assert all(r["category"] == task and T.solve(r["prompt"]) == r["answer"] for r in rows)
            for r in rows:
                assert r["id"] not in seen_ids and r["prompt"] not in seen_prompts
                seen_ids[r["id"]] = seen_prompts[r["prompt"]] = split
    combined = [json.loads(line) for line in zoo.tasks["all"]["sort"].read_text().splitlines()]
    assert {r["split"] for r in combined} == {"search", "heldout"}
    assert len(combined) == SMALL["search_size"] + SMALL["heldout_size"]
    with pytest.raises(DataError, match="not found"):
        T.read_jsonl(zoo.root / "tasks" / "nope.jsonl")


def test_second_call_reuses_cache_and_changed_settings_rebuild(zoo, tmp_path):
    stamps = {p: p.stat().st_mtime_ns for p in zoo.root.rglob("*.safetensors")}
    again = build_zoo(zoo.root, seed=3, **SMALL)
    assert again.reused and again.base == zoo.base and again.scores == zoo.scores
    assert {p: p.stat().st_mtime_ns for p in zoo.root.rglob("*.safetensors")} == stamps
    assert load_zoo(zoo.root).settings == zoo.settings
    # A different directory with the same seed gives the same weights (deterministic build).
    other = build_zoo(tmp_path / "z", seed=3, **{**SMALL, "expert_steps": 5}, experts=("count",), score=False)
    assert not other.reused and set(other.experts) == {"count"}
    from safetensors.torch import load_file

    a, b = load_file(zoo.base / "model.safetensors"), load_file(other.base / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="experts"):
        build_zoo(tmp_path / "bad", experts=("sort",), tasks=("add", "count"))
    with pytest.raises(ConfigError, match="batch_size"):
        build_zoo(tmp_path / "bad", batch_size=2)
    # A truncated manifest or a missing weight file means "not built": load_zoo refuses it.
    (other.root / "manifest.json").write_text("{}")
    assert load_zoo(other.root) is None


def test_exact_match_scores_a_perfect_and_a_wrong_oracle(zoo):
    """exact_match reads greedy answers up to EOS: a model rigged to emit a fixed answer scores accordingly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.base)
    target = "abc"
    items = [T.Item(f"x{i}", p, target if i % 2 else "zzz", "sort") for i, p in
             enumerate(i.prompt for i in zoo.items("search", "sort")[:6])]
    # Rig the head: next token is always the one after the current token in `target` + EOS.
    seq = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for layer in model.model.layers:  # make the residual stream the token embedding itself
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb.copy_(torch.eye(emb.shape[0], emb.shape[1]) * 10)  # one-hot-ish embeddings (vocab <= hidden)
        prompt_last = tok(items[0].prompt, add_special_tokens=False).input_ids[-1]
        chain = [prompt_last] + seq[:-1]
        for cur, nxt in zip(chain, seq):
            head[nxt, cur] = 10.0
    assert exact_match(model, tok, items) == pytest.approx(0.5)
    assert exact_match(model, tok, []) == 0.0
