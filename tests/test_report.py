"""write_report: plots and report.md from a run folder."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from evomerge.report import write_report
from evomerge.search.driver import Outcome, run_search
from evomerge.search.optimizers import make_optimizer
from evomerge.store import RunStore


def test_report_from_a_small_run(tmp_path):
    def obj(x):
        if x[0] > 0.7:
            raise RuntimeError("merge exploded")
        v = -float(np.sum((x - 0.3) ** 2))
        return Outcome(values=[v], metrics={"sort": {"acc": 1 + v}, "count": 0.5}, recipe_yaml="merge_method: ties\n",
                       layer_params={"a.weight": list(x), "b.density": list(1 - x[:2])},
                       merge_seconds=0.01, eval_seconds=0.02)

    store = RunStore.create(tmp_path / "demo", "name: demo\n", directions=["maximize"], meta={"space": "demo.yaml"})
    run_search(store, make_optimizer("cmaes", 3, seed=0, sigma0=0.3), obj, max_trials=21)
    best = store.best(1)[0]
    store.close()
    (tmp_path / "demo" / "heldout.json").write_text(json.dumps(
        {"rows": [{"name": "base", "sort": 0.61, "count": 0.7}, {"name": f"best #{best.number}", "sort": 0.93}]}))

    md_path = write_report(tmp_path / "demo")
    md = md_path.read_text()
    for png in ("fitness_per_trial.png", "fitness_per_generation.png", "layer_params_heatmap.png"):
        img = mpimg.imread(tmp_path / "demo" / "report" / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01  # a real, non-blank picture
        assert f"(report/{png})" in md
    assert "max_trials 21" in md and "space: demo.yaml" in md
    finished = md.split("- trials: ")[1].split(" finished")[0]
    assert finished == "21"
    assert f"best: trial #{best.number}" in md
    assert "| trial | generation | values | sort.acc | count | merge s | eval s |" in md
    assert "merge exploded" in md  # failures table
    assert "## Held-out evaluation" in md and f"| best #{best.number} | 0.93 | - |" in md
    assert "merge_method: ties" in md


def test_report_multi_objective_shows_pareto(tmp_path):
    store = RunStore.create(tmp_path / "mo", "x: 1\n", directions=["maximize", "maximize"])
    run_search(store, make_optimizer("nsga2", 2, seed=0, n_objectives=2, popsize=4),
               lambda x: Outcome(values=[float(x[0]), float(1 - x[0] + 0.1 * x[1])]), max_trials=8)
    n_pareto = len(store.pareto())
    store.close()
    md = write_report(tmp_path / "mo").read_text()
    assert "## Pareto front" in md
    table = md.split("## Pareto front")[1].split("##")[0]
    assert table.count("\n| ") - 1 == n_pareto  # header excluded
    assert not (tmp_path / "mo" / "report" / "layer_params_heatmap.png").exists()


CONFIG = """name: demo
models: {base: ./base, sort: ./sort, count: ./count}
tasks:
  - {name: sort, kind: generation, path: sort.jsonl}
  - {name: count, kind: generation, path: count.jsonl, weight: 2}
"""
HELDOUT = {"metric": "mean over tasks", "split": "heldout", "rows": [
    {"name": "source: base", "kind": "source", "sort": 0.76, "count": 0.6, "mean": 0.68, "ci95": [0.65, 0.71]},
    {"name": "source: count", "kind": "source", "sort": 0.49, "count": 0.99, "mean": 0.74, "ci95": [0.71, 0.77]},
    {"name": "baseline: average", "kind": "baseline", "sort": 0.94, "count": 0.69, "mean": 0.815, "search_mean": 0.8},
    {"name": "baseline: ties, uniform: ties weight 1, density 0.5", "kind": "baseline",
     "sort": {"value": 0.9, "low": 0.87, "high": 0.93}, "count": 0.5, "mean": {"value": 0.7}, "search_mean": 0.79},
    {"name": "evolved #1 (trial 5)", "kind": "evolved", "sort": 0.93, "count": 0.9, "mean": 0.915,
     "search_fitness": 2.6},
    {"name": "evolved #2 (trial 3)", "kind": "evolved", "sort": 0.9, "count": 0.8, "mean": 0.85}],
    "tests": [{"evolved": "evolved #1 (trial 5)", "against": "baseline: average", "diff": 0.1, "ci_low": 0.07,
               "ci_high": 0.13, "test": "mcnemar", "p_value": 2e-5}]}


def _small_run(root):
    """A run folder as a search leaves it: 12 trials in 3 generations (a failure among them), per-layer weights
    and densities of 2 models x 4 layers, and the held-out table."""
    store = RunStore.create(root, CONFIG, directions=["maximize"], meta={"space": "demo.yaml"})
    rng = np.random.default_rng(0)
    for i in range(12):
        trial = store.new_trial()
        g = rng.random(4)
        store.begin_trial(trial, g, generation=i // 4, gen_index=i % 4, key=f"k{i}")
        if i == 6:
            store.finish_trial(trial, values=None, status="failed", error="RuntimeError: out of memory")
            continue
        sort, count = 0.5 + 0.4 * g[0], 0.4 + 0.04 * i
        layer_params = {f"weight/{m}/all": list(0.5 + g) for m in ("sort", "count")}
        layer_params |= {f"density/{m}/all": list(0.4 + 0.01 * g) for m in ("sort", "count")}
        store.finish_trial(trial, values=[sort + 2 * count], status="ok", recipe_yaml="merge_method: ties\n",
                           metrics={"sort": {"exact_match": sort, "objective": sort},
                                    "count": {"exact_match": count, "objective": count}},
                           layer_params=layer_params, merge_seconds=0.01, eval_seconds=0.3)
    best = store.best(1)[0]
    store.close()
    (root / "heldout.json").write_text(json.dumps(HELDOUT))
    (root / "splits.json").write_text(json.dumps({"search": {}, "heldout": {"sort": list(range(384)),
                                                                           "count": list(range(384))}}))
    return best


def _hlines(ax) -> dict[str, float]:
    """Legend label -> y of the axes' horizontal lines."""
    return {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()
            if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2}


