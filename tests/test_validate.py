"""`evomerge validate` rejects every bad input the preflight checks, each on one line naming the file and the key,
without loading a weight (the models here are config.json files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.validate import check_space, validate_space

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2, "vocab_size": 64,
        "max_position_embeddings": 256}


def _model(folder: Path, **over) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY | over))
    return str(folder)


def _gen(path: Path, n: int = 40) -> str:
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n" for i in range(n)))
    return path.name


@pytest.fixture
def project(tmp_path):
    for name in ("base", "a", "b"):
        _model(tmp_path / name)
    _gen(tmp_path / "gen.jsonl")
    return tmp_path


def _space(project: Path, **over) -> Path:
    data = {"name": "t", "models": {"base": "./base", "a": "./a", "b": "./b"}, "base_model": "base",
            "merge_method": "ties", "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
            "tasks": [{"name": "g", "kind": "generation", "path": "gen.jsonl", "n_search": 10, "n_heldout": 10}],
            "budget": {"trials": 8}}
    data.update(over)
    path = project / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rejects(path: Path, key: str, *names: str) -> str:
    """validate_space fails with one line that starts with the file and key and names `names`."""
    with pytest.raises(EvomergeError) as err:
        validate_space(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert f"key '{key}'" in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


def test_a_good_space_validates_and_says_what_it_is(project):
    report = check_space(_space(project))
    # granularity auto: 10 search items allow no 16 per-layer genes, so a curve of 2 control points
    assert report.dim == 2 * 2 * 2  # weight, density x 2 experts x 2 points
    assert report.layer_counts == {"base": 4, "a": 4, "b": 4}
    assert [(t.name, t.items, t.n_search, t.n_heldout) for t in report.tasks] == [("g", 40, 10, 10)]
    text = report.summary()
    assert "3 models" in text and "8 genes" in text and "10 search / 10 held-out" in text and "8 trials" in text
    assert "auto: curve of 2 points (10 search items" in text and "weight [0, 1]" in text
    per_layer = check_space(_space(project, granularity="layer"))
    assert per_layer.dim == 2 * 2 * 4 and "per layer" in per_layer.summary()


# -- models ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,says", [
    (b"\x00\x01\x02binary", "binary"),
    ("{\"model_type\": \"llama\"}".encode("utf-16"), "binary"),
    (b"{\"model_type\": \"l\xe9ama\"}", "not UTF-8"),
    (b"{\"model_type\": \"llama\", \"hidden_si", "truncated"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"{\"hidden_size\": 64}", "model_type"),
])
def test_unreadable_config_json(project, content, says):
    (project / "a" / "config.json").write_bytes(content)
    _rejects(_space(project), "models.a", str(project / "a" / "config.json"), says)


def test_missing_model_and_missing_config(project):
    _rejects(_space(project, models={"base": "./base", "a": "./nowhere"}), "models.a", "does not exist")
    (project / "a" / "config.json").unlink()
    _rejects(_space(project), "models.a", "has no config.json")


def test_hub_id_offline_and_not_cached(project, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(project / "empty-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(project / "empty-cache"))
    _rejects(_space(project, models={"base": "./base", "a": "someone/no-such-model"}), "models.a",
             "someone/no-such-model", "HF_HUB_OFFLINE")


@pytest.mark.parametrize("name", ["empty.gguf", "fake.gguf"])
def test_unreadable_gguf(project, name):
    (project / name).write_bytes(b"" if name == "empty.gguf" else b"PK\x03\x04 not a gguf")
    _rejects(_space(project, models={"base": "./base", "a": f"./{name}"}), "models.a", name)


@pytest.mark.parametrize("over,key,says", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "models", "different architectures"),
    ({"hidden_size": 32}, "models", "different hidden sizes"),
    ({"intermediate_size": 256}, "models", "intermediate_size"),
    ({"num_hidden_layers": 2}, "models", "different layer counts (4 vs 2)"),
    ({"vocab_size": 80}, "embeddings", "different vocabularies"),
])
def test_incompatible_models(project, over, key, says):
    _model(project / "b", **over)
    _rejects(_space(project), key, str(project / "space.yaml"), says)


def test_vocabularies_may_differ_with_an_embedding_policy(project):
    _model(project / "b", vocab_size=80)
    assert check_space(_space(project, embeddings="keep_target")).dim == 8  # auto: a curve of 2 points


# -- the merge method --------------------------------------------------------------------------------

@pytest.mark.parametrize("params,key", [
    ({"weight": {"range": [0, 1]}, "dens": 0.5}, "parameters.dens"),
    ({"weight": {"range": [0, 1]}, "density": {"range": [0.0, 1.5]}}, "parameters.density.range"),
    ({"density": {"range": [0.1, 1]}, "normalize": "evolve"}, "parameters.normalize"),  # no default range
    ({"weight": 0.5, "density": 0.5}, "parameters"),  # nothing evolves
    ({"weight": {"range": [0, "x"]}}, "parameters.weight.range.1"),
    ({"weight": {"range": [1, 0]}}, "parameters.weight"),
])
def test_bad_parameters(project, params, key):
    _rejects(_space(project, parameters=params), key, str(project / "space.yaml"))


@pytest.mark.parametrize("params", [{}, {"weight": "evolve", "density": "evolve"}, {"density": "evolve"}])
def test_parameters_not_given_evolve_over_the_default_ranges(project, params):
    """TIES's weight and density evolve over [0, 1] and [0.1, 1] (on the 0.001 grid) unless the space says."""
    from evomerge.validate import check_space

    report = check_space(_space(project, parameters=params))
    assert "weight [0, 1]" in report.genome and "density [0.1, 1]" in report.genome, report.genome
    fixed = check_space(_space(project, parameters={"density": 0.5}))
    assert "density" not in fixed.genome and fixed.dim * 2 == report.dim


