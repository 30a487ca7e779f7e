"""Statistics for comparing a regularized variant with its baseline over seeds.

Every comparison in the report is "several seeds per variant, mean ± std, a significance
test" (docs/DESIGN.md §5.9). Seeds are few (typically 3-5), so the tests here are Welch's
t-test (unequal variances) and an exact permutation test; ``compare_groups`` packages either
into one JSON-ready dict and says plainly when there are too few seeds to test at all.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

TESTS = ("welch", "permutation")


def _as_sample(values: Sequence[float], name: str, min_size: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values: {arr.tolist()}")
    return arr


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's two-sided t-test for mean(a) != mean(b) without assuming equal variances.

    t = (ā − b̄) / sqrt(s_a²/n_a + s_b²/n_b) (s² with ddof=1), with Welch–Satterthwaite degrees
    of freedom ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)) and
    p = 2·P(T_ν > |t|). Both groups need at least 2 values. When both variances are zero the
    test is degenerate: p = 1 if the means are equal, else t = ±inf and p = 0.
    """
    x = _as_sample(a, "a", 2)
    y = _as_sample(b, "b", 2)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = x.mean() - y.mean()
    se2 = va + vb
    if se2 == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), 0.0)
    t = diff / math.sqrt(se2)
    df = se2**2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    p = 2.0 * _scipy_stats.t.sf(abs(t), df)
    return float(t), float(min(p, 1.0))


def permutation_test(
    a: Sequence[float], b: Sequence[float], n_permutations: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Two-sided permutation test of the difference in means; returns (mean(a) − mean(b), p).

    p = fraction of relabellings of the pooled values (a group of size n_a against the rest)
    whose |mean difference| is at least the observed one. All C(n_a+n_b, n_a) relabellings are
    enumerated when there are at most ``n_permutations`` of them (exact p, the observed split
    included); otherwise ``n_permutations`` random ones are drawn and p = (hits + 1)/(n + 1).
    """
    x = _as_sample(a, "a", 1)
    y = _as_sample(b, "b", 1)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    pooled = np.concatenate([x, y])
    n, na = pooled.size, x.size
    total = pooled.sum()
    observed = x.mean() - y.mean()
    # relative tolerance: splits with the same |difference| up to rounding count as hits
    threshold = abs(observed) * (1 - 1e-12) - 1e-15

    def diff_of(sum_a: np.ndarray) -> np.ndarray:
        return sum_a / na - (total - sum_a) / (n - na)

    n_splits = math.comb(n, na)
    if n_splits <= n_permutations:
        idx = np.array(list(itertools.combinations(range(n), na)), dtype=np.int64)
        diffs = diff_of(pooled[idx].sum(axis=1))
        return float(observed), float(np.mean(np.abs(diffs) >= threshold))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, n)), axis=1)[:, :na]
    diffs = diff_of(pooled[perms].sum(axis=1))
    hits = int(np.sum(np.abs(diffs) >= threshold))
    return float(observed), (hits + 1) / (n_permutations + 1)


def _summary(values: np.ndarray) -> tuple[float | None, float | None]:
    mean = float(values.mean()) if values.size else None
    std = float(values.std(ddof=1)) if values.size >= 2 else None
    return mean, std


def compare_groups(
    baseline: Sequence[float],
    variant: Sequence[float],
    higher_is_better: bool = True,
    test: str = "welch",
    alpha: float = 0.05,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> dict:
    """Variant vs baseline over seeds: means, stds (ddof=1), diff = mean(variant) − mean(baseline),
    the p-value of ``test`` ("welch" or "permutation"), and a verdict.

    ``improved`` is True when the difference is significant (p < alpha) and points the good way
    (up when ``higher_is_better``), False when it is not significant or points the bad way, and
    None when no test is possible (fewer than 2 seeds in a group); ``note`` explains.
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(TESTS)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    base = _as_sample(baseline, "baseline", 0)
    var = _as_sample(variant, "variant", 0)
    mean_b, std_b = _summary(base)
    mean_v, std_v = _summary(var)
    result = dict(
        mean_baseline=mean_b, std_baseline=std_b, n_baseline=int(base.size),
        mean_variant=mean_v, std_variant=std_v, n_variant=int(var.size),
        diff=None if mean_b is None or mean_v is None else mean_v - mean_b,
        higher_is_better=higher_is_better, test=None, p=None, alpha=alpha,
        significant=None, improved=None, note="",
    )
    if base.size < 2 or var.size < 2:
        result["note"] = (
            f"no significance test: {base.size} baseline and {var.size} variant seed(s); "
            "at least 2 per group are needed (run more seeds)"
        )
        return result
    if test == "welch":
        _, p = welch_t_test(var, base)
    else:
        _, p = permutation_test(var, base, n_permutations=n_permutations, seed=seed)
    good_direction = result["diff"] > 0 if higher_is_better else result["diff"] < 0
    significant = p < alpha
    result.update(test=test, p=p, significant=significant, improved=bool(significant and good_direction))
    if not significant:
        result["note"] = f"difference not significant at alpha={alpha} (p={p:.3g})"
    elif good_direction:
        result["note"] = f"significant improvement (p={p:.3g})"
    else:
        result["note"] = f"significantly worse (p={p:.3g})"
    # smallest exact two-sided p: the observed split (and its mirror image when sizes are equal)
    n_splits = math.comb(base.size + var.size, base.size)
    min_p = (2 if base.size == var.size else 1) / n_splits
    if test == "permutation" and n_splits <= n_permutations and min_p >= alpha:
        result["note"] += (
            f"; with {base.size}+{var.size} seeds the exact permutation test cannot reach "
            f"p < {alpha} (smallest possible p = {min_p:.3g})"
        )
    return result
