"""End-to-end parameter-space search on tiny models (CPU): run folder contents, live == exported merge,
failure injection, kill -9 and resume equal to an uninterrupted run, bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.store import RunStore


def _mcq_file(path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = rng.integers(10, 50, size=2)
        right = a + b
        choices = [str(right), str(right + 1), str(right - 1), str(right + 10)]
        order = rng.permutation(4)
        rows.append({"id": f"q{i}", "question": f"add:{a}+{b}=", "choices": [choices[j] for j in order],
                     "answer": int(np.where(order == 0)[0][0]), "category": "even" if i % 2 else "odd"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _space(fam, tmp_path, **over) -> Path:
    data = {
        "name": "tiny",
        "models": {k: str(v) for k, v in fam.items()},
        "base_model": "base",
        "merge_method": "ties",
        "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
        "granularity": "block",
        "block_size": 2,
        "split_attn_mlp": True,
        "tasks": [{"name": "add", "kind": "mcq", "path": str(_mcq_file(tmp_path / "mcq.jsonl")), "n_search": 10,
                   "n_heldout": 10, "loss_tiebreak": 0.01}],
        "optimizer": {"name": "cmaes", "popsize": 4},
        "budget": {"trials": 8},
        "heldout": {"top_k": 1},
        "seed": 3,
        "run_dir": str(tmp_path / "run"),
    }
    for k, v in over.items():
        data[k] = v
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_short_search_completes_and_leaves_a_full_run_folder(llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    run = start_run(_space(llama_family, tmp_path), quiet=True)
    for name in ("config.yaml", "study.db", "best.yaml", "heldout.json", "heldout.md", "splits.json", "report.md",
                 "report/fitness_per_trial.png", "report/layer_params_heatmap.png"):
        assert (run / name).exists(), name
    store = RunStore.open(run)
    trials = [t for t in store.trials() if t.finished]
    assert len(trials) == 8
    assert all(t.status == "ok" for t in trials)
    assert all(t.merge_seconds > 0 and t.eval_seconds > 0 for t in trials)
    # 4 layers in blocks of 2, attention and MLP apart: 2 params x 3 models x 2 blocks x 2 parts = 24 genes
    assert len(trials[0].genome) == 24
    best = Recipe.load(run / "best.yaml")
    assert best.merge_method == "ties"
    rows = json.loads((run / "heldout.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert sum(n.startswith("source:") for n in names) == 4
    labels = {n.split(": ")[1] for n in names if n.startswith("baseline:")}  # "baseline: LABEL: settings"
    assert {"average", "ties, uniform", "task arithmetic, uniform"} <= labels
    assert names[-1].startswith("evolved #1")
    splits = json.loads((run / "splits.json").read_text())
    assert not set(splits["search"]["add"]) & set(splits["heldout"]["add"])
    # mergekit accepts best.yaml as it stands
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(yaml.safe_load((run / "best.yaml").read_text()))


def test_live_candidate_equals_evomerge_merge_of_its_exported_recipe(llama_family, tmp_path):
    from evomerge.config import load_search_space
    from evomerge.merge.materialize import materialize
    from evomerge.workflow.context import build_context

    path = _space(llama_family, tmp_path)
    space, text = load_search_space(path)
    ctx = build_context(space, text, source=str(path), base_dir=tmp_path)
    genome = np.random.default_rng(1).random(ctx.space.dim)
    recipe = ctx.space.decode(genome)
    np.testing.assert_allclose(ctx.space.encode(recipe), genome, atol=1e-3)  # the inverse map
    live = {k: v.clone() for k, v in ctx.merger.merge(recipe).state_dict().items()}
    (tmp_path / "cand.yaml").write_text(recipe.to_yaml())
    out = materialize(Recipe.load(tmp_path / "cand.yaml"), tmp_path / "out", progress=False, copy_tokenizer=False)
    for name, value in load_file(str(out / "model.safetensors")).items():
        assert (live[name] - value).abs().max() <= 1e-6, name


FLAKY = '''
import math
calls = {"n": 0}
def score(model, tokenizer):
    calls["n"] += 1
    if calls["n"] % 4 == 2:
        raise RuntimeError("injected evaluation failure")
    if calls["n"] % 4 == 3:
        return float("nan")
    return float(model.model.layers[0].mlp.up_proj.weight.sum())
'''


def test_failures_are_recorded_and_the_run_completes(llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    (tmp_path / "flaky.py").write_text(FLAKY)
    tasks = [{"name": "flaky", "kind": "custom", "function": str(tmp_path / "flaky.py") + ":score"}]
    run = start_run(_space(llama_family, tmp_path, tasks=tasks, heldout={"sources": False, "baselines": False}),
                    quiet=True)
    trials = [t for t in RunStore.open(run, verify_config=False).trials() if t.finished]
    assert len(trials) == 8
    failed = [t for t in trials if t.status == "failed"]
    assert {"injected evaluation failure" in t.error for t in failed} == {True, False}
    assert any("nan" in t.error.lower() for t in failed)
    assert (run / "best.yaml").exists()


def _finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _trial_table(run: Path) -> list[tuple]:
    return [(t.number, tuple(np.round(t.genome, 12)), tuple(t.values or ()))
            for t in RunStore.open(run, verify_config=False).trials() if t.finished]


def kill_resume_and_compare(space_a: Path, space_b: Path, *, kill_after: int, total: int) -> list[tuple]:
    """Run space_a in a subprocess, SIGKILL it after `kill_after` finished trials, resume it to `total`;
    check nothing finished was lost or changed, the database is intact, and the trials equal an
    uninterrupted run of space_b (same search, another folder). Returns the trials finished before the kill."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_a, run_b = space_a.parent / "run", space_b.parent / "run"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "run", str(space_a), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _finished(run_a / "study.db") < kill_after and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _trial_table(run_a)
    assert kill_after <= len(before) < total
    res = subprocess.run([sys.executable, "-m", "evomerge", "resume", str(run_a), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    after = _trial_table(run_a)
    assert after[: len(before)] == before  # nothing finished was lost or changed
    assert len(after) == total
    with sqlite3.connect(run_a / "study.db") as con:
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    res = subprocess.run([sys.executable, "-m", "evomerge", "run", str(space_b), "--quiet"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # the same candidates with the same results; a trial killed mid-evaluation is enqueued again behind the ones
    # already waiting, so its number differs: candidates are compared by their place in their generation
    assert _by_place(run_a) == _by_place(run_b)
    return before


def _by_place(run: Path) -> list[tuple]:
    records = [t for t in RunStore.open(run, verify_config=False).trials() if t.finished]
    return sorted((t.generation, t.gen_index, tuple(np.round(t.genome, 12)), tuple(t.values or ()))
                  for t in records)


def test_kill_9_then_resume_equals_an_uninterrupted_run(llama_family, tmp_path):
    spaces = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        spaces.append(_space(llama_family, tmp_path / name, heldout={"sources": False, "baselines": False},
                             budget={"trials": 12}))
    kill_resume_and_compare(*spaces, kill_after=5, total=12)


@pytest.mark.parametrize("change,key", [
    ({"optimizer": {"name": "simulated-annealing"}}, "optimizer.name"),
    ({"parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.0, 1.5]}}}, "parameters.density.range"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"merge_method": "ties-ish"}, "merge_method"),
])
def test_bad_search_spaces(change, key, llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    with pytest.raises(ConfigError) as err:
        start_run(_space(llama_family, tmp_path, **change), quiet=True)
    assert str(tmp_path / "space.yaml") in str(err.value)
    assert key in str(err.value)
    assert not (tmp_path / "run").exists()


def test_models_that_cannot_be_merged(llama_family, qwen2_family, tmp_path):
    from evomerge.workflow.run import start_run

    fam = dict(llama_family) | {"c": qwen2_family["c"]}
    with pytest.raises(ConfigError, match="models"):
        start_run(_space(fam, tmp_path), quiet=True)


def test_unwritable_run_folder(llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # (tests run as root here, so permissions alone would not block)
    with pytest.raises(ConfigError, match="cannot write the run folder"):
        start_run(_space(llama_family, tmp_path, run_dir=str(blocker / "run")), quiet=True)


def test_resume_refuses_an_edited_config(llama_family, tmp_path):
    from evomerge.workflow.run import resume_run, start_run

    run = start_run(_space(llama_family, tmp_path, budget={"trials": 4},
                           heldout={"sources": False, "baselines": False}), quiet=True)
    before = _trial_table(run)
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("trials: 4", "trials: 6"))
    with pytest.raises(ConfigError, match="config.yaml"):
        resume_run(run, quiet=True)
    assert _trial_table(run) == before


def test_multi_objective_search_writes_the_pareto_set(llama_family, tmp_path):
    from evomerge.workflow.run import start_run

    mcq = str(_mcq_file(tmp_path / "mcq.jsonl"))
    tasks = [{"name": "odd", "kind": "mcq", "path": mcq, "n_search": 6, "n_heldout": 6, "seed": 1,
              "loss_tiebreak": 0.01},
             {"name": "even", "kind": "mcq", "path": mcq, "n_search": 6, "n_heldout": 6, "seed": 2,
              "loss_tiebreak": 0.01}]
    run = start_run(_space(llama_family, tmp_path, tasks=tasks, objectives="vector",
                           optimizer={"name": "nsga2", "popsize": 4},
                           heldout={"top_k": 1, "sources": False, "baselines": False}), quiet=True)
    store = RunStore.open(run)
    assert store.directions == ["maximize", "maximize"]
    front = store.pareto()
    files = sorted((run / "pareto").glob("*.yaml"))
    assert len(files) == len(front) >= 1
    for rec in front:  # nothing in the run dominates a Pareto member
        for other in store.trials():
            if other.finished and other.values:
                assert not all(o >= v for o, v in zip(other.values, rec.values)) or other.values == rec.values
    Recipe.load(files[0])


def test_resume_resolves_env_vars_as_when_the_run_started(llama_family, tmp_path, monkeypatch):
    from evomerge.workflow.run import resume_run, start_run

    _mcq_file(tmp_path / "mcq.jsonl")
    monkeypatch.setenv("EVOMERGE_TEST_DATA", str(tmp_path))
    tasks = [{"name": "add", "kind": "mcq", "path": "${EVOMERGE_TEST_DATA}/mcq.jsonl", "n_search": 6,
              "n_heldout": 6, "loss_tiebreak": 0.01}]  # (a flat fitness would let CMA-ES stop early)
    run = start_run(_space(llama_family, tmp_path, tasks=tasks, budget={"trials": 4},
                           heldout={"sources": False, "baselines": False}), quiet=True)
    monkeypatch.delenv("EVOMERGE_TEST_DATA")
    resume_run(run, quiet=True, max_trials=6)
    assert len([t for t in RunStore.open(run).trials() if t.finished]) == 6
