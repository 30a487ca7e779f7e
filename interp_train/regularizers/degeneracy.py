"""Degeneracy regularizers: make a layer's representation use fewer independent directions.

Three kinds (docs/DESIGN.md §3.5), all built on one numerically safe *effective rank* of a matrix:

* ``ActivationDegeneracy`` (kind 1): effective rank of the centered batch activations.
* ``GradientDegeneracy`` (kind 2): effective rank of the per-example gradients of the loss
  (or target logit / log-probability) with respect to those activations.
* ``FiringPatternDegeneracy`` (kind 3): effective rank of the soft firing patterns
  ``sigmoid(z / tau)`` of ReLU pre-activations ``z``; low when neurons fire on the same inputs.

Rows: an activation of shape (B, d) gives B rows; (B, T, d) (a position dimension) gives B·T
rows — every leading dimension is flattened into rows and the last dimension is the feature
dimension. Lower effective rank = more linearly dependent rows' features, i.e. a more
degenerate layer. The penalties are batch statistics (one value per layer and batch), with one
logged term per layer.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from interp_train.checks import check_choice, check_target
from interp_train.losses import target_score
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import WeightLike

Measure = Literal["nuclear", "entropy", "participation"]
MEASURES = ("nuclear", "entropy", "participation")


def _check_measure(measure: str) -> None:
    check_choice(measure, MEASURES, "measure")


def as_rows(a: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (N, d): every leading dimension (batch, positions, ...) becomes rows."""
    if a.ndim < 2:
        raise ValueError(f"need an activation with a batch and a feature dimension, got shape {tuple(a.shape)}")
    return a.reshape(-1, a.shape[-1])


def gram_eigenvalues(rows: torch.Tensor, center: bool = True, rel_floor: float = 1e-8) -> torch.Tensor:
    """Eigenvalues λ_k = σ_k² (+ floor) of the Gram matrix of ``rows`` (N, d), in float64.

    A = rows − mean(rows) if ``center``; the Gram is AᵀA (d×d) or AAᵀ (N×N), whichever is
    smaller (same nonzero eigenvalues). Each eigenvalue is clamped at 0 and raised by
    ``floor = rel_floor · tr(G)/k + 1e-30`` (k = Gram size) so that square roots and logs have
    finite gradients at zero singular values. ``eigvalsh``'s backward is V diag(∂L/∂λ) Vᵀ, which
    is well defined at repeated eigenvalues (no 1/(λ_i − λ_j) terms), unlike an SVD backward
    through singular vectors.
    """
    a = rows.to(torch.float64)
    if center:
        a = a - a.mean(dim=0, keepdim=True)
    n, d = a.shape
    gram = a.T @ a if d <= n else a @ a.T
    k = gram.shape[0]
    floor = rel_floor * torch.diagonal(gram).sum() / k + 1e-30
    return torch.linalg.eigvalsh(gram).clamp_min(0.0) + floor


def effective_rank(a: torch.Tensor, measure: Measure = "participation", center: bool = True,
                   rel_floor: float = 1e-8) -> torch.Tensor:
    """Effective rank of the matrix of rows of ``a`` (see ``as_rows``), a differentiable scalar.

    With singular values σ_k of the (centered) matrix A:
    * ``"nuclear"``: ||A||_* / ||A||_F = Σ σ_k / sqrt(Σ σ_k²), in [1, sqrt(rank)];
    * ``"entropy"``: exp(H(p)) with p_k = σ_k / Σ σ_j and H(p) = −Σ p_k log p_k (Roy & Vetterli),
      in [1, rank];
    * ``"participation"``: (Σ σ_k²)² / Σ σ_k⁴, in [1, rank] (see ``participation_ratio``; no
      eigendecomposition, so much cheaper for wide layers).
    All are 1 for a rank-1 matrix and scale-invariant; the first two are computed in float64 from
    ``gram_eigenvalues`` (finite gradients at rank-deficient inputs); returned in a's dtype.
    The floor biases "nuclear" upward by at most sqrt(k · rel_floor) (1e-4 for k = 100 at the
    default); pass a smaller rel_floor for evaluation.
    """
    _check_measure(measure)
    if measure == "participation":
        return participation_ratio(a, center=center)
    lam = gram_eigenvalues(as_rows(a), center=center, rel_floor=rel_floor)
    sigma = lam.sqrt()
    if measure == "nuclear":
        value = sigma.sum() / lam.sum().sqrt()
    else:
        p = sigma / sigma.sum()
        value = torch.exp(-(p * p.log()).sum())
    return value.to(a.dtype if a.is_floating_point() else torch.get_default_dtype())


def participation_ratio(a: torch.Tensor, center: bool = True) -> torch.Tensor:
    """(Σ_k σ_k²)² / Σ_k σ_k⁴ = tr(G)² / ||G||_F² for the Gram G of the (centered) rows of ``a``.

    The exponential of the order-2 Rényi entropy of p_k = σ_k² / Σ σ_j²; 1 for rank 1, r for r
    equal singular values. A polynomial in A, so its gradient exists everywhere and no
    eigendecomposition is needed: cost O(N·k²) for k = min(N, d). The Gram matrix is a matmul in
    a's dtype (both sums are dominated by the large eigenvalues, so float32 rounding does not
    matter here, unlike for the square roots of the eigen-based measures); the sums are float64.
    """
    rows = as_rows(a)
    if center:
        rows = rows - rows.mean(dim=0, keepdim=True)
    gram = (rows.T @ rows if rows.shape[1] <= rows.shape[0] else rows @ rows.T).to(torch.float64)
    value = torch.diagonal(gram).sum().pow(2) / (gram.pow(2).sum() + 1e-30)
    return value.to(a.dtype if a.is_floating_point() else torch.get_default_dtype())


