"""The warm start's points: the uniform hand-made merges that are points of the genome space, decoded back
to exactly their settings; settings outside an evolved range or against a fixed value are left out."""

from __future__ import annotations

import numpy as np

from evomerge.config import parse_search_space
from evomerge.recipe import evaluate_setting
from evomerge.spaces.parameter import ParameterSpace

SPACE = """
name: t
models: {base: b, x: x, y: y}
base_model: base
merge_method: ties
parameters:
  weight: {range: [0.0, 1.5]}
  density: {range: [0.1, 1.0]}
tasks: [{name: t, kind: custom, function: "m:f"}]
"""


def _space(text: str) -> ParameterSpace:
    config = parse_search_space(text, source="space.yaml")
    return ParameterSpace(config, {k: k for k in config.models}, 4)


def test_baselines_decode_to_their_own_settings():
    space = _space(SPACE)
    points = [(lbl, g) for lbl, g in space.baseline_genomes() if not lbl.startswith("source:")]
    assert len(points) == 8  # the uniform TIES grid: weights 0.5, 1 x densities 0.3, 0.5, 0.7, 1
    for label, genome in points:
        w = float(label.split("weight ")[1].split(",")[0])
        d = float(label.split("density ")[1])
        recipe = space.decode(genome)
        for entry in recipe.models or []:
            params = entry.parameters or {}
            for layer in range(4):
                t = layer / 3
                name = f"model.layers.{layer}.mlp.up_proj.weight"
                assert np.isclose(evaluate_setting(name, params["weight"], t), w)
                assert np.isclose(evaluate_setting(name, params["density"], t), d)


def test_settings_the_space_cannot_hold_are_left_out():
    narrow = SPACE.replace("weight: {range: [0.0, 1.5]}", "weight: {range: [0.8, 1.5]}")
    assert {lbl.split(", density")[0] for lbl, _ in _space(narrow).baseline_genomes()} == {"ties, uniform: weight 1"}
    fixed = SPACE.replace("density: {range: [0.1, 1.0]}", "density: 0.5")  # density 0.5 trims x and y: base only
    assert [lbl for lbl, _ in _space(fixed).baseline_genomes()] == ["source: base",
                                                                    "ties, uniform: weight 0.5, density 0.5",
                                                                    "ties, uniform: weight 1, density 0.5"]


def test_the_parents_are_warm_start_points():
    """The base (every weight 0) and each expert alone (its weight 1, the others 0), density 1, come first."""
    space = _space(SPACE)
    points = space.baseline_genomes()
    assert [lbl for lbl, _ in points[:3]] == ["source: base", "source: x", "source: y"]
    for label, genome in points[:3]:
        recipe = space.decode(genome)
        alone = label.removeprefix("source: ")
        for entry in recipe.models or []:
            params = entry.parameters or {}
            assert params["weight"] == (1.0 if entry.model == alone else 0.0)
            assert params["density"] == 1.0


def test_merging_a_parent_point_gives_the_parent(llama_family):
    """TIES of the base point is the base bit for bit; an expert's point is the expert up to base + (x - base)
    rounding (float32)."""
    import torch
    from safetensors.torch import load_file

    from evomerge.models.sources import open_model

    text = SPACE.replace("{base: b, x: x, y: y}", "{" + ", ".join(
        f"{k}: {llama_family[v]}" for k, v in (("base", "base"), ("x", "a"), ("y", "b"))) + "}")
    config = parse_search_space(text, source="space.yaml")
    refs = {k: str(v) for k, v in config.models.items()}
    space = ParameterSpace(config, refs, 4, sources={k: open_model(v) for k, v in refs.items()})
    merger = space.make_merger(device="cpu", offload="never")
    for label, genome in space.source_genomes():
        live = merger.merge(space.decode(genome)).state_dict()
        parent = load_file(str(llama_family[{"base": "base", "x": "a", "y": "b"}[label.removeprefix("source: ")]]
                               / "model.safetensors"))
        for name, value in parent.items():
            if label == "source: base":
                assert torch.equal(live[name], value), name
            else:
                assert torch.allclose(live[name], value, rtol=0, atol=1e-6), name


def test_no_parent_points_when_the_space_cannot_hold_them():
    assert _space(SPACE.replace("weight: {range: [0.0, 1.5]}", "weight: {range: [0.2, 1.5]}")).source_genomes() == []
    assert _space(SPACE.replace("density: {range: [0.1, 1.0]}", "density: {range: [0.1, 0.9]}")).source_genomes() == []
