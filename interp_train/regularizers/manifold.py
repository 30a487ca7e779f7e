"""Off-manifold regularizers: make the model robust off the data manifold (docs/DESIGN.md §3.4).

Both read a tangent basis U_i (B, d, k) of the data manifold at each input x_i (d = the
flattened input size) from a :class:`~interp_train.tangents.TangentProvider`, and penalise
only what happens in the orthogonal complement, P⊥ = I − U Uᵀ:

* ``OffManifoldNoisePenalty``:    mean_i ||f(x_i) − f(x_i + P⊥_i ε_i)||²,  ε_i ~ N(0, σ² I)
* ``OffManifoldGradientPenalty``: mean_i ||P⊥_i ∇_x s_i||²  (double backprop), or with
  ``normalize=True`` the off-manifold share mean_i ||P⊥_i ∇_x s_i||² / ||∇_x s_i||²

``tangents`` is a provider instance, or a name ("exact" | "local_pca" | "global_pca") that is
fitted in ``setup(model, datamodule)`` via ``tangents.fit_from_datamodule`` (the Lightning
mixin calls ``setup`` at fit start; in a plain loop call ``reg.setup(model, datamodule)``).
Tangent spaces live in data space, so both act on the model input (``at = "input"``), which
must be a float tensor.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from interp_train.losses import target_score
from interp_train.checks import check_nonnegative, check_target
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import WeightLike
from interp_train.sites import INPUT, check_float_input
from interp_train.tangents import TANGENT_KINDS, TangentProvider, fit_from_datamodule, project_off


class _TangentRegularizer(Regularizer):
    """Holds the tangent provider (an instance, or a name fitted in ``setup``)."""

    at = INPUT

    def __init__(self, weight: WeightLike, tangents: str | TangentProvider, tangent_kwargs: Mapping[str, Any] | None,
                 name: str | None):
        super().__init__(weight, name)
        if isinstance(tangents, str):
            if tangents not in TANGENT_KINDS:
                raise ValueError(f"unknown tangent provider {tangents!r}; allowed: {', '.join(TANGENT_KINDS)} "
                                 "or a TangentProvider instance")
            self.tangent_kind, self.provider = tangents, None
        elif isinstance(tangents, TangentProvider):
            self.tangent_kind, self.provider = None, tangents
        else:
            raise TypeError(f"tangents must be one of {', '.join(TANGENT_KINDS)} or a TangentProvider, "
                            f"got {type(tangents).__name__}")
        self.tangent_kwargs = dict(tangent_kwargs or {})

    def setup(self, model: nn.Module, datamodule: Any = None) -> None:
        """Fits the tangent provider from the datamodule when ``tangents`` was given by name."""
        if self.tangent_kind is not None:
            self.provider = fit_from_datamodule(self.tangent_kind, datamodule, **self.tangent_kwargs)

    def tangent_basis(self, ctx: RegularizerContext) -> torch.Tensor:
        """U (B, d, k) at the batch inputs, outside the autograd graph."""
        if self.provider is None:
            raise RuntimeError(
                f"regularizer {self.name!r} was given tangents={self.tangent_kind!r} by name, which is fitted in "
                "setup(model, datamodule); call reg.setup(model, datamodule) before training (the Lightning "
                "mixin does so at fit start) or pass a TangentProvider instance"
            )
        check_float_input(ctx.inputs, type(self).__name__)
        with torch.no_grad():
            return self.provider.basis(ctx.inputs.detach(), ctx.extras)

    def extra_repr(self) -> str:
        tangents = self.tangent_kind if self.provider is None else repr(self.provider)
        return f"{super().extra_repr()}, tangents={tangents}"


class OffManifoldNoisePenalty(_TangentRegularizer):
    """mean_i ||f(x_i) − f(x_i + ε⊥_i)||², ε⊥_i = (I − U_iU_iᵀ) ε_i, ε_i ~ N(0, σ² I_d).

    f is the model output (logits), the squared norm is summed over all output entries.
    One noise draw per example and step. For f(x) = Wx the expectation is σ² ||W(I − UUᵀ)||_F².

    Args:
        weight: number or Schedule.
        tangents: provider instance or "exact" | "local_pca" | "global_pca" (fitted in setup).
        sigma: noise standard deviation (>= 0) before projection.
        tangent_kwargs: passed to the provider when ``tangents`` is a name.
    """

    def __init__(self, weight: WeightLike = 1.0, tangents: str | TangentProvider = "exact", sigma: float = 0.1,
                 name: str | None = None, tangent_kwargs: Mapping[str, Any] | None = None):
        check_nonnegative(sigma, "sigma")
        super().__init__(weight, tangents, tangent_kwargs, name)
        self.sigma = float(sigma)

    def off_manifold_noise(self, ctx: RegularizerContext) -> torch.Tensor:
        """ε⊥ = (I − UUᵀ) ε with ε ~ N(0, σ²I), shaped like the inputs."""
        U = self.tangent_basis(ctx)
        eps = self.sigma * torch.randn_like(ctx.inputs)
        return project_off(U, eps)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        noise = self.off_manifold_noise(ctx)
        clean = ctx.clean().output
        noisy = ctx.run(edit={INPUT: lambda x: x + noise}).output
        return {"off_manifold_noise": (clean - noisy).pow(2).reshape(ctx.batch_size, -1).sum(dim=1).mean()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma={self.sigma}"


class OffManifoldGradientPenalty(_TangentRegularizer):
    """mean_i ||(I − U_iU_iᵀ) ∇_x s_i||², the off-manifold part of each input gradient; with
    ``normalize=True`` its share of the gradient instead,

        mean_i ||(I − U_iU_iᵀ) g_i||² / ||g_i||² = mean_i (1 − a_i²),   g_i = ∇_x s_i,

    where a_i = ||U_iU_iᵀ g_i|| / ||g_i|| is the gradient alignment that evaluation measures
    (examples with g_i = 0 add 0). The share is scale-free: the plain penalty can also be
    lowered by shrinking every gradient (confident predictions), the share only by turning
    the gradient into the tangent space.

    s_i is the per-example score: target="loss" uses the context's per-example loss
    (``ctx.per_example_loss``, cross-entropy unless the loop was given another ``loss_fn``);
    "logit" and "logprob" use ``losses.target_score``. The gradient is taken with
    create_graph=True (double backprop) through the shared clean forward pass. Per-example
    gradients come from ∇_x ∑_i s_i, which requires examples not to interact in the forward
    pass (no BatchNorm in training mode).

    Args:
        weight: number or Schedule.
        tangents: provider instance or "exact" | "local_pca" | "global_pca" (fitted in setup).
        target: "loss" | "logit" | "logprob".
        normalize: penalise the off-manifold share of each gradient (term "off_manifold_grad_share")
            instead of its squared norm (term "off_manifold_grad").
        tangent_kwargs: passed to the provider when ``tangents`` is a name.
    """

    def __init__(self, weight: WeightLike = 1.0, tangents: str | TangentProvider = "exact", target: str = "loss",
                 name: str | None = None, tangent_kwargs: Mapping[str, Any] | None = None,
                 normalize: bool = False):
        check_target(target)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        super().__init__(weight, tangents, tangent_kwargs, name)
        self.target = target
        self.normalize = normalize

    def input_gradients(self, ctx: RegularizerContext) -> torch.Tensor:
        """∇_x s_i for every example, shaped like the inputs, part of the graph."""
        x = ctx.activation(INPUT)
        output = ctx.clean().output
        scores = ctx.per_example_loss(output) if self.target == "loss" else target_score(output, ctx.targets, self.target)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return grad

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        U = self.tangent_basis(ctx)
        grad = self.input_gradients(ctx)
        off_sq = project_off(U, grad).pow(2).reshape(ctx.batch_size, -1).sum(dim=1)
        if not self.normalize:
            return {"off_manifold_grad": off_sq.mean()}
        norm_sq = grad.pow(2).reshape(ctx.batch_size, -1).sum(dim=1)
        nonzero = norm_sq > 0
        # the inner where keeps the division (and its gradient) finite where g_i = 0
        share = torch.where(nonzero, off_sq / torch.where(nonzero, norm_sq, torch.ones_like(norm_sq)),
                            torch.zeros_like(norm_sq))
        return {"off_manifold_grad_share": share.mean()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target!r}" + (", normalize=True" if self.normalize else "")
