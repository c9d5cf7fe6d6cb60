"""Architecture layout from parameter names: which layer a tensor belongs to and what it is.

Robust name patterns instead of per-family tables, so Llama, Qwen2, Gemma, Mistral, GPT-2 style and
most other decoder-only models are understood without hard-coding any one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable


class ParamKind(str, Enum):
    EMBED = "embed"
    ATTN = "attn"
    MLP = "mlp"
    NORM = "norm"  # a norm inside a layer
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    OTHER = "other"


@dataclass(frozen=True)
class ParamInfo:
    name: str
    layer: int | None
    kind: ParamKind


# "<prefix>layers.N.<rest>" with the usual container names; the prefix is kept so renaming stays exact
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)\.(?P<rest>.+)$")
_NORM = re.compile(r"(norm|^ln_|_ln$|^ln\d*$|^ln_f$)", re.IGNORECASE)
_ATTN = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP = re.compile(r"(mlp|feed_forward|ffn|moe|experts|intermediate|(^|\.)fc\d|(^|\.)w[123](\.|$))", re.IGNORECASE)
_EMBED = re.compile(r"(embed_tokens|(^|\.)wte(\.|$)|word_embeddings|tok_embeddings|(^|\.)wpe(\.|$)|"
                    r"embed_positions|position_embeddings|(^|\.)embeddings?(\.|$)|token_embd)", re.IGNORECASE)
_HEAD = re.compile(r"(^|\.)(lm_head|output|embed_out)\.", re.IGNORECASE)


def _module_leaf(name: str) -> str:
    """The module name that owns a parameter: 'mlp.down_proj' for 'mlp.down_proj.weight'."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def _classify_in_layer(rest: str) -> ParamKind:
    if _NORM.search(_module_leaf(rest)):
        return ParamKind.NORM  # norms anywhere in a layer, q_norm/k_norm inside attention included
    if _ATTN.search(rest):
        return ParamKind.ATTN
    if _MLP.search(rest):
        return ParamKind.MLP
    return ParamKind.OTHER


def _classify_outside(name: str) -> ParamKind:
    if _HEAD.search(name):
        return ParamKind.LM_HEAD
    if _EMBED.search(name):
        return ParamKind.EMBED
    if _NORM.search(_module_leaf(name)):
        return ParamKind.FINAL_NORM
    return ParamKind.OTHER


class ModelLayout:
    """Per-parameter layer index and kind, plus what a merger needs to address layers."""

    def __init__(self, params: dict[str, ParamInfo], num_layers: int, layer_prefix: str | None, tied_embeddings: bool):
        self.params = params
        self.num_layers = num_layers
        self.layer_prefix = layer_prefix
        self.tied_embeddings = tied_embeddings
        self._by_layer: dict[int, list[str]] = {}
        for info in params.values():
            if info.layer is not None:
                self._by_layer.setdefault(info.layer, []).append(info.name)

    @classmethod
    def from_names(cls, names: Iterable[str], config=None) -> "ModelLayout":
        params: dict[str, ParamInfo] = {}
        prefixes: dict[str, int] = {}
        for name in names:
            m = _LAYER.match(name)
            if m:
                layer = int(m.group("index"))
                prefixes[m.group("prefix")] = prefixes.get(m.group("prefix"), 0) + 1
                params[name] = ParamInfo(name, layer, _classify_in_layer(m.group("rest")))
            else:
                params[name] = ParamInfo(name, None, _classify_outside(name))
        layers = [p.layer for p in params.values() if p.layer is not None]
        num_layers = max(layers) + 1 if layers else int(_cfg(config, "num_hidden_layers") or 0)
        layer_prefix = max(prefixes, key=prefixes.__getitem__) if prefixes else None
        has_head = any(p.kind is ParamKind.LM_HEAD for p in params.values())
        tied = bool(_cfg(config, "tie_word_embeddings")) or not has_head
        return cls(params, num_layers, layer_prefix, tied)

    @classmethod
    def from_source(cls, source) -> "ModelLayout":
        return cls.from_names(source.keys(), getattr(source, "config", None))

    def __repr__(self) -> str:
        return (f"ModelLayout({len(self.params)} params, {self.num_layers} layers, prefix={self.layer_prefix!r}, "
                f"tied={self.tied_embeddings})")

    def info(self, name: str) -> ParamInfo:
        info = self.params.get(name)
        if info is None:  # a name this model does not store (e.g. a tied lm_head): classify it anyway
            return ModelLayout.from_names([name]).params[name]
        return info

    def layer_of(self, name: str) -> int | None:
        return self.info(name).layer

    def kind_of(self, name: str) -> ParamKind:
        return self.info(name).kind

    def names_in_layer(self, i: int) -> list[str]:
        return list(self._by_layer.get(i, []))

    def non_layer_names(self) -> list[str]:
        return [n for n, p in self.params.items() if p.layer is None]

    def names_of_kind(self, kind: ParamKind) -> list[str]:
        return [n for n, p in self.params.items() if p.kind is kind]

    def rename_layer(self, name: str, new_index: int) -> str:
        """The same parameter in layer `new_index` ('model.layers.3.mlp.down_proj.weight', 7 -> '...layers.7...')."""
        m = _LAYER.match(name)
        if not m:
            raise ValueError(f"'{name}' is not a per-layer parameter")
        return f"{m.group('prefix')}{int(new_index)}.{m.group('rest')}"


def _cfg(config, key: str):
    if config is None:
        return None
    v = getattr(config, key, None)
    if v is None and getattr(config, "text_config", None) is not None:
        v = getattr(config.text_config, key, None)
    return v
