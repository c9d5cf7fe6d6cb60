"""`evomerge eval runs/NAME`: a run's evolved recipe re-scored from its exported best.yaml, on the run's own tasks
and split items, gives the run's held-out row (and its search-split metrics) exactly."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.cli import main
from tests.workflow.test_run import _mcq_file, _space


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run on models far enough apart that the base, the merges and the evolved recipe score the 48
    held-out items differently."""
    from evomerge.models.tiny import char_tokenizer, perturbed, random_model, save_model, tiny_config
    from evomerge.workflow.run import start_run

    tmp = tmp_path_factory.mktemp("evalrun")
    tok = char_tokenizer()
    base = random_model(tiny_config("llama", vocab_size=len(tok)), seed=0)
    fam = {"base": save_model(base, tok, tmp / "base")}
    fam |= {name: save_model(perturbed(base, seed=i, scale=0.6), tok, tmp / name) for i, name in ((1, "a"), (2, "b"))}
    task = {"name": "add", "kind": "mcq", "path": str(_mcq_file(tmp / "add.jsonl", n=64)), "n_search": 16,
            "n_heldout": 48}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_THREADS", "1")
        return start_run(_space(fam, tmp, tasks=[task], budget={"trials": 4},
                                heldout={"top_k": 2, "sources": False, "baselines": False}), quiet=True)


def _eval(capsys, *args: str) -> tuple[dict, str]:
    out = args[-1]
    assert main(["eval", *args[:-1], "--json", out]) == 0
    return json.loads(open(out).read()), capsys.readouterr().out


def test_eval_of_a_run_reproduces_its_heldout_row(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_THREADS", "1")
    rows = json.loads((tiny_run / "heldout.json").read_text())["rows"]
    evolved = next(r for r in rows if r["name"].startswith("evolved #1"))
    splits = json.loads((tiny_run / "splits.json").read_text())

    got, text = _eval(capsys, str(tiny_run), "--split", "heldout", str(tmp_path / "e.json"))
    assert got["split"] == "heldout" and got["split_ids"] == splits["heldout"]
    assert {k: got["row"][k] for k in ("add", "mean", "ci95")} == {k: evolved[k] for k in ("add", "mean", "ci95")}
    assert got["recorded"] == evolved and "best.yaml (materialized)" in got["model"]
    assert "equal to the run's held-out row" in text and evolved["name"] in text
    assert f"{evolved['add']:.4f}" in text

    # an already materialized model, scored on the run's tasks: the same row; the search split: the best trial's
    from evomerge.merge.materialize import materialize
    from evomerge.recipe import Recipe
    from evomerge.store import RunStore

    folder = materialize(Recipe.load(tiny_run / "best.yaml"), tmp_path / "merged", progress=False)
    again, _ = _eval(capsys, str(folder), "--run", str(tiny_run), str(tmp_path / "m.json"))
    assert again["row"] == got["row"] and again["recorded"] is None
    base = yaml.safe_load((tiny_run / "config.yaml").read_text())["models"]["base"]
    other, _ = _eval(capsys, base, "--run", str(tiny_run), str(tmp_path / "b.json"))
    assert other["row"]["add"] != got["row"]["add"]  # the rows tell models apart: the equalities above have teeth
    search, _ = _eval(capsys, str(tiny_run), "--split", "search", str(tmp_path / "s.json"))
    store = RunStore.open(tiny_run)
    best = store.best(1)[0]
    store.close()
    assert search["row"]["add"] == round(best.metrics["add"]["acc"], 4)
    assert search["split_ids"] == splits["search"]


def test_eval_of_a_run_refuses_changed_items_and_task_arguments(tiny_run, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("EVOMERGE_THREADS", "1")
    run = tmp_path / "copy" / tiny_run.name  # the study is named after its folder
    shutil.copytree(tiny_run, run)
    splits = json.loads((run / "splits.json").read_text())
    splits["heldout"]["add"] = splits["heldout"]["add"][1:]
    (run / "splits.json").write_text(json.dumps(splits))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the heldout items of task 'add' are not the run's" in err and "splits.json" in err
    assert main(["eval", str(tiny_run), "--n", "3"]) == 2
    assert "a run's tasks are scored as the run scored them" in capsys.readouterr().err
    assert main(["eval", str(tiny_run / "nowhere")]) == 2
    assert "TASK" in capsys.readouterr().err
