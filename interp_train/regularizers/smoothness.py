"""Smoothness regularizers (docs/DESIGN.md §3.3): the model should change little when an input or
activation ``a`` (the site ``at``) moves a little.

Notation: ``a_i`` the clean activation of example i at the site (any shape (B, ...); norms are
over all non-batch dims), ``f`` the model output (logits), ``ℓ_i`` the per-example loss
(``ctx.loss_fn``), ``B`` the batch size. Every penalty is a mean over examples of a per-example
quantity, so it does not depend on the batch size.

Gradients with respect to a batch are per-example gradients because example i's output depends
only on a_i (true for the usual models; not for batch norm in training mode).
"""

from __future__ import annotations

from typing import Callable

import torch

from interp_train.checks import check_count, check_number, check_site, check_target
from interp_train.losses import target_score
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import WeightLike
from interp_train.sites import INPUT

__all__ = [
    "GradientNorm",
    "FiniteDifferenceGradientNorm",
    "JacobianNorm",
    "NoisePenalty",
    "RandomizedSmoothing",
    "PGDAdversarial",
    "per_example_sq_norm",
    "normalize_per_example",
    "project_to_ball",
    "uniform_in_ball",
]


# ---------------------------------------------------------------- per-example tensor helpers

def per_example_sq_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_i||² summed over all non-batch dims; shape (B,)."""
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_i|| broadcastable against t: shape (B, 1, ..., 1)."""
    norms = t.reshape(t.shape[0], -1).norm(dim=1)
    return norms.reshape(-1, *([1] * (t.ndim - 1)))


