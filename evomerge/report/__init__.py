"""Plots and a Markdown summary of a run folder (reads the store only; matplotlib with Agg).

    runs/NAME/report.md
    runs/NAME/report/fitness_per_trial.png
    runs/NAME/report/fitness_per_generation.png
    runs/NAME/report/layer_params_heatmap.png      (when the best trial has layer_params)

`runs/NAME/heldout.json`, when present, adds a held-out table. Accepted shapes:
`{"rows": [{"name": "best #12", "task_a": 0.91, ...}, ...]}`, a list of such rows, or a mapping
`{"best #12": {"task_a": 0.91, ...}, ...}`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import DataError
from evomerge.store import RunFolder, RunStore, TrialRecord
from evomerge.tables import fmt, markdown_table


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_metrics(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def plot_fitness_per_trial(records: list[TrialRecord], objectives: list[str], path: Path) -> None:
    plt = _plt()
    n_obj = len(objectives)
    fig, axes = plt.subplots(n_obj, 1, figsize=(8, 3.2 * n_obj), squeeze=False)
    ok = [r for r in records if r.status == "ok" and r.values]
    failed = [r for r in records if r.status == "failed"]
    for j, ax in enumerate(axes[:, 0]):
        xs = [r.number for r in ok]
        ys = [r.values[j] for r in ok]  # type: ignore[index]
        ax.scatter(xs, ys, s=12, alpha=0.7, label="ok")
        if ys:
            sign = 1 if objectives[j] == "maximize" else -1
            running = sign * np.maximum.accumulate(sign * np.asarray(ys))
            ax.step(xs, running, where="post", color="C3", label="best so far")
            if failed:
                ax.scatter([r.number for r in failed], [min(ys) if sign > 0 else max(ys)] * len(failed),
                           marker="x", color="k", s=18, label="failed")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"objective {j} ({objectives[j]})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fitness_per_generation(records: list[TrialRecord], objectives: list[str], path: Path) -> None:
    plt = _plt()
    sign = 1 if objectives[0] == "maximize" else -1
    by_gen: dict[int, list[float]] = {}
    for r in records:
        if r.status == "ok" and r.values and r.generation is not None:
            by_gen.setdefault(int(r.generation), []).append(r.values[0])
    gens = sorted(by_gen)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if gens:
        ax.plot(gens, [sign * max(sign * v for v in by_gen[g]) for g in gens], marker="o", label="best")
        ax.plot(gens, [float(np.mean(by_gen[g])) for g in gens], marker=".", label="mean")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"objective 0 ({objectives[0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_params(layer_params: dict[str, list[float]], title: str, path: Path) -> None:
    """Rows = labels (e.g. "model_a.weight"), columns = layers; ragged rows are padded blank."""
    plt = _plt()
    labels = list(layer_params)
    width = max(len(v) for v in layer_params.values())
    grid = np.full((len(labels), width), np.nan)
    for i, k in enumerate(labels):
        grid[i, : len(layer_params[k])] = layer_params[k]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * width + 3), max(2.5, 0.4 * len(labels) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if width * len(labels) <= 256:  # small grids: print each value, rows may have different scales
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("layer (path position for layer stacking)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heldout_rows(data: Any) -> tuple[list[str], list[list[Any]]]:
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if isinstance(data, dict):
        data = [{"name": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError("expected rows of metrics (a list of objects, or an object of objects)", file="heldout.json")
    cols: list[str] = []
    for r in data:
        for k in r:
            if k != "name" and k not in cols:
                cols.append(k)
    return ["name"] + cols, [[r.get("name", "")] + [r.get(c) for c in cols] for r in data]


def write_report(run_dir: str | os.PathLike, *, top_k: int = 10) -> Path:
    """Write report.md and the plots for the run in `run_dir`; returns the path of report.md."""
    folder = RunFolder(run_dir)
    run_dir = folder.root
    store = RunStore.open(run_dir, verify_config=False)
    try:
        records = store.trials()
        objectives = store.directions
        attrs = store.attrs
        best = store.best(top_k, records=records)
        pareto = store.pareto() if len(objectives) > 1 else []
    finally:
        store.close()

    out = folder.report
    out.mkdir(exist_ok=True)
    plots: list[tuple[str, str]] = []
    plot_fitness_per_trial(records, objectives, out / "fitness_per_trial.png")
    plots.append(("Fitness per trial", "report/fitness_per_trial.png"))
    plot_fitness_per_generation(records, objectives, out / "fitness_per_generation.png")
    plots.append(("Best and mean fitness per generation", "report/fitness_per_generation.png"))
    heat = out / "layer_params_heatmap.png"
    if best and best[0].layer_params:
        plot_layer_params(best[0].layer_params, f"best trial #{best[0].number}", heat)
        plots.append((f"Per-layer parameters of the best trial (#{best[0].number})", "report/layer_params_heatmap.png"))
    elif heat.exists():
        heat.unlink()

    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    dups = sum(1 for r in records if r.duplicate_of is not None)
    timed = [r for r in records if r.status == "ok" and r.duplicate_of is None]
    merge_s = [r.merge_seconds for r in timed if r.merge_seconds is not None]
    eval_s = [r.eval_seconds for r in timed if r.eval_seconds is not None]
    budget = attrs.get("budget") or {}
    opt = attrs.get("optimizer") or {}
    meta = attrs.get("meta") or {}

    md = [f"# Run report: {run_dir.name}", ""]
    md += ["## Summary", ""]
    md += [f"- optimizer: {opt.get('name', '?')} (popsize {opt.get('popsize', '?')}, seed {opt.get('seed', '?')})",
           f"- budget: max_trials {budget.get('max_trials', '?')}, max_seconds {budget.get('max_seconds') or 'none'}",
           f"- objectives: {', '.join(objectives)}",
           f"- trials: {counts.get('ok', 0) + counts.get('failed', 0)} finished "
           f"({counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, {dups} answered by a duplicate), "
           f"{counts.get('stale', 0)} stale, {counts.get('cancelled', 0) + counts.get('interrupted', 0)} "
           f"cancelled/interrupted, {counts.get('running', 0)} running",
           f"- generations: {1 + max((r.generation for r in records if r.generation is not None), default=-1)}"]
    if merge_s:
        mean_eval = np.mean(eval_s) if eval_s else float("nan")
        md.append(f"- mean seconds per merge: {np.mean(merge_s):.3g}; per evaluation: {mean_eval:.3g}")
    for k, v in meta.items():
        md.append(f"- {k}: {fmt(v)}")
    if best:
        md.append(f"- best: trial #{best[0].number}, values {fmt(best[0].values)}")
    md.append("")

    metric_cols: list[str] = []
    for r in best:
        for k in _flat_metrics(r.metrics):
            if k not in metric_cols:
                metric_cols.append(k)
    metric_cols = metric_cols[:8]
    rows_src = pareto if pareto else best
    md += ["## Pareto front" if pareto else f"## Top {len(best)} trials", ""]
    header = ["trial", "generation", "values"] + metric_cols + ["merge s", "eval s"]
    rows = []
    for r in rows_src:
        fm = _flat_metrics(r.metrics)
        rows.append([r.number, r.generation, r.values] + [fm.get(c) for c in metric_cols]
                    + [r.merge_seconds, r.eval_seconds])
    md += [markdown_table(header, rows) if rows else "No successful trial yet.", ""]

    failed = [r for r in records if r.status == "failed" and r.duplicate_of is None]
    if failed:
        reasons: dict[str, int] = {}
        for r in failed:
            reasons[r.error or "?"] = reasons.get(r.error or "?", 0) + 1
        top = sorted(reasons.items(), key=lambda x: -x[1])[:10]
        md += ["## Failures", "", markdown_table(["reason", "trials"], top), ""]

    heldout = folder.heldout_json
    if heldout.exists():
        try:
            data = json.loads(heldout.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read held-out results: {exc}", file=str(heldout)) from None
        head, hrows = _heldout_rows(data)
        md += ["## Held-out evaluation", "", markdown_table(head, hrows), ""]

    md += ["## Plots", ""]
    for title, rel in plots:
        md += [f"### {title}", "", f"![{title}]({rel})", ""]
    if best and best[0].recipe_yaml:
        md += [f"## Recipe of the best trial (#{best[0].number})", "",
               "```yaml", best[0].recipe_yaml.rstrip(), "```", ""]
    path = folder.report_md
    path.write_text("\n".join(md), encoding="utf-8")
    return path
