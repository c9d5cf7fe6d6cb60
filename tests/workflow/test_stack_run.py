"""Layer-stacking searches end to end on tiny models (CPU): DFS, PS+DFS with kill -9 and resume, DUS; the
exported passthrough recipe reproduces the live stacked model through `evomerge merge` and mergekit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.store import RunStore
from tests.workflow.test_run import _mcq_file, kill_resume_and_compare


def _space(fam, tmp_path, stacking: dict, **over):
    data = {
        "name": "stack",
        "models": {k: str(v) for k, v in fam.items() if k in ("a", "b")},
        "merge_method": None,
        "stacking": stacking,
        "tasks": [{"name": "add", "kind": "mcq", "path": str(_mcq_file(tmp_path / "mcq.jsonl")), "n_search": 8,
                   "n_heldout": 8, "loss_tiebreak": 0.01}],
        "optimizer": {"name": "cmaes", "popsize": 4},
        "budget": {"trials": 6},
        "heldout": {"top_k": 1, "sources": True, "baselines": False},
        "seed": 1,
        "run_dir": str(tmp_path / "run"),
    } | over
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_dfs_search_end_to_end_and_export_matches_live(llama_family, tmp_path):
    from evomerge.config import load_search_space
    from evomerge.merge.materialize import materialize
    from evomerge.workflow.context import build_context
    from evomerge.workflow.run import start_run

    path = _space(llama_family, tmp_path, {"mode": "dfs", "models": ["a", "b"], "target": "a", "repeats": 2,
                                          "max_length": 8, "scale_range": [0.7, 1.3]})
    run = start_run(path, quiet=True)
    trials = [t for t in RunStore.open(run).trials() if t.finished]
    assert len(trials) == 6 and all(t.status == "ok" for t in trials)
    best = Recipe.load(run / "best.yaml")
    assert best.merge_method == "passthrough"
    assert (run / "report" / "layer_params_heatmap.png").exists()

    # a random candidate: live stacked model vs evomerge merge vs mergekit of its exported recipe
    space, text = load_search_space(path)
    ctx = build_context(space, text, source=str(path), base_dir=tmp_path)
    genome = np.random.default_rng(5).random(ctx.space.dim)
    cand = ctx.space.decode(genome)
    assert len(set(cand.path)) < len(cand.path) or len(cand.path) > 2  # a real path through several layers
    live = ctx.merger.merge(cand)
    out = materialize(cand.recipe, tmp_path / "ours", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(cand.to_yaml())), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk").eval()
    ids = torch.tensor([[5, 9, 14, 30, 31, 40, 7]])
    with torch.no_grad():
        a, b, c = live(ids).logits, ours(ids).logits, theirs(ids).logits
    assert torch.allclose(b, c, atol=1e-6)  # evomerge merge == mergekit, exactly
    # score what you ship: the live model is the exported recipe's model (rms_norm_eps 1e-6 here)
    assert ours.config.rms_norm_eps == 1e-6
    assert ((a - b).abs().max() / a.abs().max()) <= 1e-6


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_live_stack_is_the_exported_recipes_model(eps, tmp_path):
    """At realistic norm eps the search's live model equals `evomerge merge` and mergekit of the recipe it
    exports: the same weights bit for bit, logits within 1e-6 relative (measured: equal). The scaled-residual
    stack it replaced differed by ~eps / ms(activations): 1.3e-4 to 1.9e-4 at eps 1e-6, ~1.5e-3 at 1e-5."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge.config import load_search_space
    from evomerge.merge.materialize import materialize
    from evomerge.merge.stacking import build_stacked_model
    from evomerge.models.tiny import make_family
    from evomerge.workflow.context import build_context

    fam = make_family(tmp_path / "fam", "llama", rms_norm_eps=eps)
    path = _space(fam, tmp_path, {"mode": "dfs", "models": ["a", "b"], "target": "a", "repeats": 2,
                                  "max_length": 8, "scale_range": [0.7, 1.3]})
    space, text = load_search_space(path)
    ctx = build_context(space, text, source=str(path), base_dir=tmp_path)
    ids = torch.tensor([[5, 9, 14, 30, 31, 40, 7], [3, 3, 8, 21, 2, 17, 11]])
    for seed in (5, 6):
        cand = ctx.space.decode(np.random.default_rng(seed).random(ctx.space.dim))
        assert any(s != 1.0 for s in cand.scales[1:])  # transition scales to fold
        live = ctx.merger.merge(cand)
        out = materialize(cand.recipe, tmp_path / f"ours{seed}", progress=False)
        ours = AutoModelForCausalLM.from_pretrained(out).eval()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(cand.to_yaml())), str(tmp_path / f"mk{seed}"),
                  options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / f"mk{seed}").eval()
        state, written = live.state_dict(), ours.state_dict()
        assert set(state) == set(written)
        assert all(torch.equal(state[k], written[k]) and torch.equal(written[k], theirs.state_dict()[k])
                   for k in written)
        with torch.no_grad():
            a, b = live(ids).logits, ours(ids).logits
            models = [ctx.merger.models[r] for r in ctx.space.refs]
            hooked = build_stacked_model(models[ctx.space.target_index], cand.path, cand.scales, models)(ids).logits
        assert float((a - b).abs().max() / a.abs().max()) <= 1e-6
        assert float((hooked - b).abs().max() / b.abs().max()) > 10 * eps  # what the old live model scored


