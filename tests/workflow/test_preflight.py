"""`preflight` learns from configs alone what the run's genome spaces learn from the opened weights: the same
genome size, layer counts and split sizes, without reading a tensor. `evomerge validate` is this very function."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.config import load_search_space
from evomerge.workflow.preflight import Preflight, preflight
from tests.workflow.test_run import _mcq_file, _space


def _stack_space(fam, tmp_path: Path, stacking: dict) -> Path:
    data = yaml.safe_load(_space(fam, tmp_path).read_text())
    data.update(models={k: str(v) for k, v in fam.items() if k in ("a", "b")}, merge_method=None, parameters={},
                stacking=stacking)
    data.pop("base_model")
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _both(path: Path, tmp_path: Path) -> tuple[Preflight, object]:
    """The preflight of a space and the genome space a run builds from the opened weights (load=False)."""
    from evomerge.workflow.context import build_context

    config, text = load_search_space(path)
    report = preflight(config, str(path), path.parent)
    config, text = load_search_space(path)
    ctx = build_context(config, text, source=str(path), base_dir=path.parent, load=False, run_dir=tmp_path / "run")
    return report, ctx.space


def test_parameter_space_matches_the_run(llama_family, tmp_path):
    report, space = _both(_space(llama_family, tmp_path), tmp_path)
    assert report.dim == space.dim == 24  # 2 params x 3 models x 2 blocks x (attn, mlp)
    assert report.layer_counts == {name: 4 for name in llama_family}
    assert [(t.items, t.n_search, t.n_heldout) for t in report.tasks] == [(24, 10, 10)]


@pytest.mark.parametrize("stacking", [
    {"mode": "dfs", "models": ["a", "b"], "target": "a", "repeats": 2, "max_length": 8},
    {"mode": "dus", "target": "a"},
    {"mode": "dus", "target": "a", "drop": 1},
], ids=["dfs", "dus", "dus-fixed"])
def test_stacking_space_matches_the_run(llama_family, tmp_path, stacking):
    report, space = _both(_stack_space(llama_family, tmp_path, stacking), tmp_path)
    assert report.dim == space.dim
    assert list(report.stack_layers.values()) == space.layer_counts


def test_ps_dfs_layer_counts_match_the_materialized_ps_merge(llama_family, tmp_path):
    fam = {k: str(v) for k, v in llama_family.items()}
    ps = {"merge_method": "ties", "base_model": fam["base"],
          "models": [{"model": fam[n], "parameters": {"weight": 1.0, "density": 0.5}} for n in ("a", "b")]}
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(ps))
    stacking = {"mode": "dfs", "models": ["a"], "ps_recipe": "ps.yaml", "repeats": 1, "max_length": 6}
    report, space = _both(_stack_space(llama_family, tmp_path, stacking), tmp_path)
    assert report.stack_layers == {"ps_merge": 4, "a": 4}
    assert list(report.stack_layers.values()) == space.layer_counts and report.dim == space.dim


def test_preflight_reads_no_weights(llama_family, tmp_path, monkeypatch):
    import safetensors
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("preflight opened a weight file")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    path = _space(llama_family, tmp_path)
    config, _ = load_search_space(path)
    assert preflight(config, str(path), path.parent).dim == 24


def test_validate_runs_exactly_the_preflight():
    import evomerge.validate
    import evomerge.workflow.preflight

    assert evomerge.validate.preflight is evomerge.workflow.preflight.preflight


def test_split_sizes_follow_the_run_splits(llama_family, tmp_path):
    """per_category and n_search as make_splits allocates them (the categories of _mcq_file: odd / even)."""
    path = _space(llama_family, tmp_path, tasks=[
        {"name": "a", "kind": "mcq", "path": str(_mcq_file(tmp_path / "m.jsonl", 30)), "per_category": 5},
        {"name": "b", "kind": "mcq", "path": str(tmp_path / "m.jsonl"), "n_search": 7, "n_heldout": 3}])
    config, _ = load_search_space(path)
    tasks = preflight(config, str(path), path.parent).tasks
    assert [(t.n_search, t.n_heldout) for t in tasks] == [(10, 10), (7, 3)]


def test_gguf_header_gives_the_layer_count(smollm2_gguf, llama_family, tmp_path):
    """A GGUF file's config comes from its header (no tensor dequantized): SmolLM2-135M has 30 layers."""
    path = _space(llama_family, tmp_path, models={"base": str(smollm2_gguf), "a": str(smollm2_gguf)},
                  granularity="layer", split_attn_mlp=False)
    config, _ = load_search_space(path)
    report = preflight(config, str(path), path.parent)
    assert report.layer_counts == {"base": 30, "a": 30}
    assert report.dim == 2 * 30  # weight, density x 1 expert x 30 layers
