"""The named zoos (evomerge.demo.zoos): the new ones build at a tiny size into loadable HF folders whose tokenizer
covers their tasks, their task generators are seeded, the demo zoo's cache key is unchanged, and the search
space written for a zoo validates and sets nothing beyond what a user must give."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from evomerge.demo import tasks as T
from evomerge.demo import zoos
from evomerge.validate import check_space

TINY = {"base_steps": 6, "expert_steps": 3, "batch_size": 12, "train_size": 120, "search_size": 16,
        "heldout_size": 24, "log_every": 3, "score": False}
NEW = [name for name in zoos.ZOOS if name != "demo"]
USER_KEYS = {"name", "models", "base_model", "merge_method", "tasks", "optimizer", "budget", "seed"}


@pytest.fixture(scope="module", params=NEW)
def built(request, tmp_path_factory):
    name = request.param
    return name, zoos.build(name, tmp_path_factory.mktemp(name), seed=1, **TINY)


def test_registry_has_the_zoos_the_benchmark_needs():
    assert {"demo", "three", "disagree"} <= set(zoos.ZOOS)
    assert len(zoos.ZOOS["three"].experts) == 3
    demo_tasks = set(T.TASKS)
    for name in NEW:
        spec = zoos.ZOOS[name]
        assert not demo_tasks & set(spec.tasks), name  # task families the demo does not have
        assert set(spec.experts) <= set(spec.tasks)
    assert zoos.zoo_dir("demo").name == "zoo" and zoos.zoo_dir("three").name == "zoo_three"
    assert (Path(__file__).resolve().parents[2] / str(zoos.ZOOS["demo"].preset)).is_file()
    with pytest.raises(Exception, match="unknown zoo"):
        zoos.zoo_spec("nope")


def test_new_generators_are_correct_fixed_length_and_seeded():
    tasks = sorted({t for name in NEW for t in zoos.ZOOS[name].tasks})
    rng = random.Random(0)
    for task in tasks:
        items = [T.make_item(task, rng) for _ in range(50)]
        assert len({len(p) for p, _ in items}) == 1, task
        assert all(T.solve(p) == a for p, a in items), task
        assert all(set(p + a) <= set(zoos.ALPHABET) for p, a in items), task  # the demo's tokenizer covers them
    a = T.generate_splits(tasks, seed=4, train=60, search=10, heldout=12)
    assert a == T.generate_splits(tasks, seed=4, train=60, search=10, heldout=12)
    assert a != T.generate_splits(tasks, seed=5, train=60, search=10, heldout=12)
    assert T.solve("hi:abcadd:abccaa=") == "abccaa" and T.solve("lo:abcadd:abccaa=") == "abcadd"
    assert T.solve("cmp:4821:4819=") == "4821"
    assert T.solve("uniq:abacbd=") == "abcd" and T.solve("dsum:999=") == "27"


def test_demo_cache_key_is_unchanged(tmp_path):
    """The demo's settings, hence its manifest and cache, are what they were before the other zoos existed."""
    zoo = zoos.build("demo", tmp_path, seed=1, **TINY)
    assert zoo.settings == {
        "version": 2, "seed": 1, "base_steps": 6, "expert_steps": 3, "experts": ["sort", "count"],
        "tasks": ["add", "sort", "count"], "base_lr": 1e-3, "expert_lr": 5e-4, "batch_size": 12,
        "train_size": 120, "search_size": 16, "heldout_size": 24, "layers": 4, "hidden": 128, "heads": 4,
        "intermediate": 256, "alphabet": "abcdefghijklmnopqrstuvwxyz0123456789+=:",
        "task_spec": {"sort_letters": "abcdefghijklmnopqrstuvwxyz", "sort_length": 8, "count_letters": "abcdefgh",
                      "count_length": 10},
        "score": False}


def test_zoo_folders_load_and_tokenizer_round_trips(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, zoo = built
    spec = zoos.ZOOS[name]
    assert tuple(zoo.experts) == spec.experts and not zoo.reused
    assert zoo.settings["tasks"] == list(spec.tasks)
    base = AutoModelForCausalLM.from_pretrained(zoo.base).state_dict()
    for label, folder in zoo.models().items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
        assert model.config.hidden_size == 128 and model.get_input_embeddings().weight.shape[0] == len(tok)
        if label != "base":
            assert model.state_dict().keys() == base.keys()
        text = "".join(dict.fromkeys(zoos.ALPHABET))
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
        for task in spec.tasks:
            for item in zoo.items("search", task)[:5]:
                ids = tok(item.prompt + item.answer, add_special_tokens=False).input_ids
                assert tok.unk_token_id not in ids and len(ids) == len(item.prompt + item.answer)
                assert tok.decode(ids) == item.prompt + item.answer
    again = zoos.build(name, zoo.root, seed=1, **TINY)
    assert again.reused and again.settings == zoo.settings


def test_task_files_are_generation_jsonl(built):
    _, zoo = built
    files = zoos.task_files(zoo)
    assert set(files) == set(zoo.experts)
    for task, path in files.items():
        items = T.read_jsonl(path)
        assert len(items) == TINY["search_size"] + TINY["heldout_size"]
        assert all(i.category == task and T.solve(i.prompt) == i.answer for i in items)


def test_written_space_validates_with_only_user_keys(built, tmp_path):
    name, zoo = built
    path = zoos.write_space(zoo, tmp_path / f"{name}.yaml", optimizer="random", seed=2, trials=5, n_search=8,
                            n_heldout=16)
    checked = check_space(path)
    assert checked.dim > 0 and checked.method.startswith("ties")
    data = yaml.safe_load(path.read_text())
    assert set(data) == USER_KEYS
    assert data["optimizer"] == {"name": "random"} and data["budget"] == {"trials": 5} and data["seed"] == 2
    assert data["merge_method"] == "ties" and data["base_model"] == "base"
    assert set(data["models"]) == {"base", *zoo.experts}
    for task in data["tasks"]:
        assert set(task) == {"name", "kind", "path", "n_search", "n_heldout"}
        assert (task["n_search"], task["n_heldout"]) == (8, 16)
