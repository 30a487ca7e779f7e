"""Interaction sparsity: the sampled Jacobian-L1 estimator against exact Jacobians, errors, training effect."""

import pytest
import torch
from torch import nn

from interp_train import regularized_loss
from interp_train.regularizers.interaction import InteractionSparsity, jacobian_l1_estimate
from interp_train.sites import run_model
from tests.helpers import SideBranch, digits, train_digits


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5))


def exact_jacobian_l1(fn, x):
    """mean_i Σ|∂fn(x_i)/∂x_i| with torch.func.jacrev, one example at a time."""
    return torch.stack([torch.func.jacrev(fn)(xi).abs().sum() for xi in x]).mean().item()


@pytest.mark.parametrize("vectorize", [True, False])
def test_exact_when_m_equals_d_out(vectorize):
    model, x, y = mlp(), torch.randn(5, 6), torch.randint(0, 5, (5,))
    reg = InteractionSparsity(source="input", target_layer="4", m=5, vectorize=vectorize)
    out = regularized_loss(model, x, y, [reg])
    assert out.terms["interaction_sparsity/jacobian_l1"].item() == pytest.approx(exact_jacobian_l1(model, x), rel=1e-5)
    # between two hidden layers: a_1 = tanh(W0 x) -> a_3 = tanh(W2 a_1)
    h1 = torch.tanh(model[0](x)).detach()
    hidden = InteractionSparsity(source="1", target_layer="3", m=7, vectorize=vectorize, name="hidden")
    value = regularized_loss(model, x, y, [hidden]).terms["hidden/jacobian_l1"].item()
    assert value == pytest.approx(exact_jacobian_l1(lambda h: torch.tanh(model[2](h)), h1), rel=1e-5)


def test_m_larger_than_d_out_is_exact():
    model, x = mlp(), torch.randn(3, 6)
    rec = run_model(model, x, record=["input", "4"], input_requires_grad=True)
    est = jacobian_l1_estimate(rec.activations["input"], rec.activations["4"], m=50)
    assert est.item() == pytest.approx(exact_jacobian_l1(model, x), rel=1e-5)


def test_sampled_estimate_is_unbiased():
    model, x = mlp(), torch.randn(4, 6)
    rec = run_model(model, x, record=["input", "4"], input_requires_grad=True)
    exact = exact_jacobian_l1(model, x)
    draws = torch.stack([jacobian_l1_estimate(rec.activations["input"], rec.activations["4"], m=2, create_graph=False)
                         for _ in range(1500)]).detach()
    stderr = draws.std() / len(draws) ** 0.5
    assert draws.std() > 0.02 * exact  # really random (m < d_out) ...
    assert abs(draws.mean().item() - exact) < 4 * stderr.item()  # ... and unbiased


def test_vectorized_and_looped_vjps_agree_on_the_same_rows():
    model, x = mlp(), torch.randn(4, 6)
    rec = run_model(model, x, record=["input", "4"], input_requires_grad=True)
    values = [jacobian_l1_estimate(rec.activations["input"], rec.activations["4"], m=2, vectorize=v,
                                   generator=torch.Generator().manual_seed(3)).item() for v in (True, False)]
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_transformer_hooks_with_positions_include_cross_position_terms():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    model = TransformerBridge.boot_native(TransformerBridgeConfig(
        d_model=8, d_head=4, n_layers=1, n_ctx=3, n_heads=2, d_vocab=7, d_vocab_out=7, d_mlp=16,
        act_fn="relu", normalization_type=None, seed=0))
    tokens, y = torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2,))
    reg = InteractionSparsity(source="hook_embed", target_layer="blocks.0.hook_resid_post", m=24)  # d_out = 3·8
    value = regularized_loss(model, tokens, y, [reg]).terms["interaction_sparsity/jacobian_l1"].item()
    # naive reference: every output element's gradient, one backward pass each
    rec = run_model(model, tokens, record=["hook_embed", "blocks.0.hook_resid_post"])
    src, tgt = rec.activations["hook_embed"], rec.activations["blocks.0.hook_resid_post"]
    total, cross = 0.0, 0.0
    for i in range(2):
        for t in range(3):
            for k in range(8):
                g = torch.autograd.grad(tgt[i, t, k], src, retain_graph=True)[0][i]
                total += g.abs().sum().item()
                cross += g.abs().sum().item() - g[t].abs().sum().item()
    assert cross > 0  # attention mixes positions, so the test sees cross-position terms
    assert value == pytest.approx(total / 2, rel=1e-5)


def test_bad_input_is_a_clear_error():
    x, y = torch.randn(3, 6), torch.randint(0, 5, (3,))
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=r"m \(the number of sampled Jacobian rows\) must be a positive integer"):
            InteractionSparsity(source="input", target_layer="4", m=bad)
    with pytest.raises(KeyError, match=r"unknown layer 'blocks.0.hook_resid_post'.*one of"):
        regularized_loss(mlp(), x, y, [InteractionSparsity(source="input", target_layer="blocks.0.hook_resid_post")])
    with pytest.raises(ValueError, match=r"layer '0' does not depend on layer '2': no gradient path"):
        regularized_loss(mlp(), x, y, [InteractionSparsity(source="2", target_layer="0")])
    with pytest.raises(ValueError, match=r"layer 'side' does not depend on layer 'main'"):
        regularized_loss(SideBranch(), torch.randn(3, 4), y, [InteractionSparsity(source="main", target_layer="side")])
    with pytest.raises(ValueError, match=r"must be different layers"):
        InteractionSparsity(source="1", target_layer="1")


def test_penalty_lowers_jacobian_l1_in_training():
    _, (xt, _) = digits(n_test=256)

    def train(regs):
        model = train_digits(regs)
        h1 = torch.relu(model[0](xt)).detach()
        return exact_jacobian_l1(lambda h: torch.relu(model[2](h)), h1)

    base = train([])
    regularized = train([InteractionSparsity(0.01, source="1", target_layer="3", m=4)])
    assert regularized < 0.8 * base, (regularized, base)
