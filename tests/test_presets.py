"""Every preset in search_spaces/ passes `evomerge validate` (the preflight `evomerge run` makes: model configs,
method parameters, genome, task data and splits, recipes, budget; no weights loaded) with its models replaced by
stand-in configs: Mistral-7B's for the EvoLLM-JP presets, Llama-3-8B's for the Korean chat vector, tiny ones
elsewhere. Bad edits of a preset fail on one line naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError, DataError
from evomerge.recipe import Recipe
from evomerge.validate import check_space, validate_space

ROOT = Path(__file__).resolve().parents[1] / "search_spaces"
PRESETS = sorted(ROOT.glob("*.yaml"))

# config.json of the real models (the fields that decide shapes and layer counts)
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
LLAMA_3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
# SOLAR's depth up-scaling drops 8 of 32 layers: a tiny Mistral with Mistral-7B's layer count
TINY_MISTRAL_32 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
                   "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 32,
                   "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 256}
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
              "vocab_size": 64, "max_position_embeddings": 256}
STAND_INS = {"evollm_jp_ps": MISTRAL_7B, "evollm_jp_dfs": MISTRAL_7B, "ko_chat_vector": LLAMA_3_8B,
             "solar_dus": TINY_MISTRAL_32, "solar_dus_search": TINY_MISTRAL_32}
# the EvoLLM-JP presets cannot run: their lm-eval task sets neither n_heldout nor per_category, so every MGSM-JA
# item is in the search split and the held-out split the run builds right after loading the weights is empty


def _config(folder: Path, cfg: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """The demo zoo as config.json files (tiny Llamas) and task files of 480 items (96 search + 384 held out)."""
    zoo = tmp_path / "zoo"
    for name in ("base", "expert_sort", "expert_count"):
        _config(zoo / name, TINY_LLAMA)
    (zoo / "tasks").mkdir()
    for task in ("sort", "count"):
        rows = [json.dumps({"prompt": f"{task} {i}:", "answer": str(i)}) for i in range(480)]
        (zoo / "tasks" / f"{task}.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("EVOMERGE_ZOO", str(zoo))
    return zoo


def _with_stand_ins(preset: Path, tmp_path: Path) -> Path:
    """The preset with its models replaced by stand-in configs, at tmp/search_spaces/ (relative paths hold)."""
    data = yaml.safe_load(preset.read_text())
    cfg = STAND_INS.get(preset.stem)
    if cfg is not None:
        data["models"] = {name: _config(tmp_path / "models" / preset.stem / name, cfg) for name in data["models"]}
    if preset.stem == "evollm_jp_dfs":  # its PS stage: what evollm_jp_ps leaves in runs/evollm_jp_ps/best.yaml
        m = {n: _config(tmp_path / "models" / "ps" / n, MISTRAL_7B) for n in ("base", "shisa", "wizardmath", "abel")}
        ps = {"merge_method": "dare_ties", "base_model": m["base"], "dtype": "bfloat16",
              "models": [{"model": m[n], "parameters": {"weight": [0.2, 0.5, 0.8], "density": 0.6}}
                         for n in ("shisa", "wizardmath", "abel")]}
        best = tmp_path / "runs" / "evollm_jp_ps" / "best.yaml"
        best.parent.mkdir(parents=True)
        best.write_text(yaml.safe_dump(ps))
    out = tmp_path / "search_spaces" / preset.name
    out.parent.mkdir(parents=True, exist_ok=True)
    if (ROOT / "recipes").is_dir() and not (out.parent / "recipes").exists():
        (out.parent / "recipes").symlink_to(ROOT / "recipes")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_there_are_presets_for_every_scenario():
    names = {p.stem for p in PRESETS}
    assert {"demo", "ko_chat_vector", "evollm_jp_ps", "evollm_jp_dfs", "solar_dus", "solar_dus_search",
            "demo_ps_dfs"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates(preset, fake_zoo, tmp_path, capsys):
    space = _with_stand_ins(preset, tmp_path)
    report = check_space(space)
    assert report.dim >= 1
    assert main(["validate", str(space)]) == 0
    out = capsys.readouterr().out
    assert f"{space}: ok" in out and "genes per layer group" not in out


GENOMES = {  # the sizes the presets' comments promise
    "demo": 16,  # weight, density x 2 experts x 4 layers
    "ko_chat_vector": 16,  # 32 layers in blocks of 4 -> 8 groups x (attn, mlp)
    "evollm_jp_ps": 192,  # 32 layers x 3 models x 2 parameters
    "evollm_jp_dfs": 64 * 3 + 64 * 64,  # PS merge + shisa = 64 layers, x 3 repeats, + 64 x 64 scales
    "solar_dus": 1, "solar_dus_search": 2, "demo_ps_dfs": 8 * 2 + 8 * 8,
}


@pytest.mark.parametrize("name", sorted(GENOMES))
def test_preset_genome_sizes(name, fake_zoo, tmp_path):
    space = _with_stand_ins(ROOT / f"{name}.yaml", tmp_path)
    report = check_space(space)
    assert report.dim == GENOMES[name]
    summary = report.summary()
    assert f"{GENOMES[name]} gene" in summary
    assert ("1 model " if len(report.models) == 1 else f"{len(report.models)} models ") in summary


def test_an_lm_eval_task_without_a_held_out_split_is_refused_before_anything_runs(tmp_path, fake_zoo):
    """What kept the evollm presets from running: `evomerge run` loaded every weight, created the run folder,
    then built the held-out evaluator, whose split was empty. Preflight says so at once."""
    space = _with_stand_ins(ROOT / "evollm_jp_ps.yaml", tmp_path)
    data = yaml.safe_load(space.read_text())
    del data["tasks"][0]["n_heldout"]
    space.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError) as err:
        validate_space(space)
    assert str(err.value).startswith(f"{space}: key 'tasks.0.n_heldout':")
    assert "held-out split is empty" in str(err.value)


def test_ps_dfs_preset_needs_its_ps_run(fake_zoo, tmp_path):
    space = _with_stand_ins(ROOT / "evollm_jp_dfs.yaml", tmp_path)
    (tmp_path / "runs" / "evollm_jp_ps" / "best.yaml").unlink()
    with pytest.raises(ConfigError, match=r"key 'stacking.ps_recipe': recipe '../runs/evollm_jp_ps/best.yaml' not"):
        validate_space(space)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_recipes_parse(recipe, fake_zoo):
    r = Recipe.load(recipe)
    assert all(str(fake_zoo) in ref for ref in r.referenced_models())


@pytest.mark.parametrize("edit,key", [
    (("merge_method: ties", "merge_method: tie"), "merge_method"),
    (("merge_method: ties", "merge_method: ties\nparameters: {density: {range: [0.0, 1.0]}}"),
     "parameters.density.range"),
    (("merge_method: ties", "merge_method: ties\nparameters: {normalize: evolve}"), "parameters.normalize"),
    (("budget: {trials: 96}", "budget: {trials: 0}"), "budget.trials"),
    (("budget: {trials: 96}", "budget: {trials: 96, seconds: -60}"), "budget.seconds"),
    (("budget: {trials: 96}", "budget: {trials: 96, seconds: ten}"), "budget.seconds"),
    (("optimizer: {name: cmaes}", "optimizer: {name: hillclimb}"), "optimizer.name"),
    (("merge_method: ties", "merge_method: ties\ngranularity: layr"), "granularity"),
    (("n_search: 96 ", "n_search: 400 "), "tasks.0.n_heldout"),
    (("max_new_tokens: 12", "max_new_tokens: twelve"), "tasks.0.max_new_tokens"),
])
def test_bad_edits_name_the_key(edit, key, fake_zoo, tmp_path):
    text = (ROOT / "demo.yaml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises((ConfigError, DataError)) as err:
        validate_space(bad)
    assert str(err.value).startswith(f"{bad}: key '{key}'"), str(err.value)
    assert "\n" not in str(err.value)
