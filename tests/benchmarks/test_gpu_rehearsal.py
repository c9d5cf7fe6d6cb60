"""benchmarks/gpu_rehearsal.py runs to completion on CPU (`--device cpu --tiny`), so the GPU rehearsal cannot rot
between GPU sessions: the GPU tests are collected (and skipped), both benchmarks run, a 4-candidate TIES and
DARE-TIES search runs through `start_run` on tiny random Llamas, mergekit merges the best candidate, and the JSON
holds every figure, positive and finite."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _positive(value, name):
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)


@pytest.mark.slow
def test_tiny_cpu_rehearsal_writes_complete_json(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_rehearsal", ROOT / "benchmarks" / "gpu_rehearsal.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rehearsal.json"
    mod.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(out), "--workdir", str(tmp_path / "w")])
    report = json.loads(out.read_text())

    for path, value in _numbers(report):  # nothing NaN or infinite anywhere
        assert math.isfinite(value), path
    meta = report["meta"]
    assert meta["tiny"] and meta["device"] == "cpu"
    _positive(meta["copy_bandwidth_bytes_per_s"], "copy bandwidth")
    _positive(meta["seconds_total"], "seconds_total")
    assert report["gpu_tests"]["rc"] == 0 and "skipped" in report["gpu_tests"]["summary"]  # no CUDA here
    assert {"rc", "seconds", "output_tail"} <= set(report["benchmarks"]["merge"])  # a colleague's script: captured
    ev = report["benchmarks"]["eval"]
    assert ev["rc"] == 0, ev["output_tail"]
    for r in ev["figures"]["decode"]:
        assert all(v == 0 for v in r["differ_from_generate"].values())
        for key in ("new", "old", "generate", "generate_static"):
            _positive(r["tokens_per_s"][key], f"decode tokens/s {key}")

    searches = report["searches"]
    assert [(s["size"], s["method"]) for s in searches] == [("tiny", "ties"), ("tiny", "dare_ties")]
    for s in searches:
        assert "error" not in s, s.get("traceback")
        name = f"{s['method']}:"
        assert s["candidates"] == s["ok"] == 4
        for t in s["trials"]:
            _positive(t["merge_seconds"], f"{name} trial {t['number']} merge_seconds")
            _positive(t["eval_seconds"], f"{name} trial {t['number']} eval_seconds")
        for key in ("params", "run_seconds", "merge_bytes_moved", "merge_floor_seconds", "eval_tokens", "eval_flops",
                    "peak_memory_bytes", "peak_over_plan"):
            _positive(s[key], name + key)
        for key in ("merge_seconds", "eval_seconds", "merge_over_floor", "eval_mfu"):
            for stat in ("median", "min", "max", "mean"):
                _positive(s[key][stat], f"{name}{key}.{stat}")
        _positive(s["memory_plan"]["total"], name + "memory_plan.total")
        assert s["mergekit"], name
        for m in s["mergekit"]:
            assert m["mergekit_rc"] == 0, m.get("mergekit_output_tail")
            for key in ("mergekit_seconds", "reload_seconds", "evomerge_merge_seconds",
                        "mergekit_plus_reload_over_evomerge"):
                _positive(m[key], f"{name}mergekit.{key}")
