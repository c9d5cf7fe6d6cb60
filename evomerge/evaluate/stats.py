"""Uncertainty and significance for a held-out table, in plain numpy (no scipy / statsmodels).

A held-out score is a mean over a few hundred items, so two merges 1 point apart are often indistinguishable.
These helpers put an interval on every number and a p-value on every "A beats B":

- `bootstrap_ci` / `bootstrap_ci_tasks`: percentile bootstrap interval of a mean (items resampled with
  replacement); the `_tasks` form is for a "mean over tasks" row: the statistic is the mean of per-task means
  and each task's items are resampled within that task (stratified), so task sizes never re-weight the row.
- `mcnemar_exact`: exact two-sided McNemar test for paired 0/1 scores (accuracy on the same items), computed
  with integer arithmetic so it stays exact for thousands of discordant pairs.
- `paired_bootstrap` / `paired_bootstrap_tasks`: paired bootstrap of mean(a - b) for any per-item score.
- `is_binary` / `compare`: pick McNemar for 0/1 scores and the paired bootstrap otherwise, JSON-ready.

Sign convention everywhere: differences are a - b. Every bootstrap is deterministic given `seed`: replicate r
draws `rng.integers(0, n, size=n)` from `np.random.default_rng(seed)` in order (per task in sorted task-name
order for the stratified forms, all replicates of a task before the next task).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence, Union

import numpy as np
import numpy.typing as npt

ArrayLike = Union[Sequence[float], Sequence[bool], npt.NDArray[Any]]

_CHUNK_ELEMENTS = 1 << 20  # index draws per bootstrap chunk (8 MiB of int64): bounds memory for large n * n_boot


@dataclass(frozen=True)
class McNemarResult:
    """Discordant counts and the exact two-sided p-value. b01: a wrong & b right; b10: a right & b wrong."""

    b01: int
    b10: int
    p_value: float


@dataclass(frozen=True)
class PairedResult:
    """mean(a - b) (the mean over tasks of per-task mean differences for the stratified form), its percentile
    bootstrap interval, and the two-sided bootstrap p-value for "the difference has the observed sign"."""

    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    seed: int


def _as_scores(x: ArrayLike, name: str = "scores") -> npt.NDArray[np.float64]:
    """1-D, non-empty, finite float copy of `x`: a NaN would silently poison every mean downstream."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D per-item scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN/inf)")
    return arr


