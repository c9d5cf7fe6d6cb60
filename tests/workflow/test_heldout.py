"""The final table: one metric for every row with its 95 % interval, paired tests of the exported recipe
against the best baseline and the best source, baseline rows that say their settings, three disjoint splits,
the exported recipe picked on the selection split, and the report split touched only for the table."""

from __future__ import annotations

import json

import numpy as np
import yaml

from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.stats import bootstrap_ci_tasks
from evomerge.store import RunStore
from tests.workflow.test_run import _mcq_file, _space


def test_table_rows_intervals_tests_and_selection(llama_family, tmp_path, monkeypatch):
    from evomerge.workflow.run import start_run

    calls: list[tuple[str, int]] = []  # (split, finished trials at the time)
    original = Evaluator.evaluate

    def counting(self, model, *, per_item=False):
        finished = -1
        if self.split == "heldout" and (tmp_path / "run" / "study.db").exists():
            store = RunStore.open(tmp_path / "run", verify_config=False)
            finished = store.count_finished()
            store.close()
        calls.append((self.split, finished))
        return original(self, model, per_item=per_item)

    monkeypatch.setattr(Evaluator, "evaluate", counting)
    mcq = str(_mcq_file(tmp_path / "mcq60.jsonl", n=60))
    tasks = [{"name": "add", "kind": "mcq", "path": mcq, "n_search": 20, "n_selection": 10, "n_heldout": 24,
              "loss_tiebreak": 0.01}]
    run = start_run(_space(llama_family, tmp_path, tasks=tasks, heldout={"top_k": 3}, budget={"trials": 8}),
                    quiet=True)
    table = json.loads((run / "heldout.json").read_text())
    rows = table["rows"]
    assert table["metric"].startswith("mean over tasks")
    for r in rows:  # one metric everywhere: the mean of the tasks' metrics, with its interval around it
        assert r["mean"] == round(float(np.mean([r["add"]])), 4)
        lo, hi = r["ci95"]
        assert lo <= r["mean"] <= hi
    baselines = [r for r in rows if r["kind"] == "baseline"]
    assert baselines and all(":" in r["name"].removeprefix("baseline: ") for r in baselines)  # their settings
    assert any("ties" in r["name"] and "density" in r["name"] for r in baselines)
    tests = {t["against"].split(":")[0]: t for t in table["tests"]}
    assert set(tests) == {"baseline", "source"} and all(t["test"] == "mcnemar_exact" for t in tests.values())
    # the selection split picked the exported recipe among the top 3
    sel = table["selection"]
    assert len(sel) == 3 and sel[0]["selection_mean"] == max(s["selection_mean"] for s in sel)
    store = RunStore.open(run)
    exported = store.trial(sel[0]["trial"])
    assert (run / "best.yaml").read_text() == exported.recipe_yaml
    assert rows[-3]["name"] == f"evolved #1 (trial {sel[0]['trial']})"
    splits = json.loads((run / "splits.json").read_text())
    ids = {s: set(splits[s]["add"]) for s in ("search", "selection", "heldout")}
    assert (len(ids["search"]), len(ids["selection"]), len(ids["heldout"])) == (20, 10, 24)
    assert not (ids["search"] & ids["selection"] or ids["search"] & ids["heldout"] or ids["selection"] & ids["heldout"])
    # the report split was scored only after the search, once per row of the table
    heldout_calls = [c for c in calls if c[0] == "heldout"]
    assert len(heldout_calls) == len(rows) and all(f == 8 for _, f in heldout_calls)
    assert not any(c[0] == "heldout" for c in calls[: calls.index(heldout_calls[0])] if c[1] == -1)


def test_interval_is_the_stratified_bootstrap_of_the_items(llama_family, tmp_path):
    """The row's interval is exactly bootstrap_ci_tasks over the row's per-item 0/1 scores."""
    from evomerge.config import load_search_space
    from evomerge.workflow.context import build_context
    from evomerge.workflow.heldout import score_row

    path = _space(llama_family, tmp_path)
    config, text = load_search_space(path)
    ctx = build_context(config, text, source=str(path), base_dir=tmp_path)
    row, items = score_row(ctx, ctx.live_model(np.full(ctx.space.dim, 0.5)), "heldout")
    assert set(items) == {"add"} and set(np.unique(items["add"])) <= {0.0, 1.0}
    assert row["add"] == round(float(items["add"].mean()), 4)
    lo, hi = bootstrap_ci_tasks(items, n_boot=2000, seed=0)
    assert row["ci95"] == [round(lo, 4), round(hi, 4)]
    assert yaml.safe_load(text)["tasks"][0]["n_heldout"] == len(items["add"])