def test_plots_say_what_they_show(tmp_path, monkeypatch):
    import evomerge.report.plots as plots

    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    best = _small_run(tmp_path / "demo")
    write_report(tmp_path / "demo")
    assert set(figures) == {"fitness_per_trial.png", "fitness_per_generation.png", "layer_params_heatmap.png"}
    for name in figures:
        assert (tmp_path / "demo" / "report" / name).stat().st_size > 10_000

    # fitness per trial: titled, the tasks, weights and unit named; the best search fitness, the best baseline
    # (by held-out mean: average) and the best source (count) drawn on the fitness scale: Σ weight x metric
    fitness, tasks = figures["fitness_per_trial.png"].axes[:2]
    assert "fitness per trial" in fitness.get_title().lower()
    assert fitness.get_xlabel() == "trial number"
    ylabel = fitness.get_ylabel()
    assert "1·sort exact_match" in ylabel and "2·count exact_match" in ylabel and "fraction correct" in ylabel
    lines = _hlines(fitness)
    assert lines[f"best search fitness {best.values[0]:.4g}"] == pytest.approx(best.values[0])
    baseline = next(k for k in lines if k.startswith("best baseline (average)"))
    assert lines[baseline] == pytest.approx(0.94 + 2 * 0.69) and "mean 0.815" in baseline
    source = next(k for k in lines if k.startswith("best source model (count)"))
    assert lines[source] == pytest.approx(0.49 + 2 * 0.99)
    assert "metric per trial" in tasks.get_title()
    assert [t.get_text() for t in tasks.get_legend().get_texts()] == ["sort: exact_match", "count: exact_match"]
    assert "fraction correct" in tasks.get_ylabel()

    generation = figures["fitness_per_generation.png"].axes[0]
    assert "per generation" in generation.get_title() and generation.get_xlabel() == "generation"
    assert set(_hlines(generation)) == set(lines)

    # the heatmap: one panel and one labelled colour bar per parameter, each scaled to its own values
    heat = figures["layer_params_heatmap.png"]
    assert "best trial (#%d)" % best.number in heat._suptitle.get_text()
    images = [ax for ax in heat.axes if ax.get_images()]
    assert [ax.get_title(loc="left").split(" ")[0] for ax in images] == ["weight", "density"]
    bars = [ax for ax in heat.axes if not ax.get_images()]
    assert sorted(ax.get_ylabel() for ax in bars) == ["density", "weight"]
    weight_clim, density_clim = (ax.get_images()[0].get_clim() for ax in images)
    assert density_clim[1] - density_clim[0] < 0.011 < weight_clim[1] - weight_clim[0]  # not one shared scale
    assert [t.get_text() for t in images[-1].get_xticklabels()] == ["0", "1", "2", "3"]
    assert images[-1].get_xlabel() == "layer"
    assert [t.get_text() for t in images[0].get_yticklabels()] == ["sort", "count"]


def test_heldout_table_explains_its_rows_and_columns(tmp_path):
    _small_run(tmp_path / "demo")
    md = write_report(tmp_path / "demo").read_text()
    table = md.split("## Held-out evaluation")[1].split("## Plots")[0]
    assert "| model (what it is) | sort | count | mean | 95 % interval | search_mean | search_fitness |" in table
    assert "| source: base — a source model as it is, unmerged | 0.76 | 0.6 | 0.68 | 0.65 to 0.71 |" in table
    assert "| baseline: average — hand-made merge: the models' plain average" in table
    assert "| baseline: ties, uniform: ties weight 1, density 0.5 — hand-made merge: one setting" in table
    assert "chosen on the search split | 0.9 [0.87, 0.93] | 0.5 | 0.7 |" in table  # cells with an interval
    assert "| evolved #1 (trial 5) — the evolved recipe (best.yaml) | 0.93 |" in table
    assert "| evolved #2 (trial 3) — a runner-up of the search" in table
    assert "kind" not in table.split("\n\n")[2].splitlines()[0]
    assert "- `sort`: exact_match (fraction correct, 0-1) on the held-out split (384 items)" in table
    assert "- `mean`: unweighted mean of the task columns" in table
    assert "- `search_fitness`: the evolved recipe's fitness on the search split" in table
    assert ("- evolved #1 (trial 5) vs baseline: average: mean difference +0.1000 (95 % +0.0700 to +0.1300), "
            "mcnemar p = 2e-05") in table
