"""Gradient alignment with the data manifold (docs/DESIGN.md §5.4).

frac(g) = ||U Uᵀ g|| / ||g|| for the gradient g of a per-example score (loss or target logit)
with respect to the input (or an activation such as ``hook_embed`` for token models), where U
(d × k, orthonormal columns) spans the tangent space of the data manifold at that point. A
random direction has E[frac²] = k/d, so sqrt(k/d) is reported beside it as the baseline.

Tangent spaces come from a provider with ``basis(points (B, d), extras) -> U (B, d, k)``
(interp_train.tangents: exact tangents on the synthetic manifold recipe, local PCA on real
data). The points handed to the provider are the site's activations flattened per example,
so for ``site="hook_embed"`` the provider must be built on flattened embeddings too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from evaluation.errors import DegenerateModelError
from interp_train.lightning import default_batch_fn
from interp_train.losses import TARGET_KINDS, target_score
from interp_train.sites import INPUT, check_float_input, eval_mode, run_model
from interp_train.tangents import project_on


def iterate_batches(
    data: Iterable, max_batches: int | None, desc: str, progress: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """(inputs, targets, extras) for at most ``max_batches`` batches ``(x, y, *extras)`` of ``data``."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches}")
    total = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    for i, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        yield default_batch_fn(batch)


def tangent_basis(tangents, points: torch.Tensor, extras: Mapping | None) -> torch.Tensor:
    """U (B, d, k) from the provider for flattened points (B, d), in float64 on the points' device
    (a provider may answer on its own), shape-checked."""
    basis = tangents.basis(points.detach(), extras or None)
    if basis.ndim != 3 or basis.shape[:2] != points.shape:
        raise ValueError(
            f"tangent provider {type(tangents).__name__} returned a basis of shape {tuple(basis.shape)}; "
            f"expected (B, d, k) = ({points.shape[0]}, {points.shape[1]}, k) for points of shape "
            f"{tuple(points.shape)} (is it built on the same representation as the site?)"
        )
    return basis.to(device=points.device, dtype=torch.float64)


@dataclass
class AlignmentResult:
    """Per-example fractions frac = ||U Uᵀ g|| / ||g|| and their summary.

    baseline = sqrt(k/d) (expected for a random direction, up to O(1/d)); k is the tangent
    dimension (the largest one seen if a provider chose it per batch), d the ambient dimension;
    n_zero_gradient counts examples dropped because g = 0 (frac undefined).
    """

    fractions: torch.Tensor
    mean: float
    median: float
    std: float
    baseline: float
    k: int
    d: int
    target: str
    site: str
    n_zero_gradient: int = 0
    provider: str = ""
    quantiles: dict[str, float] = field(default_factory=dict)

    def to_dict(self, include_fractions: bool = False) -> dict:
        out = {name: getattr(self, name) for name in
               ("mean", "median", "std", "baseline", "k", "d", "target", "site", "n_zero_gradient",
                "provider", "quantiles")}
        out["n"] = int(self.fractions.numel())
        out["ratio_to_baseline"] = self.mean / self.baseline if self.baseline > 0 else None
        if include_fractions:
            out["fractions"] = self.fractions.tolist()
        return out


def input_gradients(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target: str, site: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, gradients) at ``site``, both flattened to (B, d): g_i = ∂ score_i / ∂ a_i.

    score_i = target_score(output_i, y_i, target); summing over the batch gives per-example
    gradients because examples do not interact in eval mode.
    """
    if site == INPUT:
        check_float_input(inputs, "gradient alignment at site='input'")
    with torch.enable_grad():
        fwd = run_model(model, inputs, record=[site], input_requires_grad=(site == INPUT))
        act = fwd.activations[site]
        if not act.requires_grad:
            raise ValueError(f"the activation at site {site!r} does not depend on differentiable inputs")
        score = target_score(fwd.output, targets, target).sum()
        (grad,) = torch.autograd.grad(score, act)
    return act.detach().reshape(act.shape[0], -1), grad.detach().reshape(grad.shape[0], -1)


def gradient_alignment(
    model: nn.Module,
    data: Iterable,
    tangents,
    target: str = "loss",
    site: str = INPUT,
    max_batches: int | None = None,
    progress: bool = True,
) -> AlignmentResult:
    """frac_i = ||U_i U_iᵀ g_i|| / ||g_i|| over the examples of ``data`` (batches ``(x, y, *extras)``).

    g_i: gradient of ``target`` ("loss": per-example cross-entropy, "logit": the target's logit,
    "logprob") with respect to the activation at ``site`` ("input", or e.g. "hook_embed").
    U_i: ``tangents.basis(a_i, extras)``, orthonormal columns, at the flattened activation a_i.
    """
    if target not in TARGET_KINDS:
        raise ValueError(f"unknown target {target!r}; allowed: {', '.join(TARGET_KINDS)}")
    fractions: list[torch.Tensor] = []
    k_max, d, n_zero = 0, 0, 0
    with eval_mode(model):
        for inputs, targets, extras in iterate_batches(data, max_batches, "gradient alignment", progress):
            points, grads = input_gradients(model, inputs, targets, target, site)
            basis = tangent_basis(tangents, points, extras)
            g = grads.to(torch.float64)
            norms = g.norm(dim=1)
            on = project_on(basis, g).norm(dim=1)  # ||U Uᵀ g||
            nonzero = norms > 0
            n_zero += int((~nonzero).sum())
            fractions.append(on[nonzero] / norms[nonzero])
            k_max, d = max(k_max, basis.shape[2]), g.shape[1]
    if not fractions:
        raise ValueError("gradient alignment got no batches from the data")
    fr = torch.cat(fractions)
    if fr.numel() == 0:
        raise DegenerateModelError(f"all {n_zero} gradients were exactly zero; alignment is undefined")
    qs = torch.quantile(fr, torch.tensor([0.1, 0.25, 0.75, 0.9], dtype=fr.dtype, device=fr.device))
    return AlignmentResult(
        fractions=fr.cpu(), mean=float(fr.mean()), median=float(fr.median()),
        std=float(fr.std()) if fr.numel() > 1 else 0.0,
        baseline=math.sqrt(k_max / d), k=int(k_max), d=int(d), target=target, site=site,
        n_zero_gradient=n_zero, provider=repr(tangents),
        quantiles={f"q{int(q * 100)}": float(v) for q, v in zip((0.1, 0.25, 0.75, 0.9), qs)},
    )