def _ps_recipe(fam, tmp_path):
    path = tmp_path / "ps.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(fam["c"]), "parameters": {"weight": 0.4, "density": 0.7}}],
        "dtype": "float32"}))
    return path


def test_ps_plus_dfs_kill_9_and_resume(llama_family, tmp_path):
    stacking = {"mode": "dfs", "models": ["b"], "repeats": 1, "max_length": 8,
                "ps_recipe": str(_ps_recipe(llama_family, tmp_path))}
    spaces = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        spaces.append(_space(llama_family, tmp_path / name, stacking, budget={"trials": 10},
                             heldout={"sources": False, "baselines": False}))
    kill_resume_and_compare(*spaces, kill_after=4, total=10)
    run_a = tmp_path / "a" / "run"
    assert (run_a / "ps_model" / "config.json").exists()
    best = Recipe.load(run_a / "best.yaml")
    assert str((run_a / "ps_model").resolve()) in best.referenced_models()


def _recipe_path(recipe: Recipe, refs: list[str]) -> list[tuple[int, int]]:
    """(source index, layer) of every layer the recipe's slices stack, in order (empty slices add none)."""
    path = []
    for s in recipe.slices:
        src = s.sources[0]
        path += [(refs.index(str(src.model)), layer) for layer in range(*src.layer_range)]
    return path


@pytest.mark.parametrize("drop", [None, 1])
def test_dus_search_and_fixed_dus(drop, llama_family, tmp_path):
    """The best genome's layer path is exactly the path best.yaml's slices stack, and a DUS path: the first copy
    keeps layers [0, end), the second [start, n), with end >= n/2 >= start (a fixed drop d: end = n - d, start = d)."""
    from evomerge.config import load_search_space
    from evomerge.workflow.context import build_context
    from evomerge.workflow.run import start_run

    stacking = {"mode": "dus", "target": "a"} | ({"drop": drop} if drop else {})
    path = _space(llama_family, tmp_path, stacking, budget={"trials": 4})
    run = start_run(path, quiet=True)
    best = Recipe.load(run / "best.yaml")
    store = RunStore.open(run)
    trial = store.best(1)[0]
    trials = [t for t in store.trials() if t.finished]
    store.close()

    space, text = load_search_space(path)
    ctx = build_context(space, text, source=str(path), base_dir=tmp_path, load=False)
    decoded, scales = ctx.space.path_of(trial.genome)
    assert _recipe_path(best, [str(r) for r in ctx.space.refs]) == decoded
    assert trial.layer_params["layer (global index)"] == [float(layer) for _, layer in decoded]
    assert scales == [1.0] * len(decoded)
    n = 4
    if drop:
        assert decoded == [(0, i) for i in range(n - drop)] + [(0, i) for i in range(drop, n)]
        assert sum(t.duplicate_of is None for t in trials) == 1  # the one recipe, scored once
    else:
        dus_paths = [[(0, i) for i in range(end)] + [(0, i) for i in range(start, n)]
                     for end in range(math.ceil(n / 2), n + 1) for start in range(n // 2 + 1)]
        assert decoded in dus_paths


def test_stacking_bad_input(llama_family, tmp_path):
    from evomerge.models.tiny import char_tokenizer, random_model, save_model, tiny_config
    from evomerge.workflow.run import start_run

    with pytest.raises(ConfigError, match="max_len"):
        start_run(_space(llama_family, tmp_path, {"mode": "dfs", "max_length": 1}), quiet=True)
    tok = char_tokenizer()
    narrow = save_model(random_model(tiny_config("llama", vocab_size=len(tok), hidden=32)), tok, tmp_path / "narrow")
    fam = {"a": llama_family["a"], "b": narrow}
    with pytest.raises(ConfigError, match="stacking.models"):
        start_run(_space(fam, tmp_path, {"mode": "dfs"}), quiet=True)
    assert not (tmp_path / "run" / "study.db").exists()
