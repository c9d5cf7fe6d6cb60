"""Materialize a recipe into a Hugging Face model folder: sharded safetensors, config, tokenizer, model card.

Everything is written to a temporary sibling folder that is renamed at the end, so a failure leaves no
half-written output behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, EvomergeError, ModelLoadError
from evomerge.merge.plan import output_config
from evomerge.models.sources import WeightSource, open_model
from evomerge.recipe import Recipe, expand_chat_template


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
        tmp.chmod(0o755)  # mkdtemp makes 0700: the model folder is for whoever can read its parent
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
    # Open and plan everything (the tokenizer asked for and the chat template too) before creating any output folder.
    asked = _open_tokenizer_source(recipe, recipe_source, trust_remote_code)
    session = MergeSession.open(recipe, device=device, source=recipe_source, trust_remote_code=trust_remote_code,
                                sources=asked)
    try:
        template = chat_template(recipe, session.source)
        _write_folder(recipe, session, out_dir, out_dtype, shard_size, copy_tokenizer, overwrite, progress, template)
    except EvomergeError as exc:
        raise exc.located(recipe_source) from None
    return out_dir


def tokenizer_ref(recipe: Recipe) -> str | None:
    """The model whose tokenizer the recipe asks for with `tokenizer_source` ('base': the base model), else None."""
    if not recipe.tokenizer_source:
        return None
    if recipe.tokenizer_source == "base":
        return recipe.base_model or recipe.target_model()
    return recipe.tokenizer_source


def _open_tokenizer_source(recipe: Recipe, source: str, trust_remote_code: bool) -> dict[str, WeightSource]:
    """The `tokenizer_source` model, opened; a missing model or one without tokenizer files is a one-line error.

    mergekit fails then too (its tokenizer step cannot load the tokenizer); without the check the merge would
    be written with no tokenizer at all.
    """
    ref = tokenizer_ref(recipe)
    if ref is None:
        return {}
    try:
        src = open_model(ref, trust_remote_code=trust_remote_code)
    except EvomergeError as exc:
        raise ConfigError(f"the tokenizer's model cannot be opened: {exc.detail}", file=source,
                          key="tokenizer_source", allowed="base, or a model with tokenizer files") from None
    if src.tokenizer() is None:
        raise ConfigError(f"model '{ref}' has no tokenizer files, so the merge would have no tokenizer",
                          file=source, key="tokenizer_source",
                          allowed="base, or a model with tokenizer files (tokenizer.json, tokenizer.model, ...)")
    return {ref: src}


def chat_template(recipe: Recipe, source_of: Callable[[str], WeightSource]) -> str | None:
    """The chat template text to write, as mergekit 0.1.5 chooses it (see `recipe.expand_chat_template`);
    'auto': the template most of the recipe's models' tokenizers carry (none: keep the tokenizer's own)."""
    value = expand_chat_template(recipe.chat_template)
    if value != "auto":
        return value
    templates = []
    for ref in recipe.referenced_models():
        tok = source_of(ref).tokenizer()
        template = getattr(tok, "chat_template", None) if tok is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None


def _write_folder(recipe, session, out_dir, out_dtype, shard_size, copy_tokenizer, overwrite, progress,
                  template) -> None:
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
            tok = session.source(tokenizer_ref(recipe) or plan.target).tokenizer()
            if tok is not None:
                if template is not None:  # on a copy: the source's tokenizer may be shared (a search's target)
                    tok = copy.deepcopy(tok)
                    tok.chat_template = template
                tok.save_pretrained(tmp)
        recipe.save(tmp / "evomerge_recipe.yaml")
        (tmp / "README.md").write_text(model_card(recipe, files))
