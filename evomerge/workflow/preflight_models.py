"""Preflight of the models: each one's config.json (or GGUF header) read as `open_model` would find it, and the
checks `models.compat.check_mergeable` makes on tensor shapes, made on the configs that decide those shapes.
No weight file is opened."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError, ModelLoadError
from evomerge.models.sources import _load_config, _looks_like_hub_id
from evomerge.yamlio import one_line, read_text

# config keys that decide the shape of some tensor every layer has: models that differ in one cannot be merged
SHAPE_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelInfo:
    """What a model's config says (no weights read)."""

    name: str  # the space's short name (or the recipe's reference)
    ref: str  # a folder, a .gguf file or a hub id
    config_file: str  # the file the config came from
    model_type: str | None
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None
    config: Any = field(repr=False, compare=False, default=None)  # the transformers config


def read_model(name: str, ref: str, *, source: str, key: str | None = None) -> ModelInfo:
    """The config facts of one model; a one-line error naming `source` and `key` (default `models.NAME`)."""
    key = key or f"models.{name}"
    try:
        cfg, where = read_config(ref)
    except EvomergeError as exc:
        detail = f"{exc.file}: {exc.detail}" if exc.file else exc.detail
        raise ConfigError(detail, file=source, key=key, allowed=exc.allowed) from None
    layers = int(_attr(cfg, "num_hidden_layers") or 0)
    if layers < 1:
        raise ConfigError(f"{where}: the config gives no layer count (num_hidden_layers)", file=source, key=key)
    hidden, vocab = _attr(cfg, "hidden_size"), _attr(cfg, "vocab_size")
    return ModelInfo(name, ref, where, getattr(cfg, "model_type", None), layers,
                     int(hidden) if hidden is not None else None, int(vocab) if vocab is not None else None, cfg)


def read_config(ref: str) -> tuple[Any, str]:
    """(transformers config, the file it came from) of a folder, a .gguf file or a hub id (from the Hugging Face
    cache, else its config.json alone is fetched unless HF_HUB_OFFLINE is set). Resolution as `open_model`."""
    path = Path(ref).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(ref):
            raise ModelLoadError(f"model path '{ref}' does not exist")
        path = _hub_folder(ref)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return _gguf_config(ref, path)
        if suffix not in (".safetensors", ".bin", ".json"):
            raise ModelLoadError(f"'{ref}' is not a supported model file",
                                 allowed="a Hugging Face folder, a .gguf file, a hub id")
        path = path.parent
    ggufs = sorted(path.glob("*.gguf"))
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights and len(ggufs) == 1:
        return _gguf_config(ref, ggufs[0])
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"'{ref}' has no config.json" + (f" (and {len(ggufs)} .gguf files: name one)"
                                                              if len(ggufs) > 1 else ""))
    text = read_text(cfg_file, what="model config", error=ModelLoadError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = " (truncated?)" if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated") else ""
        raise ModelLoadError(f"not valid JSON{cut} (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                             file=str(cfg_file)) from None
    if not isinstance(raw, dict):
        raise ModelLoadError("a model config must be a JSON object", file=str(cfg_file))
    if not raw.get("model_type"):
        raise ModelLoadError("the config names no model_type", file=str(cfg_file), key="model_type")
    return _load_config(path, ref, False), str(cfg_file)


def _hub_folder(ref: str) -> Path:
    """The folder holding a hub model's config.json: the local Hugging Face cache, else the hub (config only)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelLoadError(f"'{ref}' is neither a local path nor in the Hugging Face cache, and HF_HUB_OFFLINE "
                             "is set; give a local folder or .gguf file, or go online")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, "config.json")).parent
    except Exception as exc:
        raise ModelLoadError(f"'{ref}' is not a local path, and its config.json could not be fetched from the "
                             f"Hugging Face hub ({one_line(exc, 200)}); give a local folder or .gguf file, or go "
                             "online") from None


def _gguf_config(ref: str, path: Path) -> tuple[Any, str]:
    """The config in a GGUF file's header (transformers parses the metadata; no tensor is dequantized)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read the GGUF file: {exc.strerror or exc}", file=str(path)) from None
    if not head:
        raise ModelLoadError("the GGUF file is empty", file=str(path))
    if head != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (it starts with {head!r}, not b'GGUF')", file=str(path))
    from evomerge.models.gguf import GGUFSource

    return GGUFSource(ref, path).config, str(path)


def _attr(cfg: Any, key: str) -> Any:
    v = getattr(cfg, key, None)
    if v is None and getattr(cfg, "text_config", None) is not None:
        v = getattr(cfg.text_config, key, None)
    return v


def check_compatible(models: dict[str, ModelInfo], *, same_layers: bool, embeddings: str, file: str,
                     embeddings_key: str = "embeddings") -> None:
    """check_mergeable's checks on configs: one architecture, one hidden size and per-layer shapes, the same layer
    count where the merge pairs layers one to one, one vocabulary unless an embedding policy handles it."""
    items = list(models.items())
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    for name, m in items[1:]:
        pair = f"'{ref_name}' and '{name}'"
        a_arch, b_arch = _attr(ref.config, "architectures"), _attr(m.config, "architectures")
        if ref.model_type != m.model_type or (a_arch and b_arch and list(a_arch) != list(b_arch)):
            raise ConfigError(f"{pair} have different architectures ({ref.model_type} {a_arch or ''} vs "
                              f"{m.model_type} {b_arch or ''})".replace(" )", ")"), file=file, key="models")
        if ref.hidden_size != m.hidden_size:
            raise ConfigError(f"{pair} have different hidden sizes ({ref.hidden_size} vs {m.hidden_size})",
                              file=file, key="models")
        for k in SHAPE_KEYS:
            a, b = _attr(ref.config, k), _attr(m.config, k)
            if a is not None and b is not None and a != b:
                raise ConfigError(f"{pair} have different {k} ({a} vs {b}): their layers differ in shape",
                                  file=file, key="models")
        if same_layers and ref.num_layers != m.num_layers:
            raise ConfigError(f"{pair} have different layer counts ({ref.num_layers} vs {m.num_layers}); "
                              "a parameter-space search pairs layers one to one (merge them with slices and "
                              "layer ranges instead)", file=file, key="models")
        if embeddings == "merge" and ref.vocab_size and m.vocab_size and ref.vocab_size != m.vocab_size:
            raise ConfigError(f"{pair} have different vocabularies ({ref.vocab_size} vs {m.vocab_size} tokens); "
                              "choose an embedding policy", file=file, key=embeddings_key, allowed="keep_target, align")
