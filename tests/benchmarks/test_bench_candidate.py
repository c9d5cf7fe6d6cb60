"""benchmarks/bench_candidate.py runs to completion on CPU with `--tiny` (in a subprocess: it points the data-set and
torch.compile caches at its work folder through the environment), and what it compares agrees: lm-eval's per-item
log-likelihoods on the mergekit-yaml output equal ours, accuracy is equal, and the live model it scored holds the
very tensors mergekit-yaml writes for the exported recipe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# measured on the tiny Llama: 6.1e-08 (float32 rounding of two batchings); SmolLM2: see the benchmark's output
LOGLIK_REL_TOL = 1e-6
ROW_FIELDS = {"merge_s", "eval_s", "candidate_s", "first_call_s", "eval_alone_s", "candidate_over_eval_alone",
              "candidate_cpu_s", "eval_alone_cpu_s", "candidate_over_eval_alone_cpu", "merge_over_floor",
              "mergekit_yaml_s", "reload_s", "lm_eval_s", "mergekit_lm_eval_s", "speedup"}


@pytest.mark.slow
def test_tiny_bench_candidate_matches_mergekit_and_lm_eval(tmp_path):
    out = tmp_path / "candidates.json"
    # 5 shots overflow the tiny Llama's 256 positions: lm-eval cuts prompts from the left, and so must the run's
    # evaluator (1.2e-2 relative apart when it did not)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_candidate.py"), "--tiny", "--shots", "5",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "per cand s" in proc.stdout and "mean" in proc.stdout  # the table was printed
    figures = json.loads(out.read_text())

    meta = figures["meta"]
    assert meta["experts"] == 2 and meta["method"] == "ties" and meta["threads"] == 1 and meta["items"] == 8
    assert meta["reps"] == 2
    for key in ("copy_bandwidth_bytes_per_s", "floor_bytes", "floor_s", "setup_s", "first_candidate_s", "wall_s"):
        assert math.isfinite(meta[key]) and meta[key] > 0, key
    rows = figures["candidates"]
    assert len(rows) == 2
    assert rows[0]["recipe_yaml"] != rows[1]["recipe_yaml"]  # two different candidates
    for r in rows:
        for key in ROW_FIELDS:
            assert math.isfinite(r[key]) and r[key] > 0, (r["candidate"], key)
        assert math.isclose(r["speedup"], r["mergekit_lm_eval_s"] / r["first_call_s"])
        assert r["candidate_s"] <= r["first_call_s"]  # the best of the calls
        assert all(round(d * 1000) == pytest.approx(d * 1000, abs=1e-6) for d in r["densities"])  # the 0.001 grid
        # lm-eval on the folder mergekit-yaml wrote scores every item as we score the live model
        assert r["items"] == 8
        assert r["max_loglik_rel_diff"] <= LOGLIK_REL_TOL
        assert r["items_scored_differently"] == 0
        assert r["acc"] == r["acc_lm_eval"] == r["acc_search"] and r["acc_equal"]
        # the candidate scored is the model the exported recipe materializes, to the bit
        assert r["params_not_written"] == [] and r["tensors_compared"] > 0
        assert r["weights_bit_identical"] and r["weights_max_abs_diff"] == 0.0
    for key in ("merge_s", "eval_s", "candidate_s", "candidate_over_eval_alone", "candidate_over_eval_alone_cpu",
                "merge_over_floor", "mergekit_lm_eval_s", "speedup", "max_loglik_rel_diff", "lm_eval_s"):
        assert figures["mean"][key] == pytest.approx(sum(r[key] for r in rows) / len(rows))
