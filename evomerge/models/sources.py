"""A uniform, lazy view of a model's weights, whatever it was saved as.

Merging reads one tensor at a time (safetensors `safe_open`), so a model never has to fit in memory
as a whole; only GGUF and legacy `.bin` files, which cannot be read that way, are held in memory.
Every failure a user can cause is raised as `ModelLoadError` naming the ref or path.
"""
from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import SAFETENSORS_DTYPES
from evomerge.errors import ModelLoadError
from evomerge.yamlio import read_text

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken",
                "merges.txt", "vocab.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class WeightSource(ABC):
    """One model's tensors by name, read lazily; plus its config, tokenizer and generation config."""

    kind: str = "?"

    def __init__(self, ref: str, path: Path, *, trust_remote_code: bool = False):
        self.ref = ref
        self.path = path
        self.trust_remote_code = trust_remote_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ref!r})"

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    @abstractmethod
    def _index(self) -> dict[str, Any]:
        """name -> whatever the subclass needs to find the tensor."""

    @property
    @abstractmethod
    def config(self):
        """The transformers `PretrainedConfig`."""

    def keys(self) -> list[str]:
        return list(self._index)

    @abstractmethod
    def shape(self, name: str) -> torch.Size: ...

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """The stored tensor, on the CPU, a tensor the caller may modify."""

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, cast and moved; KeyError if the model has no such tensor."""
        if name not in self._index:
            raise KeyError(f"{self.ref}: no tensor '{name}'")
        t = self._read(name)
        device = torch.device(device)
        if device.type != "cpu":
            t = t.to(device, non_blocking=True)  # cast on the device: faster than on the host
        return t if dtype is None else t.to(dtype)

    @abstractmethod
    def tokenizer(self):
        """The model's tokenizer, or None when the model comes without one."""

    @property
    def tokenizer_files_dir(self) -> Path | None:
        """A folder whose tokenizer files can be copied next to a merged model, or None."""
        return None

    @property
    def generation_config(self):
        return None

    def num_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", 0) or 0)


# --------------------------------------------------------------------------- HF folders

class FolderSource(WeightSource):
    """An ordinary Hugging Face folder: config.json plus safetensors (single or sharded) or pytorch_model.bin."""

    def __init__(self, ref: str, path: Path, *, trust_remote_code: bool = False):
        super().__init__(ref, path, trust_remote_code=trust_remote_code)
        self._config = _load_config(path, ref, trust_remote_code)
        self._tok = None
        self._tok_loaded = False

    @property
    def config(self):
        return self._config

    def tokenizer(self):
        if not self._tok_loaded:
            has_files = self.tokenizer_files_dir is not None
            self._tok = _load_tokenizer(self.path, self.ref, self.trust_remote_code) if has_files else None
            self._tok_loaded = True
        return self._tok

    @property
    def tokenizer_files_dir(self) -> Path | None:
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else None

    @cached_property
    def generation_config(self):
        if not (self.path / "generation_config.json").is_file():
            return None
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(self.path)
        except Exception as exc:  # a broken generation config should not stop a merge
            log.warning("%s: ignoring unreadable generation_config.json (%s)", self.ref, exc)
            return None


class SafetensorsSource(FolderSource):
    kind = "safetensors"

    @property
    def standard_layout(self) -> bool:
        """Named as transformers expects, so `from_pretrained(folder)` finds the weights."""
        return (self.path / "model.safetensors").is_file() or (self.path / "model.safetensors.index.json").is_file()

    def __init__(self, ref: str, path: Path, files: list[Path], *, trust_remote_code: bool = False,
                 weight_map: dict[str, str] | None = None):
        super().__init__(ref, path, trust_remote_code=trust_remote_code)
        from safetensors import safe_open

        self._handles = {}
        self._meta: dict[str, tuple[str, torch.Size, torch.dtype]] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                names = list(h.keys())
                for n in names:
                    sl = h.get_slice(n)
                    dt = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise ModelLoadError(f"{f}: tensor '{n}' has unsupported dtype {sl.get_dtype()}")
                    if n in self._meta and self._meta[n][0] != f.name:
                        raise ModelLoadError(f"{path}: tensor '{n}' is stored twice ({self._meta[n][0]}, {f.name})")
                    self._meta[n] = (f.name, torch.Size(sl.get_shape()), dt)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{f}: not a readable safetensors file ({_short(exc)})") from None
            self._handles[f.name] = h
        if weight_map:
            missing = sorted(n for n in weight_map if n not in self._meta)
            if missing:
                raise ModelLoadError(f"{path}: the shard index lists {len(missing)} tensor(s) not found in the "
                                     f"shards, e.g. '{missing[0]}'")
        if not self._meta:
            raise ModelLoadError(f"{path}: the safetensors files hold no tensors")

    @property
    def _index(self):
        return self._meta

    def shape(self, name: str) -> torch.Size:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][2]

    def _read(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._meta[name][0]].get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"{self.path / self._meta[name][0]}: cannot read tensor '{name}' "
                                 f"({_short(exc)})") from None


