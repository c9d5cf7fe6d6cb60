"""What a run is about, read from its folder: the tasks (name, metric, weight) of the config snapshot, and the
held-out table of heldout.json, read defensively (rows by their "name" and "mean" keys and task columns; a cell
may be a number or an object with an estimate, "value"/"mean"/"estimate", and an interval, "low"/"high" or
"ci"), with the labels that say what each row is."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from evomerge.errors import DataError
from evomerge.evaluate.spec import DEFAULT_METRIC
from evomerge.store import RunFolder, TrialRecord
from evomerge.tables import fmt, markdown_table

FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "em", "accuracy"}
ESTIMATE_KEYS = ("value", "mean", "estimate", "score", "point")


@dataclass
class TaskInfo:
    name: str
    metric: str
    weight: float | None = 1.0  # None: not known (a store without a search-space snapshot)


def number(v: Any) -> float | None:
    """A held-out cell as a number: plain numbers, numeric strings, or an object's estimate; else None."""
    if isinstance(v, dict):
        v = next((v[k] for k in ESTIMATE_KEYS if k in v), None)
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def unit(metric: str) -> str:
    return "fraction correct, 0-1" if metric in FRACTION_METRICS else metric


# -------------------------------------------------------------------------- what the run is about
def run_tasks(folder: RunFolder, records: list[TrialRecord]) -> tuple[list[TaskInfo], str]:
    """The run's tasks (name, metric, weight) and objectives mode, from the config snapshot, else the metrics."""
    import yaml

    cfg: Any = None
    try:
        cfg = yaml.safe_load(folder.config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        pass
    cfg = cfg if isinstance(cfg, dict) else {}
    tasks = []
    for t in cfg.get("tasks") or []:
        if isinstance(t, dict) and "name" in t:
            metric = t.get("metric") or DEFAULT_METRIC.get(str(t.get("kind")), "objective")
            tasks.append(TaskInfo(str(t["name"]), str(metric), float(t.get("weight", 1.0))))
    if not tasks:  # a store made without a search space: the tasks its trials were scored on
        for r in records:
            for name, m in r.metrics.items():
                if name not in [t.name for t in tasks]:
                    keys = [k for k in m if k != "objective"] if isinstance(m, dict) else []
                    tasks.append(TaskInfo(name, "objective" if isinstance(m, dict) and "objective" in m
                                          else (keys[0] if keys else "value"), weight=None))
    return tasks, str(cfg.get("objectives", "weighted"))


def task_value(metrics: dict[str, Any], task: TaskInfo) -> float | None:
    m = metrics.get(task.name)
    return number(m.get(task.metric) if isinstance(m, dict) else m)


def fitness_label(tasks: list[TaskInfo], objectives: list[str], j: int, mode: str) -> str:
    if mode == "vector" and j < len(tasks):
        return f"objective {j}: {tasks[j].name} {tasks[j].metric} ({unit(tasks[j].metric)})"
    if not tasks or any(t.weight is None for t in tasks):
        return f"fitness ({objectives[j]})"
    terms = " + ".join(f"{t.weight:g}·{t.name} {t.metric}" for t in tasks)
    return f"fitness = {terms}\n(search split; {unit(tasks[0].metric)} per task)"


def references(rows: list[dict[str, Any]], tasks: list[TaskInfo], mode: str, j: int) -> list[tuple[str, float]]:
    """(label, value on objective j's scale) of the best source model and the best baseline in heldout.json."""
    out = []
    for prefix, what in (("baseline:", "best baseline"), ("source:", "best source model")):
        scored = []
        for r in rows:
            name = str(r.get("name", ""))
            if not name.startswith(prefix) or number(r.get("mean")) is None:
                continue
            if mode == "vector" and j < len(tasks):
                value = number(r.get(tasks[j].name))
            elif tasks and all(number(r.get(t.name)) is not None and t.weight is not None for t in tasks):
                value = sum((t.weight or 0.0) * (number(r.get(t.name)) or 0.0) for t in tasks)
            else:
                value = number(r.get("mean"))
            if value is not None:
                scored.append((number(r.get("mean")) or 0.0, value, name))
        if scored:
            mean, value, name = max(scored)
            extra = f" (mean {mean:.3g})" if abs(mean - value) > 1e-9 else ""
            out.append((f"{what} ({name[len(prefix):].strip()}), held-out: {value:.4g}{extra}", value))
    return out


# -------------------------------------------------------------------------- held-out table
def heldout_rows(data: Any) -> list[dict[str, Any]]:
    """The rows of heldout.json in any accepted shape (see the module docstring)."""
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if isinstance(data, dict):
        data = [{"name": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError("expected rows of metrics (a list of objects, or an object of objects)", file="heldout.json")
    return data


def what_row_is(name: str) -> str:
    if name.startswith("source:"):
        return "a source model as it is, unmerged"
    if name.startswith("baseline:"):
        if name.split(":", 1)[1].strip().startswith("average"):
            return "hand-made merge: the models' plain average (linear, equal weights)"
        return "hand-made merge: one setting (in its label) for all layers and models, chosen on the search split"
    if name.startswith("evolved #1"):
        return "the evolved recipe (best.yaml)"
    if name.startswith("evolved #"):
        return "a runner-up of the search (one of the next best trials)"
    return ""


def _cell(v: Any) -> Any:
    if isinstance(v, dict):
        est = number(v)
        lo, hi = v.get("low", v.get("lo")), v.get("high", v.get("hi"))
        if lo is None and isinstance(v.get("ci"), (list, tuple)) and len(v["ci"]) == 2:
            lo, hi = v["ci"]
        if est is not None and number(lo) is not None and number(hi) is not None:
            return f"{fmt(est)} [{fmt(number(lo))}, {fmt(number(hi))}]"
        return fmt(est) if est is not None else json.dumps(v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(number(x) is not None for x in v):
        return f"{fmt(float(v[0]))} to {fmt(float(v[1]))}"
    return v


HIDDEN = ("name", "kind")  # the row label says what "kind" says
HEADERS = {"ci95": "95 % interval"}
COLUMN_NOTES = {"mean": "unweighted mean of the task columns",
                "ci95": "95 % interval of the mean (bootstrap over the held-out items)",
                "search_mean": "a baseline's mean on the search split (how its setting was chosen)",
                "search_fitness": "the evolved recipe's fitness on the search split (what the search maximized)",
                "error": "why a row could not be scored"}


def heldout_markdown(rows: list[dict[str, Any]], tasks: list[TaskInfo], n_items: dict[str, int],
                     tests: list[dict[str, Any]] | None = None) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in HIDDEN and k not in cols]
    labels = []
    for r in rows:
        name = str(r.get("name", ""))
        labels.append(name + (f" — {what_row_is(name)}" if what_row_is(name) else ""))
    table = markdown_table(["model (what it is)"] + [HEADERS.get(c, c) for c in cols],
                           [[label] + [_cell(r.get(c)) for c in cols] for label, r in zip(labels, rows)])
    notes = []
    for t in tasks:
        if t.name in cols:
            items = f" ({n_items[t.name]} items)" if t.name in n_items else ""
            notes.append(f"- `{t.name}`: {t.metric} ({unit(t.metric)}) on the held-out split{items}")
    notes += [f"- `{HEADERS.get(c, c)}`: {text}" for c, text in COLUMN_NOTES.items() if c in cols]
    md = ["## Held-out evaluation", "",
          "Every row is scored on the held-out split, which the search never saw.", "", table, "",
          "Columns:", "", *notes, ""]
    lines = []
    for test in tests or []:
        diff, lo, hi, p = (number(test.get(k)) for k in ("diff", "ci_low", "ci_high", "p_value"))
        if diff is not None:
            interval = f" (95 % {lo:+.4f} to {hi:+.4f})" if lo is not None and hi is not None else ""
            pv = f", {test.get('test', 'test')} p = {p:.3g}" if p is not None else ""
            lines.append(f"- {test.get('evolved', 'evolved')} vs {test.get('against', '?')}: mean difference "
                         f"{diff:+.4f}{interval}{pv}")
    if lines:
        md += ["Paired tests on the same held-out items:", "", *lines, ""]
    return md


def read_heldout(folder: RunFolder) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """(rows, paired tests) of heldout.json, or None without one."""
    path = folder.heldout_json
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read held-out results: {exc}", file=str(path)) from None
    tests = data.get("tests") if isinstance(data, dict) else None
    return heldout_rows(data), [t for t in tests if isinstance(t, dict)] if isinstance(tests, list) else []


def split_sizes(folder: RunFolder) -> dict[str, int]:
    try:
        held = json.loads(folder.splits.read_text(encoding="utf-8")).get("heldout", {})
        return {k: len(v) for k, v in held.items() if isinstance(v, list)}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


