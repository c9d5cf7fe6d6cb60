"""The zoos the project builds for its demo, tests and quality benchmark, by name.

Every zoo is built by `evomerge.demo.zoo.build_zoo` (the same tiny Llama, character tokenizer and training recipe:
a base trained on an equal mix of the zoo's tasks, one expert fine-tuned from it per task), deterministic for a
seed, and cached in its own folder behind its own manifest:

- `demo`: the `evomerge demo` zoo (add/sort/count base; sort and count experts), in `~/.cache/evomerge/zoo`.
- `three`: three experts on task families the demo does not have (digit sum, dropping repeated letters,
  the larger of two numbers), in `~/.cache/evomerge/zoo_three`.
- `disagree`: two experts on the same inputs and prompt format with opposite answers (the later / earlier of
  two words), fine-tuned harder than the others (400 steps at 2e-3 instead of 300 at 5e-4) so their deltas are
  large and pull apart: each forgets the other task entirely, and the plain average of the two is far worse
  than each expert on its own task and than the base. In `~/.cache/evomerge/zoo_disagree`.

`write_space` writes a search space for a built zoo with nothing but what a user has to give (models, base
model, merge method, tasks with their split sizes, optimizer name, budget, seed) and the schema's defaults
for everything else, so the quality benchmark measures what a user gets rather than a preset tuned to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.demo.tasks import TASKS
from evomerge.demo.zoo import ALPHABET, Zoo, build_zoo, score_tasks
from evomerge.errors import ConfigError

MEASURED = "measured.json"
__all__ = ["ALPHABET", "ZOOS", "ZooSpec", "build", "measure", "task_files", "write_space", "zoo_dir", "zoo_spec"]


@dataclass(frozen=True)
class ZooSpec:
    """How one named zoo is built: its tasks (the base's mix), its experts, and build_zoo settings."""

    name: str
    tasks: tuple[str, ...]
    experts: tuple[str, ...]
    build: dict[str, Any] = field(default_factory=dict)  # build_zoo keywords beyond its defaults
    about: str = ""
    preset: str | None = None  # a hand-written search space for the zoo (repository-relative), if it has one


ZOOS: dict[str, ZooSpec] = {
    "demo": ZooSpec("demo", TASKS, ("sort", "count"), about="the `evomerge demo` zoo: sort and count experts",
                    preset="search_spaces/demo.yaml"),  # what `evomerge demo` runs; the benchmark uses write_space
    "three": ZooSpec("three", ("dsum", "dedup", "cmp"), ("dsum", "dedup", "cmp"),
                     about="three experts: digit sum, dropping repeated letters, the larger of two numbers"),
    "disagree": ZooSpec("disagree", ("hi", "lo"), ("hi", "lo"), {"expert_steps": 400, "expert_lr": 2e-3},
                        about="two experts with opposite answers to the same inputs (the later / earlier of two "
                              "words), fine-tuned hard"),
}


def zoo_spec(name: str) -> ZooSpec:
    if name not in ZOOS:
        raise ConfigError(f"unknown zoo '{name}'", key="zoo", allowed=", ".join(ZOOS))
    return ZOOS[name]


def zoo_dir(name: str) -> Path:
    """The zoo's cache folder: the demo's `${EVOMERGE_ZOO}` default for `demo`, `zoo_<name>` beside it otherwise."""
    from evomerge.demo.run import default_zoo_dir

    zoo_spec(name)
    root = default_zoo_dir()
    return root if name == "demo" else root.parent / f"zoo_{name}"


def build(name: str, root: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> Zoo:
    """Build (or reuse from its cache) the named zoo; `overrides` go to build_zoo (e.g. fewer steps in tests)."""
    spec = zoo_spec(name)
    settings = {**spec.build, **overrides}
    return build_zoo(Path(root) if root is not None else zoo_dir(name), seed=seed, tasks=spec.tasks,
                     experts=spec.experts, **settings)


def task_files(zoo: Zoo) -> dict[str, Path]:
    """Generation-task JSONL (search + held-out items, `evomerge/evaluate/README.md`) of each expert's task."""
    return {task: zoo.tasks["all"][task] for task in zoo.experts}


def space_data(zoo: Zoo, *, name: str, optimizer: str = "cmaes", seed: int = 0, trials: int = 96,
               n_search: int = 96, n_heldout: int = 384) -> dict[str, Any]:
    """The search space as a mapping: what a user must give, nothing more (parameters evolve over the schema's
    default ranges)."""
    models = {"base": str(zoo.base.resolve()), **{t: str(p.resolve()) for t, p in zoo.experts.items()}}
    data: dict[str, Any] = {
        "name": name,
        "models": models,
        "base_model": "base",
        "merge_method": "ties",
        "tasks": [{"name": t, "kind": "generation", "path": str(p.resolve()), "n_search": n_search,
                   "n_heldout": n_heldout} for t, p in task_files(zoo).items()],
        "optimizer": {"name": optimizer},
        "budget": {"trials": trials},
        "seed": seed,
    }
    return data


def write_space(zoo: Zoo, path: str | Path, *, name: str | None = None, optimizer: str = "cmaes", seed: int = 0,
                trials: int = 96, n_search: int = 96, n_heldout: int = 384) -> Path:
    """Write a search space for `zoo` at `path` using the schema's defaults for everything a user need not give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"name": name or path.stem, "optimizer": optimizer, "seed": seed, "trials": trials,
                          "n_search": n_search, "n_heldout": n_heldout}
    path.write_text(_dump(space_data(zoo, **kw)), encoding="utf-8")
    return path


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def measure(zoo: Zoo, *, force: bool = False) -> dict[str, dict[str, float]]:
    """Held-out exact match of the base, each expert and the plain average of the experts (the held-out table's
    "average" baseline) on every expert's task; cached in root/measured.json next to the manifest."""
    import json

    import torch

    cache = zoo.root / MEASURED
    if not force and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("settings") == zoo.settings:
                return dict(data["scores"])
        except (OSError, ValueError, KeyError):
            pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    heldout = {t: zoo.items("heldout", t) for t in zoo.experts}
    scores: dict[str, dict[str, float]] = {}
    models = {"base": zoo.base, **{f"expert_{t}": p for t, p in zoo.experts.items()}}
    states = {}
    for label, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        scores[label] = score_tasks(model, tok, heldout)
        if label != "base":
            states[label] = model.state_dict()
    model = AutoModelForCausalLM.from_pretrained(zoo.base)
    with torch.no_grad():
        avg = {k: sum(sd[k] for sd in states.values()) / len(states) for k in model.state_dict()}
    model.load_state_dict(avg)
    scores["average"] = score_tasks(model, tok, heldout)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": zoo.settings, "scores": scores}, indent=2))
    tmp.replace(cache)
    return scores
