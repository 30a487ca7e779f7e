"""Smoothness regularizers against analytic values, naive per-example loops and statistics."""

import math

import pytest
import torch
from torch import nn

from interp_train.losses import per_example_cross_entropy, target_score
from interp_train.regularizers.base import RegularizerContext, regularized_loss
from interp_train.regularizers.smoothness import (
    FiniteDifferenceGradientNorm, GradientNorm, JacobianNorm, NoisePenalty, PGDAdversarial,
    RandomizedSmoothing, per_example_sq_norm, project_to_ball, uniform_in_ball,
)

TARGETS = ("loss", "logit", "logprob")


def linear_model(d_in=5, n_classes=4, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, n_classes, bias=bias).double()


def mlp(d_in=5, d_hidden=7, n_classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, n_classes)).double()


def batch(n=6, d_in=5, n_classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, n_classes, (n,), generator=g)


def context(model, x, y, reg):
    return RegularizerContext(model, x, y, sites=reg.sites)


def term(reg, model, x, y):
    (value,) = reg.terms(context(model, x, y, reg)).values()
    return value


# ------------------------------------------------------------------ GradientNorm

def test_gradient_norm_linear_model_analytic():
    model, (x, y) = linear_model(), batch()
    W, b = model.weight.detach(), model.bias.detach()
    logit = term(GradientNorm(target="logit"), model, x, y)
    assert logit.item() == pytest.approx(W[y].pow(2).sum(1).mean().item(), rel=1e-12)
    # ∇_x CE = Wᵀ (softmax(Wx + b) − e_y)
    residual = torch.softmax(x @ W.T + b, dim=1) - nn.functional.one_hot(y, 4).double()
    expected = (residual @ W).pow(2).sum(1).mean()
    assert term(GradientNorm(target="loss"), model, x, y).item() == pytest.approx(expected.item(), rel=1e-12)


def naive_gradient_norm(model, x, y, target):
    """mean_i ||∇_{x_i} s(model(x_i), y_i)||², one example at a time, graph kept."""
    total = 0.0
    for xi, yi in zip(x, y):
        xi = xi.unsqueeze(0).clone().requires_grad_(True)
        s = target_score(model(xi), yi.unsqueeze(0), target).sum()
        (g,) = torch.autograd.grad(s, xi, create_graph=True)
        total = total + g.pow(2).sum()
    return total / len(x)


@pytest.mark.parametrize("target", TARGETS)
def test_gradient_norm_matches_naive_loop_value_and_parameter_gradient(target):
    model, (x, y) = mlp(), batch()
    value = term(GradientNorm(target=target), model, x, y)
    reference = naive_gradient_norm(model, x, y, target)
    assert value.item() == pytest.approx(reference.item(), rel=1e-10)
    params = list(model.parameters())  # the last bias does not reach the logit gradient: zeros
    grads = torch.autograd.grad(value, params, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(reference, params, allow_unused=True, materialize_grads=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_gradient_norm_in_total_loss_with_weight():
    model, (x, y) = mlp(), batch()
    out = regularized_loss(model, x, y, [GradientNorm(weight=0.3)])
    expected = per_example_cross_entropy(model(x), y).mean() + 0.3 * naive_gradient_norm(model, x, y, "loss")
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-10)
    assert "gradient_norm/grad_norm_sq" in out.terms


def test_gradient_norm_does_not_scale_with_batch_size():
    model, (x, y) = mlp(), batch(n=4)
    one = term(GradientNorm(), model, x, y)
    doubled = term(GradientNorm(), model, torch.cat([x, x]), torch.cat([y, y]))
    assert doubled.item() == pytest.approx(one.item(), rel=1e-12)


# ------------------------------------------------------------------ finite differences

def test_finite_difference_converges_to_exact_gradient_norm():
    model, (x, y) = mlp(), batch()
    exact = term(GradientNorm(target="loss"), model, x, y).item()
    errors = [abs(term(FiniteDifferenceGradientNorm(h=h), model, x, y).item() - exact) for h in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 * exact, (errors, exact)  # O(h): about 1.5e-6 relative at h = 1e-4


def test_finite_difference_zero_gradient_gives_zero_direction():
    model = linear_model()
    with torch.no_grad():
        model.weight[1:] = 0.0  # only class 0 depends on x ...
        model.weight[0] = 0.0    # ... and not even that one: ∇_x ℓ = 0 for every example
    x, y = batch()
    value = term(FiniteDifferenceGradientNorm(h=1e-2), model, x, y)
    assert torch.isfinite(value) and value.item() == 0.0


# ------------------------------------------------------------------ Jacobian projections

def test_jacobian_norm_is_unbiased_for_linear_model():
    torch.manual_seed(123)
    model, (x, y) = linear_model(d_in=5, n_classes=6), batch(n=4)
    frob = model.weight.detach().pow(2).sum().item()
    draws = torch.stack([term(JacobianNorm(), model, x, y).detach() for _ in range(400)])
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - frob) < 4 * se, (draws.mean().item(), frob, se)
    assert draws.std().item() > 0  # a random estimate, not the exact value by accident
    # averaging projections inside one call lowers the spread
    many = torch.stack([term(JacobianNorm(n_projections=16), model, x, y).detach() for _ in range(50)])
    assert many.std().item() < 0.5 * draws.std().item()


def test_jacobian_norm_exact_for_one_output():
    model = mlp(n_classes=1)
    x, _ = batch()
    y = torch.zeros(len(x), dtype=torch.long)
    value = term(JacobianNorm(), model, x, y)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)  # (B, 1, d_in)
    assert value.item() == pytest.approx(jac.pow(2).sum((1, 2)).mean().item(), rel=1e-12)


