"""Genes along the layers: a curve of K control points is the mergekit gradient list the recipe keeps (the
live merge, `evomerge merge` and mergekit read the same numbers), and `granularity: auto` sizes the genome
from the search items the space states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.config import parse_search_space
from evomerge.errors import ConfigError
from evomerge.models.sources import open_model
from evomerge.recipe import evaluate_setting
from evomerge.spaces.parameter import ParameterSpace
from evomerge.spaces.points import ITEMS_PER_GENE, Points, auto_points
from tests.workflow.test_run import _mcq_file


def _space(fam, tmp_path, n_search=8, **over) -> ParameterSpace:
    data = {"name": "curve", "models": {n: str(fam[n]) for n in ("base", "a", "b")}, "base_model": "base",
            "merge_method": "ties", "dtype": "float32",
            "tasks": [{"name": "add", "kind": "mcq", "path": str(_mcq_file(tmp_path / "mcq.jsonl")),
                       "n_search": n_search}]} | over
    config = parse_search_space(yaml.safe_dump(data), source="space.yaml")
    refs = {n: str(p) for n, p in config.models.items()}
    return ParameterSpace(config, refs, 4, source="space.yaml", sources={n: open_model(r) for n, r in refs.items()})


def test_curve_values_are_mergekit_gradient_interpolation():
    points = Points.curved(7, 3)
    values = [0.2, 0.9, 0.4]
    assert points.setting(values) == values  # the recipe keeps the control points
    want = [evaluate_setting("", values, i / 6) for i in range(7)]
    assert points.layer_values(values) == want
    assert points.layer_values(values)[3] == pytest.approx(0.9) and points.layer_values(values)[0] == 0.2
    assert [points.position(i) for i in range(3)] == [0.0, 0.5, 1.0]


def test_auto_keeps_ten_items_per_gene():
    assert auto_points(4, 4, 16 * ITEMS_PER_GENE)[0] == Points.grouped(4, 1)  # 16 genes: per layer
    points, why = auto_points(4, 4, 16 * ITEMS_PER_GENE - 1)  # one item short: a curve of 3 points (12 genes)
    assert points == Points.curved(4, 3) and "curve of 3 points" in why
    assert auto_points(32, 12, 150)[0] == Points.curved(32, 2)  # never fewer than 2 points
    assert auto_points(32, 12, None)[0] == Points.grouped(32, 1)  # sizes not stated: per layer, and says so


def test_a_curve_space_merges_like_mergekit(llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from evomerge.merge.materialize import materialize

    space = _space(llama_family, tmp_path, granularity="curve", control_points=3, split_attn_mlp=True)
    assert space.dim == 2 * 2 * 3 * 2  # weight, density x 2 models x 3 points x attn/mlp
    genome = np.random.default_rng(1).random(space.dim)
    recipe = space.decode(genome)
    weight = recipe.models[0].parameters["weight"]
    assert [len(c.value) for c in weight] == [3, 3, 3]  # attn, mlp, the rest: 3-point gradients
    assert space.decode(space.encode(recipe)).to_yaml() == recipe.to_yaml()
    assert {n.split(".")[2] for n in space.gene_layout().names} == {"curve0of3", "curve1of3", "curve2of3"}

    live = space.make_merger(device="cpu", offload="never").merge(recipe).state_dict()
    ours = load_file(str(materialize(recipe, tmp_path / "ours", progress=False, copy_tokenizer=False)
                         / "model.safetensors"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    for name, ref in theirs.items():
        assert torch.equal(ours[name], ref) and torch.equal(live[name], ref), name
    # the middle layers take interpolated values: layer 1 of 4 sits at t = 1/3 between points 0 and 1
    per_layer = space.per_layer(genome)[("weight", "a", "attn")]
    points = space.per_point(genome)[("weight", "a", "attn")]
    assert per_layer[1] == pytest.approx(points[0] + (points[1] - points[0]) * 2 / 3)


def test_auto_granularity_in_validate(llama_family, tmp_path):
    from evomerge.validate import check_space
    from tests.workflow.test_run import _space as space_file

    small = _space(llama_family, tmp_path, n_search=24)  # 24 items, 4 genes a layer: a curve of 2 points
    assert small.points == Points.curved(4, 2) and small.dim == 8
    path = space_file(llama_family, tmp_path, parameters={}, granularity="auto", split_attn_mlp=False,
                      models={n: str(llama_family[n]) for n in ("base", "a", "b")})
    report = check_space(path)  # 10 search items: 2 points x weight, density x 2 models
    assert report.dim == 8 and "auto: curve of 2 points (10 search items" in report.method, report.method
    assert "a curve of 2 control points over 4 layers" in report.genome, report.genome


@pytest.mark.parametrize("over, key", [({"control_points": 3}, "control_points"),
                                       ({"granularity": "curve", "control_points": 5}, "control_points")])
def test_bad_control_points_name_the_key(llama_family, tmp_path, over, key):
    with pytest.raises(ConfigError) as err:
        _space(llama_family, tmp_path, **over)
    assert f"key '{key}'" in str(err.value)
