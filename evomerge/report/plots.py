"""The report's figures (matplotlib, Agg). Each function returns its Figure (and saves and closes it when given a
path), so tests read titles and labels from the figure rather than from pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evomerge.report.data import TaskInfo, fitness_label, references, task_value, unit
from evomerge.store import TrialRecord

PARAM_UNITS = {"weight": "weight (× the model's task vector)", "density": "density (fraction of the delta kept)",
               "scale": "residual scale (×)", "layer (global index)": "source layer (global index)",
               "t": "t (0 = base, 1 = other model)", "lambda": "λ (× the merged delta)"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# -------------------------------------------------------------------------- plots
def _reference_lines(ax: Any, refs: list[tuple[str, float]], best: float | None) -> None:
    if best is not None:
        ax.axhline(best, color="C3", lw=1, ls="-", alpha=0.6, label=f"best search fitness {best:.4g}")
    for (label, value), style in zip(refs, ("--", ":")):
        ax.axhline(value, color="k", lw=1, ls=style, label=label)


def plot_fitness_per_trial(records: list[TrialRecord], objectives: list[str], path: Path | None = None, *,
                           tasks: list[TaskInfo] | None = None, mode: str = "weighted",
                           heldout: list[dict[str, Any]] | None = None, run: str = "") -> Any:
    """Fitness per trial (one panel per objective) and each task's metric per trial; returns the Figure."""
    plt = _plt()
    tasks = tasks or []
    ok = [r for r in records if r.status == "ok" and r.values]
    failed = [r for r in records if r.status == "failed"]
    n_obj = len(objectives)
    fig, axes = plt.subplots(n_obj + (1 if tasks else 0), 1, figsize=(9, 3.4 * (n_obj + bool(tasks))),
                             squeeze=False)
    for j in range(n_obj):
        ax = axes[j, 0]
        xs, ys = [r.number for r in ok], [r.values[j] for r in ok]  # type: ignore[index]
        ax.scatter(xs, ys, s=12, alpha=0.7, label="trial")
        best = None
        if ys:
            sign = 1 if objectives[j] == "maximize" else -1
            running = sign * np.maximum.accumulate(sign * np.asarray(ys))
            best = float(running[-1])
            ax.step(xs, running, where="post", color="C3", label="best so far")
            if failed:
                ax.scatter([r.number for r in failed], [min(ys) if sign > 0 else max(ys)] * len(failed),
                           marker="x", color="k", s=18, label="failed (drawn at the bottom)")
        _reference_lines(ax, references(heldout or [], tasks, mode, j), best)
        ax.set_title(f"Search fitness per trial{f' ({run})' if run else ''}"
                     + (f", objective {j}" if n_obj > 1 else ""))
        ax.set_xlabel("trial number")
        ax.set_ylabel(fitness_label(tasks, objectives, j, mode), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    if tasks:
        ax = axes[n_obj, 0]
        for k, t in enumerate(tasks):
            pts = [(r.number, task_value(r.metrics, t)) for r in ok]
            pts = [(x, y) for x, y in pts if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=0.6, color=f"C{k}",
                    label=f"{t.name}: {t.metric}")
        ax.set_title("Each task's metric per trial (search split)")
        ax.set_xlabel("trial number")
        ax.set_ylabel(f"task metric ({unit(tasks[0].metric)})" if len({t.metric for t in tasks}) == 1
                      else "task metric")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_fitness_per_generation(records: list[TrialRecord], objectives: list[str], path: Path | None = None, *,
                                tasks: list[TaskInfo] | None = None, mode: str = "weighted",
                                heldout: list[dict[str, Any]] | None = None, run: str = "") -> Any:
    """Best and mean fitness (objective 0) of each generation; returns the Figure."""
    plt = _plt()
    sign = 1 if objectives[0] == "maximize" else -1
    by_gen: dict[int, list[float]] = {}
    for r in records:
        if r.status == "ok" and r.values and r.generation is not None:
            by_gen.setdefault(int(r.generation), []).append(r.values[0])
    gens = sorted(by_gen)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    best = None
    if gens:
        per_gen = [sign * max(sign * v for v in by_gen[g]) for g in gens]
        best = sign * max(sign * v for v in per_gen)
        ax.plot(gens, per_gen, marker="o", label="best of the generation")
        ax.plot(gens, [float(np.mean(by_gen[g])) for g in gens], marker=".", label="mean of the generation")
    _reference_lines(ax, references(heldout or [], tasks or [], mode, 0), best)
    ax.set_title(f"Search fitness per generation{f' ({run})' if run else ''}")
    ax.set_xlabel("generation")
    ax.set_ylabel(fitness_label(tasks or [], objectives, 0, mode), fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return fig


def param_of(label: str) -> tuple[str, str]:
    """(parameter, row label) of a layer_params key: "weight/sort/all" -> ("weight", "sort"), "a.weight" ->
    ("weight", "a"), "scale" -> ("scale", "scale")."""
    if "/" in label:
        param, *rest = label.split("/")
        rest = [p for p in rest if p not in ("all", "*")] or [param]
        return param, " ".join(rest)
    if "." in label:
        owner, param = label.rsplit(".", 1)
        return param, owner
    return label, label


def plot_layer_params(layer_params: dict[str, list[float]], title: str, path: Path | None = None) -> Any:
    """One heatmap per parameter (rows: models / parts, columns: layers), each with its own labelled colour bar;
    ragged rows are padded blank. Returns the Figure."""
    plt = _plt()
    groups: dict[str, list[tuple[str, list[float]]]] = {}
    for label, values in layer_params.items():
        param, row = param_of(label)
        groups.setdefault(param, []).append((row, list(values)))
    width = max(len(v) for v in layer_params.values())
    heights = [len(rows) + 0.8 for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(7, 0.4 * width + 4), 1.2 + 0.55 * sum(heights)),
                             squeeze=False, sharex=True, gridspec_kw={"height_ratios": heights})
    stacked = "layer (global index)" in groups
    for k, (ax, (param, rows)) in enumerate(zip(axes[:, 0], groups.items())):
        grid = np.full((len(rows), width), np.nan)
        for i, (_, values) in enumerate(rows):
            grid[i, : len(values)] = values
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                       cmap=("viridis", "magma", "cividis", "plasma")[k % 4])
        ax.set_yticks(range(len(rows)), [r for r, _ in rows], fontsize=8)
        if width * len(rows) <= 256:  # small grids: print each value
            lo, hi = np.nanmin(grid), np.nanmax(grid)
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    bright = hi > lo and (v - lo) / (hi - lo) > 0.6
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
        bar = fig.colorbar(im, ax=ax, pad=0.01)
        bar.set_label(param, fontsize=8)
        ax.set_title(PARAM_UNITS.get(param, param), fontsize=9, loc="left")
    last = axes[-1, 0]
    if width <= 48:
        last.set_xticks(range(width))
    else:
        from matplotlib.ticker import MaxNLocator

        last.xaxis.set_major_locator(MaxNLocator(integer=True))
    last.set_xlabel("position in the layer path" if stacked else "layer")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _save(fig: Any, path: Path | None) -> None:
    if path is not None:
        fig.savefig(path, dpi=110)
        _plt().close(fig)


