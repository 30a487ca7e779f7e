"""Activation sparsity in the unit basis: make each example use few channels of a layer.

Weight sparsity (``weight_sparsity.py``) thins the connections between units but leaves every
residual channel in use on every token; a task's pruned circuit then still needs most of the
residual stream (study/README.md, narrow-task circuits). Gao et al. (2025) pair weight sparsity
with *activation* sparsity (an AbsTopK nonlinearity) for that reason. This is the loss-term
version, which leaves the model's forward pass unchanged (so LIB's closed forms and every
checkpoint reader keep working).

For a layer's activation with feature dimension d, every leading dimension (batch, positions)
gives rows a_r (see ``degeneracy.as_rows``). With c_r = a_r − μ, μ the batch mean of each
feature (detached; ``center=False``: μ = 0), the per-row measure is

    s(c) = ||c||_1 / (sqrt(d) · ||c||_2)  ∈ [1/sqrt(d), 1]

(Hoyer 2004): 1/sqrt(d) when c has one non-zero entry, 1 when all |c_j| are equal, about
sqrt(2/π) ≈ 0.80 for a Gaussian vector. It is scale-invariant, so a LayerNorm model cannot lower
it by shrinking the residual stream, and centred, so a constant offset in one channel does not
count as sparsity: mean ablation replaces a channel by its mean, and a channel whose centred
value is zero on a token carries nothing there. Term per layer: the mean of s over rows (a mean
over examples and positions, so it does not depend on the batch size).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.regularizers.degeneracy import _layer_list, as_rows
from interp_train.schedules import WeightLike

__all__ = ["ActivationSparsity", "hoyer_measure"]


def hoyer_measure(rows: torch.Tensor) -> torch.Tensor:
    """s(c_r) = ||c_r||_1 / (sqrt(d) ||c_r||_2) for each row of ``rows`` (N, d); shape (N,).

    A zero row gets 0 (no channel in use); the tiny term under the square root keeps the gradient
    finite there.
    """
    d = rows.shape[-1]
    tiny = torch.finfo(rows.dtype).tiny
    l1 = rows.abs().sum(dim=-1)
    l2 = (rows.pow(2).sum(dim=-1) + tiny).sqrt()
    return l1 / (math.sqrt(d) * l2)


class ActivationSparsity(Regularizer):
    """Term per layer ``hoyer/<layer>`` = mean over rows of s(a_r − μ) (module docstring).

    Args:
        layers: a module path or TransformerLens hook name, or a list of them (for a transformer:
            the residual stream hooks and ``blocks.L.mlp.hook_post``).
        center: subtract the batch mean of each feature (detached) first (default True).
    """

    def __init__(self, weight: WeightLike = 1.0, layers: str | Sequence[str] = (), center: bool = True,
                 name: str | None = None):
        super().__init__(weight, name)
        names = _layer_list(layers)
        if not isinstance(center, bool):
            raise TypeError(f"center must be True or False, got {center!r}")
        self.layers = names
        self.at = list(names)
        self.center = center

    def measure(self, activation: torch.Tensor) -> torch.Tensor:
        """Mean of s over the rows of one layer's activation (module docstring)."""
        rows = as_rows(activation)
        if rows.shape[-1] < 2:
            raise ValueError(f"activation sparsity needs a feature dimension of at least 2, got shape "
                             f"{tuple(activation.shape)}")
        if self.center:
            rows = rows - rows.mean(dim=0, keepdim=True).detach()
        return hoyer_measure(rows).mean()

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {f"hoyer/{layer}": self.measure(ctx.activation(layer)) for layer in self.layers}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.layers}, center={self.center}"
