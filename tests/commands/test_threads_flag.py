"""`--threads N` on run, resume, eval and demo reaches `choose_threads` (as EVOMERGE_THREADS) before any work; the
search space's `threads:` is validated."""

from __future__ import annotations

import os

import pytest

from evomerge.cli import main
from evomerge.threads import choose_threads


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    """The commands set EVOMERGE_THREADS: put it back as it was after each test."""
    monkeypatch.setenv("EVOMERGE_THREADS", "")  # remembers the value before the test
    monkeypatch.delenv("EVOMERGE_THREADS")


@pytest.mark.parametrize("argv, target", [
    (["run", "space.yaml", "--threads", "3"], "evomerge.workflow.run.start_run"),
    (["resume", "runs/x", "--threads", "3"], "evomerge.workflow.run.resume_run"),
    (["demo", "--threads", "3"], "evomerge.demo.run.run_demo"),
])
def test_threads_flag_is_what_choose_threads_returns(argv, target, monkeypatch):
    seen = []
    monkeypatch.setattr(target, lambda *a, **k: seen.append(choose_threads(None)))
    assert main(argv) == 0
    assert seen == [3] and os.environ["EVOMERGE_THREADS"] == "3"
    assert choose_threads(8) == 3  # the flag wins over the space's threads:


def test_without_the_flag_the_space_decides(monkeypatch):
    seen = []
    monkeypatch.setattr("evomerge.workflow.run.start_run", lambda *a, **k: seen.append(choose_threads(2)))
    assert main(["run", "space.yaml"]) == 0
    assert seen == [2] and "EVOMERGE_THREADS" not in os.environ


def test_eval_applies_the_flag(monkeypatch, llama_family, tmp_path):
    import torch

    task = tmp_path / "t.jsonl"
    task.write_text('{"question": "1+1=", "choices": ["2", "3"], "answer": 0}\n')
    before = torch.get_num_threads()
    try:
        assert main(["eval", str(llama_family["base"]), str(task), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_thread_counts_are_one_line_errors(bad, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["run", "space.yaml", "--threads", bad])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err


def test_threads_in_the_search_space():
    from evomerge.config import parse_search_space
    from evomerge.errors import ConfigError

    text = "name: x\nmodels: {a: ./a}\ntasks: [{name: t, kind: mcq, path: t.jsonl}]\n"
    assert parse_search_space(text, source="s.yaml").threads is None
    assert parse_search_space(text + "threads: 4\n", source="s.yaml").threads == 4
    with pytest.raises(ConfigError, match="s.yaml.*threads"):
        parse_search_space(text + "threads: 0\n", source="s.yaml")
