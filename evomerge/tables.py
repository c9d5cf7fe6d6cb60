"""Markdown tables, in one place: the held-out table, the report's tables."""

from __future__ import annotations

import math
from typing import Any, Sequence


def fmt(v: Any) -> str:
    """A cell: 4 significant digits for floats, '-' for missing, lists joined with ' / '."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return " / ".join(fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rows_table(rows: Sequence[dict[str, Any]], *, first: str = "name", title: str = "model") -> str:
    """A table of dict rows: `first` as the first column (headed `title`), then every other key in order."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k != first and k not in cols:
                cols.append(k)
    return markdown_table([title] + cols, [[r.get(first, "")] + [r.get(c) for c in cols] for r in rows])
