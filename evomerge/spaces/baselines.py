"""Hand-made merges to beat: uniform recipes (one value for every layer and model) whose best setting is
chosen on the search split, exactly as a person tuning a mergekit YAML by hand would."""

from __future__ import annotations

from typing import Any

from evomerge.config import SearchConfig
from evomerge.recipe import Recipe

TIES_GRID = [(w, d) for w in (0.5, 1.0) for d in (0.3, 0.5, 0.7, 1.0)]
TA_GRID = (0.25, 0.5, 0.75, 1.0)
SLERP_GRID = (0.25, 0.5, 0.75)


def uniform_baselines(space: SearchConfig, refs: dict[str, str]) -> dict[str, list[Recipe]]:
    """label -> candidate recipes (the best on the search split is reported on the held-out split)."""
    common: dict[str, Any] = {"dtype": space.dtype, "evomerge": {"seed": space.seed, "embeddings": space.embeddings}}
    base = space.base_model
    if space.chat_vector:
        cv = space.chat_vector
        assert base is not None  # SearchConfig requires base_model with chat_vector
        target = {"target_model": refs[cv.target]}
        return {"chat vector, uniform λ": [Recipe.from_dict({
            "merge_method": "task_arithmetic", "base_model": refs[base],
            "models": [{"model": refs[cv.target], "parameters": {"weight": 1.0}},
                       {"model": refs[cv.chat], "parameters": {"weight": lam}}],
            **common, "evomerge": common["evomerge"] | target}) for lam in TA_GRID]}
    members = [m for m in space.models if m != base]
    if not base or not members:
        return {}
    if space.merge_method == "slerp":
        return {"slerp, uniform t": [Recipe.from_dict({
            "merge_method": "slerp", "base_model": refs[base],
            "models": [{"model": refs[base]}, {"model": refs[members[0]]}], "parameters": {"t": t}, **common})
            for t in SLERP_GRID]}
    n = len(members)
    out = {"average": [Recipe.from_dict({
        "merge_method": "linear", "models": [{"model": refs[m], "parameters": {"weight": 1.0 / n}} for m in members],
        **common})]}
    out["ties, uniform"] = [Recipe.from_dict({
        "merge_method": "ties", "base_model": refs[base],
        "models": [{"model": refs[m], "parameters": {"weight": w, "density": d}} for m in members], **common})
        for w, d in TIES_GRID]
    out["task arithmetic, uniform"] = [Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": refs[base],
        "models": [{"model": refs[m], "parameters": {"weight": w}} for m in members], **common})
        for w in TA_GRID]
    return out
