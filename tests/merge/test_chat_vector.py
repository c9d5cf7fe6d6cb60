"""The chat-vector scenario: θ_cp + λ·(θ_chat − θ_base) where the continual-pretrained model has a larger
vocabulary; shared layers get the chat vector, embed/lm_head follow the chosen policy, the result generates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.merge.materialize import materialize
from evomerge.models.tiny import DEFAULT_ALPHABET, char_tokenizer, perturbed, random_model, save_model, tiny_config
from evomerge.recipe import Recipe

KOREAN = "한국어모델가나다라"


@pytest.fixture(scope="module")
def chat_vector_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatvec")
    tok = char_tokenizer(DEFAULT_ALPHABET)
    ko_tok = char_tokenizer(KOREAN + DEFAULT_ALPHABET)  # larger vocabulary, different order
    base = random_model(tiny_config("llama", vocab_size=len(tok)), seed=1)
    chat = perturbed(base, seed=2, scale=0.05)
    cp_layers = perturbed(base, seed=3, scale=0.05)
    cp = random_model(tiny_config("llama", vocab_size=len(ko_tok)), seed=4)
    sd = cp_layers.state_dict()
    new_sd = cp.state_dict()
    for name, value in sd.items():
        if value.shape == new_sd[name].shape:
            new_sd[name] = value
    cp.load_state_dict(new_sd)
    return {
        "base": save_model(base, tok, root / "base"),
        "chat": save_model(chat, tok, root / "chat"),
        "cp": save_model(cp, ko_tok, root / "cp"),
    }


def _recipe(m, policy: str, lam=(0.5, 1.0)) -> Recipe:
    return Recipe.from_dict({
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["cp"]), "parameters": {"weight": 1.0}},
            {"model": str(m["chat"]), "parameters": {"weight": list(lam)}},
        ],
        "dtype": "float32",
        "evomerge": {"embeddings": policy, "target_model": str(m["cp"])},
    })


def _sd(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("policy", ["keep_target", "align"])
def test_chat_vector_end_to_end(policy, chat_vector_models, tmp_path):
    m = chat_vector_models
    out = materialize(_recipe(m, policy), tmp_path / "out", progress=False)
    merged, base, chat, cp = _sd(out), _sd(m["base"]), _sd(m["chat"]), _sd(m["cp"])
    n = 4
    for name, value in merged.items():
        if ".layers." in name or name == "model.norm.weight":
            layer = int(name.split(".")[2]) if ".layers." in name else 0
            lam = 0.5 + 0.5 * (layer / (n - 1)) if ".layers." in name else 0.5
            expected = cp[name] + lam * (chat[name] - base[name])
            assert torch.allclose(value, expected, atol=1e-6), name
    ko_tok = AutoTokenizer.from_pretrained(m["cp"])
    en_vocab = AutoTokenizer.from_pretrained(m["base"]).get_vocab()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == cp[name].shape
        if policy == "keep_target":
            assert torch.equal(merged[name], cp[name])
        else:
            for token, row in ko_tok.get_vocab().items():
                if token in en_vocab:  # shared token: gets the chat vector (λ at t=0 is 0.5)
                    expected = cp[name][row] + 0.5 * (chat[name][en_vocab[token]] - base[name][en_vocab[token]])
                else:  # new Korean token: untouched
                    expected = cp[name][row]
                assert torch.allclose(merged[name][row], expected, atol=1e-6), (name, token)
    # the tokenizer and config are the continual-pretrained model's; the result loads and generates
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == ko_tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(["한국어 abc"], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_vocab_mismatch_without_policy_is_a_clear_error(chat_vector_models, tmp_path):
    from evomerge.errors import ConfigError

    recipe = _recipe(chat_vector_models, "merge")
    with pytest.raises(ConfigError, match="vocabulary sizes differ.*allowed: keep_target, align"):
        materialize(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_chat_vector_recipe_is_the_mergekit_task_arithmetic(chat_vector_models, tmp_path):
    """On equal vocabularies the chat-vector recipe is plain task_arithmetic: mergekit accepts the very YAML we
    write (it ignores the `evomerge:` key) and gives the same tensors, and they equal cp + λ(chat − base)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    m = chat_vector_models
    base = AutoModelForCausalLM.from_pretrained(m["base"])
    cp_en = save_model(perturbed(base, seed=5, scale=0.05), AutoTokenizer.from_pretrained(m["base"]), tmp_path / "cp")
    recipe = _recipe(m | {"cp": cp_en}, "merge")
    ours = _sd(materialize(recipe, tmp_path / "ours", progress=False))
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    import yaml

    run_merge(MergeConfiguration.model_validate(yaml.safe_load((tmp_path / "r.yaml").read_text())),
              str(tmp_path / "mk"), options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = _sd(tmp_path / "mk")
    assert set(ours) == set(theirs)
    b, c, t = _sd(m["base"]), _sd(m["chat"]), _sd(cp_en)
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-6, name
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.allclose(ours[name], t[name] + 1.0 * (c[name] - b[name]), atol=1e-6)
