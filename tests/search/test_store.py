"""RunStore: run folder, config snapshot, trial records, optimizer state, stale trials, claims."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import numpy as np
import optuna
import pytest

from evomerge.errors import ConfigError
from evomerge.store import RunStore
from evomerge.store.locks import this_worker

CONFIG = "models: [a, b]\nmethod: ties\n"
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def _trial(store: RunStore, genome, gen=0, idx=0, key=None):
    trial = store.new_trial()
    store.begin_trial(trial, np.asarray(genome, float), generation=gen, gen_index=idx, key=key or f"k{gen}-{idx}")
    return trial


def test_create_writes_snapshot_and_study(tmp_path):
    store = RunStore.create(tmp_path / "r1", CONFIG, directions=["maximize"], meta={"space": "demo", "dim": 3})
    assert (tmp_path / "r1" / "config.yaml").read_text() == CONFIG
    assert store.folder.storage_url == f"sqlite:///{tmp_path / 'r1' / 'study.db'}"
    assert store.meta == {"space": "demo", "dim": 3} and store.directions == ["maximize"]
    store.close()
    again = RunStore.open(tmp_path / "r1", CONFIG)
    assert again.meta["space"] == "demo"
    # a plain Optuna client (what optuna-dashboard uses) reads the run
    assert optuna.get_all_study_names(again.folder.storage_url) == ["r1"]


def test_refuses_to_overwrite_unless_asked(tmp_path):
    RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"]).close()
    with pytest.raises(ConfigError, match="already exists") as ei:
        RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"])
    assert str(tmp_path / "r") in str(ei.value)
    fresh = RunStore.create(tmp_path / "r", "other: 1\n", directions=["minimize"], overwrite=True)
    assert fresh.directions == ["minimize"] and fresh.trials() == []


def test_refuses_unwritable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write the run folder") as ei:
        RunStore.create(blocker / "run", CONFIG, directions=["maximize"])
    assert "a_file" in str(ei.value)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot write"):
            RunStore.create(ro / "run", CONFIG, directions=["maximize"])


def test_open_refuses_edited_or_different_config(tmp_path):
    RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"]).close()
    with pytest.raises(ConfigError, match="differs from this run's snapshot"):
        RunStore.open(tmp_path / "r", CONFIG + "# changed\n")
    (tmp_path / "r" / "config.yaml").write_text(CONFIG.replace("ties", "dare_ties"))
    with pytest.raises(ConfigError, match="edited after the run started") as ei:
        RunStore.open(tmp_path / "r")
    assert "config.yaml" in str(ei.value)
    RunStore.open(tmp_path / "r", verify_config=False).close()  # the report may still read it
    with pytest.raises(ConfigError, match="no run here"):
        RunStore.open(tmp_path / "nothing")


def test_bad_directions(tmp_path):
    with pytest.raises(ConfigError, match="directions"):
        RunStore.create(tmp_path / "r", CONFIG, directions=["up"])


def test_trial_records_best_pareto_and_keys(tmp_path):
    store = RunStore.create(tmp_path / "r", CONFIG, directions=["maximize", "maximize"])
    rows = [([0.1, 0.2], [1.0, 0.0]), ([0.3, 0.4], [0.0, 1.0]), ([0.5, 0.6], [0.5, 0.5]), ([0.7, 0.8], [0.4, 0.4])]
    for i, (g, v) in enumerate(rows):
        t = _trial(store, g, idx=i)
        store.finish_trial(t, values=v, status="ok", metrics={"a": {"acc": np.float32(v[0])}},
                           recipe_yaml=f"r: {i}\n", layer_params={"w": np.array([1.0, 2.0])},
                           merge_seconds=0.1, eval_seconds=0.2)
    t = _trial(store, [0.9, 0.9], idx=4)
    store.finish_trial(t, values=None, status="failed", error="ValueError: nope")
    recs = store.trials()
    assert [r.status for r in recs] == ["ok", "ok", "ok", "ok", "failed"]
    assert recs[0].metrics == {"a": {"acc": 1.0}} and recs[0].layer_params == {"w": [1.0, 2.0]}
    assert recs[2].recipe_yaml == "r: 2\n" and np.array_equal(recs[3].genome, [0.7, 0.8])
    assert recs[4].error == "ValueError: nope" and recs[4].state == "FAIL"
    assert [r.number for r in store.pareto()] == [0, 1, 2]  # trial 3 is dominated by 2
    assert store.best(2)[0].number == 0
    assert set(store.generation_trials(0)) == {0, 1, 2, 3, 4}
    assert store.count_finished() == 5


def test_optimizer_state_lives_in_the_storage_and_round_trips(tmp_path):
    store = RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"])
    assert store.load_optimizer_state() is None
    store.save_optimizer_state({"generation": 3, "blob": b"x" * 100_000})
    store.save_optimizer_state({"generation": 4, "blob": b"y"})
    store.close()
    store = RunStore.open(tmp_path / "r", CONFIG)  # another process sees it: it is in study.db, not a side file
    assert store.load_optimizer_state() == {"generation": 4, "blob": b"y"}
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if not p.name.startswith("study.db")) == [
        "config.yaml"]
    with sqlite3.connect(tmp_path / "r" / "study.db") as con:
        con.execute("update evomerge_state set value = ? where key like '%:optimizer'", (b"garbage",))
    with pytest.raises(ConfigError, match="unreadable"):
        store.load_optimizer_state()


def test_trials_of_a_dead_worker_become_stale(tmp_path):
    store = RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"])
    mine = _trial(store, [0.5], idx=0)
    dead = _trial(store, [0.6], idx=1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_worker = dict(this_worker(), pid=int(gone.stdout), start=None)
    store.set_trial_attrs(dead, {"worker": dead_worker})
    assert store.fail_stale_trials() == [dead.number]  # ours is alive: left alone
    recs = store.trials()
    assert recs[0].status == "running" and recs[1].status == "stale" and "stopped" in recs[1].error
    assert store.count_finished() == 0  # stale trials are not counted
    retry = store.trials()[-1]  # its candidate is back in the queue for any worker
    assert retry.status == "waiting" and np.array_equal(retry.genome, [0.6]) and retry.number == dead.number + 1
    assert store.fail_stale_trials() == []  # failed and requeued once, not at every check
    assert store.pop_waiting().number == retry.number and mine.number == 0


def test_claims_give_each_key_one_owner(tmp_path):
    store = RunStore.create(tmp_path / "r", CONFIG, directions=["maximize"])
    a, b = _trial(store, [0.1], key="K"), _trial(store, [0.1], idx=1, key="K")
    assert store.claim("K", a) == a.number
    assert store.claim("K", b) == a.number  # a owns it while running
    store.abort_trial(a, "cancelled", "budget")
    assert store.claim("K", b) == b.number  # a stopped without a result: b takes over
    store.finish_trial(b, values=None, status="failed", error="E: x")
    c = _trial(store, [0.1], idx=2, key="K")
    assert store.claim("K", c) == b.number  # a real failure is a result: reused, not retried