# ------------------------------------------------------------------ noise

def test_noise_penalty_expectation_for_linear_model():
    torch.manual_seed(7)
    model, (x, y) = linear_model(bias=True), batch(n=8)
    sigma = 0.3
    expected = sigma ** 2 * model.weight.detach().pow(2).sum().item()
    draws = torch.stack([term(NoisePenalty(sigma=sigma), model, x, y).detach() for _ in range(300)])
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - expected) < 4 * se, (draws.mean().item(), expected, se)


def test_randomized_smoothing_equals_noisy_loss_and_replace_flag():
    model, (x, y) = mlp(), batch()
    keep = RandomizedSmoothing(sigma=0.2, weight=0.5)
    torch.manual_seed(3)
    out = regularized_loss(model, x, y, [keep])
    torch.manual_seed(3)
    noisy_x = x + 0.2 * torch.randn_like(x)
    noisy = per_example_cross_entropy(model(noisy_x), y).mean()
    clean = per_example_cross_entropy(model(x), y).mean()
    assert out.total.item() == pytest.approx(clean.item() + 0.5 * noisy.item(), rel=1e-12)

    replace = RandomizedSmoothing(sigma=0.2, weight=0.5, replace_task_loss=True)
    assert replace.replaces_task_loss and not keep.replaces_task_loss
    torch.manual_seed(3)
    out = regularized_loss(model, x, y, [replace])
    assert out.total.item() == pytest.approx(0.5 * noisy.item(), rel=1e-12)
    assert out.task_loss.item() == pytest.approx(clean.item(), rel=1e-12)  # still logged


# ------------------------------------------------------------------ PGD

def test_ball_helpers_are_per_example():
    torch.manual_seed(0)
    like = torch.zeros(200, 3, 4, dtype=torch.float64)
    points = uniform_in_ball(like, 0.7)
    norms = per_example_sq_norm(points).sqrt()
    assert norms.max().item() <= 0.7 + 1e-12
    # uniform in a 12-ball: P(||δ|| <= r) = (r / ε)^12, so the median radius is ε 0.5^(1/12)
    assert norms.median().item() == pytest.approx(0.7 * 0.5 ** (1 / 12), rel=0.03)
    big = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(project_to_ball(big, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.float64))


def test_pgd_per_example_balls_increase_loss_and_leave_no_grad():
    model, (x, y) = mlp(), batch(n=16)
    model.train()
    eps = 0.5
    reg = PGDAdversarial(epsilon=eps, steps=5)
    reg.terms(context(model, x, y, reg))  # the attack (and final forward) alone
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    delta = reg.last_delta
    assert delta.shape == x.shape
    norms = delta.norm(dim=1)
    assert norms.max().item() <= eps + 1e-6
    assert norms.min().item() > 0.5 * eps  # every example uses its own ball, not a share of one
    clean = per_example_cross_entropy(model(x), y)
    attacked = per_example_cross_entropy(model(x + delta), y)
    assert (attacked - clean).mean().item() > 0
    assert (attacked > clean).float().mean().item() > 0.9

    model.eval()
    reg.terms(context(model, x, y, reg))
    assert not model.training


