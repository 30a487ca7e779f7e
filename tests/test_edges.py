"""LIB edges: integration rules, docs/DESIGN.md §4.8 edge properties, stochastic Jacobian Grams."""

import math

import pytest
import torch
from torch import nn

from evaluation.lib.edges import integration_rule, jacobian_gram_for_batch, rademacher, section_forward
from evaluation.lib.fit import LIBConfig, fit_lib
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
    probed = fit_lib(model, data, MLP_LAYERS, LIBConfig(stochastic_sources=1, seed=3, jacobians="autograd"), progress=False)
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
    from evaluation.lib.edges import edges_for_batch
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


# ---- stochastic sources over positions and hidden units; exact position grouping ----------------

def transformer_section(l_in=TF_LAYERS[0], l_out=TF_LAYERS[1], n=8):
    model = transformer()
    toks = token_data(n=n, batch=n)[0][0]
    res = fit_lib(model, [toks], TF_LAYERS, progress=False)
    return model, toks, res, section_forward(model, toks, l_in, l_out)


def z_scores(estimates, exact):
    """|mean − exact| in standard errors of the mean, per entry."""
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    return (estimates.mean(0) - exact).abs() / (se + 1e-12 * exact.abs().max())


def test_jacobian_gram_with_probes_over_positions_and_hidden_units_is_unbiased():
    """r ∈ {±1}^{T×k}: one VJP per probe; mean of K estimates within 5 standard errors of the exact M′."""
    _, _, res, sp = transformer_section()
    C_next = res.lib[TF_LAYERS[1]].C
    k = C_next.shape[1] - 1
    exact = jacobian_gram_for_batch(sp, C_next, 2 ** 20)
    g = torch.Generator().manual_seed(1)
    K = 400
    est = torch.stack([jacobian_gram_for_batch(sp, C_next, 2 ** 20, rademacher(1, 8, 3, g, hidden=k)) for _ in range(K)])
    assert not torch.allclose(est[0], exact, rtol=1e-2)
    assert z_scores(est, exact).max() < 5.0
    # the sample mean does converge on the exact value (not merely a wide standard error)
    torch.testing.assert_close(est.mean(0), exact, atol=0.3 * exact.abs().max(), rtol=0)


def test_edges_with_probes_over_output_positions_are_unbiased():
    """(1/S) ∑_r (∑_t r_t A_t)² over the attention section with a trapezoid rule (probes shared over α)."""
    from evaluation.lib.edges import edges_for_batch
    model, toks, res, _ = transformer_section()
    l_in, l_out = TF_LAYERS[0], TF_LAYERS[1]
    passes = [(w, section_forward(model, toks, l_in, l_out, a)) for a, w in zip(*integration_rule("trapezoid", 2))]
    bases = [(res.lib[l_in].C, res.lib[l_in].C_pinv, res.lib[l_out].C), (res.pca[l_in].C, res.pca[l_in].C_pinv, res.pca[l_out].C)]
    exact = edges_for_batch(passes, bases, 2 ** 20)
    g = torch.Generator().manual_seed(2)
    K = 300
    draws = [edges_for_batch(passes, bases, 2 ** 20, rademacher(1, 8, 3, g)) for _ in range(K)]
    for b in range(2):
        est = torch.stack([d[b] for d in draws])
        assert exact[b].abs().max() > 1e-6
        assert not torch.allclose(est[0], exact[b], rtol=1e-2)
        assert z_scores(est, exact[b]).max() < 5.0


def test_edge_probes_are_exact_with_one_output_position():
    model, data = mlp(), mlp_data()
    exact = fit_lib(model, data, MLP_LAYERS, LIBConfig(integration="trapezoid", n_intervals=2), progress=False)
    probed = fit_lib(model, data, MLP_LAYERS, LIBConfig(integration="trapezoid", n_intervals=2, edge_sources=1, seed=7, jacobians="autograd"),
                     progress=False)
    for name in MLP_LAYERS[:-1]:
        assert exact.lib_edges[name].abs().max() > 1e-6
        torch.testing.assert_close(probed.lib_edges[name], exact.lib_edges[name], atol=1e-14, rtol=1e-10)
        torch.testing.assert_close(probed.pca_edges[name], exact.pca_edges[name], atol=1e-14, rtol=1e-10)


