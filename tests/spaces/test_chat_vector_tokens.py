"""`chat_vector.special_tokens` in a search space: the decoded recipes carry the token map, the live candidate
has the chat model's rows there, and a token no tokenizer has stops the run before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.config import load_search_space
from evomerge.errors import ConfigError
from evomerge.models.tiny import char_tokenizer
from tests.workflow.test_run import _space


def _chat_space(fam, tmp_path, tokens):
    return _space(fam, tmp_path, merge_method="task_arithmetic", parameters={"weight": {"range": [0.0, 1.5]}},
                  chat_vector={"target": "a", "chat": "b", "special_tokens": tokens},
                  embeddings="keep_target", budget={"trials": 2})


def test_special_tokens_reach_the_recipe_and_the_live_model(llama_family, tmp_path):
    from evomerge.models.sources import open_model
    from evomerge.spaces.parameter import ParameterSpace

    config, _ = load_search_space(_chat_space(llama_family, tmp_path, ["</s>", "x"]))
    refs = {n: str(p) for n, p in config.models.items()}
    space = ParameterSpace(config, refs, 4, sources={n: open_model(r) for n, r in refs.items()})
    recipe = space.decode(np.full(space.dim, 0.3))
    rows = recipe.options.token_rows
    assert rows is not None and rows.model == str(llama_family["b"])
    assert rows.tokens == [("</s>", "</s>"), ("x", "x")]
    live = space.make_merger(device="cpu", offload="never").merge(recipe).state_dict()
    ids = [char_tokenizer().get_vocab()[t] for t in ("</s>", "x")]
    chat = load_file(str(llama_family["b"] / "model.safetensors"))
    target = load_file(str(llama_family["a"] / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(live[name][ids], chat[name][ids])
        assert torch.equal(live[name][10:20], target[name][10:20])  # keep_target elsewhere


def test_unknown_special_token_stops_before_the_run_folder(llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    path = _chat_space(llama_family, tmp_path, ["<|eot_id|>"])
    with pytest.raises(ConfigError) as err:
        start_run(path, quiet=True)
    text = str(err.value)
    assert str(path) in text and "chat_vector.special_tokens" in text and "'<|eot_id|>'" in text
    assert not (tmp_path / "run").exists()