class InMemorySource(FolderSource):
    """Tensors already in memory (legacy `.bin` checkpoints)."""

    kind = "pytorch_bin"

    def __init__(self, ref: str, path: Path, state_dict: dict[str, torch.Tensor], *, trust_remote_code: bool = False):
        super().__init__(ref, path, trust_remote_code=trust_remote_code)
        self._sd = state_dict

    @property
    def _index(self):
        return self._sd

    def shape(self, name: str) -> torch.Size:
        return self._sd[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def _read(self, name: str) -> torch.Tensor:
        return self._sd[name].clone()


def _bin_state_dict(path: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # pre-zip (legacy) serialization cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{f}: cannot be read as plain tensors with torch.load(weights_only=True) "
                                 f"({_short(exc)}); convert it to safetensors") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelLoadError(f"{f}: is not a state dict of tensors")
        sd.update(part)
    if not sd:
        raise ModelLoadError(f"{path}: the .bin checkpoint holds no tensors")
    return sd


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without tied duplicates (as save_pretrained writes it: a tied lm_head is left out)."""
    seen: set[int] = set()
    out = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[n] = t
    return out


# --------------------------------------------------------------------------- resolving a ref

def open_model(ref: str, *, trust_remote_code: bool = False, revision: str | None = None) -> WeightSource:
    """Open a local HF folder, a GGUF file (or a folder holding exactly one), or a hub id (downloaded when online)."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        if _looks_like_hub_id(ref):
            path = _snapshot(ref, revision, trust_remote_code)
        else:
            raise ModelLoadError(f"model path '{ref}' does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            from evomerge.models.gguf import GGUFSource

            return GGUFSource(ref, path, trust_remote_code=trust_remote_code)
        if suffix in (".safetensors", ".bin", ".json"):
            path = path.parent  # a file of an HF folder: open the folder
        else:
            raise ModelLoadError(f"'{ref}' is not a supported model file",
                                 allowed="a Hugging Face folder, a .gguf file, a hub id")
    return _open_folder(ref, path, trust_remote_code)


def _open_folder(ref: str, path: Path, trust_remote_code: bool) -> WeightSource:
    st_index = path / "model.safetensors.index.json"
    if st_index.is_file():
        weight_map = _read_index(st_index)
        files = _shard_files(path, st_index, weight_map)
        return SafetensorsSource(ref, path, files, trust_remote_code=trust_remote_code, weight_map=weight_map)
    if (path / "model.safetensors").is_file():
        return SafetensorsSource(ref, path, [path / "model.safetensors"], trust_remote_code=trust_remote_code)
    if (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"'{ref}' is a LoRA/PEFT adapter, not a full model; merge it into its base model first")
    others = sorted(p for p in path.glob("*.safetensors"))
    if others:
        return SafetensorsSource(ref, path, others, trust_remote_code=trust_remote_code)
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        weight_map = _read_index(bin_index)
        files = _shard_files(path, bin_index, weight_map)
        return InMemorySource(ref, path, _bin_state_dict(path, files), trust_remote_code=trust_remote_code)
    if (path / "pytorch_model.bin").is_file():
        return InMemorySource(ref, path, _bin_state_dict(path, [path / "pytorch_model.bin"]),
                              trust_remote_code=trust_remote_code)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        from evomerge.models.gguf import GGUFSource  # lazy: gguf imports this module

        return GGUFSource(ref, ggufs[0], trust_remote_code=trust_remote_code)
    if len(ggufs) > 1:
        raise ModelLoadError(f"'{ref}' holds {len(ggufs)} .gguf files; name one of them",
                             allowed=", ".join(p.name for p in ggufs))
    raise ModelLoadError(f"'{ref}' holds no model weights",
                         allowed="model.safetensors, model.safetensors.index.json + shards, pytorch_model.bin, "
                                 "one .gguf file")


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
        return weight_map
    except Exception:
        raise ModelLoadError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from None


def _shard_files(path: Path, index: Path, weight_map: dict[str, str]) -> list[Path]:
    files = [path / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    return files


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "~")) and \
        not ref.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))


def _snapshot(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """Download (or find in the HF cache) the safetensors, config and tokenizer files of a hub model."""
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(f"'{repo_id}' is not a local path, and the Hugging Face hub could not be reached "
                             f"for it ({_short(exc)}); give a local folder or .gguf file instead, "
                             "or go online") from None


def _load_config(path: Path, ref: str, trust_remote_code: bool):
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"'{ref}' has no config.json")
    text = read_text(cfg_file, what="model config", error=ModelLoadError)  # binary, not UTF-8, empty: one line
    try:
        raw = json.loads(text)
    except Exception as exc:
        raise ModelLoadError(f"not valid JSON ({_short(exc)})", file=str(cfg_file)) from None
    if not isinstance(raw, dict):
        raise ModelLoadError("a model config must be a JSON object", file=str(cfg_file))
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if not trust_remote_code and model_type not in CONFIG_MAPPING:
        if raw.get("auto_map"):
            raise ModelLoadError(f"'{ref}' needs its own Python code (model_type '{model_type}', auto_map in "
                                 "config.json); pass trust_remote_code=True (--trust-remote-code) if you trust it")
        raise ModelLoadError(f"{cfg_file}: model_type '{model_type}' is unknown to this transformers version")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"{cfg_file}: transformers cannot read it ({_short(exc)})") from None


def _load_tokenizer(path: Path, ref: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"'{ref}': cannot load its tokenizer ({_short(exc)})") from None


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
