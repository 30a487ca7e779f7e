"""Statistics for comparing a regularized variant with its baseline over seeds.

Every comparison in the report is "several seeds per variant, mean ± std, a significance test,
p-values corrected for the number of comparisons" (docs/DESIGN.md §5.9). Seeds are few
(typically 3-5), so the tests are Welch's t-test (unequal variances; ``scipy.stats.ttest_ind``)
and an exact permutation test (``scipy.stats.permutation_test``); ``compare_groups`` packages
either into one JSON-ready dict and says plainly when there are too few seeds to test at all.

Zero spread: when neither group varies (e.g. 21, 21, 21 LIB features against 19, 19, 19),
Welch's t is ±inf and its p-value undefined (a t-test would call any difference certain).
``compare_groups`` then uses the exact permutation test, whose p cannot go below
(2 if n_a = n_b else 1) / C(n_a + n_b, n_a) — 0.1 for 3 against 3 — and says so in the note.

Multiple comparisons: a report makes one test per (variant, metric), ~50 of them; judging each
at α inflates false positives. ``adjust_pvalues`` implements Holm's step-down correction (default;
controls the family-wise error rate at α, uniformly more powerful than Bonferroni), Bonferroni, or
none; ``apply_correction`` re-judges a family of ``compare_groups`` results on the adjusted p.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

TESTS = ("welch", "permutation")
CORRECTIONS = ("holm", "bonferroni", "none")


def _as_sample(values: Sequence[float], name: str, min_size: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values: {arr.tolist()}")
    return arr


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's two-sided t-test for mean(a) != mean(b) without assuming equal variances
    (``scipy.stats.ttest_ind(a, b, equal_var=False)``).

    t = (ā − b̄) / sqrt(s_a²/n_a + s_b²/n_b) (s² with ddof=1), with Welch–Satterthwaite degrees
    of freedom ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)) and
    p = 2·P(T_ν > |t|). Both groups need at least 2 values. When both variances are zero the
    test is degenerate: (0, 1) if the means are equal, else (±inf, nan) — p is undefined (see
    the module docstring: ``compare_groups`` falls back to the exact permutation test).
    """
    x = _as_sample(a, "a", 2)
    y = _as_sample(b, "b", 2)
    if x.var() == 0.0 and y.var() == 0.0:
        diff = x.mean() - y.mean()
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's near-constant-data precision warning
        result = _scipy_stats.ttest_ind(x, y, equal_var=False)
    return float(result.statistic), float(min(result.pvalue, 1.0))


def _abs_mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.mean(x, axis=axis) - np.mean(y, axis=axis))


