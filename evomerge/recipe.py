"""Recipe: one merge, in mergekit's YAML shape (so `mergekit-yaml recipe.yaml out` accepts what we write).

Parameter settings follow mergekit: a scalar, a gradient list (interpolated over a slice's layers), or a
list of `{filter, value}` conditions where the first filter found in the tensor name wins. evomerge's own
options (DARE seed, embedding policy for different vocabularies) live under the `evomerge:` key, which
mergekit ignores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.dtypes import DTYPES
from evomerge.envvars import expand
from evomerge.errors import ConfigError
from evomerge.yamlio import load_mapping, validate

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = Union[Conditional, list[Conditional], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:  # [k, k] is an empty slice (mergekit uses it to pick embed/norm sources)
            raise ValueError(f"layer_range must be [start, end) with 0 <= start <= end, got {list(v)}")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        return self


TokenRef = Union[int, str]


class TokenRows(BaseModel):
    """Rows of embed_tokens / lm_head taken from one model after the merge: the special-token map of the Chat
    Vector paper's code (a chat model's `<|eot_id|>` rows, say, put into a target that never learned them).

    `tokens`: (target token, `model`'s token) pairs; each is a token string looked up in that model's
    tokenizer, or an integer row id. Given as a mapping, a list of pairs, or a list of tokens (the same token
    in both); kept as pairs so integer ids stay integers in YAML and JSON."""

    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[tuple[TokenRef, TokenRef]]

    @field_validator("tokens", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return list(v.items())
        if isinstance(v, list):
            return [t if isinstance(t, (list, tuple)) else (t, t) for t in v]
        return v

    @field_validator("tokens")
    @classmethod
    def _some(cls, v: list[tuple[TokenRef, TokenRef]]) -> list[tuple[TokenRef, TokenRef]]:
        if not v:
            raise ValueError("name at least one token")
        return v


class EvomergeOptions(BaseModel):
    """evomerge's extensions; mergekit ignores this key."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(default=None, description="seeds DARE/DELLA masks per tensor so a recipe reproduces")
    embeddings: Literal["merge", "keep_target", "align"] = Field(
        default="merge",
        description="embed_tokens/lm_head: merge as usual (vocabularies must match), keep the target's rows, "
        "or align rows by token string into the target's vocabulary",
    )
    target_model: str | None = Field(
        default=None, description="model whose config, tokenizer and (kept) embeddings the output takes"
    )
    token_rows: TokenRows | None = Field(
        default=None, description="embed_tokens / lm_head rows copied from one model after the merge "
        "(the Chat Vector special-token map); mergekit does not apply them"
    )


class Recipe(BaseModel):
    """A mergekit merge configuration (the subset evomerge reads and writes) plus evomerge options."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    evomerge: EvomergeOptions | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Recipe":
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        return self

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        expand_chat_template(v)  # an unknown name that is not a Jinja template fails here, naming the key
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}' (allowed: {', '.join(DTYPES)})")
        return v

    # -- convenience -----------------------------------------------------------------------------
    @property
    def options(self) -> EvomergeOptions:
        return self.evomerge or EvomergeOptions()

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, in first-mention order."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                refs.append(s.base_model)
            refs.extend(src.model for src in s.sources)
        if self.evomerge and self.evomerge.target_model:
            refs.append(self.evomerge.target_model)
        if self.evomerge and self.evomerge.token_rows:
            refs.append(self.evomerge.token_rows.model)
        return list(dict.fromkeys(refs))

    def target_model(self) -> str:
        """The model whose architecture config and tokenizer the output uses."""
        if self.evomerge and self.evomerge.target_model:
            return self.evomerge.target_model
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            return self.tokenizer_source
        if self.base_model:
            return self.base_model
        if self.models:
            return self.models[0].model
        return self.slices[0].sources[0].model  # type: ignore[index]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<recipe>") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a YAML mapping", file=source)
        return validate(cls, data, source=source)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<recipe>") -> "Recipe":
        return cls.from_dict(load_mapping(text, source=source, what="a recipe"), source=source)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("recipe file not found", file=str(path))
        return cls.from_yaml(path.read_text(), source=str(path)).expand_refs()

    def expand_refs(self) -> "Recipe":
        """`${VAR}` and `~` in model references expanded (hand-written recipes may point at $EVOMERGE_ZOO)."""
        def fix(ref: str | None) -> str | None:
            return expand(ref) if ref else ref

        data = self.model_dump()
        data["base_model"] = fix(data["base_model"])
        for m in data.get("models") or []:
            m["model"] = fix(m["model"])
        for sl in data.get("slices") or []:
            sl["base_model"] = fix(sl.get("base_model"))
            for src in sl["sources"]:
                src["model"] = fix(src["model"])
        if data.get("tokenizer_source") not in (None, "base", "union"):
            data["tokenizer_source"] = fix(data["tokenizer_source"])
        if data.get("evomerge"):
            data["evomerge"]["target_model"] = fix(data["evomerge"].get("target_model"))
        return type(self).model_validate(data)



CHAT_TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"
"""mergekit 0.1.5's named chat templates (``mergekit/_data/chat_templates``), copied verbatim."""


def chat_template_names() -> list[str]:
    return sorted(p.stem for p in CHAT_TEMPLATE_DIR.glob("*.jinja"))


def expand_chat_template(value: str | None) -> str | None:
    """The Jinja text a recipe's `chat_template` stands for, read as mergekit 0.1.5 reads it.

    None or empty: no template. 'auto': returned as is (the plurality template of the models' tokenizers,
    chosen when the tokenizers are open). A short single-line value without '{' naming one of mergekit's
    templates (chatml, llama3, ...): that template's text. Otherwise a value shorter than 20 characters or
    without '{' is an unknown name (ValueError); anything else is a Jinja template, used verbatim.
    """
    if not value or value == "auto":
        return value or None
    if len(value) < 256 and "\n" not in value and "{" not in value and "/" not in value and "\\" not in value:
        path = CHAT_TEMPLATE_DIR / f"{value}.jinja"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"unknown chat template '{value}': not one of mergekit's names "
                         f"({', '.join(chat_template_names())}, auto) and not a Jinja template")
    return value


class _RecipeDumper(yaml.SafeDumper):
    """Numeric lists (gradients, layer ranges) in flow style, like mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any] | tuple[Any, ...]) -> yaml.SequenceNode:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)


def evaluate_setting(tensor_name: str, setting: Any, t: float) -> Any:
    """Resolve a parameter setting for one tensor at gradient position t, as mergekit does.

    Numeric lists interpolate linearly at t*(n-1); non-numeric lists pick element int(t*(n-1));
    condition lists return the first whose filter is None, '*' or a substring of the tensor name.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Conditional):
                cond = Conditional.model_validate(cond)
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t)
        return None
    raise ConfigError(f"unexpected parameter setting {setting!r}")
