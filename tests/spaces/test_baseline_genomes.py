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
    points = space.baseline_genomes()
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
    fixed = SPACE.replace("density: {range: [0.1, 1.0]}", "density: 0.5")
    assert [lbl for lbl, _ in _space(fixed).baseline_genomes()] == ["ties, uniform: weight 0.5, density 0.5",
                                                                    "ties, uniform: weight 1, density 0.5"]