def permutation_test(
    a: Sequence[float], b: Sequence[float], n_permutations: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Two-sided permutation test of the difference in means; returns (mean(a) − mean(b), p).

    p = fraction of relabellings of the pooled values (a group of size n_a against the rest)
    whose |mean difference| is at least the observed one (``scipy.stats.permutation_test`` with
    statistic |ā − b̄| and alternative "greater"). All C(n_a+n_b, n_a) relabellings are
    enumerated when there are at most ``n_permutations`` of them (exact p, the observed split
    included); otherwise ``n_permutations`` random ones are drawn and p = (hits + 1)/(n + 1).
    """
    x = _as_sample(a, "a", 1)
    y = _as_sample(b, "b", 1)
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be an integer >= 1, got {n_permutations!r}")
    result = _scipy_stats.permutation_test(
        (x, y), _abs_mean_difference, permutation_type="independent", vectorized=True,
        n_resamples=n_permutations, alternative="greater", random_state=np.random.default_rng(seed))
    return float(x.mean() - y.mean()), float(result.pvalue)


def min_exact_permutation_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided exact permutation p: the observed split (and its mirror image when
    the sizes are equal) out of C(n_a + n_b, n_a)."""
    return (2 if n_a == n_b else 1) / math.comb(n_a + n_b, n_a)


def adjust_pvalues(pvalues: Sequence[float], method: str = "holm") -> list[float]:
    """p-values adjusted for m = len(pvalues) comparisons, in the input order.

    holm: with p_(1) ≤ … ≤ p_(m) sorted, p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j));
    rejecting p̃ < α controls the family-wise error rate at α (Holm 1979).
    bonferroni: min(1, m · p). none: p unchanged.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; allowed: {', '.join(CORRECTIONS)}")
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    if method == "none" or m == 0:
        return p.tolist()
    if method == "bonferroni":
        return np.minimum(1.0, m * p).tolist()
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted.tolist()


def _summary(values: np.ndarray) -> tuple[float | None, float | None]:
    mean = float(values.mean()) if values.size else None
    std = float(values.std(ddof=1)) if values.size >= 2 else None
    return mean, std


def _judge(result: dict, p_adjusted: float, correction: str, n_comparisons: int) -> None:
    """Sets p_adjusted, significant, improved and the note of a tested comparison."""
    p, alpha = result["p"], result["alpha"]
    good_direction = result["diff"] > 0 if result["higher_is_better"] else result["diff"] < 0
    significant = p_adjusted < alpha
    result.update(p_adjusted=p_adjusted, correction=correction, n_comparisons=n_comparisons,
                  significant=significant, improved=bool(significant and good_direction))
    shown = (f"p={p:.3g}" if correction == "none"
             else f"{correction}-adjusted p={p_adjusted:.3g} over {n_comparisons} comparisons, raw p={p:.3g}")
    if not significant:
        verdict = f"difference not significant at alpha={alpha} ({shown})"
    elif good_direction:
        verdict = f"significant improvement ({shown})"
    else:
        verdict = f"significantly worse ({shown})"
    result["note"] = "; ".join([verdict, *result.get("test_notes", [])])


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
    the p-value of ``test`` ("welch" or "permutation"), and a verdict on this one comparison
    (p_adjusted = p; ``apply_correction`` re-judges a family of them).

    ``improved`` is True when the difference is significant (p_adjusted < alpha) and points the
    good way (up when ``higher_is_better``), False when it is not significant or points the bad
    way, and None when no test is possible (fewer than 2 seeds in a group); ``note`` explains.
    Welch with zero spread in both groups uses the exact permutation test (module docstring);
    ``test`` then reads "permutation".
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
        higher_is_better=higher_is_better, test=None, p=None, p_adjusted=None, correction="none",
        n_comparisons=None, alpha=alpha, significant=None, improved=None, note="",
    )
    if base.size < 2 or var.size < 2:
        result["note"] = (
            f"no significance test: {base.size} baseline and {var.size} variant seed(s); "
            "at least 2 per group are needed (run more seeds)"
        )
        return result
    notes = []
    if test == "welch" and std_b == 0.0 and std_v == 0.0 and result["diff"] != 0.0:
        test = "permutation"
        notes.append("no spread in either group: Welch's t is undefined, exact permutation test used")
    if test == "welch":
        _, p = welch_t_test(var, base)
    else:
        _, p = permutation_test(var, base, n_permutations=n_permutations, seed=seed)
    n_splits = math.comb(base.size + var.size, base.size)
    min_p = min_exact_permutation_p(base.size, var.size)
    if test == "permutation" and n_splits <= n_permutations and min_p >= alpha:
        notes.append(f"with {base.size}+{var.size} seeds the exact permutation test cannot reach "
                     f"p < {alpha} (smallest possible p = {min_p:.3g})")
    result.update(test=test, p=p, test_notes=notes)
    _judge(result, p, "none", 1)
    return result


def apply_correction(comparisons: Sequence[dict], method: str = "holm") -> int:
    """Adjusts the p-values of the tested ``compare_groups`` results in ``comparisons`` (one
    family) for their number and re-judges each on its adjusted p; returns that number."""
    tested = [c for c in comparisons if c.get("p") is not None]
    adjusted = adjust_pvalues([c["p"] for c in tested], method)
    for c, p_adj in zip(tested, adjusted):
        _judge(c, p_adj, method, len(tested))
    for c in comparisons:
        c["correction"] = method
    return len(tested)
