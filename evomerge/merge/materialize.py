"""Materialize a recipe into a Hugging Face model folder: sharded safetensors, config, tokenizer, model card.

Everything is written to a temporary sibling folder that is renamed at the end, so a failure leaves no
half-written output behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, EvomergeError, ModelLoadError
from evomerge.merge.plan import output_config
from evomerge.recipe import Recipe


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to `out_dir`; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError("output folder already exists (pass --overwrite to replace it)", file=str(out_dir))
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"cannot write the output folder: {exc.strerror}", file=str(out_dir)) from None
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _memory_base(tensor: torch.Tensor) -> int:
    """Address of the start of the memory a tensor views (equal for views of one buffer)."""
    return tensor.data_ptr() - int(tensor.storage_offset()) * tensor.element_size()


class ShardWriter:
    """Collects tensors and writes HF-style shards `model-0000i-of-0000n.safetensors` plus the index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0
        self._ptrs: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if _memory_base(tensor) in self._ptrs:  # a layer used twice: safetensors wants own memory
            tensor = tensor.clone()
        self._ptrs.add(_memory_base(tensor))
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.current, str(self.folder / f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0
        self._ptrs = set()

    def close(self) -> list[str]:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / "shard-00000.tmp").rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / fname)
            files.append(fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files


def model_card(recipe: Recipe, files: list[str]) -> str:
    models = "\n".join(f"- `{m}`" for m in recipe.referenced_models())
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n- mergekit\n---\n\n"
        "# Merged model\n\n"
        f"Made with evomerge (evolutionary merge-recipe search) using the **{recipe.merge_method}** method.\n\n"
        f"## Source models\n\n{models}\n\n"
        "## Recipe\n\nThis YAML reproduces the merge with `evomerge merge` or `mergekit-yaml`:\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n\n"
        f"Weights: {', '.join(files)}\n"
    )


def materialize(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: str | int = "5GB",
    copy_tokenizer: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    recipe_source: str = "<recipe>",
    trust_remote_code: bool = False,
) -> Path:
    """Merge `recipe` and write a Hugging Face folder at `out_dir`; returns the folder."""
    from evomerge.merge.session import MergeSession

    out_dir = Path(out_dir)
    out_dtype = dtype or recipe.out_dtype or recipe.dtype
    if out_dtype is not None and out_dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{out_dtype}'", key="dtype", allowed=", ".join(DTYPES))
    if recipe.tokenizer_source == "union":
        raise ConfigError("tokenizer_source 'union' is not supported by evomerge", file=recipe_source,
                          key="tokenizer_source", allowed="base or a model name")
    # Open and plan everything before creating any output folder.
    session = MergeSession.open(recipe, device=device, source=recipe_source, trust_remote_code=trust_remote_code)
    try:
        _write_folder(recipe, session, out_dir, out_dtype, shard_size, copy_tokenizer, overwrite, progress)
    except EvomergeError as exc:
        raise exc.located(recipe_source) from None
    return out_dir


def _write_folder(recipe, session, out_dir, out_dtype, shard_size, copy_tokenizer, overwrite, progress) -> None:
    plan = session.plan
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, parse_size(shard_size))
        first_dtype = None
        for name, tensor in session.iter_merged(progress=progress, description=f"merging into {out_dir.name}"):
            if out_dtype is not None:
                tensor = tensor.to(DTYPES[out_dtype])
            first_dtype = first_dtype or str(tensor.dtype).removeprefix("torch.")
            if not torch.isfinite(tensor).all():
                raise ModelLoadError(f"merged tensor {name} has NaN or inf values; check the recipe's parameters")
            writer.add(name, tensor)
        files = writer.close()
        cfg = output_config(plan, session.sources, out_dtype or first_dtype or "float32")
        cfg.save_pretrained(tmp)
        target = session.sources[plan.target]
        gen_cfg = getattr(target, "generation_config", None)
        if gen_cfg is not None:
            gen_cfg.save_pretrained(tmp)
        if copy_tokenizer:
            tokenizer_ref = plan.target
            if recipe.tokenizer_source == "base" and recipe.base_model:
                tokenizer_ref = recipe.base_model
            elif recipe.tokenizer_source:
                tokenizer_ref = recipe.tokenizer_source
            tok = session.source(tokenizer_ref).tokenizer()
            if tok is not None:
                if recipe.chat_template:
                    tok.chat_template = recipe.chat_template
                tok.save_pretrained(tmp)
        recipe.save(tmp / "evomerge_recipe.yaml")
        (tmp / "README.md").write_text(model_card(recipe, files))
