"""ModelLayout on real transformers families (tiny random models) and on the real SmolLM2 GGUF."""

from __future__ import annotations

import pytest

from evomerge.models.layout import ModelLayout, ParamInfo, ParamKind
from evomerge.models.sources import open_model
from evomerge.models.tiny import random_model, tiny_config

# family -> per-layer tensors by kind (what transformers' own classes hold)
FAMILIES = {
    "llama": {ParamKind.ATTN: 4, ParamKind.MLP: 3, ParamKind.NORM: 2},
    "mistral": {ParamKind.ATTN: 4, ParamKind.MLP: 3, ParamKind.NORM: 2},
    "qwen2": {ParamKind.ATTN: 7, ParamKind.MLP: 3, ParamKind.NORM: 2},  # q/k/v biases
    "gemma": {ParamKind.ATTN: 4, ParamKind.MLP: 3, ParamKind.NORM: 2},
    "gemma2": {ParamKind.ATTN: 4, ParamKind.MLP: 3, ParamKind.NORM: 4},  # pre/post norms around both blocks
}


def _layout(family, **kw):
    model = random_model(tiny_config(family, **kw))
    return ModelLayout.from_names(model.state_dict().keys(), model.config), model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_param_of_a_family_is_classified(family):
    layout, model = _layout(family, num_layers=3)
    names = list(model.state_dict().keys())
    assert set(layout.params) == set(names)
    assert layout.num_layers == 3 and layout.layer_prefix == "model.layers."
    assert not layout.names_of_kind(ParamKind.OTHER)
    assert layout.names_of_kind(ParamKind.EMBED) == ["model.embed_tokens.weight"]
    assert layout.names_of_kind(ParamKind.FINAL_NORM) == ["model.norm.weight"]
    assert layout.non_layer_names() == [n for n in names if ".layers." not in n]
    for i in range(3):
        in_layer = layout.names_in_layer(i)
        assert in_layer == [n for n in names if n.startswith(f"model.layers.{i}.")]
        counts = {}
        for n in in_layer:
            info = layout.params[n]
            assert info == ParamInfo(n, i, info.kind)
            counts[info.kind] = counts.get(info.kind, 0) + 1
        assert counts == FAMILIES[family]
    assert layout.kind_of("model.layers.1.self_attn.q_proj.weight") is ParamKind.ATTN
    assert layout.kind_of("model.layers.1.mlp.down_proj.weight") is ParamKind.MLP
    assert layout.kind_of("model.layers.1.input_layernorm.weight") is ParamKind.NORM
    assert layout.layer_of("model.layers.2.mlp.up_proj.weight") == 2
    assert layout.layer_of("model.norm.weight") is None


def test_qwen2_biases_are_attention():
    layout, _ = _layout("qwen2")
    for proj in "qkv":
        assert layout.kind_of(f"model.layers.0.self_attn.{proj}_proj.bias") is ParamKind.ATTN


def test_untied_and_tied_llama():
    untied, _ = _layout("llama")
    assert not untied.tied_embeddings
    assert untied.names_of_kind(ParamKind.LM_HEAD) == ["lm_head.weight"]
    tied_model = random_model(tiny_config("llama", tie_embeddings=True))
    # as saved: the tied lm_head is not stored (config alone, and names alone, both say tied)
    stored = [n for n in tied_model.state_dict() if n != "lm_head.weight"]
    assert ModelLayout.from_names(stored, tied_model.config).tied_embeddings
    assert ModelLayout.from_names(stored).tied_embeddings
    assert ModelLayout.from_names(tied_model.state_dict().keys(), tied_model.config).tied_embeddings


def test_rename_layer():
    layout, _ = _layout("llama")
    assert layout.rename_layer("model.layers.3.mlp.down_proj.weight", 7) == "model.layers.7.mlp.down_proj.weight"
    assert layout.rename_layer("model.layers.0.self_attn.q_proj.weight", 12) == \
        "model.layers.12.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="not a per-layer"):
        layout.rename_layer("model.norm.weight", 1)


