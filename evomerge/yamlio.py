"""Read YAML files into validated pydantic models; every failure is one ConfigError naming file and key."""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def load_mapping(text: str, *, source: str, what: str) -> dict[str, Any]:
    """Parse YAML text that must be a mapping (`what` names it in the error: 'a recipe', 'a search space')."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"malformed YAML{line}: {getattr(exc, 'problem', exc)}", file=source) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a YAML mapping", file=source)
    return data


def validate(model: type[M], data: dict[str, Any], *, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, source) from None


def validation_error(exc: ValidationError, source: str) -> ConfigError:
    """pydantic's first error as one line: file, dotted key, what is wrong."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[", "list[", "tuple[")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return ConfigError(msg, file=source, key=key or None)
