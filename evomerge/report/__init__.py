"""Plots and a Markdown summary of a run folder (reads the store only; matplotlib with Agg).

    runs/NAME/report.md
    runs/NAME/report/fitness_per_trial.png       fitness per trial and each task's metric per trial
    runs/NAME/report/fitness_per_generation.png  best and mean fitness per generation
    runs/NAME/report/layer_params_heatmap.png    (when the best trial has layer_params) one colour bar per parameter

The fitness plots draw a line at the best search fitness and, when `runs/NAME/heldout.json` has them, the
best source model ("source: ..." rows) and the best hand-made baseline ("baseline: ...", best by held-out mean)
on the fitness scale: Σ weight × the row's task metric (the search's loss tie-break is not in held-out rows).
report.md explains every held-out row and column, and lists the paired tests. heldout.json as
evomerge.workflow.heldout writes it, `{"rows": [...], "tests": [...]}`, a bare list of rows, or a mapping
`{"source: base": {...}}`; rows are read by their "name" and "mean" keys and task columns (see
evomerge.report.data). Figures: evomerge.report.plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.report.data import heldout_markdown, read_heldout, run_tasks, split_sizes
from evomerge.report.plots import plot_fitness_per_generation, plot_fitness_per_trial, plot_layer_params
from evomerge.store import RunFolder, RunStore, TrialRecord
from evomerge.tables import fmt, markdown_table

__all__ = ["plot_fitness_per_generation", "plot_fitness_per_trial", "plot_layer_params", "write_report"]


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_metrics(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


# -------------------------------------------------------------------------- report.md
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
    tasks, mode = run_tasks(folder, records)
    heldout, tests = read_heldout(folder) or (None, [])

    out = folder.report
    out.mkdir(exist_ok=True)
    plots: list[tuple[str, str]] = []
    plot_fitness_per_trial(records, objectives, out / "fitness_per_trial.png", tasks=tasks, mode=mode,
                           heldout=heldout, run=folder.name)
    plots.append(("Fitness and task metrics per trial", "report/fitness_per_trial.png"))
    plot_fitness_per_generation(records, objectives, out / "fitness_per_generation.png", tasks=tasks, mode=mode,
                                heldout=heldout, run=folder.name)
    plots.append(("Best and mean fitness per generation", "report/fitness_per_generation.png"))
    heat = out / "layer_params_heatmap.png"
    if best and best[0].layer_params:
        plot_layer_params(best[0].layer_params, f"Per-layer merge parameters of the best trial (#{best[0].number})",
                          heat)
        plots.append((f"Per-layer parameters of the best trial (#{best[0].number})", "report/layer_params_heatmap.png"))
    elif heat.exists():
        heat.unlink()

    md = [f"# Run report: {run_dir.name}", "", "## Summary", ""]
    md += _summary(records, objectives, attrs, best)
    metric_cols: list[str] = []
    for r in best:
        metric_cols += [k for k in _flat_metrics(r.metrics) if k not in metric_cols]
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
    if heldout is not None:
        md += heldout_markdown(heldout, tasks, split_sizes(folder), tests)

    md += ["## Plots", ""]
    for title, rel in plots:
        md += [f"### {title}", "", f"![{title}]({rel})", ""]
    if best and best[0].recipe_yaml:
        md += [f"## Recipe of the best trial (#{best[0].number})", "",
               "```yaml", best[0].recipe_yaml.rstrip(), "```", ""]
    path = folder.report_md
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def _summary(records: list[TrialRecord], objectives: list[str], attrs: dict[str, Any],
             best: list[TrialRecord]) -> list[str]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    dups = sum(1 for r in records if r.duplicate_of is not None)
    timed = [r for r in records if r.status == "ok" and r.duplicate_of is None]
    merge_s = [r.merge_seconds for r in timed if r.merge_seconds is not None]
    eval_s = [r.eval_seconds for r in timed if r.eval_seconds is not None]
    budget = attrs.get("budget") or {}
    opt = attrs.get("optimizer") or {}
    md = [f"- optimizer: {opt.get('name', '?')} (popsize {opt.get('popsize', '?')}, seed {opt.get('seed', '?')})",
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
    for k, v in (attrs.get("meta") or {}).items():
        md.append(f"- {k}: {fmt(v)}")
    if best:
        md.append(f"- best: trial #{best[0].number}, values {fmt(best[0].values)}")
    return md + [""]
