"""`evomerge validate`: exactly the preflight a run makes before it writes anything (see
evomerge/workflow/preflight.py): schema, model configs and compatibility, method parameters and ranges, the
genome, every task's data and splits, recipes, budget; no weights loaded."""

from __future__ import annotations

from pathlib import Path

from evomerge.config import load_search_space
from evomerge.workflow.preflight import Preflight, preflight


def check_space(path: str | Path) -> Preflight:
    """Parse the search space at `path` and run the preflight on it; one-line errors naming file and key."""
    config, _ = load_search_space(path)
    return preflight(config, str(path), Path(path).resolve().parent)


def validate_space(path: str | Path) -> str:
    """Raise on the first problem; return the readable summary (several lines)."""
    return check_space(path).summary()
