"""WeightSource over HF folders (single, sharded, bf16, .bin), GGUF, errors, and check_mergeable."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ModelLoadError
from evomerge.models.causal_lm import load_causal_lm
from evomerge.models.compat import check_mergeable
from evomerge.models.gguf import GGUFSource
from evomerge.models.sources import InMemorySource, SafetensorsSource, open_model
from evomerge.models.tiny import char_tokenizer, random_model, save_model, tiny_config


def _tiny(tmp_path, name="m", family="llama", dtype=torch.float32, seed=0, shard=None, **cfg):
    tok = char_tokenizer()
    cfg.setdefault("vocab_size", len(tok))
    model = random_model(tiny_config(family, **cfg), seed=seed, dtype=dtype)
    kw = {"max_shard_size": shard} if shard else {}
    return save_model(model, tok, tmp_path / name, **kw), model


# ------------------------------------------------------------------ HF folders

def test_single_file_folder_reads_every_tensor_exactly(llama_family):
    folder = llama_family["a"]
    src = open_model(str(folder))
    stored = load_file(folder / "model.safetensors")
    assert isinstance(src, SafetensorsSource)
    assert sorted(src.keys()) == sorted(stored)
    for name, t in stored.items():
        assert src.shape(name) == t.shape and src.dtype(name) == t.dtype
        assert torch.equal(src.get(name), t)
    assert src.config.model_type == "llama" and src.config.num_hidden_layers == 4
    assert src.get("lm_head.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert "lm_head.weight" in src and "nope" not in src
    with pytest.raises(KeyError, match="nope"):
        src.get("nope")


def test_tokenizer_and_generation_config(llama_family):
    src = open_model(str(llama_family["base"]))
    tok = src.tokenizer()
    assert tok is src.tokenizer()  # cached
    assert tok.decode(tok("abc 12").input_ids, skip_special_tokens=True) == "abc 12"
    assert src.tokenizer_files_dir == llama_family["base"]
    assert (src.tokenizer_files_dir / "tokenizer.json").is_file()
    assert src.generation_config is not None and src.generation_config.eos_token_id == 2


def test_folder_without_tokenizer_gives_none(tmp_path):
    model = random_model(tiny_config("llama"))
    folder = save_model(model, None, tmp_path / "notok")
    src = open_model(str(folder))
    assert src.tokenizer() is None and src.tokenizer_files_dir is None


def test_sharded_bf16_folder(tmp_path):
    folder, model = _tiny(tmp_path, dtype=torch.bfloat16, shard="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    src = open_model(str(folder))
    assert sorted(src.keys()) == sorted(model.state_dict())
    for name, t in model.state_dict().items():
        assert src.dtype(name) == torch.bfloat16
        assert torch.equal(src.get(name), t)
    assert src.get("model.norm.weight", dtype=torch.float32).dtype == torch.float32


def test_a_weights_file_path_opens_its_folder(llama_family):
    src = open_model(str(llama_family["b"] / "model.safetensors"))
    assert src.path == llama_family["b"] and "model.embed_tokens.weight" in src


def test_legacy_bin_via_weights_only(tmp_path):
    folder, model = _tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    src = open_model(str(folder))
    assert isinstance(src, InMemorySource)
    for name, t in model.state_dict().items():
        assert torch.equal(src.get(name), t)
    got = src.get("model.norm.weight")
    got.add_(1.0)  # callers may modify what they get
    assert torch.equal(src.get("model.norm.weight"), model.state_dict()["model.norm.weight"])
    lm, tok = load_causal_lm(str(folder))
    ids = tok("12+3=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, model(ids).logits, atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_legacy_bin_with_pickled_objects_is_refused(tmp_path):
    folder, _ = _tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"w": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only"):
        open_model(str(folder))


def test_load_causal_lm_matches_the_saved_model(tmp_path):
    folder, model = _tiny(tmp_path, tie_embeddings=True)
    lm, tok = load_causal_lm(str(folder))
    assert not lm.training and lm.lm_head.weight is lm.model.embed_tokens.weight
    ids = tok("sort:dcba", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, model(ids).logits, atol=1e-6)
    lm16, _ = load_causal_lm(str(folder), dtype=torch.bfloat16)
    assert lm16.model.norm.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------ GGUF

@pytest.fixture(scope="module")
def gguf_source(smollm2_gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    return open_model(str(folder))  # a folder holding exactly one .gguf


def test_gguf_names_and_shapes_without_dequantizing(gguf_source):
    src = gguf_source
    assert isinstance(src, GGUFSource)
    cfg = src.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    keys = src.keys()
    assert len(keys) == 2 + 9 * 30  # embed, final norm, 9 tensors a layer; tied lm_head not listed
    assert "lm_head.weight" not in keys
    assert src.shape("model.embed_tokens.weight") == (49152, 576)
    assert src.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert src.dtype("model.layers.5.mlp.down_proj.weight") == torch.float32
    assert src.tokenizer_files_dir is None and src.generation_config is None


def test_gguf_weights_tokenizer_and_a_sensible_model(gguf_source):
    src = gguf_source
    emb = src.get("model.embed_tokens.weight")
    assert emb.shape == (49152, 576) and torch.isfinite(emb).all() and emb.std() > 0.01
    norm = src.get("model.norm.weight", dtype=torch.bfloat16)
    assert norm.dtype == torch.bfloat16 and norm.shape == (576,)
    tok = src.tokenizer()
    assert len(tok) == 49152
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).strip() == text
    lm, _ = load_causal_lm(src)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert lm.model.embed_tokens.weight.data_ptr() != src.state_dict()["model.embed_tokens.weight"].data_ptr()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = lm(ids, labels=ids).loss.item()
    # dequantized correctly, the model predicts English far better than chance (ln 49152 = 10.8)
    assert loss < 4.0


# ------------------------------------------------------------------ errors

def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_model(str(tmp_path / "nothing-here"))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    with pytest.raises(ModelLoadError, match="holds no model weights") as e:
        open_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_folder_without_config(tmp_path):
    folder, _ = _tiny(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        open_model(str(folder))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    folder, _ = _tiny(tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00\x01not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="safetensors") as e:
        open_model(str(folder))
    assert "model.safetensors" in str(e.value)


def test_missing_shard(tmp_path):
    folder, _ = _tiny(tmp_path, shard="40KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        open_model(str(folder))


def test_unsupported_file_kind(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a supported model file"):
        open_model(str(f))


def test_two_gguf_files_must_be_named(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        open_model(str(tmp_path))


def test_broken_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        open_model(str(f))


def test_remote_code_needs_trust(tmp_path):
    folder, _ = _tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code") as e:
        open_model(str(folder))
    assert str(folder) in str(e.value)


def test_lora_adapter_folder_is_named_as_such(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    with pytest.raises(ModelLoadError, match="adapter"):
        open_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="could not be reached") as e:
        open_model("evomerge-test/no-such-model-42")
    msg = str(e.value)
    assert "evomerge-test/no-such-model-42" in msg and "local folder" in msg


# ------------------------------------------------------------------ check_mergeable

@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    out = {}
    out["llama"], _ = _tiny(root, "llama")
    out["llama2"], _ = _tiny(root, "llama2", seed=1)
    out["qwen"], _ = _tiny(root, "qwen", family="qwen2")
    out["wide"], _ = _tiny(root, "wide", hidden=128)
    out["deep"], _ = _tiny(root, "deep", num_layers=6)
    out["mlp"], _ = _tiny(root, "mlp", intermediate=96)
    out["vocab"], _ = _tiny(root, "vocab", vocab_size=80)
    return {k: open_model(str(v)) for k, v in out.items()}


def _pair(variants, a, b):
    return {a: variants[a], b: variants[b]}


def test_mergeable_same_architecture(variants):
    check_mergeable(_pair(variants, "llama", "llama2"), same_layers=True)


def test_different_architecture_names_both(variants):
    with pytest.raises(ModelLoadError, match="different architectures") as e:
        check_mergeable(_pair(variants, "llama", "qwen"))
    assert "'llama'" in str(e.value) and "'qwen'" in str(e.value) and "qwen2" in str(e.value)


def test_different_hidden_size(variants):
    with pytest.raises(ModelLoadError, match=r"hidden sizes \(64 vs 128\)"):
        check_mergeable(_pair(variants, "llama", "wide"))


def test_layer_counts_only_when_asked(variants):
    check_mergeable(_pair(variants, "llama", "deep"))  # slices may take different ranges
    with pytest.raises(ModelLoadError, match=r"layer counts \(4 vs 6\)"):
        check_mergeable(_pair(variants, "llama", "deep"), same_layers=True)


def test_other_shape_difference_names_the_tensor(variants):
    with pytest.raises(ModelLoadError, match=r"shape of 'model\.layers\.0\.mlp\.\w+_proj\.weight'") as e:
        check_mergeable(_pair(variants, "llama", "mlp"))
    assert re.search(r"\((64, 128|128, 64)\) vs \((64, 96|96, 64)\)", str(e.value))


def test_vocab_difference_is_the_vocab_case(variants):
    check_mergeable(_pair(variants, "llama", "vocab"))  # handled by the embedding policy
    with pytest.raises(ModelLoadError, match="different vocabularies") as e:
        check_mergeable(_pair(variants, "llama", "vocab"), allow_vocab_mismatch=False)
    assert "keep_target" in str(e.value) and "80" in str(e.value)
