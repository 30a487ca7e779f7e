"""LIB edges: integration rules, DESIGN.md §4 edge properties, stochastic Jacobian Grams."""

import math

import pytest
import torch
from torch import nn

from evaluation.edges import integration_rule, jacobian_gram_for_batch, rademacher, section_forward
from evaluation.lib import LIBConfig, fit_lib
from tests.test_lib import MLP_LAYERS, TF_LAYERS, mlp, mlp_data, token_data, transformer

F64 = torch.float64


@pytest.mark.parametrize("kind,n", [("trapezoid", 1), ("trapezoid", 4), ("gauss-legendre", 1), ("gauss-legendre", 3)])
def test_integration_rules_integrate_polynomials(kind, n):
    alphas, weights = integration_rule(kind, n)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-14)
    assert all(0 <= a <= 1 for a in alphas)
    assert math.isclose(sum(w * a for a, w in zip(alphas, weights)), 0.5, rel_tol=1e-14)  # ∫ α dα
    if kind == "gauss-legendre":  # exact up to degree 2n - 1
        for p in range(2 * n):
            assert math.isclose(sum(w * a ** p for a, w in zip(alphas, weights)), 1 / (p + 1), rel_tol=1e-12)
    else:  # trapezoid error for α²: 1/(6 n²)
        assert math.isclose(sum(w * a ** 2 for a, w in zip(alphas, weights)), 1 / 3 + 1 / (6 * n * n), rel_tol=1e-12)


def test_gradient_rule_is_alpha_one():
    assert integration_rule("gradient", 1) == ([1.0], [1.0])


def test_edges_of_a_linear_section_sum_to_lambda():
    """∑_i E_ij = Λ_j for the linear last section, in an MLP (P = 1) and per position in a transformer."""
    for model, data, layers in ((mlp(), mlp_data(), MLP_LAYERS), (transformer(), token_data(), TF_LAYERS)):
        res = fit_lib(model, data, layers, progress=False)
        last = layers[-2]
        torch.testing.assert_close(res.lib_edges[last].sum(0), res.lib[last].Lambda, atol=1e-13, rtol=1e-9)


def test_total_edge_weight_of_a_linear_section_is_the_same_in_lib_and_pca():
    for model, data, layers in ((mlp(), mlp_data(), MLP_LAYERS), (transformer(), token_data(), TF_LAYERS)):
        res = fit_lib(model, data, layers, progress=False)
        last = layers[-2]
        lib_total, pca_total = res.lib_edges[last].sum(), res.pca_edges[last].sum()
        assert lib_total > 1e-6
        torch.testing.assert_close(lib_total, pca_total, atol=1e-13, rtol=1e-10)
        # the nonlinear section: generally different (so the check above can fail)
        assert not torch.isclose(res.lib_edges[layers[0]].sum(), res.pca_edges[layers[0]].sum(), rtol=1e-3)


def test_linear_section_edges_do_not_depend_on_integration_intervals():
    model, data = mlp(), mlp_data()
    ref = fit_lib(model, data, MLP_LAYERS, progress=False)
    for integration, n in (("trapezoid", 1), ("trapezoid", 4), ("gauss-legendre", 3)):
        res = fit_lib(model, data, MLP_LAYERS, LIBConfig(integration=integration, n_intervals=n), progress=False)
        torch.testing.assert_close(res.lib_edges["1"], ref.lib_edges["1"], atol=1e-14, rtol=1e-10)
        torch.testing.assert_close(res.pca_edges["1"], ref.pca_edges["1"], atol=1e-14, rtol=1e-10)
        # the tanh section is not linear: its integrated-gradient edges differ from the gradient rule
        assert not torch.allclose(res.lib_edges["0"], ref.lib_edges["0"], rtol=1e-4)


def block_data():
    """x = [u, v] over the Cartesian product of two samples: Cov(u, v) is exactly 0."""
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(6, 2, dtype=F64, generator=g), torch.randn(5, 2, dtype=F64, generator=g)
    x = torch.cat([u.repeat_interleave(5, 0), v.repeat(6, 1)], 1)
    return [x[:15], x[15:]]