def test_probed_fit_of_a_transformer_is_close_but_not_identical():
    model, data = transformer(), token_data()
    exact = fit_lib(model, data, TF_LAYERS, progress=False)
    probed = fit_lib(model, data, TF_LAYERS, LIBConfig(stochastic_sources=4, stochastic_over="positions_and_hidden",
                                                       edge_sources=4, jacobians="autograd"), progress=False)
    again = fit_lib(model, data, TF_LAYERS, LIBConfig(stochastic_sources=4, stochastic_over="positions_and_hidden",
                                                      edge_sources=4, jacobians="autograd"), progress=False)
    name = TF_LAYERS[0]
    assert not torch.allclose(probed.lib_edges[name], exact.lib_edges[name], rtol=1e-3)
    torch.testing.assert_close(again.lib_edges[name], probed.lib_edges[name], rtol=0, atol=0)  # seeded
    # the last section is linear: ∑_i E_ij = Λ_j holds per probe draw in expectation only, so compare totals loosely
    total, ref = probed.lib_edges[TF_LAYERS[-2]].sum(), exact.lib_edges[TF_LAYERS[-2]].sum()
    assert abs(total / ref - 1) < 0.5


def test_output_dependence_finds_causal_attention_and_position_wise_mlp():
    from evaluation.lib.edges import output_dependence
    model, toks, _, attn = transformer_section()
    mlp_sp = section_forward(model, toks, TF_LAYERS[1], TF_LAYERS[2])
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(output_dependence(attn, 2 ** 20), causal)
    assert torch.equal(output_dependence(mlp_sp, 100), torch.eye(3, dtype=torch.bool))  # chunked, one position a call


def test_position_groups_share_cotangents_only_between_disjoint_supports():
    from evaluation.lib.edges import position_groups
    assert position_groups(torch.eye(4, dtype=torch.bool)) == [[0, 1, 2, 3]]
    assert position_groups(torch.tril(torch.ones(3, 3, dtype=torch.bool))) == [[0], [1], [2]]
    dep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    assert position_groups(dep) == [[0, 2], [3]]  # position 1 depends on nothing: no VJP at all


def test_grouped_exact_gram_equals_one_cotangent_per_position():
    """The grouped M′ of the position-wise MLP section equals the ungrouped sum over (t, i) cotangents."""
    from evaluation.lib.edges import Cotangents, batched_vjp
    _, _, res, _ = transformer_section()
    model = transformer()
    toks = token_data(n=8, batch=8)[0][0]
    sp = section_forward(model, toks, TF_LAYERS[1], TF_LAYERS[2])
    C_next = res.lib[TF_LAYERS[2]].C
    ref = torch.zeros(8, 8, dtype=F64)
    for _, g in batched_vjp(sp, Cotangents(C_next[1:, 1:], sp.out), 2 ** 20):  # T·k cotangents
        rows = g.reshape(-1, 8)
        ref += rows.T @ rows
    torch.testing.assert_close(jacobian_gram_for_batch(sp, C_next, 2 ** 20), ref, atol=1e-13, rtol=1e-11)


def test_section_forward_stops_after_the_output_layer():
    from interp_train.sites import resolve_site, run_model
    model, toks = transformer(), token_data(n=4, batch=4)[0][0]
    calls = []
    handle = resolve_site(model, "blocks.0.hook_resid_post").register_forward_hook(lambda *a: calls.append(1))
    try:
        sp = section_forward(model, toks, TF_LAYERS[0], TF_LAYERS[1])
    finally:
        handle.remove()
    assert calls == []  # resid_post (after resid_mid) never ran
    with torch.no_grad():
        ref = run_model(model, toks, record=[TF_LAYERS[1]]).activations[TF_LAYERS[1]]
    torch.testing.assert_close(sp.out.detach(), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"node layer 'blocks.0.hook_resid_pre' does not depend on node layer "
                                         r"'blocks.0.hook_resid_mid'; node_layers must be listed in forward order"):
        section_forward(model, toks, TF_LAYERS[1], TF_LAYERS[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(stochastic_over="hidden"), r"unknown stochastic_over 'hidden'; use one of \('positions', 'positions_and_hidden'\)"),
    (dict(edge_sources=0), r"edge_sources must be None or an integer >= 1, got 0"),
    (dict(edge_sources=2.5), r"edge_sources must be None or an integer >= 1, got 2.5"),
    (dict(seed="x"), r"seed must be an integer, got 'x'"),
])
def test_config_rejects_bad_stochastic_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LIBConfig(**kwargs)
