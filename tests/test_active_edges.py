"""Active-edge sparsity (docs/DESIGN.md §5.1): the edges-for-90 % fraction among the edges between
the features for 99 % of each layer's ΣΛ, against hand-computed values, a loop-by-loop naive
implementation and its defining property (zero-Λ features do not change it)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from evaluation.compare.metrics._edges import active_edge_fraction_90, edge_fraction_90
from evaluation.metrics.lib_summary import active_edge_stats, summarize, top_features


def naive_top(lam, frac=0.99):
    """Non-constant feature indices, largest first, until their Λ sum reaches frac of the total."""
    feats = sorted(range(1, len(lam)), key=lambda j: -float(lam[j]))
    total = sum(float(lam[j]) for j in feats)
    kept, acc = [], 0.0
    for j in feats:
        if acc >= frac * total * (1 - 1e-12):
            break
        kept.append(j)
        acc += float(lam[j])
    return kept


def naive_n90(weights):
    weights = sorted(weights, reverse=True)
    total, acc = sum(weights), 0.0
    for n, w in enumerate(weights, 1):
        acc += w
        if acc >= 0.9 * total * (1 - 1e-12):
            return n
    return len(weights)


def naive_active(E, lam_in, lam_out, frac=0.99):
    rows = list(range(1, E.shape[0])) if lam_out is None else naive_top(lam_out, frac)
    cols = naive_top(lam_in, frac)
    weights = [float(E[i, j]) for i in rows for j in cols]
    return naive_n90(weights), len(weights)


def test_hand_computed():
    lam_in = np.array([7.0, 5.0, 0.001, 3.0])  # 5 + 3 = 8 of 8.001 (> 99 %): features 1 and 3
    lam_out = np.array([1.0, 0.0, 2.0, 7.0])  # 7 + 2 = 9 of 9: features 3 and 2
    E = np.zeros((4, 4))
    E[0, :] = E[:, 0] = 100.0  # constant row and column: never counted
    E[3, 1], E[3, 3], E[2, 1], E[2, 3] = 6.0, 2.0, 1.0, 1.0  # active: 6, 2, 1, 1 (total 10)
    E[1, 1] = E[2, 2] = 50.0  # edges of an inactive feature: outside the active block
    assert list(top_features(lam_in)) == [1, 3] and list(top_features(lam_out)) == [3, 2]
    stats = active_edge_stats(E, lam_in, lam_out)
    # 6 + 2 = 8 < 9, 6 + 2 + 1 = 9 >= 9: three of the four active edges
    assert stats == {"n_in": 2, "n_out": 2, "n_edges": 4, "edges_90": 3, "fraction_90": 0.75}
    # the last node layer keeps every output feature: rows 1-3 x columns 1, 3
    last = active_edge_stats(E, lam_in, None)
    assert (last["n_out"], last["n_edges"]) == (3, 6)
    assert last["edges_90"] == 2  # now with E[1, 1] = 50: 50, 6, 2, 1, 1, 0 -> 56 >= 54 of 60


def test_matches_naive_on_random_layers():
    rng = np.random.default_rng(0)
    for trial in range(20):
        k_in, k_out = rng.integers(3, 30, size=2)
        lam_in = rng.exponential(size=k_in) ** 3
        lam_out = rng.exponential(size=k_out) ** 3
        E = rng.exponential(size=(k_out, k_in)) ** 2
        for out in (lam_out, None):
            stats = active_edge_stats(E, lam_in, out)
            assert (stats["edges_90"], stats["n_edges"]) == naive_active(E, lam_in, out), trial


def test_zero_lambda_features_change_the_fraction_over_all_edges_not_the_active_one():
    """The defining property: a layer padded with unused directions (Λ = 0, no edges) reads as
    sparser over all edges, and exactly as sparse over the active ones."""
    rng = np.random.default_rng(1)
    lam_in, lam_out = rng.exponential(size=9), rng.exponential(size=7)
    E = rng.exponential(size=(7, 9))
    pad = 20
    lam_in_p, lam_out_p = np.concatenate([lam_in, np.zeros(pad)]), np.concatenate([lam_out, np.zeros(pad)])
    E_p = np.zeros((7 + pad, 9 + pad))
    E_p[:7, :9] = E
    before, after = active_edge_stats(E, lam_in, lam_out), active_edge_stats(E_p, lam_in_p, lam_out_p)
    assert after == before
    from evaluation.metrics.lib_summary import edges_for_fraction

    assert edges_for_fraction(E_p, 0.9)[1] < edges_for_fraction(E, 0.9)[1] / 5


def test_shape_mismatch_raises_with_the_sizes():
    with pytest.raises(ValueError, match=r"shape \(3, 4\) does not match Λ of sizes 5 \(out\) and 4 \(in\)"):
        active_edge_stats(np.ones((3, 4)), np.ones(4), np.ones(5))


@dataclass
class Basis:
    Lambda: torch.Tensor


@dataclass
class Result:
    node_layers: list
    lib: dict
    pca: dict
    lib_edges: dict
    pca_edges: dict


def test_summary_and_metric_pool_layers_as_the_naive_sum():
    rng = np.random.default_rng(2)
    sizes = {"a": 6, "b": 9, "out": 5}
    lam = {side: {l: torch.tensor(rng.exponential(size=n) ** 2) for l, n in sizes.items()} for side in ("lib", "pca")}
    edges = {side: {"a": torch.tensor(rng.exponential(size=(9, 6))), "b": torch.tensor(rng.exponential(size=(5, 9)))}
             for side in ("lib", "pca")}
    result = Result(["a", "b", "out"], {l: Basis(v) for l, v in lam["lib"].items()},
                    {l: Basis(v) for l, v in lam["pca"].items()}, edges["lib"], edges["pca"])
    summary = summarize(result)
    for side in ("lib", "pca"):
        n_a, t_a = naive_active(edges[side]["a"].numpy(), lam[side]["a"].numpy(), lam[side]["b"].numpy())
        n_b, t_b = naive_active(edges[side]["b"].numpy(), lam[side]["b"].numpy(), None)  # "out" is the last layer
        assert summary["edges"]["b"][side]["active"]["n_out"] == 4
        assert active_edge_fraction_90(summary, side) == pytest.approx((n_a + n_b) / (t_a + t_b), rel=1e-12)
    assert edge_fraction_90(summary, "lib") is not None
    from evaluation.compare.metrics._edges import active_edge_measurement

    assert active_edge_measurement(summary, "pca").details == {"pca_active_edges": {l: summary["edges"][l]["pca"]["active"] for l in "ab"}}


def test_metric_without_active_statistics_names_the_layers():
    summary = {"edges": {"a": {"lib": {"edges_90": 1, "n_edges": 4}}}}
    with pytest.raises(ValueError, match=r"lib edges do not match.*\['a'\]"):
        active_edge_fraction_90(summary, "lib")


def test_edge_table_shows_the_active_counts():
    from evaluation.metrics.lib_summary import edge_table

    lam_in = np.array([7.0, 5.0, 0.001, 3.0])
    E = np.zeros((4, 4))
    E[3, 1], E[3, 3], E[2, 1], E[2, 3] = 6.0, 2.0, 1.0, 1.0
    E[1, 1] = 50.0
    result = Result(["a", "out"], {"a": Basis(lam_in), "out": Basis(np.ones(4))}, {"a": Basis(lam_in), "out": Basis(np.ones(4))},
                    {"a": E}, {"a": E})
    # all edges: 50 + 6 = 56 >= 54 (90 % of 60), 2 of 9; active (rows 1-3 x columns 1, 3): the same 2 of 6
    assert edge_table(summarize(result)) == "  a: edges for 90 %: LIB 2/9 (active 2/6), PCA 2/9 (active 2/6)"


def test_study_cutoff_fractions_match_the_naive_sum_at_every_cutoff():
    """study/active_edge_cutoffs.py: the pooled active fraction of a fit at several cut-offs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from study.active_edge_cutoffs import cutoff_fractions, table

    rng = np.random.default_rng(3)
    sizes = {"a": 7, "b": 11, "out": 6}
    lam = {side: {l: rng.exponential(size=n) ** 3 for l, n in sizes.items()} for side in ("lib", "pca")}
    edges = {side: {"a": rng.exponential(size=(11, 7)), "b": rng.exponential(size=(6, 11))} for side in ("lib", "pca")}
    fit = Result(["a", "b", "out"], {l: Basis(v) for l, v in lam["lib"].items()},
                 {l: Basis(v) for l, v in lam["pca"].items()}, edges["lib"], edges["pca"])
    got = cutoff_fractions(fit, [0.5, 0.9, 0.99])
    for side in ("lib", "pca"):
        for cutoff in (0.5, 0.9, 0.99):
            n_a, t_a = naive_active(edges[side]["a"], lam[side]["a"], lam[side]["b"], cutoff)
            n_b, t_b = naive_active(edges[side]["b"], lam[side]["b"], None, cutoff)
            assert got[f"{side}@{cutoff:g}"] == pytest.approx((n_a + n_b) / (t_a + t_b), rel=1e-12)
    rows = [{"variant": v, "seed": s, "lib@0.9": x, "pca@0.9": 0.5}
            for v, xs in (("base", (0.40, 0.42, 0.41)), ("reg", (0.30, 0.31, 0.29))) for s, x in enumerate(xs)]
    text = table(rows, [0.9], "base")
    assert "| 0.9 | `base` | 3 | 0.410 | 0.500 | 0.820 | – | – |" in text
    assert "| 0.9 | `reg` | 3 | 0.300 | 0.500 | 0.600 |" in text
