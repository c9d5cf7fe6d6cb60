"""Preflight of the tasks: each task's data read and validated by the very readers a run uses
(`evaluate.data.load_items`) and split by the very split logic (`evaluate.splits.make_splits`), so a task that
passes here reads and splits the same way when the run tokenizes it. Data that only a download or lm-eval can
count (`dataset:`, `lm_eval`) is checked for what the space itself decides: a held-out split that is not empty.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import ConfigError, DataError, EvomergeError
from evomerge.evaluate.data import PARSERS, load_items, resolve_path
from evomerge.evaluate.spec import TaskSpec
from evomerge.evaluate.tasks import task_splits
from evomerge.yamlio import read_text


@dataclass(frozen=True)
class TaskInfo:
    """A task's data and split sizes (None: counted only when the data is loaded, e.g. a hub data set)."""

    name: str
    kind: str
    where: str  # the data file / folder, data set or lm-eval task
    items: int | None
    n_search: int | None
    n_heldout: int | None
    rule: str = ""  # how the splits are chosen, when their sizes are not known yet

    def describe(self) -> str:
        size = f", {self.items} items" if self.items is not None else ""
        head = f"{self.name} ({self.kind}{size}, {self.where})"
        if self.kind == "custom":
            return f"{head}: scored by the function"
        if self.n_search is not None and self.n_heldout is not None:
            return f"{head}: {self.n_search} search / {self.n_heldout} held-out"
        return f"{head}: {self.rule} (counted when loaded)"


def check_task(index: int, spec: TaskSpec, *, source: str, base_dir: Path) -> TaskInfo:
    """Check one task of the space at `source`; one-line errors name the data file or the space, and the key."""
    try:
        if spec.kind in PARSERS:
            if spec.path:
                return _file_task(spec, base_dir)
            return _declared(spec, str(spec.dataset))
        if spec.kind == "lm_eval":
            return _lm_eval_task(spec, base_dir)
        reason = importable(str(spec.function), base_dir)
        if reason:
            raise ConfigError(f"cannot import '{spec.function}': {reason}", key="function")
        return TaskInfo(spec.name, spec.kind, str(spec.function), None, None, None)
    except EvomergeError as exc:
        raise _located(exc, spec, index, source) from None


def _located(exc: EvomergeError, spec: TaskSpec, index: int, source: str) -> EvomergeError:
    """Name the key in the space (`tasks.N.KEY`) and the file the problem is in."""
    space_key = f"tasks.{index}"
    if exc.key is None or exc.key == "path":  # the data file itself: unreadable, not UTF-8, empty, ...
        return type(exc)(f"{exc.detail} (task '{spec.name}' of {source})", file=exc.file or source,
                         key=f"{space_key}.path", allowed=exc.allowed)
    if exc.key in TaskSpec.model_fields:  # a setting of the task: split sizes, few-shot, lm-eval name, ...
        where = f" ({exc.file})" if exc.file and exc.file != source else ""
        return type(exc)(f"task '{spec.name}': {exc.detail}{where}", file=source, key=f"{space_key}.{exc.key}",
                         allowed=exc.allowed)
    # a column of the data file
    return type(exc)(f"{exc.detail} (task '{spec.name}', {space_key} of {source})", file=exc.file or source,
                     key=exc.key, allowed=exc.allowed)


def _file_task(spec: TaskSpec, base_dir: Path) -> TaskInfo:
    assert spec.path is not None
    p = resolve_path(spec.path, base_dir)
    if not p.exists():
        raise DataError("task file not found", file=str(p), key="path")
    if not p.is_dir():
        read_text(p, what="task file", error=DataError, key="path")
    items = load_items(spec.kind, path=spec.path, subjects=spec.subjects, split=spec.split, base_dir=base_dir)
    for key in ("heldout_path", "selection_path"):
        fixed = getattr(spec, key)
        if fixed is not None:
            fp = resolve_path(fixed, base_dir)
            if not fp.exists():
                raise DataError("split file not found", file=str(fp), key=key)
            read_text(fp, what="split file", error=DataError, key=key)
    parts = task_splits(spec, items, str(p), base_dir)
    _nonempty(spec, len(parts["search"]), len(parts["heldout"]), len(items))
    if spec.num_fewshot:
        _check_fewshot(spec, p, base_dir)
    return TaskInfo(spec.name, spec.kind, spec.path, len(items), len(parts["search"]), len(parts["heldout"]))