def test_block_diagonal_linear_network_gives_block_diagonal_edges():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    with torch.no_grad():
        for layer in model:
            layer.weight[:2, 2:] = 0
            layer.weight[2:, :2] = 0
    res = fit_lib(model, block_data(), ["input", "0", "output"], progress=False)

    def block_of(C):  # block (0: units 0-1, 1: units 2-3) of each non-constant feature
        rows = C[1:, 1:].abs()
        return (rows[2:].sum(0) > rows[:2].sum(0)).long()

    blocks = {n: block_of(res.lib[n].C) for n in ("input", "0", "output")}
    for n in ("input", "0"):
        assert sorted(blocks[n].tolist()) == [0, 0, 1, 1]
        C = res.lib[n].C[1:, 1:]
        for j, b in enumerate(blocks[n].tolist()):  # each feature lives in one block
            assert C[2 * (1 - b):2 * (1 - b) + 2, j].abs().max() < 1e-12
    for l_in, l_out in (("input", "0"), ("0", "output")):
        E = res.lib_edges[l_in][1:, 1:]
        cross = blocks[l_out][:, None] != blocks[l_in][None, :]
        assert E[~cross].max() > 1e-3
        assert E[cross].max() < 1e-12 * E.max()


def test_stochastic_sources_exact_with_one_output_position():
    model, data = mlp(), mlp_data()
    exact = fit_lib(model, data, MLP_LAYERS, progress=False)
    probed = fit_lib(model, data, MLP_LAYERS, LIBConfig(stochastic_sources=1, seed=3), progress=False)
    for name in MLP_LAYERS:
        torch.testing.assert_close(probed.lib[name].Lambda, exact.lib[name].Lambda, atol=1e-13, rtol=1e-10)


def test_stochastic_jacobian_gram_is_unbiased_over_positions():
    """Mean of K one-probe estimates of M′ vs the exact M′: every entry within 5 standard errors."""
    model = transformer()
    toks = token_data(n=8, batch=8)[0][0]
    res = fit_lib(model, [toks], TF_LAYERS, progress=False)
    sp = section_forward(model, toks, TF_LAYERS[0], TF_LAYERS[1])
    C_next = res.lib[TF_LAYERS[1]].C
    exact = jacobian_gram_for_batch(sp, C_next, 2 ** 20)
    g = torch.Generator().manual_seed(0)
    K = 300
    est = torch.stack([jacobian_gram_for_batch(sp, C_next, 2 ** 20, rademacher(1, 8, 3, g)) for _ in range(K)])
    assert not torch.allclose(est[0], exact, rtol=1e-3)  # one probe over 3 positions is noisy
    se = est.std(0) / math.sqrt(K)
    z = (est.mean(0) - exact).abs() / (se + 1e-12 * exact.abs().max())
    assert z.max() < 5.0


def test_shared_raw_gradients_equal_per_basis_cotangents():
    """edges_for_batch projects raw output-unit gradients when the bases are wide; same numbers."""
    from evaluation.edges import edges_for_batch
    model = transformer()
    data = token_data(n=8, batch=8)
    res = fit_lib(model, data, TF_LAYERS, progress=False)
    toks = data[0][0]
    l_in, l_out = TF_LAYERS[0], TF_LAYERS[1]
    passes = [(w, section_forward(model, toks, l_in, l_out, a)) for a, w in zip(*integration_rule("trapezoid", 2))]
    lib = (res.lib[l_in].C, res.lib[l_in].C_pinv, res.lib[l_out].C)
    pca = (res.pca[l_in].C, res.pca[l_in].C_pinv, res.pca[l_out].C)
    (alone,) = edges_for_batch(passes, [lib], chunk_elements=500)      # per-basis cotangents, many chunks
    together, _ = edges_for_batch(passes, [lib, pca], chunk_elements=10 ** 6)  # shared raw gradients
    assert alone.abs().max() > 1e-6
    torch.testing.assert_close(alone, together, atol=1e-14, rtol=1e-10)
