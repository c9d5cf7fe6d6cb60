"""evomerge.evaluate.stats against hand-computed values and independent reference implementations.

The references here are deliberately written differently from the module (plain loops, log-space sums,
hand-rolled quantiles) so a shared bug cannot make both sides agree.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.evaluate.stats import (
    bootstrap_ci,
    bootstrap_ci_tasks,
    compare,
    is_binary,
    mcnemar_exact,
    paired_bootstrap,
    paired_bootstrap_tasks,
)

# ---------------------------------------------------------------- independent references


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default 'linear' method) written out by hand."""
    h = (len(sorted_vals) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (h - lo) * (sorted_vals[hi] - sorted_vals[lo])


def _ref_boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float]:
    """One replicate at a time: draw n indices, average by a Python sum."""
    n = len(x)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        out.append(sum(float(x[i]) for i in idx) / n)
    return out


def _ref_interval(means: list[float], level: float) -> tuple[float, float]:
    s = sorted(means)
    a = (1 - level) / 2
    return _quantile(s, a), _quantile(s, 1 - a)


def _ref_mcnemar_p(b01: int, b10: int) -> float:
    """Two-sided exact binomial p-value via a log-space sum (lgamma), not integers."""
    n = b01 + b10
    if n == 0:
        return 1.0
    k = min(b01, b10)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    log_tail = m + math.log(sum(math.exp(v - m) for v in logs))
    return min(1.0, 2 * math.exp(log_tail))


def _pairs(b01: int, b10: int, both_right: int = 5, both_wrong: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """0/1 arrays with exactly b01 (a wrong, b right) and b10 (a right, b wrong) discordant items, shuffled."""
    a = [0] * b01 + [1] * b10 + [1] * both_right + [0] * both_wrong
    b = [1] * b01 + [0] * b10 + [1] * both_right + [0] * both_wrong
    perm = np.random.default_rng(123).permutation(len(a))
    return np.array(a)[perm], np.array(b)[perm]


# ---------------------------------------------------------------- McNemar


def test_mcnemar_hand_computed_value_and_counts():
    a, b = _pairs(b01=2, b10=10)
    res = mcnemar_exact(a, b)
    assert (res.b01, res.b10) == (2, 10)  # catches swapped discordant definitions
    assert res.p_value == 0.03857421875  # 2*(1+12+66)/4096 exactly: catches k<min, a missing 2x, wrong n


def test_mcnemar_symmetric_and_bool_input():
    a, b = _pairs(b01=2, b10=10)
    swapped = mcnemar_exact(b, a)
    assert (swapped.b01, swapped.b10) == (10, 2)
    assert swapped.p_value == mcnemar_exact(a, b).p_value
    assert mcnemar_exact(a.astype(bool), b.astype(bool)) == mcnemar_exact(a, b)


@pytest.mark.parametrize("b01,b10,expected", [(0, 0, 1.0), (0, 1, 1.0), (0, 5, 2 / 32), (5, 5, 1.0), (3, 4, 1.0)])
def test_mcnemar_small_cases(b01, b10, expected):
    # (0,0): no discordant pairs -> 1; (5,5): 2*638/1024 > 1 must be capped; (0,5): 2 * 0.5**5
    assert mcnemar_exact(*_pairs(b01, b10)).p_value == expected


def test_mcnemar_concordant_items_do_not_matter():
    a1, b1 = _pairs(2, 10, both_right=0, both_wrong=0)
    a2, b2 = _pairs(2, 10, both_right=500, both_wrong=300)
    assert mcnemar_exact(a1, b1).p_value == mcnemar_exact(a2, b2).p_value == 0.03857421875


@pytest.mark.parametrize("b01,b10", [(400, 480), (520, 600), (1500, 1650)])
def test_mcnemar_large_n_matches_log_space_reference(b01, b10):
    # n > 1074 makes 0.5**n underflow / 2**n overflow a float: only exact arithmetic gets these right
    p = mcnemar_exact(*_pairs(b01, b10)).p_value
    ref = _ref_mcnemar_p(b01, b10)
    assert 0 < p < 0.05
    assert p == pytest.approx(ref, rel=1e-8)


def test_mcnemar_input_validation():
    with pytest.raises(ValueError, match=r"3 .*4|4 .*3"):
        mcnemar_exact([1, 0, 1], [1, 0, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([1, 0, 0.5], [1, 0, 1])


# ---------------------------------------------------------------- bootstrap_ci


def test_bootstrap_ci_matches_reference_loop():
    x = np.random.default_rng(7).normal(0.4, 0.3, size=57)
    got = bootstrap_ci(x, n_boot=2000, seed=3)
    ref = _ref_interval(_ref_boot_means(x, 2000, np.random.default_rng(3)), 0.95)
    assert got == pytest.approx(ref, abs=1e-12)
    got90 = bootstrap_ci(x, level=0.9, n_boot=2000, seed=3)  # level is honoured, not hard-coded
    assert got90 == pytest.approx(_ref_interval(_ref_boot_means(x, 2000, np.random.default_rng(3)), 0.9), abs=1e-12)
    assert got[0] < got90[0] < got90[1] < got[1]


def test_bootstrap_ci_normal_asymptotics_and_contains_mean():
    n = 2000
    x = (np.random.default_rng(11).random(n) < 0.7).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=0)
    p = x.mean()
    assert lo < p < hi
    half = (hi - lo) / 2
    assert half == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.10)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.2 * half)  # centred on the mean, not on 0 or 0.5


