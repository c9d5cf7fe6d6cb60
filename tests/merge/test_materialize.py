"""`evomerge merge`: the written folder loads with transformers and matches mergekit's output; bad input fails
cleanly with one line naming file and key, leaving no output folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import main
from evomerge.recipe import Recipe


def _ties_recipe(fam) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["a"]), "parameters": {"weight": [0.3, 0.8], "density": 0.6}},
            {"model": str(fam["b"]), "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.4},
                                                                                {"value": 0.9}]}},
        ],
        "dtype": "float32",
    }


def test_merge_cli_folder_loads_and_matches_mergekit_logits(llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = _ties_recipe(llama_family)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "ours"), "--shard-size", "200KB", "--quiet"]) == 0
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=True, quiet=True))

    ours_dir = tmp_path / "ours"
    index = json.loads((ours_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (ours_dir / name).exists(), name
    card = (ours_dir / "README.md").read_text()
    assert "merge_method: ties" in card and str(llama_family["a"]) in card

    ours = AutoModelForCausalLM.from_pretrained(ours_dir).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk").eval()
    tok = AutoTokenizer.from_pretrained(ours_dir)
    ids = tok(["abc 123+456=", "sort:hgfedcba="], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**ids).logits
        b = theirs(**ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    out = ours.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_recipe_round_trip(llama_family, tmp_path):
    recipe = Recipe.from_dict(_ties_recipe(llama_family) | {"evomerge": {"seed": 3, "embeddings": "keep_target"}})
    text = recipe.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == recipe
    assert again.to_yaml() == text
    assert "weight: [0.3, 0.8]" in text  # gradients in flow style, like mergekit writes them


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _bad_inputs(fam, tmp_path):
    good = _ties_recipe(fam)
    other = fam["other_hidden"]
    return {
        "malformed YAML": ("merge_method: ties\nmodels: [a, b\n", "malformed YAML"),
        "unknown method": (good | {"merge_method": "frobnicate"}, "merge_method"),
        "missing model": (good | {"models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1.0}}]},
                          "nope"),
        "different hidden sizes": (good | {"models": [{"model": str(other), "parameters": {"weight": 1.0}}]},
                                   "hidden"),
        "layer range out of bounds": ({"merge_method": "passthrough",
                                       "slices": [{"sources": [{"model": str(fam["a"]), "layer_range": [0, 9]}]}]},
                                      "layer_range"),
        "density outside (0, 1]": (good | {"parameters": {"density": 1.5}}, "density"),
        "density zero": (good | {"parameters": {"density": 0.0}}, "density"),
        "unknown key": (good | {"modles": []}, "modles"),
    }


@pytest.fixture(scope="module")
def family_with_other(llama_family, tmp_path_factory):
    from evomerge.models.tiny import char_tokenizer, random_model, save_model, tiny_config

    tok = char_tokenizer()
    other = save_model(random_model(tiny_config("llama", vocab_size=len(tok), hidden=32)), tok,
                       tmp_path_factory.mktemp("other") / "other")
    return dict(llama_family) | {"other_hidden": other}


@pytest.mark.parametrize("case", ["malformed YAML", "unknown method", "missing model", "different hidden sizes",
                                  "layer range out of bounds", "density outside (0, 1]", "density zero",
                                  "unknown key"])
def test_bad_input_one_clear_line(case, family_with_other, tmp_path):
    data, expected = _bad_inputs(family_with_other, tmp_path)[case]
    recipe = _write(tmp_path, data)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evomerge", "merge", recipe, str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert recipe in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_output_folder_is_readable_by_others(llama_family, tmp_path):
    import stat

    from evomerge.merge.materialize import atomic_output_dir

    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700
