"""Random-weight Llamas for the GPU rehearsal (benchmarks/gpu_rehearsal.py): a base and "experts" = base + small
Gaussian perturbations, written as ordinary Hugging Face folders (sharded bfloat16 safetensors + index, config,
tokenizer) without a hub.

Shapes: "1b" = Llama-3.2-1B (16 layers, hidden 2048, tied embeddings, 1.24B parameters), "8b" = Llama-3-8B
(32 layers, hidden 4096, 8.03B), both with Llama-3's 128,256-token vocabulary; the tokenizer is SmolLM2's (the only
real one offline: 49,152 tokens; ids above it decode to nothing). "tiny" = a 4-layer, 64-wide Llama with the
character tokenizer of evomerge.models.tiny.

Disk: an 8B model is 16 GB in bfloat16, so base + 3 experts + mergekit's output would not fit a 64 GB disk.
`shared` (a regex) names tensors the experts take unchanged from the base: they go into separate shards that the
experts' folders symlink to the base's files. A merge reads and writes every tensor all the same (the deltas of
the shared ones are zeros), so merge and evaluation times do not change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 4 * 2**30
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5),
}
SHARE_WHEN_SHORT = r"mlp\.|embed_tokens|lm_head"  # experts perturb attention and norms only when the disk is short


def tokenizer_for(size: str):
    if size == "tiny":
        from evomerge.models.tiny import char_tokenizer

        return char_tokenizer()
    from transformers import AutoTokenizer

    from evomerge.models.tiny import smollm2_gguf_path

    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def llama_config(size: str, tokenizer):
    from transformers import LlamaConfig

    shape = dict(SHAPES[size])
    shape.setdefault("vocab_size", len(tokenizer))
    eos = tokenizer.eos_token_id
    return LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                       pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def n_params(config) -> int:
    from evomerge.models.memory import param_shapes

    total = 0
    for shape in param_shapes(config).values():
        k = 1
        for d in shape:
            k *= int(d)
        total += k
    return total


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes: tied weights once (the first name)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape)
        if key not in seen:
            seen.add(key)
            out[name] = t.detach()
    return out


def _shards(names: list[str], state: dict[str, torch.Tensor], shared: re.Pattern | None) -> list[list[str]]:
    """Tensor names per shard (<= SHARD_BYTES each); shared and perturbed tensors never share a shard."""
    groups: list[list[str]] = []
    for is_shared in (False, True):
        cur: list[str] = []
        size = 0
        for n in names:
            if bool(shared and shared.search(n)) != is_shared:
                continue
            b = state[n].numel() * state[n].element_size()
            if cur and size + b > SHARD_BYTES:
                groups.append(cur)
                cur, size = [], 0
            cur.append(n)
            size += b
        if cur:
            groups.append(cur)
    return groups


def _write_folder(folder: Path, tensors_of, shards: list[list[str]], config, tokenizer,
                  link_from: Path | None, linked: set[int], total: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if link_from is not None and i in linked:
            os.symlink(link_from / fname, folder / fname)
        else:
            tensors = {n: tensors_of(n).to("cpu").contiguous() for n in names}
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        for n in names:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def write_family(root: str | Path, size: str, tokenizer, *, n_experts: int = 3, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cpu", seed: int = 0, scale: float = 0.02, shared: str | None = None
                 ) -> dict[str, Any]:
    """root/base and root/expert_1..n: random init (seeded) in `dtype` on `device`; expert k = base + N(0, (scale x
    the tensor's std)^2), per tensor from a generator seeded by (seed, k, tensor index). Returns the folders, the
    config, the parameter count and which tensors the experts share with the base."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    config = llama_config(size, tokenizer)
    config.dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.architectures = [type(model).__name__]  # mergekit picks its architecture table by this
    state = _unique_state(model)
    names = list(state)
    pattern = re.compile(shared) if shared else None
    shards = _shards(names, state, pattern)
    linked = {i for i, s in enumerate(shards) if pattern and all(pattern.search(n) for n in s)}
    folders = {"base": root / "base"}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    _write_folder(folders["base"], state.__getitem__, shards, config, tokenizer, None, set(), nbytes)
    index = {n: i for i, n in enumerate(names)}
    for k in range(1, n_experts + 1):
        gen = torch.Generator(device=device)

        def expert(name: str, k: int = k, gen: torch.Generator = gen) -> torch.Tensor:
            base = state[name]
            gen.manual_seed(seed * 100003 + k * 1009 + index[name])
            std = float(base.float().std()) if base.numel() > 1 else 1.0
            noise = torch.randn(base.shape, generator=gen, device=base.device, dtype=torch.float32)
            return (base.float() + noise * (scale * max(std, 1e-3))).to(dtype)

        folders[f"expert_{k}"] = root / f"expert_{k}"
        _write_folder(folders[f"expert_{k}"], expert, shards, config, tokenizer, folders["base"], linked, nbytes)
    perturbed = sum(state[n].numel() for n in names if not (pattern and pattern.search(n)))
    total = sum(t.numel() for t in state.values())
    del model
    state.clear()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"folders": folders, "config": config, "params": total, "perturbed_fraction": perturbed / total,
            "shared": shared}


def disk_plan(root: Path, params: int, n_experts: int, itemsize: int = 2) -> str | None:
    """None when base + experts + a mergekit output fit the free disk under root (10% margin), else the regex of
    tensors the experts should share with the base."""
    free = shutil.disk_usage(root).free
    need = params * itemsize * (n_experts + 2) * 1.1
    return None if need <= free else SHARE_WHEN_SHORT