def test_bootstrap_ci_deterministic_seeded_and_narrower_with_more_items():
    rng = np.random.default_rng(5)
    small, big = rng.random(100), rng.random(1600)
    assert bootstrap_ci(small, n_boot=2000, seed=1) == bootstrap_ci(small, n_boot=2000, seed=1)
    assert bootstrap_ci(small, n_boot=2000, seed=1) != bootstrap_ci(small, n_boot=2000, seed=2)
    w_small = np.subtract(*bootstrap_ci(small, n_boot=2000)[::-1])
    w_big = np.subtract(*bootstrap_ci(big, n_boot=2000)[::-1])
    assert 0 < w_big < w_small / 2  # ~1/4 expected (sqrt(16))


def test_bootstrap_ci_large_input_is_chunked_like_one_draw_per_replicate():
    # n * n_boot beyond one chunk: chunked draws must equal the replicate-by-replicate stream
    x = np.random.default_rng(2).random(3000)
    got = bootstrap_ci(x, n_boot=400, seed=9)
    rng = np.random.default_rng(9)
    ref = _ref_interval([float(x[rng.integers(0, 3000, size=3000)].mean()) for _ in range(400)], 0.95)
    assert got == pytest.approx(ref, abs=1e-12)


def test_bootstrap_ci_rejects_bad_input():
    for bad in ([], [0.1, float("nan")], [[0.1, 0.2]]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad, n_boot=10)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=95)


# ---------------------------------------------------------------- stratified bootstrap_ci_tasks


def test_bootstrap_ci_tasks_never_mixes_tasks():
    # pooled resampling would give a wide interval around 10/1010; per-task means are constant 1 and 0
    lo, hi = bootstrap_ci_tasks({"ones": np.ones(10), "zeros": np.zeros(1000)}, n_boot=2000)
    assert (lo, hi) == (0.5, 0.5)


