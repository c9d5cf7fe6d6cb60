"""Sakana's DFS genome: sizes, unit-box decoding, encode round-trips and the errors a user can hit."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.merge.dfs import DfsSpace, check_stackable, validate_path
from evomerge.merge.stacking import dus_path
from evomerge.models.tiny import tiny_config


def test_genome_size_and_slot_layout():
    space = DfsSpace([4, 3], repeats=3, target=1)
    assert space.num_layers == 7 and space.num_slots == 21
    assert space.genome_size == 21 + 49
    assert space.layer_of(0) == (0, 0) and space.layer_of(3) == (0, 3) and space.layer_of(4) == (1, 0)
    assert space.layer_of(6) == (1, 2)
    assert space.first == (1, 0) and space.last == (1, 2)


def test_decode_maps_genes_to_indicators_and_scales():
    space = DfsSpace([3, 3], repeats=2, target=0, scale_bounds=(0.5, 1.5))
    g = np.zeros(space.genome_size)
    # slots: 0..2 = A0..A2, 3..5 = B0..B2, 6..8 = A0..A2 (repeat 2), 9..11 = B0..B2
    g[[1, 4, 7]] = [0.51, 0.9, 1.0]  # A1, B1, A1 again; 0.5 exactly is "off"
    g[10] = 0.5
    W = np.full((6, 6), 0.5)  # scale 1.0
    W[1, 4] = 0.0   # A1 -> B1 : 0.5
    W[4, 1] = 1.0   # B1 -> A1 : 1.5
    W[1, 2] = 0.25  # A1 -> A2 (last) : 0.75
    g[space.num_slots:] = W.reshape(-1)
    path, scales = space.decode(g)
    assert path == [(0, 0), (0, 1), (1, 1), (0, 1), (0, 2)]
    assert scales == pytest.approx([1.0, 1.0, 0.5, 1.5, 0.75])


def test_encode_decode_round_trip_identity_and_dus():
    space = DfsSpace([6, 6], repeats=2, target=0, max_len=12)
    ident = space.identity_path()
    path, scales = space.decode(space.encode(ident))
    assert path == ident and scales == [1.0] * 6

    dus = dus_path(6, drop=2)  # 8 layers of source 0, layer 2..3 twice
    sc = [1.0] + [1.1] * 3 + [0.8] + [1.1] * 3  # transition 3->2 (the seam) gets its own scale
    path, scales = space.decode(space.encode(dus, sc))
    assert path == dus and scales == pytest.approx(sc)


def test_random_genome_decode_encode_decode_is_stable():
    space = DfsSpace([4, 5], repeats=3, target=1, scale_bounds=(0.6, 1.4))
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = rng.random(space.genome_size)
        path, scales = space.decode(g)
        assert path[0] == (1, 0) and path[-1] == (1, 4)
        assert all(0.6 - 1e-12 <= s <= 1.4 + 1e-12 for s in scales[1:]) and scales[0] == 1.0
        path2, scales2 = space.decode(space.encode(path, scales))
        assert path2 == path and scales2 == pytest.approx(scales, abs=1e-12)


def test_path_longer_than_max_len_is_a_config_error_or_cut():
    space = DfsSpace([4, 4], repeats=2, target=0, max_len=6)
    g = np.full(space.genome_size, 0.9)  # every slot on: 2 + 16 layers
    with pytest.raises(ConfigError, match="more than the maximum 6"):
        space.decode(g)
    path, scales = space.decode(g, strict=False)
    assert len(path) == 6 and len(scales) == 6
    assert path[0] == (0, 0) and path[-1] == (0, 3)
    with pytest.raises(ConfigError, match="max_len"):
        space.encode(space.identity_path() + [(1, 0)] * 3)


def test_path_with_no_layer_is_a_config_error():
    space = DfsSpace([3, 3], repeats=1, fix_ends=False)
    with pytest.raises(ConfigError, match="uses no layer"):
        space.decode(np.zeros(space.genome_size))
    with pytest.raises(ConfigError, match="uses no layer"):
        validate_path([], [], [3, 3])
    # with the ends fixed a genome with no indicator on is the target's first and last layer
    path, _ = DfsSpace([3, 3], repeats=1).decode(np.zeros(space.genome_size))
    assert path == [(0, 0), (0, 2)]


def test_encode_rejects_what_the_genome_cannot_express():
    space = DfsSpace([3, 3], repeats=1, target=0, scale_bounds=(0.5, 1.5))
    with pytest.raises(ConfigError, match="subsequence"):
        space.encode([(0, 0), (0, 1), (0, 1), (0, 2)])  # layer 1 twice needs 2 repeats
    with pytest.raises(ConfigError, match="scale"):
        space.encode([(0, 0), (0, 1), (0, 2)], [1.0, 2.0, 1.0])  # outside the bounds
    with pytest.raises(ConfigError, match="first and last"):
        space.encode([(1, 0), (0, 2)])
    with pytest.raises(ConfigError, match="genome"):
        space.decode(np.zeros(3))
    with pytest.raises(ConfigError, match="scale_bounds"):
        DfsSpace([3], scale_bounds=(-1.0, 1.0))
    with pytest.raises(ConfigError, match="scales"):
        validate_path([(0, 0)], [0.0], [3])


def test_check_stackable_names_the_mismatch():
    a = tiny_config("llama", hidden=64)
    check_stackable([a, tiny_config("llama", hidden=64, intermediate=96)])  # MLP width may differ
    with pytest.raises(ConfigError) as err:
        check_stackable([a, tiny_config("llama", hidden=32, heads=2, kv_heads=1)])
    assert err.value.key == "hidden_size"
    with pytest.raises(ConfigError) as err:
        check_stackable([a, tiny_config("qwen2", hidden=64)])
    assert err.value.key == "model_type"
