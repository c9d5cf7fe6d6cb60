"""Every preset in search_spaces/ runs: a 2-trial search of it on tiny stand-in models (the preset's
architecture and layer count, random weights) ends with a best.yaml. The presets' own tasks read data sets
from the hub (MGSM-JA through lm-eval, HAERAE-HUB/KMMLU), which the tests may not download, so each task is
replaced by a local generation task; everything else (method, parameters, granularity, stacking, optimizer,
seed) is the preset's own. The PS+DFS presets stack the layers of a PS merge of the stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.models.tiny import DEFAULT_ALPHABET, make_family
from evomerge.store import RunStore

ROOT = Path(__file__).resolve().parents[1] / "search_spaces"
PRESETS = sorted(ROOT.glob("*.yaml"))
FAMILY = {"evollm_jp_ps": ("mistral", 32), "evollm_jp_dfs": ("mistral", 32), "solar_dus": ("mistral", 32),
          "solar_dus_search": ("mistral", 32), "ko_chat_vector": ("llama", 4), "demo": ("llama", 4),
          "demo_ps_dfs": ("llama", 4)}


def _task_file(path: Path) -> str:
    letters = [c for c in DEFAULT_ALPHABET if c.isalpha()][:10]
    rows = [{"prompt": f"{a}{b}=", "answer": b + a} for a in letters for b in letters[:2]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_runs_a_two_trial_search(preset, tmp_path, monkeypatch):
    from evomerge.workflow.run import start_run

    family, layers = FAMILY[preset.stem]
    data = yaml.safe_load(preset.read_text())
    names = list(data["models"])
    fam = make_family(tmp_path / "models", family, names=tuple(names), num_layers=layers, hidden=32,
                      intermediate=64, heads=2, kv_heads=1)
    data["models"] = {n: str(fam[n]) for n in names}
    task = _task_file(tmp_path / "task.jsonl")
    data["tasks"] = [{"name": t["name"], "kind": "generation", "path": task, "n_search": 4, "n_heldout": 4,
                      "max_new_tokens": 3} for t in data["tasks"]]
    data |= {"budget": {"trials": 2}, "heldout": {"top_k": 1, "sources": False, "baselines": False},
             "device": "cpu", "dtype": "float32", "run_dir": str(tmp_path / "run")}
    stacking = data.get("stacking") or {}
    if stacking.get("ps_recipe"):  # the PS merge a PS+DFS search stacks: a uniform dare_ties of stand-ins
        ps = make_family(tmp_path / "ps_models", family, names=("base", "a", "b"), num_layers=layers, hidden=32,
                         intermediate=64, heads=2, kv_heads=1, seed=1)
        recipe = {"merge_method": "dare_ties", "base_model": str(ps["base"]), "dtype": "float32",
                  "models": [{"model": str(ps[n]), "parameters": {"weight": 0.5, "density": 0.7}} for n in "ab"]}
        (tmp_path / "ps.yaml").write_text(yaml.safe_dump(recipe))
        stacking["ps_recipe"] = str(tmp_path / "ps.yaml")
    space = tmp_path / preset.name
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    run = start_run(space, quiet=True)
    store = RunStore.open(run)
    assert store.count_finished() == 2
    assert (run / "best.yaml").exists() and (run / "heldout.json").exists()