def test_from_source_of_a_saved_family(llama_family):
    layout = ModelLayout.from_source(open_model(str(llama_family["base"])))
    assert layout.num_layers == 4 and not layout.tied_embeddings
    assert len(layout.names_in_layer(3)) == 9


def test_other_naming_schemes_by_pattern_alone():
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.bias",
            "transformer.h.0.mlp.c_fc.weight", "transformer.h.11.mlp.c_proj.weight", "transformer.ln_f.weight"]
    layout = ModelLayout.from_names(gpt2)
    kinds = {n: p.kind for n, p in layout.params.items()}
    assert layout.num_layers == 12 and layout.layer_prefix == "transformer.h."
    assert kinds["transformer.wte.weight"] is ParamKind.EMBED
    assert kinds["transformer.h.0.ln_1.weight"] is ParamKind.NORM
    assert kinds["transformer.h.0.attn.c_attn.weight"] is ParamKind.ATTN
    assert kinds["transformer.h.11.mlp.c_proj.weight"] is ParamKind.MLP
    assert kinds["transformer.ln_f.weight"] is ParamKind.FINAL_NORM
    assert layout.tied_embeddings  # no lm_head stored
    assert layout.rename_layer("transformer.h.0.mlp.c_fc.weight", 5) == "transformer.h.5.mlp.c_fc.weight"

    other = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight",
             "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight", "output.weight",
             "model.layers.0.block_sparse_moe.experts.0.w2.weight", "model.layers.0.self_attn.q_norm.weight",
             "transformer.blocks.2.ffn.up.weight"]
    kinds = {n: p.kind for n, p in ModelLayout.from_names(other).params.items()}
    assert kinds == {
        "tok_embeddings.weight": ParamKind.EMBED, "layers.0.attention.wq.weight": ParamKind.ATTN,
        "layers.0.feed_forward.w1.weight": ParamKind.MLP, "layers.0.attention_norm.weight": ParamKind.NORM,
        "layers.0.ffn_norm.weight": ParamKind.NORM, "norm.weight": ParamKind.FINAL_NORM,
        "output.weight": ParamKind.LM_HEAD, "model.layers.0.block_sparse_moe.experts.0.w2.weight": ParamKind.MLP,
        "model.layers.0.self_attn.q_norm.weight": ParamKind.NORM, "transformer.blocks.2.ffn.up.weight": ParamKind.MLP,
    }


def test_unknown_names_are_other_not_guessed():
    layout = ModelLayout.from_names(["model.layers.0.mystery.weight", "model.something.weight"])
    assert layout.kind_of("model.layers.0.mystery.weight") is ParamKind.OTHER
    assert layout.kind_of("model.something.weight") is ParamKind.OTHER
    assert layout.kind_of("lm_head.weight") is ParamKind.LM_HEAD  # not stored, still classified


def test_smollm2_gguf_layout(smollm2_gguf):
    src = open_model(str(smollm2_gguf))
    layout = ModelLayout.from_source(src)
    assert layout.num_layers == 30 and layout.layer_prefix == "model.layers."
    assert layout.tied_embeddings
    assert not layout.names_of_kind(ParamKind.OTHER)
    assert not layout.names_of_kind(ParamKind.LM_HEAD)  # tied: not a separate tensor
    assert layout.names_of_kind(ParamKind.EMBED) == ["model.embed_tokens.weight"]
    assert layout.names_of_kind(ParamKind.FINAL_NORM) == ["model.norm.weight"]
    for i in (0, 17, 29):
        kinds = [layout.kind_of(n) for n in layout.names_in_layer(i)]
        assert (kinds.count(ParamKind.ATTN), kinds.count(ParamKind.MLP), kinds.count(ParamKind.NORM)) == (4, 3, 2)
