"""Check a search space without loading weights: schema, method parameters and ranges, tasks, local paths."""

from __future__ import annotations

from pathlib import Path

from evomerge.config import load_search_space
from evomerge.errors import ConfigError


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".gguf")


def validate_space(path: str | Path) -> str:
    """Raise ConfigError on the first problem; return a one-line summary."""
    from evomerge.spaces.parameter import ParameterSpace

    space, _ = load_search_space(path)
    base_dir = Path(path).resolve().parent
    for name, ref in space.models.items():
        if (_looks_local(ref) and not (base_dir / Path(ref).expanduser()).exists()
                and not Path(ref).expanduser().exists()):
            raise ConfigError(f"model path '{ref}' does not exist", file=str(path), key=f"models.{name}")
    for i, task in enumerate(space.tasks):
        if task.path and not (base_dir / task.path).exists() and not Path(task.path).exists():
            if not task.path.startswith("evomerge:"):
                raise ConfigError(f"task file '{task.path}' does not exist", file=str(path), key=f"tasks.{i}.path")
    refs = {n: n for n in space.models}
    per_layer = 0
    if space.merge_method is not None or space.chat_vector:
        ps = ParameterSpace(space, refs, num_layers=1, source=str(path))
        per_layer = ps.dim
    parts = [f"{len(space.models)} models", f"{space.merge_method or 'stacking'}",
             f"{per_layer} genes per layer group", f"{len(space.tasks)} tasks", f"optimizer {space.optimizer.name}",
             f"{space.budget.trials} trials"]
    if space.stacking is not None:
        parts.append(f"stacking {space.stacking.mode}")
    return ", ".join(parts)