def _check_boot(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _boot_means(x: npt.NDArray[np.float64], n_boot: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Means of `n_boot` with-replacement resamples of `x`, drawn in chunks (same stream as one row per draw)."""
    n = x.size
    out = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _stratified_boot_means(per_task: Mapping[str, npt.NDArray[np.float64]], n_boot: int,
                           rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Mean over tasks of per-task resampled means; items never leave their task."""
    total = np.zeros(n_boot, dtype=np.float64)
    for name in sorted(per_task):
        total += _boot_means(per_task[name], n_boot, rng)
    return total / len(per_task)


def _interval(boot: npt.NDArray[np.float64], level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    lo, hi = np.percentile(boot, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(lo), float(hi)


def _as_task_scores(per_task: Mapping[str, ArrayLike], name: str) -> dict[str, npt.NDArray[np.float64]]:
    if not per_task:
        raise ValueError(f"{name} has no tasks")
    return {t: _as_scores(v, f"{name}[{t!r}]") for t, v in per_task.items()}


def bootstrap_ci(scores: ArrayLike, *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item `scores` (items resampled with replacement).

    Why: a held-out mean over a few hundred items carries sampling noise of a few points; report it.
    """
    _check_boot(level, n_boot)
    x = _as_scores(scores)
    return _interval(_boot_means(x, n_boot, np.random.default_rng(seed)), level)


def bootstrap_ci_tasks(per_task: Mapping[str, ArrayLike], *, level: float = 0.95, n_boot: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Interval of the mean over tasks of per-task means, resampling items within each task (stratified).

    Why: pooling items would let a big task dominate and mix tasks in a resample; a "mean over tasks" row
    weights tasks equally, so its interval must too.
    """
    _check_boot(level, n_boot)
    tasks = _as_task_scores(per_task, "per_task")
    return _interval(_stratified_boot_means(tasks, n_boot, np.random.default_rng(seed)), level)


def _as_binary(x: ArrayLike, name: str) -> npt.NDArray[np.bool_]:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D per-item correctness, got shape {arr.shape}")
    if not is_binary(arr):
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return arr.astype(bool)


def _two_sided_binom_half(k: int, n: int) -> float:
    """min(1, 2 * P[X <= k]) for X ~ Binomial(n, 1/2), k <= n/2, exactly (integers, one rounding at the end)."""
    if n == 0:
        return 1.0
    term = 1  # C(n, 0)
    tail = 0
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)  # C(n, i+1), exact
    p = Fraction(2 * tail, 1 << n)
    return 1.0 if p >= 1 else float(p)


def mcnemar_exact(a_correct: ArrayLike, b_correct: ArrayLike) -> McNemarResult:
    """Exact two-sided McNemar test of paired 0/1 outcomes on the same items.

    Why: with paired accuracies only the discordant items carry information; under H0 each discordant item
    favours a or b with probability 1/2, so p = min(1, 2 * P[Binom(b01 + b10, 1/2) <= min(b01, b10)]).
    """
    a = _as_binary(a_correct, "a_correct")
    b = _as_binary(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"a_correct has {a.size} items but b_correct has {b.size}: scores must be paired")
    b01 = int(np.count_nonzero(~a & b))
    b10 = int(np.count_nonzero(a & ~b))
    return McNemarResult(b01=b01, b10=b10, p_value=_two_sided_binom_half(min(b01, b10), b01 + b10))


def _paired(diff_boot: npt.NDArray[np.float64], observed: float, level: float, n_boot: int,
            seed: int) -> PairedResult:
    lo, hi = _interval(diff_boot, level)
    if observed == 0.0:
        p = 1.0
    else:
        opposite = int(np.count_nonzero(diff_boot <= 0.0)) if observed > 0 else int(np.count_nonzero(diff_boot >= 0.0))
        p = min(1.0, 2.0 * (opposite + 1) / (n_boot + 1))
    return PairedResult(mean_diff=observed, ci_low=lo, ci_high=hi, p_value=p, n_boot=n_boot, seed=seed)


def _diffs(a: ArrayLike, b: ArrayLike, a_name: str, b_name: str) -> npt.NDArray[np.float64]:
    x = _as_scores(a, a_name)
    y = _as_scores(b, b_name)
    if x.size != y.size:
        raise ValueError(f"{a_name} has {x.size} items but {b_name} has {y.size}: scores must be paired")
    return x - y


def paired_bootstrap(a_scores: ArrayLike, b_scores: ArrayLike, *, level: float = 0.95, n_boot: int = 10_000,
                     seed: int = 0) -> PairedResult:
    """Paired bootstrap of mean(a - b): the same resampled items for a and b.

    Why: a and b are scored on the same items, so item difficulty cancels in a - b; resampling the paired
    differences gives a much tighter (and honest) interval than two independent ones. p-value: twice the
    fraction of resampled means on the other side of 0 (0 counts as other side), with the (count + 1) /
    (n_boot + 1) correction so it is never 0; 1.0 when the observed difference is exactly 0.
    """
    _check_boot(level, n_boot)
    d = _diffs(a_scores, b_scores, "a_scores", "b_scores")
    boot = _boot_means(d, n_boot, np.random.default_rng(seed))
    return _paired(boot, float(d.mean()), level, n_boot, seed)


def paired_bootstrap_tasks(a_per_task: Mapping[str, ArrayLike], b_per_task: Mapping[str, ArrayLike], *,
                           level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> PairedResult:
    """Stratified paired bootstrap of the mean over tasks of per-task mean(a - b).

    Why: the paired test for a "mean over tasks" row; items are resampled within their task, paired across a/b.
    """
    _check_boot(level, n_boot)
    if set(a_per_task) != set(b_per_task):
        raise ValueError(f"a and b cover different tasks: only in a {sorted(set(a_per_task) - set(b_per_task))}, "
                         f"only in b {sorted(set(b_per_task) - set(a_per_task))}")
    if not a_per_task:
        raise ValueError("a_per_task has no tasks")
    d = {t: _diffs(a_per_task[t], b_per_task[t], f"a[{t!r}]", f"b[{t!r}]") for t in a_per_task}
    observed = float(np.mean([d[t].mean() for t in sorted(d)]))
    boot = _stratified_boot_means(d, n_boot, np.random.default_rng(seed))
    return _paired(boot, observed, level, n_boot, seed)


def is_binary(scores: ArrayLike) -> bool:
    """True when every score is 0 or 1 (booleans included): accuracy-like data, for which McNemar is exact."""
    arr = np.asarray(scores)
    if arr.dtype == np.bool_:
        return True
    if not np.issubdtype(arr.dtype, np.number):
        return False
    return bool(np.isin(arr, (0, 1)).all())


def compare(a: ArrayLike | Mapping[str, ArrayLike], b: ArrayLike | Mapping[str, ArrayLike], *,
            level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Compare paired per-item scores of a and b with the right test; the result is JSON-serializable.

    Arrays of 0/1 on both sides: exact McNemar ("mcnemar_exact", with b01 / b10); otherwise the paired bootstrap
    ("paired_bootstrap"). Per-task dicts: the stratified paired bootstrap ("paired_bootstrap_tasks"), since a
    pooled McNemar would test the item-weighted mean, not the mean over tasks. Every result also carries
    diff = a - b and its paired bootstrap interval (ci_low, ci_high) so a table row can show both.
    """
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise ValueError("compare: pass per-task dicts for both a and b, or arrays for both")
        res = paired_bootstrap_tasks(a, b, level=level, n_boot=n_boot, seed=seed)
        out: dict[str, Any] = {"test": "paired_bootstrap_tasks", "n_tasks": len(a),
                               "n": int(sum(np.asarray(v).size for v in a.values()))}
    else:
        res = paired_bootstrap(a, b, level=level, n_boot=n_boot, seed=seed)
        out = {"test": "paired_bootstrap", "n": int(np.asarray(a).size)}
        if is_binary(a) and is_binary(b):
            mc = mcnemar_exact(a, b)
            out = {"test": "mcnemar_exact", "n": out["n"], "b01": mc.b01, "b10": mc.b10}
            res = PairedResult(**{**asdict(res), "p_value": mc.p_value})
    out.update(diff=res.mean_diff, ci_low=res.ci_low, ci_high=res.ci_high, level=float(level),
               p_value=res.p_value, n_boot=int(n_boot), seed=int(seed))
    return out


__all__ = ["McNemarResult", "PairedResult", "bootstrap_ci", "bootstrap_ci_tasks", "mcnemar_exact",
           "paired_bootstrap", "paired_bootstrap_tasks", "is_binary", "compare"]