def _check_fewshot(spec: TaskSpec, path: Path, base_dir: Path) -> None:
    where = spec.fewshot_path or spec.path
    assert where is not None
    fp = resolve_path(where, base_dir)
    if not spec.fewshot_path and not path.is_dir():
        raise DataError(f"num_fewshot={spec.num_fewshot} needs `fewshot_path` (a dev split)", file=str(fp),
                        key="fewshot_path", allowed="a dev CSV/JSONL, or a KMMLU folder as `path`")
    if spec.fewshot_path:
        if not fp.exists():
            raise DataError("few-shot file not found", file=str(fp), key="fewshot_path")
        if not fp.is_dir():
            read_text(fp, what="few-shot file", error=DataError, key="fewshot_path")
    try:
        pool = load_items(spec.kind, path=where, subjects=spec.subjects, split="dev", base_dir=base_dir)
    except EvomergeError as exc:
        raise DataError(exc.detail, file=exc.file or str(fp),
                        key="fewshot_path" if exc.key in (None, "path") else exc.key, allowed=exc.allowed) from None
    if len(pool) < spec.num_fewshot:
        raise DataError(f"num_fewshot={spec.num_fewshot} but the few-shot data has {len(pool)} items",
                        file=str(fp), key="num_fewshot", allowed=f"at most {len(pool)}")


def _nonempty(spec: TaskSpec, n_search: int, n_heldout: int, n_items: int) -> None:
    """A run scores every candidate on the search split and the final table on the held-out split: neither
    may be empty (the run would fail only after loading every weight)."""
    if not n_search:
        raise DataError(f"the search split is empty ({n_items} items)", key="n_search")
    if not n_heldout:
        raise DataError(f"the held-out split is empty ({n_items} items, all in the search split): the run's "
                        "final held-out table would have nothing to score", key="n_heldout",
                        allowed="set n_heldout (or lower n_search / per_category)")


def _declared(spec: TaskSpec, where: str) -> TaskInfo:
    """Split sizes as far as the space decides them (the data is counted when loaded)."""
    if spec.per_category is not None:
        search = f"{spec.per_category} per category"
        heldout = f"{spec.n_heldout}" if spec.n_heldout else f"up to {spec.per_category} per category"
    elif spec.n_search is not None:
        search = str(spec.n_search)
        heldout = str(spec.n_heldout) if spec.n_heldout else "the rest"
    elif spec.n_heldout is not None:
        search, heldout = "the rest", str(spec.n_heldout)
    else:
        raise DataError("neither n_heldout nor per_category is set, so every item goes to the search split and "
                        "the held-out split is empty: the run's final held-out table would have nothing to score",
                        key="n_heldout", allowed="n_heldout: N (and n_search: M to bound the search split)")
    return TaskInfo(spec.name, spec.kind, where, None, None, None, f"search: {search}, held-out: {heldout}")


def _lm_eval_task(spec: TaskSpec, base_dir: Path) -> TaskInfo:
    from evomerge.evaluate.tasks import _task_manager, _yaml_name

    if spec.lm_eval_yaml:
        yml = resolve_path(spec.lm_eval_yaml, base_dir)
        read_text(yml, what="lm-eval task YAML", error=ConfigError, key="lm_eval_yaml")
        name = spec.lm_eval_task or _yaml_name(yml)
        if not name:
            raise ConfigError("the YAML has no `task:` name (nor a `group:` name)", file=str(yml), key="lm_eval_yaml")
        info = _declared(spec, f"lm-eval {name}")
    else:
        name = str(spec.lm_eval_task)
        info = _declared(spec, f"lm-eval {name}")
        known = _task_manager(None, True).all_tasks  # indexing lm-eval's tasks takes seconds; the run reuses it
        if name not in known:
            close = [t for t in known if name.split("_")[0] in t][:5]
            raise ConfigError(f"unknown lm-eval task '{name}'", key="lm_eval_task",
                              allowed=("e.g. " + ", ".join(close)) if close
                              else "a name from `lm-eval ls tasks` or a local YAML")
    return info


def importable(ref: str, base_dir: Path) -> str | None:
    """Why the custom function `module:function` / `file.py:function` cannot be imported, or None. Finds the
    module without running it."""
    mod, _, fn = ref.rpartition(":")
    if not mod or not fn:
        return "give it as 'module:function' or 'file.py:function'"
    if mod.endswith(".py"):
        p = resolve_path(mod, base_dir)
        return None if p.is_file() else f"file '{p}' not found"
    local = base_dir / Path(*mod.split("."))
    if local.with_suffix(".py").is_file() or (local / "__init__.py").is_file():
        return None
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError) as exc:
        return f"module '{mod}' cannot be found ({exc})"
    return None if found is not None else f"module '{mod}' not found (nor in {base_dir})"
