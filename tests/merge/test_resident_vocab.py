"""`embeddings: align` / `keep_target` in the search: the live model equals `evomerge merge` of the same recipe bit
for bit (float32), for models with different vocabulary sizes and for equal sizes in a different token order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.materialize import materialize
from evomerge.merge.resident import ResidentMerger
from evomerge.models.tiny import DEFAULT_ALPHABET, char_tokenizer, perturbed, random_model, save_model, tiny_config
from evomerge.recipe import Recipe

KOREAN = "한국어모델가나다라"
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """base and chat share a tokenizer; `cp` has 9 extra (Korean) tokens first (a larger vocabulary, other ids);
    `shuffled` has the base's tokens in another order, its embedding rows permuted to match (same size)."""
    root = tmp_path_factory.mktemp("vocab")
    tok = char_tokenizer(DEFAULT_ALPHABET)
    base = random_model(tiny_config("llama", vocab_size=len(tok)), seed=1)
    out = {"base": save_model(base, tok, root / "base"),
           "chat": save_model(perturbed(base, seed=2, scale=0.05), tok, root / "chat")}
    ko_tok = char_tokenizer(KOREAN + DEFAULT_ALPHABET)
    cp = random_model(tiny_config("llama", vocab_size=len(ko_tok)), seed=4)
    layers = perturbed(base, seed=3, scale=0.05).state_dict()
    sd = cp.state_dict()
    cp.load_state_dict({k: layers[k] if layers[k].shape == v.shape else v for k, v in sd.items()})
    out["cp"] = save_model(cp, ko_tok, root / "cp")

    alphabet = list(dict.fromkeys(DEFAULT_ALPHABET))
    order = torch.randperm(len(alphabet), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled_tok = char_tokenizer("".join(alphabet[i] for i in order))
    assert len(shuffled_tok) == len(tok) and shuffled_tok.get_vocab() != tok.get_vocab()
    shuffled = perturbed(base, seed=5, scale=0.05)
    rows = [tok.get_vocab()[t] for t, _ in sorted(shuffled_tok.get_vocab().items(), key=lambda kv: kv[1])]
    with torch.no_grad():
        for name, p in shuffled.named_parameters():
            if name in EMBEDS:
                p.copy_(p[rows])  # row of id j = the base model's row of the same token
    out["shuffled"] = save_model(shuffled, shuffled_tok, root / "shuffled")
    return out


def _recipe(m, method, expert, policy="align", target=None) -> Recipe:
    models = [{"model": str(m[expert]), "parameters": {"weight": [0.6, 1.1], "density": 0.7}},
              {"model": str(m["chat"]), "parameters": {"weight": 0.8, "density": [0.4, 0.9]}}]
    if method == "task_arithmetic":
        for entry in models:
            entry["parameters"].pop("density")
    options = {"embeddings": policy, "seed": 1}
    if target:
        options["target_model"] = str(m[target])
    return Recipe.from_dict({"merge_method": method, "base_model": str(m["base"]), "models": models,
                             "dtype": "float32", "evomerge": options})


def _assert_live_equals_exported(recipe: Recipe, tmp_path) -> dict:
    merger = ResidentMerger(recipe, fused="eager")
    live = {k: v.clone() for k, v in merger.merge(recipe).state_dict().items()}
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    out = materialize(Recipe.load(tmp_path / "r.yaml"), tmp_path / "out", progress=False, copy_tokenizer=False)
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) <= set(live)
    for name, value in exported.items():
        assert torch.equal(live[name], value), name
    return exported


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_align_with_a_larger_vocabulary(vocab_models, method, tmp_path):
    recipe = _recipe(vocab_models, method, "cp", target="cp")
    exported = _assert_live_equals_exported(recipe, tmp_path)
    assert exported["model.embed_tokens.weight"].shape[0] == len(KOREAN) + len(dict.fromkeys(DEFAULT_ALPHABET)) + 4


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_align_with_a_reordered_vocabulary_of_the_same_size(vocab_models, method, tmp_path):
    recipe = _recipe(vocab_models, method, "shuffled")
    exported = _assert_live_equals_exported(recipe, tmp_path)
    # the alignment matters here: merging rows by id instead of by token gives other embeddings
    unaligned = _recipe(vocab_models, method, "shuffled", policy="merge")
    plain = ResidentMerger(unaligned, fused="eager").merge(unaligned).state_dict()
    assert not torch.equal(plain["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])


def test_keep_target_keeps_the_target_rows(vocab_models, tmp_path):
    recipe = _recipe(vocab_models, "ties", "cp", policy="keep_target", target="cp")
    exported = _assert_live_equals_exported(recipe, tmp_path)
    cp = load_file(str(vocab_models["cp"] / "model.safetensors"))
    for name in EMBEDS:
        assert torch.equal(exported[name], cp[name])


def _with_token_rows(recipe: Recipe, model, tokens) -> Recipe:
    data = recipe.to_dict()
    data["evomerge"]["token_rows"] = {"model": str(model), "tokens": tokens}
    return Recipe.from_dict(data)


@pytest.mark.parametrize("policy", ["keep_target", "align"])
def test_token_rows_come_from_the_chat_model(vocab_models, policy, tmp_path):
    """The Chat Vector special-token map: named rows of the target (here at other ids than in the chat model)
    are the chat model's rows, every other row is the plain merge's; the live model equals `evomerge merge`."""
    m = vocab_models
    plain = _recipe(m, "ties", "cp", policy=policy, target="cp")
    cp_vocab = char_tokenizer(KOREAN + DEFAULT_ALPHABET).get_vocab()
    chat_vocab = char_tokenizer(DEFAULT_ALPHABET).get_vocab()
    # the same string in both, a string pair across vocabularies, an id pair
    tokens = {"</s>": "</s>", "<s>": "<s>", "가": "a", cp_vocab["b"]: 5}
    recipe = _with_token_rows(plain, m["chat"], tokens)
    (tmp_path / "rows").mkdir()
    (tmp_path / "plain").mkdir()
    exported = _assert_live_equals_exported(recipe, tmp_path / "rows")
    reference = _assert_live_equals_exported(plain, tmp_path / "plain")
    target_ids = [cp_vocab["</s>"], cp_vocab["<s>"], cp_vocab["가"], cp_vocab["b"]]
    chat_ids = [chat_vocab["</s>"], chat_vocab["<s>"], chat_vocab["a"], 5]
    assert len(set(target_ids)) == 4 and target_ids != chat_ids  # ids differ: the map is by token string
    chat = load_file(str(m["chat"] / "model.safetensors"))
    for name in EMBEDS:
        assert torch.equal(exported[name][target_ids], chat[name][chat_ids]), name
        others = torch.ones(exported[name].shape[0], dtype=torch.bool)
        others[target_ids] = False
        assert torch.equal(exported[name][others], reference[name][others]), name
        assert not torch.equal(reference[name][target_ids], chat[name][chat_ids])  # the rows did change


def test_token_rows_written_again_after_every_merge(vocab_models):
    """With `embeddings: align` the table is merged per candidate; the named rows stay the chat model's."""
    m = vocab_models
    recipe = _with_token_rows(_recipe(m, "ties", "cp", target="cp"), m["chat"], ["a"])
    merger = ResidentMerger(recipe, fused="eager")
    row = char_tokenizer(KOREAN + DEFAULT_ALPHABET).get_vocab()["a"]
    want = load_file(str(m["chat"] / "model.safetensors"))["lm_head.weight"][char_tokenizer().get_vocab()["a"]]
    for weight in (0.3, 1.2):
        data = recipe.to_dict()
        data["models"][0]["parameters"]["weight"] = weight
        live = merger.merge(Recipe.from_dict(data)).state_dict()
        assert torch.equal(live["lm_head.weight"][row], want)


@pytest.mark.parametrize("tokens, says", [(["<|eot_id|>"], "'<|eot_id|>' is not in the vocabulary of model"),
                                          ({"a": 999}, "row 999"), ({"a": "a", 6: "b"}, None)])
def test_token_rows_errors_name_the_key(vocab_models, tmp_path, tokens, says):
    from evomerge.errors import ConfigError

    m = vocab_models
    if says is None:  # 'a' is row 6 of the target: named twice
        tokens = {"a": "a", char_tokenizer(KOREAN + DEFAULT_ALPHABET).get_vocab()["a"]: "b"}
        says = "named twice"
    recipe = _with_token_rows(_recipe(m, "ties", "cp", policy="keep_target", target="cp"), m["chat"], tokens)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    with pytest.raises(ConfigError) as err:
        materialize(Recipe.load(path), tmp_path / "out", progress=False, recipe_source=str(path))
    assert says in str(err.value) and "evomerge.token_rows.tokens" in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out").exists()
