"""Seeded, category-stratified search / selection / held-out subsets that never overlap.

Each category's items are shuffled with the task seed; the search split takes from the front of each
category's order, the selection split (optional: re-scores the best candidates to pick the exported one)
the next items, and the held-out split (the report's, touched once) from the back, so the three are
disjoint by construction.
Allocation of a total over categories is proportional to category size (largest remainder).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence, TypeVar

from evomerge.errors import DataError

T = TypeVar("T")


def _proportional(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Split `total` over categories proportionally to `sizes` (capped by them), largest remainder first."""
    avail = sum(sizes.values())
    raw = {c: total * s / avail if avail else 0 for c, s in sizes.items()}
    alloc = {c: min(int(r), sizes[c]) for c, r in raw.items()}
    left = total - sum(alloc.values())
    order = sorted(sizes, key=lambda c: (-(raw[c] - int(raw[c])), c))
    while left > 0:
        progressed = False
        for c in order:
            if left and alloc[c] < sizes[c]:
                alloc[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def make_splits(items: Sequence[T], *, seed: int = 0, n_search: int | None = None, n_heldout: int | None = None,
                per_category: int | None = None, source: str = "", category=lambda it: it.category,
                n_selection: int | None = None) -> dict[str, list[T]]:
    """{"search": [...], "selection": [...], "heldout": [...], "all": [...]} for `items`.

    search: `per_category` from each category, else `n_search` stratified, else everything not held out.
    heldout: `n_heldout` stratified over what is left, else `per_category` per category (as available),
    else everything left when search was bounded, else empty.
    """
    groups: dict[str, list[T]] = defaultdict(list)
    for it in items:
        groups[category(it)].append(it)
    cats = sorted(groups)
    rng = random.Random(seed)
    for c in cats:
        rng.shuffle(groups[c])
    sizes = {c: len(groups[c]) for c in cats}

    if per_category is not None:
        small = [c for c in cats if sizes[c] < per_category]
        if small:
            raise DataError(f"per_category={per_category} but category '{small[0]}' has only {sizes[small[0]]} items",
                            file=source, key="per_category", allowed=f"at most {min(sizes.values())}")
        n_s = {c: per_category for c in cats}
    elif n_search is not None:
        if n_search > len(items):
            raise DataError(f"n_search={n_search} is larger than the data ({len(items)} items)", file=source,
                            key="n_search", allowed=f"1..{len(items)}")
        n_s = _proportional(n_search, sizes)
    else:
        n_s = None

    rest = {c: sizes[c] - (n_s[c] if n_s else 0) for c in cats}
    if n_heldout is not None:
        if n_s is None:
            if n_heldout >= len(items):
                raise DataError(f"n_heldout={n_heldout} leaves no items for the search split ({len(items)} items)",
                                file=source, key="n_heldout", allowed=f"1..{len(items) - 1}")
        elif n_heldout > sum(rest.values()):
            raise DataError(f"n_heldout={n_heldout} is larger than the {sum(rest.values())} items left after the "
                            f"search split ({len(items)} items in all)", file=source, key="n_heldout",
                            allowed=f"1..{sum(rest.values())}")
        n_h = _proportional(n_heldout, rest)
    elif n_s is None:
        n_h = {c: 0 for c in cats}
    elif per_category is not None and n_search is None:
        n_h = {c: min(per_category, rest[c]) for c in cats}
    else:
        n_h = dict(rest)
    if n_s is None:
        n_s = {c: sizes[c] - n_h[c] for c in cats}

    free = {c: sizes[c] - n_s[c] - n_h[c] for c in cats}
    if n_selection is not None and n_selection > sum(free.values()):
        raise DataError(f"n_selection={n_selection} is larger than the {sum(free.values())} items left after the "
                        "search and held-out splits", file=source, key="n_selection",
                        allowed=f"1..{sum(free.values())}" if sum(free.values()) else "fewer search or held-out items")
    n_sel = _proportional(n_selection, free) if n_selection else {c: 0 for c in cats}
    search = [it for c in cats for it in groups[c][: n_s[c]]]
    selection = [it for c in cats for it in groups[c][n_s[c]: n_s[c] + n_sel[c]]]
    heldout = [it for c in cats for it in groups[c][sizes[c] - n_h[c]:]]
    return {"search": search, "selection": selection, "heldout": heldout, "all": list(items)}