def test_a_value_that_fits_no_member_of_a_union(project):
    params = {"weight": {"range": [0, 1]}, "density": "abc"}
    _rejects(_space(project, parameters=params), "parameters.density", "'abc'",
             "a mapping, a number, true/false or 'evolve'")


# -- budget ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,says", [
    ({"trials": 0}, "at least 1"),
    ({"trials": "many"}, "'many'"),
    ({"seconds": -5}, "> 0"),
    ({"seconds": 0}, "> 0"),
    ({"seconds": "ten"}, "'ten'"),
])
def test_bad_budget(project, budget, says):
    key = "budget." + next(iter(budget))
    _rejects(_space(project, budget=budget), key, says)


def test_budget_overridden_after_parsing_is_checked_too(project):
    from evomerge.config import load_search_space
    from evomerge.workflow.preflight import preflight

    config, _ = load_search_space(_space(project))
    config.budget.trials = 0  # as `evomerge run --trials 0` assigns it
    with pytest.raises(EvomergeError, match="key 'budget.trials'"):
        preflight(config, "space.yaml", project)


# -- recipes -----------------------------------------------------------------------------------------

def test_seed_recipes(project):
    _rejects(_space(project, seed_recipes=["nope.yaml"]), "seed_recipes.0", "nope.yaml")
    (project / "r.yaml").write_bytes(b"merge_method: ties\n\xff\n")
    with pytest.raises(EvomergeError, match=r"r.yaml: the recipe is not UTF-8"):
        validate_space(_space(project, seed_recipes=["r.yaml"]))
    recipe = {"merge_method": "ties", "base_model": str(project / "base"),
              "models": [{"model": str(project / "a"), "parameters": {"weight": 0.5, "density": 1.5}}]}
    (project / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(EvomergeError) as err:
        validate_space(_space(project, seed_recipes=["r.yaml"]))
    assert str(err.value).startswith(f"{project / 'r.yaml'}: key 'models.0.parameters.density'")
    recipe["models"][0]["parameters"]["density"] = 0.5
    (project / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert check_space(_space(project, seed_recipes=["r.yaml"])).dim == 8  # auto: a curve of 2 points


# -- stacking ----------------------------------------------------------------------------------------

def _stack(project: Path, **st) -> Path:
    return _space(project, merge_method=None, parameters={}, stacking={"mode": "dfs", "max_length": 8} | st)


def test_stacking_genome_from_configs(project):
    report = check_space(_stack(project, models=["base", "a"], repeats=2))
    assert report.dim == 8 * 2 + 8 * 8  # (4 + 4 layers) x 2 repeats + 8 x 8 scales
    assert report.stack_layers == {"base": 4, "a": 4}
    # the target (base_model) always joins the stacking sources, as StackSpace adds it
    assert check_space(_stack(project, models=["a", "b"], repeats=1)).dim == 12 + 12 * 12
    assert "genes per layer group" not in report.summary()


def test_stacking_errors(project):
    _rejects(_stack(project, models=["a", "zz"]), "stacking.models", "'zz'")
    _rejects(_stack(project, use_ps_result=True), "stacking.use_ps_result", "unknown key", "ps_recipe")
    _rejects(_stack(project, scale_range=[1.5, 0.5]), "stacking.scale_range")
    _rejects(_stack(project, mode="dus", drop=4), "stacking.drop", "1..3")
    _rejects(_stack(project, ps_recipe="ps.yaml"), "stacking.ps_recipe", "not found")
    _model(project / "b", hidden_size=32, intermediate_size=128)
    _rejects(_stack(project, models=["a", "b"]), "stacking.models", "hidden_size")
    path = _space(project, merge_method="ties", parameters={}, stacking={"mode": "dfs"})
    _rejects(path, "merge_method", "stacking.ps_recipe")


def test_ps_recipe_whose_models_differ_in_layer_count(project):
    """normalized_slices (merge/plan.py) builds slices with pydantic: the error names the recipe and key."""
    _model(project / "short", num_hidden_layers=2)
    recipe = {"merge_method": "ties", "base_model": str(project / "base"),
              "models": [{"model": str(project / "short"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    (project / "ps.yaml").write_text(yaml.safe_dump(recipe))
    msg = _rejects(_stack(project, models=["a"], ps_recipe="ps.yaml"), "models", "same number of layers")
    assert msg.startswith(str(project / "ps.yaml"))


# -- tasks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,says", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    ('{"prompt": "é", "answer": "1"}\n'.encode("latin-1"), "not UTF-8"),
    (b'{"prompt": "p0", "answer": "0"}\n{"prompt": "p1", "ans', "truncated"),
    (b"", "empty"),
    (b"  \n\n", "empty"),
])
def test_unreadable_task_file(project, content, says):
    (project / "gen.jsonl").write_bytes(content)
    msg = _rejects(_space(project), "tasks.0.path", str(project / "gen.jsonl"), says)
    assert "space.yaml" in msg


def test_task_columns_answers_and_sizes(project):
    (project / "gen.jsonl").write_text(json.dumps({"prompt": "p", "reply": "1"}) + "\n")
    _rejects(_space(project), "answer", "gen.jsonl", "lacks column")
    (project / "m.jsonl").write_text("".join(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n"
                                             for _ in range(3)))
    _rejects(_space(project, tasks=[{"name": "m", "kind": "mcq", "path": "m.jsonl"}]), "answer", "out of range")
    (project / "k.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,5\n")
    _rejects(_space(project, tasks=[{"name": "k", "kind": "kmmlu", "path": "k.csv"}]), "answer", "k.csv")
    _gen(project / "gen.jsonl", 15)
    _rejects(_space(project), "tasks.0.n_heldout", "larger than the 5 items left")
    task = {"name": "g", "kind": "generation", "path": "gen.jsonl", "n_search": 15}
    _rejects(_space(project, tasks=[task]), "tasks.0.n_heldout", "held-out split is empty")
    _rejects(_space(project, tasks=[task | {"path": "nope.jsonl"}]), "tasks.0.path", "not found")


def test_lm_eval_task_without_heldout_split(project):
    task = {"name": "m", "kind": "lm_eval", "lm_eval_task": "mgsm_direct_ja"}
    _rejects(_space(project, tasks=[task]), "tasks.0.n_heldout", "held-out split is empty")


def test_fewshot_and_custom(project):
    _gen(project / "dev.jsonl", 2)
    task = {"name": "g", "kind": "generation", "path": "gen.jsonl", "n_search": 10, "n_heldout": 10,
            "num_fewshot": 3, "fewshot_path": "dev.jsonl"}
    _rejects(_space(project, tasks=[task]), "tasks.0.num_fewshot", "has 2 items")
    (project / "dev.jsonl").write_bytes(b"\xff\xfe")
    _rejects(_space(project, tasks=[task]), "tasks.0.fewshot_path", "dev.jsonl", "not UTF-8")
    custom = {"name": "c", "kind": "custom", "function": "nofile.py:score"}
    _rejects(_space(project, tasks=[custom]), "tasks.0.function", "nofile.py")
    (project / "score.py").write_text("def score(model, tok):\n    return 1.0\n")
    assert check_space(_space(project, tasks=[custom | {"function": "score:score"}])).tasks[0].kind == "custom"


def test_duplicate_task_names(project):
    task = {"name": "g", "kind": "generation", "path": "gen.jsonl", "n_search": 10, "n_heldout": 10}
    _rejects(_space(project, tasks=[task, task]), "tasks", "unique")