def test_bootstrap_ci_tasks_matches_reference_and_ignores_dict_order():
    rng = np.random.default_rng(8)
    tasks = {"math": rng.random(40), "ko": (rng.random(90) < 0.6).astype(float), "code": rng.random(15)}
    got = bootstrap_ci_tasks(tasks, n_boot=1000, seed=4)
    ref_rng = np.random.default_rng(4)
    per_task = [_ref_boot_means(tasks[t], 1000, ref_rng) for t in sorted(tasks)]
    ref = _ref_interval([sum(col) / len(col) for col in zip(*per_task)], 0.95)
    assert got == pytest.approx(ref, abs=1e-12)
    assert bootstrap_ci_tasks(dict(reversed(list(tasks.items()))), n_boot=1000, seed=4) == got
    macro = np.mean([v.mean() for v in tasks.values()])
    assert got[0] < macro < got[1]


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_identical_scores():
    x = np.random.default_rng(0).random(50)
    res = paired_bootstrap(x, x.copy(), n_boot=2000)
    assert res.mean_diff == 0.0 and res.p_value == 1.0
    assert (res.ci_low, res.ci_high) == (0.0, 0.0)


def test_paired_bootstrap_constant_improvement_is_paired():
    b = np.random.default_rng(1).integers(0, 100, size=60).astype(float)  # very noisy items
    res = paired_bootstrap(b + 1.0, b, n_boot=2000)
    assert res.mean_diff == 1.0
    # pairing cancels item noise exactly; independent resampling of a and b would give a wide CI
    assert (res.ci_low, res.ci_high) == (1.0, 1.0)
    assert res.p_value == 2 / 2001  # (0 + 1) / (n_boot + 1), two-sided
    worse = paired_bootstrap(b, b + 1.0, n_boot=2000)
    assert worse.mean_diff == -1.0 and worse.ci_high == -1.0 and worse.p_value == 2 / 2001


