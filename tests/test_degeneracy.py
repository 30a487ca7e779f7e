"""Degeneracy regularizers (kinds 1-3): effective rank values, safe gradients, wiring, training effect."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from interp_train import regularized_loss
from interp_train.regularizers.degeneracy import (
    ActivationDegeneracy, FiringPatternDegeneracy, GradientDegeneracy, effective_rank,
)
from tests.helpers import SideBranch, digits, train_digits

MEASURES = ["nuclear", "entropy", "participation"]


def reference_rank(a: torch.Tensor, measure: str) -> float:
    """Naive reference from an SVD of the centered float64 matrix."""
    a = a.reshape(-1, a.shape[-1]).double()
    s = torch.linalg.svdvals(a - a.mean(0))
    if measure == "nuclear":
        return float(s.sum() / s.pow(2).sum().sqrt())
    if measure == "participation":
        return float(s.pow(2).sum() ** 2 / s.pow(4).sum())
    p = s[s > 0] / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@pytest.mark.parametrize("measure", MEASURES)
def test_rank_one_is_lower_than_isotropic(measure):
    iso = torch.randn(256, 8)
    rank1 = torch.randn(256, 1) * torch.randn(1, 8)
    low, high = effective_rank(rank1, measure).item(), effective_rank(iso, measure).item()
    assert low == pytest.approx(1.0, abs=0.02)
    full = math.sqrt(8) if measure == "nuclear" else 8.0  # entropy, participation: up to the rank
    assert high > 0.85 * full and low < 0.5 * high


def test_hand_built_matrix_matches_analytic_value():
    # centered, with orthogonal columns: singular values 3·sqrt2 and 4·sqrt2
    a = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    assert effective_rank(a, "nuclear").item() == pytest.approx(7 / 5, rel=1e-6)
    p = torch.tensor([3 / 7, 4 / 7])
    assert effective_rank(a, "entropy").item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert effective_rank(a, "participation").item() == pytest.approx(50 ** 2 / (18 ** 2 + 32 ** 2), rel=1e-6)
    # (B, T, d) activations are B·T rows: the same matrix split over a position dimension
    assert effective_rank(a.reshape(2, 2, 2), "nuclear").item() == pytest.approx(7 / 5, rel=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
def test_matches_svd_reference_in_value_and_gradient(measure):
    a = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    value = effective_rank(a, measure, rel_floor=0.0)
    assert value.item() == pytest.approx(reference_rank(a.detach(), measure), rel=1e-9)
    (grad,) = torch.autograd.grad(value, a)
    ref = a.detach().clone().requires_grad_(True)
    b = ref - ref.mean(0)
    s = torch.linalg.svdvals(b)  # distinct singular values here, so the SVD gradient is fine
    ref_value = {"nuclear": s.sum() / s.pow(2).sum().sqrt(),
                 "entropy": torch.exp(-((s / s.sum()) * (s / s.sum()).log()).sum()),
                 "participation": s.pow(2).sum() ** 2 / s.pow(4).sum()}[measure]
    (ref_grad,) = torch.autograd.grad(ref_value, ref)
    assert torch.allclose(grad, ref_grad, atol=1e-8)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("case", ["zeros", "rank1", "equal_singular_values", "repeated_zero_and_nonzero"])
def test_gradient_is_finite_at_rank_deficient_and_repeated_spectra(measure, case):
    if case == "zeros":
        a = torch.zeros(8, 4)
    elif case == "rank1":
        a = torch.randn(8, 1) * torch.randn(1, 4)
    elif case == "equal_singular_values":
        a = torch.cat([torch.eye(4), -torch.eye(4)])  # all four singular values equal
    else:
        a = torch.cat([torch.eye(4), -torch.eye(4)]) @ torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    a.requires_grad_(True)
    # the naive SVD route really does fail here, so the test exercises the hard case
    value = effective_rank(a, measure)
    (grad,) = torch.autograd.grad(value, a)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    if case == "equal_singular_values":  # maximal rank: a stationary point
        assert grad.abs().max() < 1e-6


def test_naive_svd_gradient_is_nan_at_repeated_singular_values():
    """Why the Gram/eigvalsh route exists: the SVD-with-vectors gradient breaks here."""
    a = (torch.cat([torch.eye(4), -torch.eye(4)]) @ torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0]))).requires_grad_(True)
    u, s, vh = torch.linalg.svd(a - a.mean(0), full_matrices=False)
    (u[:, 0] * s[0]).sum().backward()
    assert not torch.isfinite(a.grad).all()
    b = a.detach().clone().requires_grad_(True)
    effective_rank(b, "entropy").backward()
    assert torch.isfinite(b.grad).all()


def mlp(seed=0, d_in=6, width=8, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d_out))


@pytest.mark.parametrize("measure", MEASURES)
def test_activation_term_equals_rank_of_hidden_activations(measure):
    model, x, y = mlp(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    out = regularized_loss(model, x, y, [ActivationDegeneracy(layers=["1", "3"], measure=measure, rel_floor=1e-12)])
    h1 = torch.relu(model[0](x))
    h3 = torch.tanh(model[2](h1))
    assert out.terms["activation_degeneracy/erank/1"].item() == pytest.approx(reference_rank(h1.detach(), measure), rel=1e-5)
    assert out.terms["activation_degeneracy/erank/3"].item() == pytest.approx(reference_rank(h3.detach(), measure), rel=1e-5)


@pytest.mark.parametrize("target", ["loss", "logit", "logprob"])
def test_gradient_term_equals_rank_of_per_example_gradients(target):
    model, x, y = mlp(), torch.randn(12, 6), torch.randint(0, 3, (12,))
    out = regularized_loss(model, x, y, [GradientDegeneracy(layers="3", target=target, measure="nuclear",
                                                            rel_floor=1e-12)])
    rows = []
    for i in range(len(x)):  # naive reference: one example at a time
        h = torch.tanh(model[2](torch.relu(model[0](x[i:i + 1])))).detach().requires_grad_(True)
        logits = model[4](h)
        if target == "loss":
            score = F.cross_entropy(logits, y[i:i + 1])
        elif target == "logit":
            score = logits[0, y[i]]
        else:
            score = torch.log_softmax(logits, -1)[0, y[i]]
        rows.append(torch.autograd.grad(score, h)[0][0])
    expected = reference_rank(torch.stack(rows), "nuclear")
    assert out.terms["gradient_degeneracy/erank/3"].item() == pytest.approx(expected, rel=1e-5)
    default = regularized_loss(model, x, y, [GradientDegeneracy(layers="3", target=target)])
    assert default.terms["gradient_degeneracy/erank/3"].item() == pytest.approx(
        reference_rank(torch.stack(rows), "participation"), rel=1e-5)
    out.total.backward()  # double backprop reaches the parameters
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_firing_pattern_term_and_shared_firing_is_lower():
    model, x, y = mlp(), torch.randn(32, 6), torch.randint(0, 3, (32,))
    reg = FiringPatternDegeneracy(layers="0", tau=0.3, measure="nuclear", rel_floor=1e-12)
    out = regularized_loss(model, x, y, [reg])
    expected = reference_rank(torch.sigmoid(model[0](x) / 0.3).detach(), "nuclear")
    assert out.terms["firing_pattern_degeneracy/erank/0"].item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # every neuron a positive multiple of one neuron: identical firing sets
        model[0].weight.copy_(torch.rand(8, 1) * model[0].weight[:1] + 0)
        model[0].bias.zero_()
    shared = regularized_loss(model, x, y, [reg]).terms["firing_pattern_degeneracy/erank/0"].item()
    assert shared < 0.6 * expected


@pytest.fixture(scope="module")
def transformer():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    return TransformerBridge.boot_native(TransformerBridgeConfig(
        d_model=16, d_head=8, n_layers=1, n_ctx=5, n_heads=2, d_vocab=11, d_vocab_out=11, d_mlp=32,
        act_fn="relu", normalization_type=None, seed=0))


def test_transformer_hook_names_with_position_dimension(transformer):
    tokens = torch.randint(0, 11, (6, 5))
    y = torch.randint(0, 11, (6,))
    regs = [ActivationDegeneracy(layers="blocks.0.hook_resid_mid", measure="entropy"),
            GradientDegeneracy(layers="hook_embed"), FiringPatternDegeneracy(layers="blocks.0.mlp.hook_pre")]
    out = regularized_loss(transformer, tokens, y, regs)
    _, cache = transformer.run_with_cache(tokens)
    resid = cache["blocks.0.hook_resid_mid"]
    assert resid.shape == (6, 5, 16)
    assert out.terms["activation_degeneracy/erank/blocks.0.hook_resid_mid"].item() == pytest.approx(
        reference_rank(resid, "entropy"), rel=1e-4)
    assert out.terms["firing_pattern_degeneracy/erank/blocks.0.mlp.hook_pre"].item() == pytest.approx(
        reference_rank(torch.sigmoid(cache["blocks.0.mlp.hook_pre"] / 0.5), "participation"), rel=1e-4)
    assert 1.0 <= out.terms["gradient_degeneracy/erank/hook_embed"].item() <= 16.0
    out.total.backward()


def test_bad_input_is_a_clear_error():
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(KeyError, match=r"unknown layer 'blocks.3'.*one of"):
        regularized_loss(mlp(), x, y, [ActivationDegeneracy(layers="blocks.3")])
    with pytest.raises(ValueError, match=r"unknown measure 'trace'; allowed: nuclear, entropy"):
        ActivationDegeneracy(layers="1", measure="trace")
    with pytest.raises(ValueError, match=r"unknown target 'margin'; allowed: loss, logit, logprob"):
        GradientDegeneracy(layers="1", target="margin")
    with pytest.raises(ValueError, match=r"tau must be > 0, got 0"):
        FiringPatternDegeneracy(layers="0", tau=0)
    with pytest.raises(ValueError, match=r"layers must name at least one layer"):
        ActivationDegeneracy(layers=[])
    with pytest.raises(ValueError, match=r"does not depend on layer 'side'"):
        regularized_loss(SideBranch(), torch.randn(4, 4), y, [GradientDegeneracy(layers="side")])


def test_each_penalty_lowers_its_own_quantity_in_training():
    """Nuclear measure for kind 1, the default (participation) for kinds 2 and 3."""
    _, (xt, yt) = digits()

    def measures(model):
        z1 = model[0](xt)
        h1 = torch.relu(z1)
        h1g = h1.detach().requires_grad_(True)
        loss = F.cross_entropy(model[4](model[3](model[2](h1g))), yt, reduction="sum")
        grads = torch.autograd.grad(loss, h1g)[0]
        return {"act": reference_rank(h1.detach(), "nuclear"), "grad": reference_rank(grads, "participation"),
                "fire": reference_rank(torch.sigmoid(z1 / 0.5).detach(), "participation")}

    base = measures(train_digits([]))
    act = measures(train_digits([ActivationDegeneracy(0.5, layers="1", measure="nuclear")]))["act"]
    grad = measures(train_digits([GradientDegeneracy(0.5, layers="1")]))["grad"]
    fire = measures(train_digits([FiringPatternDegeneracy(0.5, layers="0")]))["fire"]
    assert act < 0.8 * base["act"], (act, base)
    assert grad < 0.8 * base["grad"], (grad, base)
    assert fire < 0.8 * base["fire"], (fire, base)
