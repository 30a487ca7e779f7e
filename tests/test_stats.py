import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from evaluation.compare.stats import (adjust_pvalues, apply_correction, compare_groups, permutation_test,
                                      welch_t_test)


@pytest.mark.parametrize("na,nb,shift,scale", [(3, 3, 1.0, 1.0), (5, 8, 0.3, 3.0), (2, 6, -2.0, 0.1)])
def test_welch_matches_scipy(na, nb, shift, scale):
    rng = np.random.default_rng(na * 10 + nb)
    a = rng.normal(shift, 1.0, na)
    b = rng.normal(0.0, scale, nb)
    t, p = welch_t_test(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8)


def test_welch_hand_computed():
    # a: mean 2, var 1; b: mean 5, var 1 (n=3 each): t = -3/sqrt(2/3), df = 4
    t, p = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert t == pytest.approx(-3 / math.sqrt(2 / 3))
    assert p == pytest.approx(2 * scipy_stats.t.sf(3 / math.sqrt(2 / 3), 4))


def test_welch_zero_variance_and_bad_input():
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)
    t, p = welch_t_test([2.0, 2.0], [1.0, 1.0])  # no spread, different means: p undefined, not 0
    assert t == math.inf and math.isnan(p)
    with pytest.raises(ValueError, match="at least 2"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        welch_t_test([1.0, float("nan")], [1.0, 2.0])


def _naive_exact_permutation_p(a, b):
    pooled = list(a) + list(b)
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        rest = [pooled[i] for i in range(len(pooled)) if i not in idx]
        d = abs(np.mean([pooled[i] for i in idx]) - np.mean(rest))
        hits += d >= obs - 1e-12
        total += 1
    return hits / total


def test_permutation_exact_matches_enumeration():
    a, b = [1.2, 3.4, 2.2, 5.0], [0.1, 0.5, 1.9]
    diff, p = permutation_test(a, b)
    assert diff == pytest.approx(np.mean(a) - np.mean(b))
    assert p == pytest.approx(_naive_exact_permutation_p(a, b))
    # completely separated groups of 3: only the observed split and its mirror are as extreme
    _, p_sep = permutation_test([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert p_sep == pytest.approx(2 / 20)


def test_permutation_monte_carlo_close_to_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.8, 1, 15), rng.normal(0, 1, 15)  # C(30,15) splits: sampled
    _, p = permutation_test(a, b, n_permutations=4000, seed=3)
    ref = scipy_stats.permutation_test(
        (a, b), lambda x, y: np.mean(x) - np.mean(y), n_resamples=20000, alternative="two-sided",
        random_state=0,
    ).pvalue
    assert p == pytest.approx(ref, abs=0.02)
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_test(a, b, n_permutations=0)


def test_compare_groups_verdicts():
    base = [0.50, 0.52, 0.51, 0.49]
    better = [0.70, 0.72, 0.69, 0.71]
    r = compare_groups(base, better, higher_is_better=True)
    assert r["improved"] is True and r["significant"] is True and r["test"] == "welch"
    assert r["diff"] == pytest.approx(np.mean(better) - np.mean(base))
    assert r["std_variant"] == pytest.approx(np.std(better, ddof=1))
    assert r["p"] == pytest.approx(scipy_stats.ttest_ind(better, base, equal_var=False).pvalue)
    # the same numbers are a significant loss when lower is better
    r = compare_groups(base, better, higher_is_better=False)
    assert r["improved"] is False and "worse" in r["note"]
    # overlapping groups: not significant
    r = compare_groups([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert r["improved"] is False and r["significant"] is False and "not significant" in r["note"]


def test_compare_groups_too_few_seeds_and_permutation_note():
    r = compare_groups([0.5], [0.7, 0.8])
    assert r["improved"] is None and r["p"] is None and r["test"] is None
    assert "at least 2" in r["note"] and r["std_baseline"] is None and r["diff"] == pytest.approx(0.25)
    r = compare_groups([1.0, 2.0, 3.0], [7.0, 8.0, 9.0], test="permutation")
    assert r["p"] == pytest.approx(0.1) and r["improved"] is False
    assert "cannot reach" in r["note"]
    with pytest.raises(ValueError, match="unknown test 'bogus'"):
        compare_groups([1.0, 2.0], [1.0, 2.0], test="bogus")


def test_holm_hand_computed():
    """m = 4, p = (0.01, 0.04, 0.03, 0.005). Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06,
    0.04·1 = 0.04 -> running max 0.06. Bonferroni: 4p capped at 1."""
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust_pvalues(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_pvalues(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_pvalues(p, "none") == pytest.approx(p)
    assert adjust_pvalues([0.3, 0.5], "holm") == pytest.approx([0.6, 0.6])  # capped by monotonicity, not 0.5
    assert adjust_pvalues([0.9, 0.8], "bonferroni") == [1.0, 1.0]
    assert adjust_pvalues([], "holm") == []
    with pytest.raises(ValueError, match="unknown correction 'bh'; allowed: holm, bonferroni, none"):
        adjust_pvalues(p, "bh")
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
        adjust_pvalues([0.1, 1.5])


def test_apply_correction_rejudges_on_the_adjusted_p():
    strong = compare_groups([0.50, 0.52, 0.51, 0.49], [0.70, 0.72, 0.69, 0.71])   # p ~ 1e-6
    weak = compare_groups([1.0, 1.2, 1.1, 0.9], [1.25, 1.4, 1.2, 1.3])           # p ~ 0.02
    untested = compare_groups([0.5], [0.6, 0.7])
    assert weak["significant"] and 0.01 < weak["p"] < 0.05
    n = apply_correction([strong, weak, untested], "holm")
    assert n == 2 and untested["p_adjusted"] is None and untested["improved"] is None
    assert strong["p_adjusted"] == pytest.approx(2 * strong["p"]) and strong["improved"] is True
    assert weak["p_adjusted"] == pytest.approx(max(weak["p"], 2 * strong["p"]))
    assert weak["significant"] == (weak["p_adjusted"] < 0.05)
    assert "holm-adjusted p=" in strong["note"] and "over 2 comparisons" in strong["note"]


def test_zero_spread_falls_back_to_the_exact_permutation_test():
    """21, 21, 21 vs 19, 19, 19: an exact permutation test of 3 vs 3 cannot go below 2 / C(6, 3) = 0.1."""
    r = compare_groups([21.0, 21.0, 21.0], [19.0, 19.0, 19.0], higher_is_better=False)
    assert r["test"] == "permutation" and r["p"] == pytest.approx(0.1)
    assert r["significant"] is False and r["improved"] is False and "undefined" in r["note"]
    r = compare_groups([21.0] * 5, [19.0] * 5, higher_is_better=False)  # 2 / C(10, 5) = 1/126
    assert r["p"] == pytest.approx(2 / 252) and r["improved"] is True
    r = compare_groups([3.0, 3.0], [3.0, 3.0])  # no difference at all: Welch's p = 1
    assert r["test"] == "welch" and r["p"] == 1.0
