"""Genes appear in the Optuna study under readable names in real units (what optuna-dashboard shows)."""

from __future__ import annotations

import numpy as np
import optuna

from evomerge.config import parse_search_space
from evomerge.search.optimizers import make_optimizer
from evomerge.spaces.parameter import ParameterSpace
from evomerge.store import RunStore

SPACE = """
name: t
models: {base: b, sort: s, count: c}
base_model: base
merge_method: ties
parameters:
  weight: {range: [0.0, 1.5]}
  density: {range: [0.1, 1.0]}
granularity: block
block_size: 2
split_attn_mlp: true
tasks: [{name: t, kind: custom, function: "m:f"}]
"""


def test_names_and_real_units_in_the_study(tmp_path):
    config = parse_search_space(SPACE, source="space.yaml")
    space = ParameterSpace(config, {k: k for k in config.models}, 4)
    layout = space.gene_layout()
    assert layout.names[:4] == ("sort.weight.layers0-1.attn", "sort.weight.layers0-1.mlp",
                                "sort.weight.layers2-3.attn", "sort.weight.layers2-3.mlp")
    assert len(set(layout.names)) == space.dim
    store = RunStore.create(tmp_path / "run", "x: 1\n", directions=["maximize"])
    store.use_genes(layout)
    genome = np.linspace(0, 1, space.dim)
    store.enqueue(genome, {"generation": 0, "gen_index": 0, "key": "k"})
    trial = optuna.load_study(study_name="run", storage=store.folder.storage_url).trials[0]
    per_layer = space.per_layer(genome)
    for name, gene, g in zip(layout.names, space.genes, genome):
        assert np.isclose(trial.params[name], gene.low + g * (gene.high - gene.low))  # real units
        layer = space.points.groups[gene.group][0]
        assert abs(trial.params[name] - per_layer[(gene.param, gene.model, gene.component)][layer]) <= 0.0005  # grid
    # a sampler proposes under the same names and ranges
    opt = make_optimizer("tpe", space.dim, seed=0, layout=layout)
    study = optuna.create_study(direction="maximize", sampler=opt.sampler)
    t = study.ask()
    x = opt.sample(t)
    assert sorted(t.params) == sorted(layout.names) and np.all((x >= 0) & (x <= 1))
    assert np.allclose(layout.params(x)[layout.names[0]], t.params[layout.names[0]])
