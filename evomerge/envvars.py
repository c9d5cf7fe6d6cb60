"""`${VAR}` and `~` in paths of search spaces and recipes: the one expander, and the variables a text uses.

`${EVOMERGE_ZOO}` defaults to the demo zoo's cache folder, so the demo's presets work as written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def demo_zoo() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", "~/.cache/evomerge")).expanduser() / "zoo"


def expand(ref: str) -> str:
    """`ref` with `${VAR}`/`$VAR` and `~` expanded (unknown variables are left as written)."""
    if "EVOMERGE_ZOO" not in os.environ:
        zoo = str(demo_zoo())
        ref = ref.replace("${EVOMERGE_ZOO}", zoo).replace("$EVOMERGE_ZOO", zoo)
    return os.path.expanduser(os.path.expandvars(ref))


def referenced(text: str) -> dict[str, str]:
    """Environment variables `text` refers to, with their values now (recorded so a resume expands alike)."""
    names = [n for pair in _VAR.findall(text) for n in pair if n]
    return {n: os.environ[n] for n in names if n in os.environ}
