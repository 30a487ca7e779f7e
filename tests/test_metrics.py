"""Metrics against hand-computed values; node ablation against an explicit projection."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.metrics.lib_summary import (
    edges_for_fraction, feature_count, gini, node_ablation_curve, project_top_k, summarize,
)

# Row 0 / column 0 belong to the constant feature; the rest is [[4, 1], [3, 2]], total 10.
E3 = torch.tensor([[9.0, 9.0, 9.0], [9.0, 4.0, 1.0], [9.0, 3.0, 2.0]], dtype=torch.float64)


def test_edges_for_fraction_hand_computed():
    # sorted 4, 3, 2, 1 -> cumulative 4, 7, 9, 10
    assert edges_for_fraction(E3, 0.9) == (3, 0.75)
    assert edges_for_fraction(E3, 0.99) == (4, 1.0)
    assert edges_for_fraction(E3, 0.4) == (1, 0.25)
    assert edges_for_fraction(E3, 0.41) == (2, 0.5)
    # with the constant node: 9 x 5 then 4, 3, 2, 1; total 55, 90 % = 49.5 -> 9, 9, 9, 9, 9, 4, 3 = 52
    assert edges_for_fraction(E3, 0.9, exclude_constant=False) == (7, 7 / 9)


def test_feature_count_hand_computed():
    lam = torch.tensor([1.0, 3.0, 5.0, 2.0])  # constant first; rest sorted 5, 3, 2 (sum 10)
    assert feature_count(lam, 0.99) == 3
    assert feature_count(lam, 0.8) == 2
    assert feature_count(lam, 0.5) == 1
    assert feature_count(lam, 0.5, exclude_constant=False) == 2  # 5, 3 of 11
    with pytest.raises(ValueError, match=r"frac must be in \(0, 1\], got 1.5"):
        feature_count(lam, 1.5)


def test_gini_known_values():
    assert gini(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros(10)
    one_hot[3] = 2.5
    assert gini(one_hot[None]) == pytest.approx(1 - 1 / 10)
    # [1, 2, 3, 4]: sum (2i - n - 1) x_i = -3 - 2 + 3 + 12 = 10; / (4 * 10)
    assert gini(E3, exclude_constant=True) == pytest.approx(0.25)
    # against the mean-absolute-difference definition G = sum_ij |x_i - x_j| / (2 n^2 mean)
    x = np.random.default_rng(0).exponential(size=50)
    naive = np.abs(x[:, None] - x[None]).sum() / (2 * x.size**2 * x.mean())
    assert gini(x[None]) == pytest.approx(naive)
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        gini(np.array([[1.0, -1.0, 3.0]]))
    # roundoff below zero (seen on a collapsed model's edges) counts as zero; a real negative still raises
    assert gini(np.array([[-6e-28, 1e-12, 3e-12]])) == pytest.approx(gini(np.array([[0.0, 1e-12, 3e-12]])))
    assert gini(np.array([[-6e-28, 1e-12, 3e-12]])) == pytest.approx(6 / (3 * 4))  # sum (2i - n - 1) x_i / (n sum x), x = [0, 1, 3]
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        gini(np.array([[-1e-12, 1e-12, 3e-12]]))
    # the same for the edges-for-a-fraction count: 3e-12 alone holds 75 % of the weight
    assert edges_for_fraction(np.array([[-6e-28, 1e-12, 3e-12]]), 0.75, exclude_constant=False) == (1, pytest.approx(1 / 3))
    assert edges_for_fraction(np.array([[-6e-28, 1e-12, 3e-12]]), 0.76, exclude_constant=False) == (2, pytest.approx(2 / 3))
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        edges_for_fraction(np.array([[-1e-12, 1e-12, 3e-12]]), 0.5, exclude_constant=False)
    with pytest.raises(ValueError, match=r"must be 2-D"):
        edges_for_fraction(torch.ones(3), 0.9)


@dataclass
class Basis:
    name: str
    C: torch.Tensor
    C_pinv: torch.Tensor
    Lambda: torch.Tensor
    mean: torch.Tensor


def pca_basis(X: torch.Tensor, name="x") -> Basis:
    """PCA basis in the LayerBasis convention: feature 0 constant, feature j = (a - mu) . u_j."""
    X = X.double()
    mu = X.mean(0)
    D, U = torch.linalg.eigh(torch.cov(X.T, correction=0))
    d = X.shape[1]
    C = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    C_pinv = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    C[0, 0], C_pinv[0, 0], C_pinv[0, 1:] = 1, 1, mu
    C[0, 1:], C[1:, 1:] = -(mu @ U), U
    C_pinv[1:, 1:] = U.T
    return Basis(name, C, C_pinv, torch.cat([torch.ones(1, dtype=torch.float64), D]), mu)  # D ascending


def test_project_top_k_matches_explicit_pca():
    X = torch.randn(200, 4) @ torch.randn(4, 4)
    b = pca_basis(X)
    mu = X.double().mean(0)
    U = b.C[1:, 1:]
    a = torch.randn(7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(project_top_k(a, b, 4), a)
    torch.testing.assert_close(project_top_k(a, b, 0), mu.expand_as(a))
    top2 = U[:, [3, 2]]  # eigh sorts ascending: the two largest variances
    want = mu + ((a - mu) @ top2) @ top2.T
    torch.testing.assert_close(project_top_k(a, b, 2), want)
    with pytest.raises(ValueError, match=r"k must be in \[0, 4\].*got 5"):
        project_top_k(a, b, 5)


@dataclass
class FakeResult:
    node_layers: list
    lib: dict
    pca: dict
    lib_edges: dict
    pca_edges: dict


def test_node_ablation_curve_against_manual_forward():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    with torch.no_grad():
        h = model[1](model[0](x))
    b = pca_basis(h, "1")
    result = FakeResult(["1"], {"1": b}, {"1": b}, {}, {})
    ks = [0, 1, 4]
    acc = node_ablation_curve(model, [(x[:30], y[:30]), (x[30:], y[30:])], result, "1", ks)
    loss = node_ablation_curve(model, (x, y), result, "1", ks, basis="pca", metric="loss")
    for k, a_got, l_got in zip(ks, acc, loss):
        with torch.no_grad():
            out = model[2](project_top_k(h, b, k))
        assert a_got == pytest.approx((out.argmax(-1) == y).double().mean().item())
        assert l_got == pytest.approx(nn.functional.cross_entropy(out, y).item())
    with torch.no_grad():  # all directions kept: the clean model
        assert loss[-1] == pytest.approx(nn.functional.cross_entropy(model(x), y).item())
    with pytest.raises(ValueError, match=r"basis must be 'lib' or 'pca', got 'ica'"):
        node_ablation_curve(model, (x, y), result, "1", ks, basis="ica")
    with pytest.raises(KeyError, match=r"no lib basis for layer '0'"):
        node_ablation_curve(model, (x, y), result, "0", ks)


def test_summarize_reports_lib_and_pca_side_by_side():
    lam = torch.tensor([1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    basis = Basis("l", torch.eye(4), torch.eye(4), lam, torch.zeros(3))
    blocks = torch.zeros(4, 4, dtype=torch.float64)
    blocks[1:3, 1:3], blocks[3, 3] = 1.0, 2.0
    result = FakeResult(["a", "b", "c"], {l: basis for l in "abc"}, {l: basis for l in "abc"},
                        {"a": blocks, "b": E3}, {"a": torch.ones(4, 4), "b": torch.ones(3, 4)})
    s = summarize(result)
    assert s["layers"]["a"]["lib"]["features_99"] == 3 and s["layers"]["a"]["lib"]["n_features"] == 3
    assert s["edges"]["b"]["lib"]["edges_90"] == 3 and s["edges"]["b"]["lib"]["fraction_90"] == 0.75
    assert s["edges"]["b"]["lib"]["gini"] == pytest.approx(0.25)
    assert s["edges"]["a"]["pca"]["gini"] == pytest.approx(0.0) and s["edges"]["a"]["pca"]["edges_99"] == 9
    lib_q = s["modularity"]["lib"]["gamma_1.0"]
    assert lib_q["n_communities"] == 2 and lib_q["community_sizes"] == [4, 2]
    # only zero edges are dropped, so eps = 1/2: four edges of weight log10(2) in {a1, a2, b1, b2},
    # one of log10(4) = 2 log10(2) in {a3, b3}; Q = sum_c L_c/m - (d_c/2m)^2 = 1 - (2/3)^2 - (1/3)^2
    assert lib_q["Q"] == pytest.approx(4 / 9)
    assert set(s["modularity"]) == {"lib", "pca"} and "gamma_0.5" in s["modularity"]["pca"]
