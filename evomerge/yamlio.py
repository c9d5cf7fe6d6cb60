"""Read text files and YAML into validated pydantic models; every failure is one ConfigError naming file and key.

`read_text` is the one reader for files a user hands us (search spaces, recipes, task files, config.json):
a missing, empty, binary or non-UTF-8 file is one line naming the file (and the key that points at it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError, EvomergeError

M = TypeVar("M", bound=BaseModel)


class KeyedValueError(ValueError):
    """A ValueError raised in a pydantic validator that knows its key (relative to the model it validates):
    `validation_error` names it, where pydantic would name only the model's own location."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def one_line(text: object, limit: int = 300) -> str:
    """`text` with its whitespace (newlines included) collapsed, cut to `limit` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_text(path: str | Path, *, what: str = "file", key: str | None = None,
              error: type[EvomergeError] = ConfigError, allow_empty: bool = False) -> str:
    """The UTF-8 text of a user's file (a leading BOM is dropped); `error` naming the file and `key` when it is
    missing, a folder, unreadable, binary, not UTF-8, or empty (blank) unless `allow_empty`."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found", file=str(path), key=key)
    if path.is_dir():
        raise error(f"{what} is a folder, not a file", file=str(path), key=key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read the {what}: {one_line(exc.strerror or exc)}", file=str(path), key=key) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise error(f"the {what} is binary, not text (a NUL byte at offset {nul})", file=str(path), key=key)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    "save it as UTF-8", file=str(path), key=key) from None
    if not allow_empty and not text.strip():
        raise error(f"the {what} is empty", file=str(path), key=key)
    return text


def load_mapping(text: str, *, source: str, what: str) -> dict[str, Any]:
    """Parse YAML text that must be a mapping (`what` names it in the error: 'a recipe', 'a search space')."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"malformed YAML{line}: {one_line(problem)}", file=source) from None
    if data is None:
        raise ConfigError(f"the file is empty; {what} must be a YAML mapping", file=source)
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a YAML mapping, not a {_yaml_type(data)}", file=source)
    return data


def _yaml_type(data: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), "value")


def validate(model: type[M], data: dict[str, Any], *, source: str, hints: dict[str, str] | None = None) -> M:
    """`model` from `data`; a ConfigError naming `source` and the key otherwise (`hints`: key -> why it is unknown)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, source, hints=hints) from None


_INTERNAL_LOC = ("function-", "union[", "list[", "tuple[", "dict[", "literal[", "nullable[")
_TYPE_LOC = {"float", "int", "bool", "str", "none"}


def validation_error(exc: ValidationError, source: str, *, key: str | None = None,
                     hints: dict[str, str] | None = None) -> ConfigError:
    """pydantic's first error as one line: file, dotted key (or `key` when pydantic gives none), what is wrong.

    `hints` maps a key's last part to a reason shown with "unknown key" (e.g. a removed option)."""
    errors = exc.errors()
    err = errors[0]
    dotted = _dotted(err)
    msg = one_line(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    union = [e for e in errors if _dotted(e) == dotted and len(e["loc"]) == len(err["loc"])]
    if err["type"] == "extra_forbidden":
        last = dotted.rpartition(".")[2]
        msg = f"unknown key ({hints[last]})" if hints and last in hints else "unknown key"
    elif len(union) > 1 and all(e["type"].endswith(("_type", "_parsing")) or e["type"] == "literal_error"
                                for e in union):
        kinds = list(dict.fromkeys(_member(e["loc"][-1]) for e in union))  # a value that fits no union member
        msg = f"{err['input']!r} is not valid here" if _short_input(err.get("input")) else "invalid value"
        msg += f" (expected {', '.join(kinds[:-1])} or {kinds[-1]})"
    elif err["type"] not in ("value_error", "assertion_error") and _short_input(err.get("input")):
        msg += f" (got {err['input']!r})"
    return ConfigError(msg, file=source, key=dotted or key)


def _dotted(err: Any) -> str:
    """The dotted key of a pydantic error, without pydantic's own location parts (union members, validators)."""
    parts = [str(p) for p in err["loc"]]
    while len(parts) > 1 and parts[-1] in _TYPE_LOC:  # the member of a union that failed: float, bool, ...
        parts.pop()
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedValueError):
        parts.append(cause.key)
    return ".".join(p for p in parts if not p.startswith(_INTERNAL_LOC))


def _member(loc: Any) -> str:
    """How to write a value of a union member named by pydantic's location part."""
    name = str(loc)
    simple = {"float": "a number", "int": "an integer", "bool": "true/false", "str": "a string", "none": "null"}
    if name in simple:
        return simple[name]
    if name.startswith("list["):
        return "a list"
    if name.startswith("literal["):
        return name.removeprefix("literal[").removesuffix("]")
    return "a mapping" if name[:1].isupper() or name.startswith(("function-", "model")) else name


def _short_input(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(repr(value)) <= 60
