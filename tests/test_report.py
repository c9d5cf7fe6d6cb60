"""write_report: plots and report.md from a run folder."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np

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
