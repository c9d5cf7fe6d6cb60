"""`evomerge demo` end to end on a small, quickly trained zoo: the held-out table has every row the README
promises (parents, hand-made merges chosen on the search split, the evolved recipe) and the run folder its plots.
The full-size demo (where the evolved recipe wins) is run by hand and reported in the README."""

from __future__ import annotations

import json


def test_demo_small_zoo(tmp_path):
    from evomerge.demo.run import run_demo

    result = run_demo(zoo_dir=tmp_path / "zoo", run_dir=tmp_path / "run", trials=8, quiet=True,
                      zoo_settings={"base_steps": 30, "expert_steps": 20, "train_size": 600, "search_size": 96,
                                    "heldout_size": 384, "score": False})
    names = [r["name"] for r in result["rows"]]
    assert names[:3] == ["source: base", "source: sort", "source: count"]
    assert {"baseline: average", "baseline: ties, uniform", "baseline: task arithmetic, uniform"} <= set(names)
    assert names[-1].startswith("evolved #1")
    assert isinstance(result["evolved_beats_all"], bool)
    run = tmp_path / "run"
    assert (run / "report" / "layer_params_heatmap.png").exists()
    heldout = json.loads((run / "heldout.json").read_text())["rows"]
    assert all(0.0 <= r["mean"] <= 1.0 for r in heldout)