def _layer_list(layers: str | Sequence[str]) -> list[str]:
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers must name at least one layer (a module path or a TransformerLens hook name)")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a layer name must be a non-empty string, got {name!r}")
    return names


class _EffectiveRankPenalty(Regularizer):
    """Shared set-up: one term ``erank/<layer>`` per layer, the effective rank of the batch's rows
    (a batch statistic: the rows pass through ``batch_rows``, see ``interp_train.distributed``)."""

    batch_statistic = True

    def __init__(self, weight: WeightLike, layers: str | Sequence[str], measure: Measure,
                 center: bool, rel_floor: float, name: str | None):
        super().__init__(weight, name)
        _check_measure(measure)
        self.layers = _layer_list(layers)
        self.at = list(self.layers)
        self.measure = measure
        self.center = center
        self.rel_floor = rel_floor

    def _rank(self, matrix: torch.Tensor) -> torch.Tensor:
        return effective_rank(self.batch_rows(as_rows(matrix)), self.measure, center=self.center,
                              rel_floor=self.rel_floor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.layers}, measure={self.measure!r}"


class ActivationDegeneracy(_EffectiveRankPenalty):
    """Kind 1: term per layer = effective_rank(activations at the layer) (rows: see module doc).

    Args:
        layers: a module path or TransformerLens hook name, or a list of them.
        measure: "nuclear" (||A||_*/||A||_F), "entropy" (exp of spectral entropy) or
            "participation" ((Σσ²)²/Σσ⁴, the default: no eigendecomposition, so it stays cheap
            for wide layers; the eigen-based measures cost O(k³) in float64, k = min(rows, width)).
        center: subtract the batch mean of each feature first (default True).
    """

    def __init__(self, weight: WeightLike = 1.0, layers: str | Sequence[str] = (), measure: Measure = "participation",
                 center: bool = True, rel_floor: float = 1e-8, name: str | None = None):
        super().__init__(weight, layers, measure, center, rel_floor, name)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {f"erank/{layer}": self._rank(ctx.activation(layer)) for layer in self.layers}


class GradientDegeneracy(_EffectiveRankPenalty):
    """Kind 2: term per layer = effective_rank(G) with G_i = ∂s_i/∂a_i the per-example gradient
    of the score s_i with respect to the layer's activation a_i (double backprop).

    target: "loss" (the context's per-example loss), "logit" (the target's logit) or "logprob"
    (its log-probability); see ``losses.target_score``. For (B, T, d) activations each example's
    gradient contributes T rows. Assumes examples do not interact in the forward pass (no
    batch norm in training mode), so ∂(Σ_i s_i)/∂a_i = ∂s_i/∂a_i.
    """

    def __init__(self, weight: WeightLike = 1.0, layers: str | Sequence[str] = (), measure: Measure = "participation",
                 target: str = "loss", center: bool = True, rel_floor: float = 1e-8, name: str | None = None):
        super().__init__(weight, layers, measure, center, rel_floor, name)
        self.target = check_target(target)

    def per_example_gradients(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        """{layer: ∂s_i/∂a_i} with the layer's activation shape, attached to the graph."""
        output = ctx.clean().output
        if self.target == "loss":
            scores = ctx.per_example_loss(output)
        else:
            scores = target_score(output, ctx.targets, self.target)
        acts = [ctx.activation(layer) for layer in self.layers]
        grads = torch.autograd.grad(scores.sum(), acts, create_graph=True, allow_unused=True)
        for layer, grad in zip(self.layers, grads):
            if grad is None:
                raise ValueError(f"the {self.target} does not depend on layer {layer!r}: no gradient path from "
                                 "that layer to the model output")
        return dict(zip(self.layers, grads))

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {f"erank/{layer}": self._rank(g) for layer, g in self.per_example_gradients(ctx).items()}


class FiringPatternDegeneracy(_EffectiveRankPenalty):
    """Kind 3: term per layer = effective_rank(sigmoid(z / tau)), z the ReLU *pre-activations*.

    sigmoid(z/τ) is a differentiable surrogate of the firing indicator 1[z > 0]; column j is
    neuron j's (soft) firing pattern over the batch rows. Neurons that fire on the same inputs
    have equal patterns, so the centered pattern matrix has low rank; lowering its effective
    rank rewards shared firing patterns. Name the layer whose output is the pre-activation
    (e.g. the Linear before the ReLU, or "blocks.0.mlp.hook_pre"/"blocks.0.mlp.in.hook_out").
    Smaller tau: closer to the hard pattern but fewer inputs get gradient.
    """

    def __init__(self, weight: WeightLike = 1.0, layers: str | Sequence[str] = (), tau: float = 0.5,
                 measure: Measure = "participation", center: bool = True, rel_floor: float = 1e-8, name: str | None = None):
        super().__init__(weight, layers, measure, center, rel_floor, name)
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.tau = float(tau)

    def soft_patterns(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """sigmoid(z / tau), same shape as z."""
        return torch.sigmoid(pre_activation / self.tau)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {f"erank/{layer}": self._rank(self.soft_patterns(ctx.activation(layer))) for layer in self.layers}
