"""Interaction sparsity: an unbiased, sampled estimate of the L1 norm of the Jacobian between
two named layers (docs/DESIGN.md §3.6).

For example i with source activation a_i (flattened to d_in numbers) and target activation
b_i (flattened to d_out numbers), J_i = ∂b_i/∂a_i (d_out × d_in) and

    ||J||_1 = mean_i Σ_{k,j} |J_i[k, j]|.

Each step draws, independently for every example, m distinct output rows k (uniformly without
replacement) and computes those rows with m vector-Jacobian products (one backward pass each,
batched with vmap); the estimate (d_out/m) Σ_{sampled k} Σ_j |J_i[k, j]| has expectation
||J_i||_1 and is exact when m = d_out. With a position dimension, (B, T, d) activations are
flattened per example (d_out = T·d_target, d_in = T·d_source), so cross-position terms (e.g.
through attention) are included. Assumes examples do not interact in the forward pass.
"""

from __future__ import annotations

import math

import torch

from interp_train.checks import check_layer, check_positive_int
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import WeightLike


def no_path_error(source: str, target: str) -> ValueError:
    return ValueError(
        f"layer {target!r} does not depend on layer {source!r}: no gradient path between them "
        "(is target_layer downstream of source in the forward pass?)"
    )


def sampled_rows(batch: int, d_out: int, m: int, device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, m) distinct output-row indices per example, uniform without replacement; all rows
    in order when m >= d_out."""
    if m >= d_out:
        return torch.arange(d_out, device=device).expand(batch, d_out)
    if m == 1:
        return torch.randint(0, d_out, (batch, 1), device=device, generator=generator)
    scores = torch.rand(batch, d_out, device=device, generator=generator)
    return scores.argsort(dim=1)[:, :m]


def jacobian_l1_estimate(source_act: torch.Tensor, target_act: torch.Tensor, m: int,
                         source: str = "source", target: str = "target",
                         generator: torch.Generator | None = None, vectorize: bool = True,
                         create_graph: bool = True) -> torch.Tensor:
    """mean_i (d_out/m) Σ_{k ∈ S_i} Σ_j |∂b_i[k]/∂a_i[j]|, S_i ~ m rows without replacement.

    ``source_act`` (B, ...) must be on the autograd path to ``target_act`` (B, ...), e.g. two
    activations recorded in the same forward pass. ``m`` is clamped to d_out (then exact).
    """
    check_positive_int(m, "m (the number of sampled Jacobian rows)")
    if source_act.shape[0] != target_act.shape[0]:
        raise ValueError(f"batch sizes differ: {source!r} has {source_act.shape[0]} rows, {target!r} {target_act.shape[0]}")
    if not target_act.requires_grad:
        raise no_path_error(source, target)
    batch = target_act.shape[0]
    d_out = math.prod(target_act.shape[1:])
    m_eff = min(m, d_out)
    rows = sampled_rows(batch, d_out, m_eff, device=target_act.device, generator=generator)
    # one one-hot cotangent per sampled row: (m, B, d_out)
    cotangents = torch.zeros(m_eff, batch, d_out, dtype=target_act.dtype, device=target_act.device)
    cotangents.scatter_(2, rows.T.unsqueeze(-1), 1.0)
    cotangents = cotangents.reshape(m_eff, *target_act.shape)
    if vectorize and m_eff > 1:
        (vjps,) = torch.autograd.grad(target_act, source_act, cotangents, create_graph=create_graph,
                                      retain_graph=True, allow_unused=True, is_grads_batched=True)
        if vjps is None:
            raise no_path_error(source, target)
        row_l1 = vjps.abs().reshape(m_eff, batch, -1).sum(dim=2)  # (m, B)
    else:
        sums = []
        for v in cotangents:
            (vjp,) = torch.autograd.grad(target_act, source_act, v, create_graph=create_graph,
                                         retain_graph=True, allow_unused=True)
            if vjp is None:
                raise no_path_error(source, target)
            sums.append(vjp.abs().reshape(batch, -1).sum(dim=1))
        row_l1 = torch.stack(sums)
    return row_l1.sum(dim=0).mean() * (d_out / m_eff)


class InteractionSparsity(Regularizer):
    """Term ``jacobian_l1`` = the sampled estimate of mean_i ||∂b_i/∂a_i||_1 (module docstring).

    Args:
        source: the layer whose activation a is differentiated against ("input", a module path or
            a TransformerLens hook name).
        target_layer: a layer downstream of ``source`` whose activation b is differentiated.
        m: output rows sampled per example and step (m VJPs); exact (deterministic) when
            m >= d_out. Default 1 (cheapest; unbiased, and the batch mean averages the noise);
            each extra row adds about one backward pass and its double backward.
        vectorize: batch the m VJPs with vmap (``is_grads_batched``); set False for models whose
            ops do not support vmap.
    """

    def __init__(self, weight: WeightLike = 1.0, source: str = "input", target_layer: str = "", m: int = 1,
                 vectorize: bool = True, name: str | None = None):
        super().__init__(weight, name)
        check_positive_int(m, "m (the number of sampled Jacobian rows)")
        check_layer(source, "source")
        check_layer(target_layer, "target_layer")
        if source == target_layer:
            raise ValueError(f"source and target_layer must be different layers, got {source!r} twice")
        self.source = source
        self.target_layer = target_layer
        self.m = m
        self.vectorize = vectorize
        self.at = [source, target_layer]

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        value = jacobian_l1_estimate(ctx.activation(self.source), ctx.activation(self.target_layer), self.m,
                                     source=self.source, target=self.target_layer, vectorize=self.vectorize)
        return {"jacobian_l1": value}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, source={self.source!r}, target_layer={self.target_layer!r}, m={self.m}"
