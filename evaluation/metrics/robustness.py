"""Output-level measurements: on/off-manifold robustness and held-out accuracy/loss.

Robustness (docs/DESIGN.md §5.5, after Srinivas et al. 2023): for each example x and radius ε,

    Δ_on(ε)  = ||softmax f(x + ε u_on) − softmax f(x)||₁,   u_on  uniform on the unit sphere of T_x
    Δ_off(ε) = ||softmax f(x + ε u_off) − softmax f(x)||₁,  u_off uniform on the unit sphere of T_x^⊥

averaged over examples and ``n_draws`` directions each; the ratio Δ_off/Δ_on per ε says whether
the model is more robust off the manifold (ratio < 1) than on it. u_on = U z/||U z||,
z ~ N(0, I_k); u_off = P_off w/||P_off w||, w ~ N(0, I_d) — both uniform on their spheres by
rotation invariance. The perturbation is added at ``site`` ("input", or an activation such as
"hook_embed"), flattened per example like the tangent provider's points. For sequence outputs
(B, T, C) the L1 change is averaged over positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from evaluation.metrics.alignment import eval_mode, iterate_batches, tangent_basis
from interp_train.losses import per_example_cross_entropy
from interp_train.sites import INPUT, check_float_input, run_model
from interp_train.tangents import project_off


@dataclass
class RobustnessResult:
    """Mean L1 softmax change per ε on and off the manifold, and ratio = off/on per ε."""

    eps: list[float]
    on_change: list[float]
    off_change: list[float]
    ratio: list[float | None]
    n_examples: int
    n_draws: int
    k: int
    d: int
    site: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _softmax_l1(p_new: torch.Tensor, p_ref: torch.Tensor) -> torch.Tensor:
    """||p_new − p_ref||₁ over classes, averaged over any positions; shape (B,)."""
    diff = (p_new - p_ref).abs().sum(dim=-1)
    return diff.reshape(diff.shape[0], -1).mean(dim=1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _check_eps(eps: Sequence[float]) -> list[float]:
    values = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
    if not values or any(not math.isfinite(e) or e <= 0 for e in values):
        raise ValueError(f"eps must be positive finite radii, got {eps!r}")
    return values


def manifold_robustness(
    model: nn.Module,
    data: Iterable,
    tangents,
    eps: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    n_draws: int = 4,
    seed: int = 0,
    site: str = INPUT,
    max_batches: int | None = None,
    progress: bool = True,
) -> RobustnessResult:
    """Mean Δ_on(ε), Δ_off(ε) (see module docstring) over ``data`` and ``n_draws`` directions per example.

    Directions are drawn from a generator seeded with ``seed`` (same directions for every ε, so
    the curves are comparable across ε). A tangent space with k = d has no complement (and
    k = 0 no tangent space): the corresponding change is reported as NaN.
    """
    eps_list = _check_eps(eps)
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    gen = torch.Generator().manual_seed(seed)
    on_sum = off_sum = 0.0  # (len(eps),) tensors on the data's device after the first batch
    n_examples, k, d = 0, 0, 0
    with eval_mode(model), torch.no_grad():
        for inputs, _targets, extras in iterate_batches(data, max_batches, "manifold robustness", progress):
            if site == INPUT:
                check_float_input(inputs, "manifold robustness at site='input'")
            clean = run_model(model, inputs, record=[site])
            act = clean.activations[site]
            p_ref = torch.softmax(clean.output.to(torch.float64), dim=-1)
            flat = act.reshape(act.shape[0], -1)
            U = tangent_basis(tangents, flat, extras)
            B, d, k = U.shape
            n_examples += B
            radii = torch.tensor(eps_list, dtype=torch.float64, device=U.device)[:, None, None]
            for _ in range(n_draws):
                # drawn on the CPU (the same directions on every device), then moved to the data
                z = torch.randn(B, k, generator=gen, dtype=torch.float64).to(U.device)
                w = torch.randn(B, d, generator=gen, dtype=torch.float64).to(U.device)
                u_on = _unit(torch.einsum("bdk,bk->bd", U, z))
                u_off = _unit(project_off(U, w))
                # one forward for all (direction, ε) pairs: rows ordered [on ε₁.., off ε₁..] × B
                steps = torch.cat([radii * u_on, radii * u_off]).reshape(-1, *act.shape[1:]).to(act.dtype)
                repeated = inputs.repeat(2 * len(eps_list), *([1] * (inputs.ndim - 1)))
                out = run_model(model, repeated, edit={site: lambda a: a + steps}).output
                probs = torch.softmax(out.to(torch.float64), dim=-1)
                change = _softmax_l1(probs, p_ref.repeat(2 * len(eps_list), *([1] * (p_ref.ndim - 1))))
                change = change.reshape(2, len(eps_list), B).sum(dim=2)
                on_sum = on_sum + change[0]
                off_sum = off_sum + change[1]
    if n_examples == 0:
        raise ValueError("manifold robustness got no batches from the data")
    total = n_examples * n_draws
    on = (on_sum / total).cpu().tolist() if k > 0 else [math.nan] * len(eps_list)
    off = (off_sum / total).cpu().tolist() if k < d else [math.nan] * len(eps_list)
    ratio = [o_ff / o_n if o_n > 0 and math.isfinite(o_ff) else None for o_n, o_ff in zip(on, off)]
    return RobustnessResult(eps=eps_list, on_change=on, off_change=off, ratio=ratio,
                            n_examples=n_examples, n_draws=n_draws, k=int(k), d=int(d), site=site)


def evaluate_accuracy(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_cross_entropy,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict:
    """Held-out {accuracy, loss, n}: example-weighted means over ``data``.

    loss: mean over examples of ``loss_fn(output, y)`` (per-example (B,) values, or a batch mean
    which is weighted by the batch size). accuracy: fraction of argmax(output) == y, averaged over
    positions for (B, T, C) outputs with (B, T) targets, read at the last position for (B,)
    targets; None when the targets are not class indices (regression).
    """
    loss_total, correct_total, n = 0.0, 0.0, 0
    classification = True
    with eval_mode(model), torch.no_grad():
        for inputs, targets, _extras in iterate_batches(data, max_batches, "accuracy", progress):
            output = run_model(model, inputs).output
            B = targets.shape[0]
            loss = loss_fn(output, targets)
            loss_total += float(loss.sum()) if loss.ndim > 0 else float(loss) * B
            n += B
            classification = classification and not torch.is_floating_point(targets)
            if classification:
                logits = output[:, -1] if output.ndim == 3 and targets.ndim == 1 else output
                hits = (logits.argmax(dim=-1) == targets).to(torch.float64)
                correct_total += float(hits.reshape(B, -1).mean(dim=1).sum())
    if n == 0:
        raise ValueError("evaluate_accuracy got no batches from the data")
    return {"accuracy": correct_total / n if classification else None, "loss": loss_total / n, "n": n}