def test_paired_bootstrap_matches_reference_loop():
    rng = np.random.default_rng(21)
    b = rng.random(80)
    a = b + rng.normal(0.03, 0.15, size=80)
    n_boot, seed = 2000, 6
    res = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    d = a - b
    means = _ref_boot_means(d, n_boot, np.random.default_rng(seed))
    obs = float(np.mean(d))
    opposite = sum(1 for m in means if (m <= 0 if obs > 0 else m >= 0))
    assert 0 < opposite < n_boot / 2  # a non-trivial, uncapped p-value: the count really is exercised
    assert res.p_value == pytest.approx(min(1.0, 2 * (opposite + 1) / (n_boot + 1)), abs=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx(_ref_interval(means, 0.95), abs=1e-12)
    assert res.mean_diff == pytest.approx(obs, abs=1e-15)
    flipped = paired_bootstrap(b, a, n_boot=n_boot, seed=seed)  # same draws, mirrored sign
    assert flipped.p_value == pytest.approx(res.p_value, abs=1e-12)
    assert flipped.mean_diff == pytest.approx(-res.mean_diff, abs=1e-15)


def test_paired_bootstrap_resampled_ties_at_zero_count_against_the_observed_sign():
    # with 0/1 scores a resample often has mean diff exactly 0: that is no evidence for the observed sign
    a, b = np.array([1, 0, 0, 0, 0]), np.zeros(5)
    res = paired_bootstrap(a, b, n_boot=2000, seed=0)
    means = _ref_boot_means(a - b, 2000, np.random.default_rng(0))
    zeros = sum(1 for m in means if m == 0)
    assert zeros > 400  # ~ (4/5)**5 of the resamples
    assert res.p_value == pytest.approx(min(1.0, 2 * (zeros + 1) / 2001), abs=1e-12)


def test_paired_bootstrap_length_mismatch():
    with pytest.raises(ValueError, match=r"3 .*2"):
        paired_bootstrap([0.1, 0.2, 0.3], [0.1, 0.2], n_boot=10)


def test_paired_bootstrap_tasks_stratified_and_paired():
    rng = np.random.default_rng(3)
    b = {"small": rng.random(5) * 50, "big": rng.random(500) * 50}
    a = {"small": b["small"] + 1.0, "big": b["big"] + 0.0}  # macro diff 0.5; pooled diff would be ~0.01
    res = paired_bootstrap_tasks(a, b, n_boot=2000)
    assert res.mean_diff == 0.5
    assert (res.ci_low, res.ci_high) == (0.5, 0.5)
    assert res.p_value == 2 / 2001


def test_paired_bootstrap_tasks_matches_reference_loop():
    rng = np.random.default_rng(4)
    b = {"x": rng.random(30), "y": rng.random(70)}
    a = {"x": b["x"] + rng.normal(0.02, 0.2, 30), "y": b["y"] + rng.normal(0.0, 0.2, 70)}
    res = paired_bootstrap_tasks(a, b, n_boot=1000, seed=2)
    d = {t: a[t] - b[t] for t in a}
    ref_rng = np.random.default_rng(2)
    per_task = [_ref_boot_means(d[t], 1000, ref_rng) for t in sorted(d)]
    means = [sum(col) / len(col) for col in zip(*per_task)]
    obs = (d["x"].mean() + d["y"].mean()) / 2
    opposite = sum(1 for m in means if (m <= 0 if obs > 0 else m >= 0))
    assert res.mean_diff == pytest.approx(obs, abs=1e-15)
    assert res.p_value == pytest.approx(min(1.0, 2 * (opposite + 1) / 1001), abs=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx(_ref_interval(means, 0.95), abs=1e-12)
    with pytest.raises(ValueError, match="only in a"):
        paired_bootstrap_tasks({"x": [1.0], "z": [1.0]}, {"x": [1.0]}, n_boot=10)


# ---------------------------------------------------------------- is_binary / compare


def test_is_binary():
    assert is_binary([True, False]) and is_binary(np.array([0, 1, 1])) and is_binary([0.0, 1.0])
    assert not is_binary([0, 0.5, 1]) and not is_binary([0, 2]) and not is_binary([0.0, float("nan")])
    assert not is_binary(["0", "1"])


def _assert_plain_json(out: dict) -> None:
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    # exact builtin types: np.int64 breaks json.dumps, np.float64 is only silently tolerated
    assert all(type(v) in (str, int, float) for v in out.values()), {k: type(v) for k, v in out.items()}


def test_compare_picks_mcnemar_for_binary():
    a, b = _pairs(b01=2, b10=10)
    out = compare(a.astype(bool), b, n_boot=2000)
    assert out["test"] == "mcnemar_exact"
    assert (out["b01"], out["b10"]) == (2, 10)
    assert out["p_value"] == 0.03857421875
    assert out["diff"] == pytest.approx((10 - 2) / len(a))
    assert out["ci_low"] <= out["diff"] <= out["ci_high"]
    _assert_plain_json(out)


def test_compare_picks_paired_bootstrap_for_continuous():
    rng = np.random.default_rng(9)
    b = rng.random(40)
    a = b + rng.normal(0.05, 0.1, size=40)
    out = compare(a, b, n_boot=2000, seed=5)
    ref = paired_bootstrap(a, b, n_boot=2000, seed=5)
    assert out["test"] == "paired_bootstrap" and "b01" not in out
    assert (out["diff"], out["ci_low"], out["ci_high"], out["p_value"]) == (
        ref.mean_diff, ref.ci_low, ref.ci_high, ref.p_value)
    _assert_plain_json(out)
    # only one side binary is still not paired accuracy
    assert compare((b > 0.5).astype(int), a, n_boot=200)["test"] == "paired_bootstrap"


def test_compare_per_task_dicts_use_stratified_bootstrap():
    a = {"t1": [1, 1, 0, 1], "t2": [0, 1]}
    b = {"t1": [1, 0, 0, 1], "t2": [0, 0]}
    out = compare(a, b, n_boot=500)
    assert out["test"] == "paired_bootstrap_tasks"
    assert out["diff"] == pytest.approx((0.25 + 0.5) / 2)
    _assert_plain_json(out)
    with pytest.raises(ValueError):
        compare(a, [1, 0], n_boot=10)
