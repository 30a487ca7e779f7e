"""Sections between node layers: batched Jacobians, the Jacobian Gram M′ and LIB edges.

A *section* maps node layer l to node layer l+1: the activation at l is replaced by a leaf
tensor x (``run_model(edit=...)``) and the activation at l+1 is recorded, so that vector-Jacobian
products ∂(v·f^{l+1})/∂x come from one forward pass and a batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over cotangents).

Shapes: every activation is viewed as (B, P, d) — P positions (1 for an MLP layer) and d units.
Bases act on the augmented activation a = [1, f] (constant first): LIB features are f̂ = a C.

Formulas (DESIGN.md section 4, N examples, P input positions, t/s output/input positions):

* Jacobian Gram  M′_{jj′} = 1/(N·P) ∑_x ∑_s ∑_{t,i} J_{(t,i),(s,j)} J_{(t,i),(s,j′)},
  J the Jacobian of ĥ = f^{l+1} C^{l+1} w.r.t. f^l (the constant coordinate has no derivative).
* Edges  E_ij = 1/(N·P) ∑_x ∑_t ( ∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} · f̂_{s,j}(x) )².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from interp_train.sites import run_model

OUTPUT = "output"
INTEGRATION_RULES = ("gradient", "trapezoid", "gauss-legendre")


def integration_rule(kind: str, n_intervals: int) -> tuple[list[float], list[float]]:
    """Points α in [0, 1] and weights w_α with ∑ w_α = 1 for ∫_0^1 g(α) dα ≈ ∑ w_α g(α).

    gradient: α = 1, w = 1 (plain gradient attribution; n_intervals must be 1).
    trapezoid: α_k = k/n, k = 0..n, weights 1/n with halves at both ends.
    gauss-legendre: the n Gauss–Legendre nodes mapped from [-1, 1] to [0, 1], weights halved.
    """
    if not isinstance(n_intervals, int) or n_intervals < 1:
        raise ValueError(f"n_intervals must be an integer >= 1, got {n_intervals!r}")
    if kind == "gradient":
        if n_intervals != 1:
            raise ValueError(f"integration='gradient' evaluates alpha = 1 only; n_intervals must be 1, got {n_intervals}")
        return [1.0], [1.0]
    if kind == "trapezoid":
        alphas = [k / n_intervals for k in range(n_intervals + 1)]
        weights = [1.0 / n_intervals] * (n_intervals + 1)
        weights[0] = weights[-1] = 0.5 / n_intervals
        return alphas, weights
    if kind == "gauss-legendre":
        nodes, w = np.polynomial.legendre.leggauss(n_intervals)
        return [float((x + 1) / 2) for x in nodes], [float(v / 2) for v in w]
    raise ValueError(f"unknown integration rule {kind!r}; use one of {INTEGRATION_RULES}")


def as_positions(act: torch.Tensor) -> torch.Tensor:
    """View an activation (B,), (B, d) or (B, *positions, d) as (B, P, d)."""
    if act.dim() == 1:
        return act.reshape(-1, 1, 1)
    if act.dim() == 2:
        return act.unsqueeze(1)
    return act.reshape(act.shape[0], -1, act.shape[-1])


@dataclass
class SectionPass:
    """One forward pass through a section: the leaf x (= α·f^l), its clean value and f^{l+1}."""

    x: torch.Tensor          # leaf that replaced the activation at l, original shape
    clean: torch.Tensor      # f^l as (B, P, d), detached
    out: torch.Tensor        # f^{l+1}, original shape, attached to x


def section_forward(model: nn.Module, inputs, in_layer: str, out_layer: str, alpha: float = 1.0) -> SectionPass:
    """Runs the model with the activation at ``in_layer`` replaced by the leaf α·f^l."""
    holder: dict[str, torch.Tensor] = {}

    def replace(act: torch.Tensor) -> torch.Tensor:
        holder["clean"] = act.detach()
        holder["x"] = (alpha * act.detach()).requires_grad_(True)
        return holder["x"]

    record = [] if out_layer == OUTPUT else [out_layer]
    with torch.enable_grad():
        result = run_model(model, inputs, record=record, edit={in_layer: replace})
    out = result.output if out_layer == OUTPUT else result.activations[out_layer]
    if not out.requires_grad:
        raise ValueError(
            f"node layer {out_layer!r} does not depend on node layer {in_layer!r}; "
            "node_layers must be listed in forward order, each computed from the previous one"
        )
    return SectionPass(x=holder["x"], clean=as_positions(holder["clean"]), out=out)


def output_cotangents(C_next: torch.Tensor, out: torch.Tensor, probes: torch.Tensor | None = None) -> torch.Tensor:
    """Cotangents selecting ĥ_{t,i} = f^{l+1}_t · C_next[1:, i] for every output unit.

    Exact (probes None): one cotangent per (t, i), shape (T·k, *out.shape), ordered t-major.
    Stochastic: probes r (S, B, T) of ±1; cotangent (r, i) = r_{b,t} C_next[1:, i], shape (S·k, ...).
    The constant column 0 of C_next has no derivative and is skipped (its edges are 0).
    """
    B, T, d = as_positions(out).shape
    W = C_next[1:, 1:].to(out.dtype)  # (d, k-1): the non-constant output features
    k = W.shape[1]
    if probes is None:
        cot = torch.zeros(T, k, B, T, d, dtype=out.dtype)
        for t in range(T):
            cot[t, :, :, t, :] = W.T.unsqueeze(1)
        return cot.reshape(T * k, *out.shape)
    S = probes.shape[0]
    cot = probes.to(out.dtype)[:, None, :, :, None] * W.T[None, :, None, None, :]
    return cot.reshape(S * k, *out.shape)


def batched_vjp(sp: SectionPass, cotangents: torch.Tensor, chunk_elements: int):
    """Yields (start, grads) with grads[n] = ∂(cotangent_n · f^{l+1})/∂x as (n, B, P, d), in chunks."""
    per = max(1, sp.x.numel())
    size = max(1, chunk_elements // per)
    for start in range(0, cotangents.shape[0], size):
        (g,) = torch.autograd.grad(sp.out, sp.x, grad_outputs=cotangents[start:start + size],
                                   is_grads_batched=True, retain_graph=True)
        yield start, g.reshape(g.shape[0], *sp.clean.shape)


def edges_for_batch(passes: list[tuple[float, SectionPass]], C_in: torch.Tensor, C_in_pinv: torch.Tensor,
                    C_out: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """∑_x ∑_t (∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} f̂_{s,j})² over one batch, shape (k_out, k_in).

    ∂ĥ/∂f̂_{s,j} = ∑_d (∂ĥ/∂f_{s,d}) C⁺_{j,1+d} since f = f̂ C⁺ restricted to the non-constant rows.
    Row 0 (the constant output feature) stays 0.
    """
    _, first = passes[0]
    clean = first.clean.to(torch.float64)
    B, P, _ = clean.shape
    f_hat = torch.cat([torch.ones(B, P, 1, dtype=torch.float64), clean], dim=-1) @ C_in   # (B, P, k_in)
    pinv_rows = C_in_pinv[:, 1:]                                                           # (k_in, d)
    T = as_positions(first.out).shape[1]
    k_out, k_in = C_out.shape[1], C_in.shape[1]
    cots = [output_cotangents(C_out, sp.out) for _, sp in passes]
    n_total = cots[0].shape[0]
    acc = torch.zeros(n_total, B, k_in, dtype=torch.float64)
    for (weight, sp), cot in zip(passes, cots):
        for start, g in batched_vjp(sp, cot, chunk_elements):
            d_hat = g.to(torch.float64) @ pinv_rows.T                                      # (n, B, P, k_in)
            acc[start:start + g.shape[0]] += weight * (d_hat * f_hat).sum(dim=2)
    E = torch.zeros(k_out, k_in, dtype=torch.float64)
    E[1:] = acc.reshape(T, k_out - 1, B, k_in).pow(2).sum(dim=(0, 2))
    return E


def jacobian_gram_for_batch(sp: SectionPass, C_out: torch.Tensor, chunk_elements: int,
                            probes: torch.Tensor | None = None) -> torch.Tensor:
    """∑_x ∑_s ∑_{t,i} J_{(t,i),(s,j)} J_{(t,i),(s,j′)} over one batch, shape (d, d).

    With probes r (S, B, T): (1/S) ∑_r ∑_i (∑_t r_t J_{(t,i),s·})ᵀ(…) — unbiased since E[r rᵀ] = I,
    and exact when there is a single output position (r_t² = 1).
    """
    cot = output_cotangents(C_out, sp.out, probes)
    d = sp.clean.shape[-1]
    M = torch.zeros(d, d, dtype=torch.float64)
    for _, g in batched_vjp(sp, cot, chunk_elements):
        rows = g.to(torch.float64).reshape(-1, d)
        M += rows.T @ rows
    if probes is not None:
        M /= probes.shape[0]
    return M


def rademacher(n_sources: int, batch: int, positions: int, generator: torch.Generator) -> torch.Tensor:
    """(S, B, T) independent ±1 entries."""
    return torch.randint(0, 2, (n_sources, batch, positions), generator=generator).mul_(2).sub_(1).double()


def n_rows(act: torch.Tensor) -> int:
    """Number of (example, position) rows: N·P for a (B, P, d) view."""
    a = as_positions(act)
    return a.shape[0] * a.shape[1]


__all__ = [
    "INTEGRATION_RULES", "OUTPUT", "SectionPass", "as_positions", "batched_vjp", "edges_for_batch",
    "integration_rule", "jacobian_gram_for_batch", "output_cotangents", "rademacher", "section_forward",
]