def normalize_per_example(t: torch.Tensor) -> torch.Tensor:
    """t_i / ||t_i||, and 0 where t_i = 0 (no direction to follow)."""
    norms = _per_example_norm(t)
    return torch.where(norms > 0, t / norms.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def project_to_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Projects each δ_i onto its own L2 ball: δ_i · min(1, radius / ||δ_i||)."""
    norms = _per_example_norm(delta)
    scale = torch.clamp(radius / norms.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)
    return delta * scale


def uniform_in_ball(like: torch.Tensor, radius: float) -> torch.Tensor:
    """One point per example, uniform in the L2 ball of the given radius in R^n, n = numel of a_i:
    direction uniform on the sphere, radius · U^(1/n) with U ~ Uniform(0, 1)."""
    direction = normalize_per_example(torch.randn_like(like))
    n = like[0].numel()
    u = torch.rand((like.shape[0],) + (1,) * (like.ndim - 1), dtype=like.dtype, device=like.device)
    return direction * (radius * u.pow(1.0 / n))


def _add(delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Site edit a -> a + δ (keeps a's graph)."""
    return lambda a: a + delta


# ---------------------------------------------------------------- regularizers

class GradientNorm(Regularizer):
    """Double backprop: mean_i ||∇_{a_i} s_i||², s_i = the per-example target score.

    target: "loss" (s_i = ℓ_i from ``ctx.loss_fn``, cross-entropy by default), "logit" (the target
    class's logit) or "logprob" (its log-probability); see ``losses.target_score``.
    The gradient keeps its graph (create_graph=True), so the penalty is trained through.
    """

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, target: str = "loss", name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.target = check_target(target)

    def scores(self, ctx: RegularizerContext, output: torch.Tensor) -> torch.Tensor:
        """s_i, shape (B,)."""
        if self.target == "loss":
            return ctx.per_example_loss(output)
        return target_score(output, ctx.targets, self.target)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        clean = ctx.clean()
        a = ctx.activation(self.at)
        # grad of sum_i s_i w.r.t. a has rows ∇_{a_i} s_i, since s_i depends on a_i only.
        (grad,) = torch.autograd.grad(self.scores(ctx, clean.output).sum(), a, create_graph=True)
        return {"grad_norm_sq": per_example_sq_norm(grad).mean()}


class FiniteDifferenceGradientNorm(Regularizer):
    """Finlay & Oberman (2019): mean_i ((ℓ_i(a_i + h d_i) − ℓ_i(a_i)) / h)², d_i = ∇_{a_i} ℓ_i / ||∇_{a_i} ℓ_i||
    (detached; d_i = 0 where the gradient is 0). Approximates mean_i ||∇_{a_i} ℓ_i||² to O(h) with no
    second-order graph: one gradient to the site, one extra forward, and the shared backward."""

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, h: float = 1e-2, name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.h = check_number(h, "h (finite-difference step)", positive=True)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        clean = ctx.clean()
        a = ctx.activation(self.at)
        clean_loss = ctx.per_example_loss(clean.output)
        (grad,) = torch.autograd.grad(clean_loss.sum(), a, retain_graph=True)
        step = self.h * normalize_per_example(grad)
        shifted_loss = ctx.per_example_loss(ctx.run(edit={self.at: _add(step)}).output)
        slope = (shifted_loss - clean_loss) / self.h
        return {"fd_grad_norm_sq": slope.pow(2).mean()}


class JacobianNorm(Regularizer):
    """Hoffman et al. (2019): mean_i ||J_i||_F², J_i = ∂f(a_i)/∂a_i, estimated without bias as
    mean_i C · mean_{k=1..n_projections} ||v_ikᵀ J_i||², v_ik uniform on the unit sphere of the
    flattened output space of one example (C = its dimension; E[v vᵀ] = I / C). Exact when C = 1."""

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, n_projections: int = 1, name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.n_projections = check_count(n_projections, "n_projections")

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        output = ctx.clean().output
        a = ctx.activation(self.at)
        n_out = output[0].numel()
        total = output.new_zeros(())
        for k in range(self.n_projections):
            v = normalize_per_example(torch.randn_like(output))
            (vjp,) = torch.autograd.grad(output, a, grad_outputs=v, create_graph=True)
            total = total + per_example_sq_norm(vjp).mean()
        return {"jacobian_frob_sq": n_out * total / self.n_projections}


class NoisePenalty(Regularizer):
    """Noise smoothness: mean_i ||f(a_i) − f(a_i + ε_i)||², ε_i ~ N(0, σ² I), the norm over all
    non-batch output dims. For f(a) = W a its expectation is σ² ||W||_F²."""

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, sigma: float = 0.1, name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.sigma = check_number(sigma, "sigma (noise standard deviation)", positive=False)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        clean = ctx.clean().output
        noise = self.sigma * torch.randn_like(ctx.activation(self.at))
        noisy = ctx.run(edit={self.at: _add(noise)}).output
        return {"output_change_sq": per_example_sq_norm(clean - noisy).mean()}


class RandomizedSmoothing(Regularizer):
    """Trains on noisy activations: mean_i ℓ_i(a_i + ε_i, y_i), ε_i ~ N(0, σ² I).

    replace_task_loss=True drops the clean task loss from the total (it is still logged), i.e.
    the model is trained on the noisy loss only (Gaussian data augmentation)."""

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, sigma: float = 0.1,
                 replace_task_loss: bool = False, name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.sigma = check_number(sigma, "sigma (noise standard deviation)", positive=False)
        self.replaces_task_loss = bool(replace_task_loss)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        noise = self.sigma * torch.randn_like(ctx.activation(self.at))
        noisy = ctx.run(edit={self.at: _add(noise)}).output
        return {"noisy_loss": ctx.per_example_loss(noisy).mean()}


class PGDAdversarial(Regularizer):
    """L2 PGD adversarial training: mean_i ℓ_i(a_i + δ_i, y_i) with δ_i ≈ argmax_{||δ_i|| <= ε} ℓ_i.

    Attack, per example (every example has its own ball): δ⁰ uniform in the ε-ball, then ``steps``
    times δ ← Π_ε(δ + α ∇_δ ℓ_i / ||∇_δ ℓ_i||), Π_ε the projection onto the ball, α = step_size
    (default 2.5 ε / steps). The attack differentiates with respect to δ only (torch.autograd.grad,
    activation detached), so it leaves nothing in the parameters' ``.grad``; the model's train/eval
    mode is left as it is. The final forward keeps the graph to the parameters. The last
    perturbation is kept in ``last_delta``.

    replace_task_loss (default True): train on the adversarial loss instead of the clean loss.
    """

    def __init__(self, weight: WeightLike = 1.0, at: str = INPUT, epsilon: float = 0.5, steps: int = 3,
                 step_size: float | None = None, replace_task_loss: bool = True, name: str | None = None):
        super().__init__(weight, name)
        self.at = check_site(at)
        self.epsilon = check_number(epsilon, "epsilon (L2 radius of the attack)", positive=False)
        self.steps = check_count(steps, "steps (number of PGD steps)")
        self.step_size = (2.5 * self.epsilon / self.steps if step_size is None
                          else check_number(step_size, "step_size", positive=True))
        self.replaces_task_loss = bool(replace_task_loss)
        self.last_delta: torch.Tensor | None = None

    def attack(self, ctx: RegularizerContext) -> torch.Tensor:
        """The perturbation δ (B, ...) found by PGD; detached."""
        clean = ctx.activation(self.at).detach()
        delta = uniform_in_ball(clean, self.epsilon)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            output = ctx.run(edit={self.at: lambda a, d=delta: a.detach() + d}).output
            (grad,) = torch.autograd.grad(ctx.per_example_loss(output).sum(), delta)
            delta = project_to_ball(delta.detach() + self.step_size * normalize_per_example(grad), self.epsilon)
        return delta.detach()

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        delta = self.attack(ctx)
        self.last_delta = delta
        output = ctx.run(edit={self.at: _add(delta)}).output
        return {"adversarial_loss": ctx.per_example_loss(output).mean()}
