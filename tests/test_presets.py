"""Every preset in search_spaces/ validates (`evomerge validate`, no weights loaded); bad presets fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.validate import validate_space

ROOT = Path(__file__).resolve().parents[1] / "search_spaces"
PRESETS = sorted(ROOT.glob("*.yaml"))


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    for name in ("base", "expert_sort", "expert_count", "tasks"):
        (tmp_path / name).mkdir()
    for task in ("sort", "count"):
        (tmp_path / "tasks" / f"{task}.jsonl").write_text("")
    monkeypatch.setenv("EVOMERGE_ZOO", str(tmp_path))
    return tmp_path


def test_there_are_presets_for_every_scenario():
    names = {p.stem for p in PRESETS}
    assert {"demo", "ko_chat_vector", "evollm_jp_ps", "evollm_jp_dfs", "solar_dus", "solar_dus_search",
            "demo_ps_dfs"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates(preset, fake_zoo, capsys):
    assert main(["validate", str(preset)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_recipes_parse(recipe, fake_zoo):
    r = Recipe.load(recipe)
    assert all(str(fake_zoo) in ref for ref in r.referenced_models())


@pytest.mark.parametrize("edit,key", [
    (("merge_method: ties", "merge_method: tie"), "merge_method"),
    (("density: {range: [0.4, 1.0]}", "density: {range: [0.0, 1.0]}"), "parameters.density.range"),
    (("budget: {trials: 96}", "budget: {trials: 0}"), "budget.trials"),
    (("optimizer: {name: cmaes}", "optimizer: {name: hillclimb}"), "optimizer.name"),
    (("granularity: layer", "granularity: layr"), "granularity"),
])
def test_bad_edits_name_the_key(edit, key, fake_zoo, tmp_path):
    text = (ROOT / "demo.yaml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(ConfigError) as err:
        validate_space(bad)
    assert str(bad) in str(err.value) and key in str(err.value)