def test_pgd_training_step_gradient_is_the_adversarial_loss_gradient_only():
    model, (x, y) = mlp(), batch(n=8)
    reg = PGDAdversarial(weight=1.0, epsilon=0.3, steps=3)
    out = regularized_loss(model, x, y, [reg])
    out.total.backward()
    delta = reg.last_delta
    loss = per_example_cross_entropy(model(x + delta), y).mean()
    assert out.total.item() == pytest.approx(loss.item(), rel=1e-12)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_pgd_step_size_default():
    assert PGDAdversarial(epsilon=0.4, steps=4).step_size == pytest.approx(0.25)


# ------------------------------------------------------------------ token model

@pytest.fixture(scope="module")
def token_model():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=16, d_head=8, n_layers=1, n_ctx=3, n_heads=2, d_vocab=7,
                                  d_vocab_out=7, d_mlp=32, act_fn="relu", normalization_type=None, seed=0)
    return TransformerBridge.boot_native(cfg).double()


def test_token_model_gradient_norm_at_embedding(token_model):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 7, (5,), generator=g)
    out = regularized_loss(token_model, tokens, y, [GradientNorm(at="hook_embed")])
    value = out.terms["gradient_norm/grad_norm_sq"]

    # naive: per example, replace the embedding output by a leaf and differentiate
    total = 0.0
    embed_hook = token_model.hook_dict["hook_embed"]
    for i in range(len(tokens)):
        captured = {}

        def hook(_m, _inp, act):
            captured["leaf"] = act.detach().clone().requires_grad_(True)
            return captured["leaf"]

        handle = embed_hook.register_forward_hook(hook)
        try:
            loss = per_example_cross_entropy(token_model(tokens[i:i + 1]), y[i:i + 1]).sum()
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(loss, captured["leaf"])
        assert grad.shape == (1, 3, 16)
        total += grad.pow(2).sum().item()
    assert value.item() == pytest.approx(total / len(tokens), rel=1e-9)

    with pytest.raises(TypeError, match=r"integer tokens have no gradient.*hook_embed"):
        regularized_loss(token_model, tokens, y, [GradientNorm(at="input")])


def test_token_model_other_regularizers_run_at_embedding(token_model):
    tokens, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4,))
    regs = [FiniteDifferenceGradientNorm(at="hook_embed"), JacobianNorm(at="hook_embed"),
            NoisePenalty(at="hook_embed"), RandomizedSmoothing(at="hook_embed"),
            PGDAdversarial(at="hook_embed", epsilon=0.2, steps=2)]
    out = regularized_loss(token_model, tokens, y, regs)
    assert len(out.terms) == 5 and all(torch.isfinite(v) and v.item() >= 0 for v in out.terms.values())
    delta = regs[-1].last_delta
    assert delta.shape == (4, 3, 16)
    assert delta.flatten(1).norm(dim=1).max().item() <= 0.2 + 1e-6  # one ball per example over (T, d)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("make, match", [
    (lambda: NoisePenalty(sigma=-0.1), r"sigma \(noise standard deviation\) must be a finite number >= 0, got -0.1"),
    (lambda: RandomizedSmoothing(sigma=float("nan")), r"sigma .* must be a finite number >= 0, got nan"),
    (lambda: PGDAdversarial(epsilon=-1), r"epsilon .* must be a finite number >= 0, got -1"),
    (lambda: PGDAdversarial(steps=0), r"steps \(number of PGD steps\) must be an integer >= 1, got 0"),
    (lambda: PGDAdversarial(steps=2.5), r"must be an integer >= 1, got 2.5"),
    (lambda: PGDAdversarial(step_size=0.0), r"step_size must be a finite number > 0, got 0.0"),
    (lambda: FiniteDifferenceGradientNorm(h=0), r"h \(finite-difference step\) must be a finite number > 0, got 0"),
    (lambda: FiniteDifferenceGradientNorm(h=-1e-3), r"must be a finite number > 0, got -0.001"),
    (lambda: JacobianNorm(n_projections=0), r"n_projections must be an integer >= 1, got 0"),
    (lambda: GradientNorm(target="margin"), r"unknown target 'margin'; allowed: loss, logit, logprob"),
])
def test_bad_arguments_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_site_and_type_errors():
    with pytest.raises(TypeError, match=r"at must be a site name.*got 3"):
        GradientNorm(at=3)
    with pytest.raises(TypeError, match=r"sigma \(noise standard deviation\) must be a number, got 'big'"):
        NoisePenalty(sigma="big")
    with pytest.raises(KeyError, match=r"unknown layer 'blocks.7'"):
        regularized_loss(mlp(), *batch(), [NoisePenalty(at="blocks.7")])
