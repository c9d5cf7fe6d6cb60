"""A recipe's tokenizer keys as mergekit 0.1.5 reads them: `chat_template` names (chatml, llama3, ...) expand to
mergekit's template text, 'auto' picks the models' plurality template, a Jinja template is used verbatim, and an
unknown name is a one-line error; `tokenizer_source` naming a missing model, or a model without tokenizer files,
fails before any output is written (mergekit fails too) instead of writing a folder without a tokenizer."""

from __future__ import annotations

import copy
import importlib.resources
import shutil

import pytest
import yaml

from evomerge.cli import main as evomerge_main
from evomerge.errors import ConfigError
from evomerge.merge.materialize import materialize
from evomerge.recipe import CHAT_TEMPLATE_DIR, Recipe, chat_template_names

JINJA = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json")


def _mergekit_templates() -> dict[str, str]:
    from mergekit._data import chat_templates

    root = importlib.resources.files(chat_templates)
    return {p.name.removesuffix(".jinja"): p.read_text() for p in root.iterdir() if p.name.endswith(".jinja")}


def _recipe(fam, **over) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(fam[m]), "parameters": {"weight": w}} for m, w in (("a", 0.6), ("b", 0.4))]} | over


def _mergekit(recipe: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(copy.deepcopy(recipe)), str(out),
              options=MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))


def _template_of(folder) -> str | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).chat_template


def test_bundled_templates_are_mergekits():
    theirs = _mergekit_templates()
    assert chat_template_names() == sorted(theirs)
    for name, text in theirs.items():
        assert (CHAT_TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8") == text, name


@pytest.mark.parametrize("name", sorted(_mergekit_templates()))
def test_named_template_is_expanded_like_mergekit(name, llama_family, tmp_path):
    recipe = _recipe(llama_family, chat_template=name)
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    assert _template_of(tmp_path / "ours") == _mergekit_templates()[name]  # not the literal word
    if name == "chatml":  # the files themselves, byte for byte
        _mergekit(recipe, tmp_path / "mk")
        for f in TOKENIZER_FILES:
            assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "mk" / f).read_bytes(), f
    assert Recipe.from_dict(recipe).to_dict()["chat_template"] == name  # the recipe keeps the name


def test_jinja_template_is_verbatim_and_auto_takes_the_plurality(llama_family, tmp_path):
    from transformers import AutoTokenizer

    materialize(Recipe.from_dict(_recipe(llama_family, chat_template=JINJA)), tmp_path / "literal", progress=False)
    assert _template_of(tmp_path / "literal") == JINJA

    fam = {}
    for name, template in (("a", "chatml"), ("b", "chatml"), ("c", "llama3")):
        fam[name] = shutil.copytree(llama_family[name], tmp_path / "zoo" / name)
        tok = AutoTokenizer.from_pretrained(str(fam[name]))
        tok.chat_template = _mergekit_templates()[template]
        tok.save_pretrained(str(fam[name]))
    recipe = _recipe(fam, chat_template="auto")
    recipe["models"].append({"model": str(fam["c"]), "parameters": {"weight": 0.1}})
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    _mergekit(recipe, tmp_path / "mk")
    assert _template_of(tmp_path / "ours") == _mergekit_templates()["chatml"].strip() == _template_of(tmp_path / "mk")


@pytest.mark.parametrize("value", ["chatmI", "vicuna", "no braces in this long template text at all"])
def test_unknown_template_name_is_a_one_line_error(value, llama_family, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(llama_family, chat_template=value)))
    assert evomerge_main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "chat_template" in err and value in err
    assert not (tmp_path / "out").exists()
    # mergekit refuses it too ("Invalid chat template"), but only after merging, and then logs the error and
    # writes the model without any tokenizer
    _mergekit(_recipe(llama_family, chat_template=value), tmp_path / "mk")
    assert (tmp_path / "mk" / "model.safetensors").exists() and not (tmp_path / "mk" / "tokenizer.json").exists()


def _without_tokenizer(folder, dest):
    shutil.copytree(folder, dest)
    for f in list(dest.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    return dest


@pytest.mark.parametrize("case", ["missing model", "model without tokenizer", "base without tokenizer"])
def test_tokenizer_no_model_has_fails_like_mergekit(case, llama_family, tmp_path):
    bare = _without_tokenizer(llama_family["b"], tmp_path / "bare")
    recipe = _recipe(llama_family)
    if case == "missing model":
        recipe["tokenizer_source"] = str(tmp_path / "nowhere")
    elif case == "model without tokenizer":
        recipe["models"][1]["model"] = str(bare)
        recipe["tokenizer_source"] = str(bare)
    else:
        recipe |= {"merge_method": "task_arithmetic", "base_model": str(bare), "tokenizer_source": "base"}
    with pytest.raises(ConfigError) as err:
        materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False, recipe_source="recipe.yaml")
    assert err.value.key == "tokenizer_source" and err.value.file == "recipe.yaml"
    assert "\n" not in str(err.value) and not (tmp_path / "ours").exists()
    with pytest.raises(Exception):  # noqa: B017 - mergekit fails with whatever transformers raises
        _mergekit(recipe, tmp_path / "mk")


def test_tokenizer_source_among_the_models_is_written(llama_family, tmp_path):
    recipe = _recipe(llama_family, tokenizer_source=str(llama_family["b"]))
    materialize(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (llama_family["b"] / "tokenizer.json").read_bytes()
