"""The search loop on cheap analytic objectives: completion, failures, dedupe, budgets, resume
(in-process and after kill -9), two workers on one storage."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.search.driver import CandidateFailed, Outcome, genome_key, run_search
from evomerge.search.optimizers import make_optimizer
from evomerge.store import RunStore

SCRIPT = Path(__file__).parent / "_scripts" / "quadratic_search.py"
sys.path.insert(0, str(SCRIPT.parent))
from quadratic_search import CONFIG, objective_factory  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def quadratic(x: np.ndarray) -> Outcome:
    v = -float(np.sum((x - 0.3) ** 2))
    return Outcome(values=[v], metrics={"task": {"acc": 1 + v}}, recipe_yaml=f"x: {list(map(float, x))}\n",
                   layer_params={"w": [float(t) for t in x]}, merge_seconds=0.001, eval_seconds=0.002)


def new_store(tmp_path: Path, name: str = "run", directions=("maximize",)) -> RunStore:
    return RunStore.create(tmp_path / name, CONFIG, directions=list(directions), meta={"test": name})


def signature(store: RunStore) -> list[tuple]:
    """What must match between an interrupted+resumed run and an uninterrupted one."""
    recs = [r for r in store.trials() if r.finished]
    return sorted((r.generation, r.gen_index, tuple(r.genome.tolist()), tuple(r.values or ()), r.status, r.error)
                  for r in recs)


def test_cma_search_completes_and_store_holds_every_trial(tmp_path):
    store = new_store(tmp_path)
    opt = make_optimizer("cmaes", 4, seed=1, sigma0=0.3)
    s = run_search(store, opt, quadratic, max_trials=48)
    assert s.stop_reason == "max_trials" and s.finished == 48 and s.evaluated == 48 and s.failed == 0
    recs = store.trials()
    assert [r.number for r in recs] == list(range(48))
    assert all(r.status == "ok" and r.state == "COMPLETE" for r in recs)
    pop = opt.popsize
    assert pop == 8  # 4 + floor(3 ln 4)
    assert sorted({r.generation for r in recs}) == list(range(48 // pop))
    assert all(sorted(r.gen_index for r in recs if r.generation == g) == list(range(pop)) for g in range(6))
    for r in recs:
        assert r.genome.shape == (4,) and np.all((r.genome >= 0) & (r.genome <= 1))
        assert r.values[0] == pytest.approx(-np.sum((r.genome - 0.3) ** 2))
        assert r.metrics == {"task": {"acc": pytest.approx(1 + r.values[0])}}
        assert r.recipe_yaml.startswith("x: ") and r.layer_params == {"w": pytest.approx(list(r.genome))}
        assert r.key == genome_key(r.genome) and r.merge_seconds == 0.001 and r.eval_seconds == 0.002
    # the search made progress, and best() agrees with the stored values
    first_gen = max(r.values[0] for r in recs if r.generation == 0)
    best = store.best(3)
    assert best[0].values[0] == max(r.values[0] for r in recs) > first_gen
    assert [b.values[0] for b in best] == sorted([b.values[0] for b in best], reverse=True)
    assert s.best.number == best[0].number
    assert store.load_optimizer_state()["generation"] == 6
    # the params are real Optuna params: the dashboard / optuna API see the genome
    import optuna

    study = optuna.load_study(study_name=store.study.study_name, storage=store.folder.storage_url)
    assert study.trials[5].params == {f"g{i:04d}": pytest.approx(recs[5].genome[i], abs=0) for i in range(4)}
    assert study.best_trial.number == best[0].number


def test_failures_are_recorded_and_the_run_goes_on(tmp_path):
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        n = calls["n"]
        if n in (2, 5):
            raise ValueError(f"bad merge {n}\nsecond line")
        if n == 7:
            return Outcome(values=[float("nan")], metrics={"acc": 0.1})
        if n == 9:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if n == 11:
            raise CandidateFailed("tokenizer mismatch", recipe_yaml="merge_method: ties\n", merge_seconds=0.5)
        if n == 13:
            return Outcome(values=[float("inf")])
        return quadratic(x)

    store = new_store(tmp_path)
    s = run_search(store, make_optimizer("cmaes", 3, seed=0), flaky, max_trials=21)  # popsize 7: 3 generations
    assert s.stop_reason == "max_trials" and s.finished == 21 and s.failed == 6
    by_n = {r.number: r for r in store.trials()}
    assert by_n[1].status == "failed" and by_n[1].error == "ValueError: bad merge 2" and by_n[1].values is None
    assert by_n[4].error == "ValueError: bad merge 5"
    assert by_n[6].status == "failed" and "non-finite" in by_n[6].error and by_n[6].metrics == {"acc": 0.1}
    assert by_n[8].error.startswith("OutOfMemoryError: CUDA out of memory")
    assert by_n[10].error == "CandidateFailed: tokenizer mismatch"
    assert by_n[10].recipe_yaml == "merge_method: ties\n" and by_n[10].merge_seconds == 0.5
    assert by_n[12].status == "failed" and "inf" in by_n[12].error
    assert sum(r.status == "ok" for r in by_n.values()) == 15
    assert all(r.state == "FAIL" for r in by_n.values() if r.status == "failed")
    assert s.generations == 3  # the optimizer got every generation despite the failures


def test_keyboard_interrupt_propagates_and_run_resumes(tmp_path):
    calls = {"n": 0}

    def interrupt_on_third(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return quadratic(x)

    store = new_store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_search(store, make_optimizer("cmaes", 4, seed=2), interrupt_on_third, max_trials=16)
    recs = store.trials()
    # the rest of the generation stays in the queue for the next worker
    assert [r.status for r in recs] == ["ok", "ok", "interrupted"] + ["waiting"] * 5
    store.close()
    store = RunStore.open(tmp_path / "run", CONFIG)
    s = run_search(store, make_optimizer("cmaes", 4, seed=2), quadratic, max_trials=16)
    assert s.finished == 16 and s.evaluated == 14  # the two finished trials were not evaluated again


def test_identical_candidates_are_evaluated_once(tmp_path):
    calls = []

    def counted(x):
        calls.append(x.copy())
        return quadratic(np.round(x, 1))

    store = new_store(tmp_path)
    def coarse(g):  # a recipe grid of 0.1: many genomes, few recipes
        return genome_key(np.round(g, 1))

    s = run_search(store, make_optimizer("cmaes", 2, seed=0, sigma0=0.05), counted, max_trials=42,
                   dedupe_key=coarse)
    recs = store.trials()
    dups = [r for r in recs if r.duplicate_of is not None]
    assert s.finished == 42 and len(dups) == s.duplicates > 0 and len(calls) == 42 - len(dups) == s.evaluated
    originals = {r.number: r for r in recs if r.duplicate_of is None}
    assert len({r.key for r in originals.values()}) == len(originals)  # no key evaluated twice
    for d in dups:
        o = originals[d.duplicate_of]
        assert d.key == o.key and d.values == o.values and d.status == o.status and d.eval_seconds == 0.0
    assert all(b.duplicate_of is None for b in store.best(5))


def test_rich_progress_reports_trials_generations_and_failures(tmp_path):
    import io

    from rich.console import Console

    from evomerge.search.progress import RichProgress

    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, width=200, force_terminal=False))

    calls = {"n": 0}

    def obj(x):
        calls["n"] += 1
        return Outcome(values=[float("nan")]) if calls["n"] == 2 else quadratic(x)

    s = run_search(new_store(tmp_path), make_optimizer("cmaes", 2, seed=0), obj, max_trials=12, progress=progress)
    out = buf.getvalue()
    assert "trial 1 failed: non-finite fitness [nan]" in out
    assert "generation 0: best" in out and "generation 1: best" in out
    assert "12 finished trials, 12 evaluated now (1 failed" in out and f"best #{s.best.number}" in out
    assert progress.stats.session_trials == 12 and progress.stats.eta() == 0.0


def test_budget_errors_and_time_limit(tmp_path):
    store = new_store(tmp_path)
    opt = make_optimizer("cmaes", 2, seed=0)
    for bad in (0, -3, 2.5, None):
        with pytest.raises(ConfigError, match="max_trials"):
            run_search(store, opt, quadratic, max_trials=bad)
    with pytest.raises(ConfigError, match="max_seconds"):
        run_search(store, opt, quadratic, max_trials=5, max_seconds=0)

    def slow(x):
        time.sleep(0.05)
        return quadratic(x)

    s = run_search(store, opt, slow, max_trials=10_000, max_seconds=1.0)
    # stopped by the clock, not the trial budget (the count depends on the machine's load)
    assert s.stop_reason == "max_seconds" and 1 <= s.finished < 80 and s.seconds < 10


def test_max_trials_counts_across_resumes_and_resume_equals_uninterrupted(tmp_path):
    obj = objective_factory(0.0)  # with its injected failures (penalties must reproduce too)
    ref = new_store(tmp_path, "ref")
    run_search(ref, make_optimizer("cmaes", 4, seed=7, sigma0=0.3), obj, max_trials=44)

    store = new_store(tmp_path, "parts")
    s1 = run_search(store, make_optimizer("cmaes", 4, seed=7, sigma0=0.3), obj, max_trials=20)  # stops mid generation 2
    assert s1.finished == 20 and s1.generations == 2
    store.close()
    store = RunStore.open(tmp_path / "parts", CONFIG)
    s2 = run_search(store, make_optimizer("cmaes", 4, seed=7, sigma0=0.3), obj, max_trials=44)
    assert s2.finished == 44 and s2.evaluated == 24
    assert signature(store) == signature(ref)
    assert any(r.status == "failed" for r in store.trials())  # the comparison covered failures as well
    # nothing left to do: a second resume with the same budget evaluates nothing
    s3 = run_search(store, make_optimizer("cmaes", 4, seed=7, sigma0=0.3), obj, max_trials=44)
    assert s3.evaluated == 0 and s3.stop_reason == "max_trials"


def test_resume_refuses_an_edited_config(tmp_path):
    store = new_store(tmp_path)
    run_search(store, make_optimizer("random", 2, seed=0), quadratic, max_trials=3)
    store.close()
    cfg = tmp_path / "run" / "config.yaml"
    cfg.write_text(CONFIG + "extra: 1\n")
    with pytest.raises(ConfigError, match="edited after the run started") as ei:
        RunStore.open(tmp_path / "run", None)
    assert str(cfg) in str(ei.value)


def _run_script(run_dir: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), *extra], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _count_finished(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'FAIL')").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_kill9_then_resume_loses_nothing_and_matches_uninterrupted_run(tmp_path):
    args = ["--optimizer", "cmaes", "--seed", "3", "--max-trials", "40", "--sleep", "0.05"]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _count_finished(run_dir / "study.db") < 11 and time.monotonic() < deadline:  # inside generation 1
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(run_dir / "study.db")
    before = con.execute("SELECT number, state FROM trials WHERE state IN ('COMPLETE','FAIL') "
                         "ORDER BY number").fetchall()
    con.close()
    assert 11 <= len(before) < 40

    res = _run_script(run_dir, *args)
    assert res.returncode == 0, res.stderr
    evaluated = int(res.stdout.split("evaluated=")[1].split()[0])
    assert evaluated == 40 - len(before)  # what finished before the kill was not evaluated again
    con = sqlite3.connect(run_dir / "study.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()

    store = RunStore.open(run_dir, CONFIG)
    recs = store.trials()
    by_number = {r.number: r for r in recs}
    # every trial finished before the kill is still there, unchanged in state
    assert all(by_number[n].state == state for n, state in before)
    finished = [r for r in recs if r.finished]
    assert len(finished) == 40
    slots = [(r.generation, r.gen_index) for r in finished]
    assert len(set(slots)) == 40  # nothing evaluated twice
    assert all(r.status in ("ok", "failed", "stale") for r in recs)
    assert not any(r.status == "running" for r in recs)

    # the same search uninterrupted (in-process, no sleep: values do not depend on it)
    ref = new_store(tmp_path, "reference")
    run_search(ref, make_optimizer("cmaes", 4, seed=3, sigma0=0.3), objective_factory(0.0), max_trials=40)
    assert signature(store) == signature(ref)


def test_two_tpe_workers_never_evaluate_the_same_candidate(tmp_path):
    run_dir = tmp_path / "shared"
    RunStore.create(run_dir, CONFIG, directions=["maximize"]).close()
    args = ["--optimizer", "tpe", "--seed", "5", "--max-trials", "16", "--sleep", "0.05", "--dim", "3"]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = RunStore.open(run_dir, CONFIG)
    recs = store.trials()
    numbers = [r.number for r in recs]
    assert len(numbers) == len(set(numbers))
    finished = [r for r in recs if r.finished]
    assert len(finished) == 16  # the budget is counted in the storage: never overshot
    evaluated = [r for r in finished if r.duplicate_of is None]
    assert len({r.key for r in evaluated}) == len(evaluated)  # no candidate evaluated twice
    assert {r.worker["pid"] for r in finished} == {p.pid for p in procs}  # both workers worked
    assert not any(r.status == "running" for r in recs)


def test_warm_start_scores_the_baselines_first_and_starts_cmaes_at_the_best(tmp_path):
    from evomerge.search.optimizers import CMAOptimizer

    warm = [("far", np.full(4, 0.9)), ("best", np.full(4, 0.35)), ("worse", np.full(4, 0.6))]
    store = new_store(tmp_path)
    s = run_search(store, make_optimizer("cmaes", 4, seed=1, sigma0=0.2), quadratic, max_trials=3 + 8,
                   warm_start=warm)
    recs = store.trials()
    assert [r.status for r in recs[:3]] == ["ok"] * 3 and [r.generation for r in recs[:3]] == [-1] * 3
    assert [np.asarray(r.genome).tolist() for r in recs[:3]] == [g.tolist() for _, g in warm]
    assert s.finished == 11 and [r.generation for r in recs[3:]] == [0] * 8
    # the first generation was drawn around the best baseline: its mean is that genome
    fresh = make_optimizer("cmaes", 4, seed=1, sigma0=0.2)
    assert isinstance(fresh, CMAOptimizer)
    fresh.start_at(np.full(4, 0.35))
    expected = fresh.ask()
    assert all(np.array_equal(np.asarray(r.genome), x) for r, x in zip(recs[3:], expected))
    assert np.allclose(fresh.es.mean, 0.35)


def test_warm_start_candidates_are_waiting_trials_for_samplers(tmp_path):
    warm = [("a", np.full(2, 0.1)), ("b", np.full(2, 0.3))]
    store = new_store(tmp_path)
    run_search(store, make_optimizer("tpe", 2, seed=0, popsize=4), quadratic, max_trials=6, warm_start=warm)
    recs = store.trials()
    assert [np.asarray(r.genome).tolist() for r in recs[:2]] == [[0.1, 0.1], [0.3, 0.3]]
    assert len([r for r in recs if r.finished]) == 6
