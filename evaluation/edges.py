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


class Cotangents:
    """Cotangents selecting ĥ_{t,i} = f^{l+1}_t · W[:, i] for the output units, built chunk by chunk.

    Exact (probes None): one cotangent per (t, i), n = T·k, ordered t-major.
    Stochastic: probes r (S, B, T) of ±1; cotangent (r, i) = r_{b,t} W[:, i], n = S·k.
    W = C_next[1:, 1:]: the constant column 0 has no derivative and is skipped (its edges are 0).
    """

    def __init__(self, W: torch.Tensor, out: torch.Tensor, probes: torch.Tensor | None = None):
        self.out_shape = out.shape
        self.B, self.T, self.d = as_positions(out).shape
        self.W = W.to(out.dtype)
        self.k = W.shape[1]
        self.probes = None if probes is None else probes.to(out.dtype)
        self.n = (self.T if probes is None else probes.shape[0]) * self.k

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        idx = torch.arange(start, stop)
        outer, unit = idx // self.k, idx % self.k
        cols = self.W.T[unit]                                                  # (n, d)
        if self.probes is None:
            cot = torch.zeros(stop - start, self.B, self.T, self.d, dtype=self.W.dtype)
            cot[torch.arange(stop - start), :, outer, :] = cols[:, None, :]
        else:
            cot = self.probes[outer][:, :, :, None] * cols[:, None, None, :]
        return cot.reshape(stop - start, *self.out_shape)


def batched_vjp(sp: SectionPass, cotangents: Cotangents, chunk_elements: int):
    """Yields (start, grads) with grads[n] = ∂(cotangent_n · f^{l+1})/∂x as (n, B, P, d), in chunks."""
    per = max(sp.x.numel(), int(torch.Size(cotangents.out_shape).numel()), 1)
    size = max(1, chunk_elements // per)
    for start in range(0, cotangents.n, size):
        stop = min(start + size, cotangents.n)
        (g,) = torch.autograd.grad(sp.out, sp.x, grad_outputs=cotangents.chunk(start, stop),
                                   is_grads_batched=True, retain_graph=True)
        yield start, g.reshape(g.shape[0], *sp.clean.shape)


def edges_for_batch(passes: list[tuple[float, SectionPass]], bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    chunk_elements: int) -> list[torch.Tensor]:
    """∑_x ∑_t (∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} f̂_{s,j})² over one batch, (k_out, k_in) per basis.

    bases: (C_in, C_in_pinv, C_out) triples sharing the forward passes (e.g. LIB and PCA).
    ∂ĥ/∂f̂_{s,j} = ∑_d (∂ĥ/∂f_{s,d}) C⁺_{j,1+d} since f = f̂ C⁺ restricted to the non-constant rows.
    When the bases together have more output features than the layer has units, the gradients
    of every raw output unit o are computed once and projected: ∂ĥ_{t,i} = ∑_o C_out[1+o, i] ∂f_{t,o}.
    Row 0 (the constant output feature) stays 0.
    """
    _, first = passes[0]
    clean = first.clean.to(torch.float64)
    B, P, _ = clean.shape
    aug = torch.cat([torch.ones(B, P, 1, dtype=torch.float64), clean], dim=-1)
    T, d_out = as_positions(first.out).shape[1:]
    W_out = [C_out[1:, 1:].to(torch.float64) for _, _, C_out in bases]
    f_hats = [aug @ C_in for C_in, _, _ in bases]
    accs = [torch.zeros(T, W.shape[1], B, C_in.shape[1], dtype=torch.float64)
            for W, (C_in, _, _) in zip(W_out, bases)]
    shared = sum(W.shape[1] for W in W_out) > d_out
    jobs = [(torch.eye(d_out, dtype=torch.float64), None)] if shared else [(W, b) for b, W in enumerate(W_out)]
    for weight, sp in passes:
        for W, only in jobs:
            cot = Cotangents(W, sp.out)
            for start, g in batched_vjp(sp, cot, chunk_elements):
                g = weight * g.to(torch.float64)
                idx = torch.arange(start, start + g.shape[0])
                t_of, unit = idx // cot.k, idx % cot.k
                for b, (C_in, C_pinv, _) in enumerate(bases):
                    if only is not None and b != only:
                        continue
                    h = ((g @ C_pinv[:, 1:].T) * f_hats[b]).sum(dim=2)                    # (n, B, k_in)
                    for t in t_of.unique().tolist():
                        sel = t_of == t
                        if shared:
                            accs[b][t] += torch.einsum("ni,nbj->ibj", W_out[b][unit[sel]], h[sel])
                        else:
                            accs[b][t, unit[sel]] += h[sel]
    results = []
    for acc, (C_in, _, C_out) in zip(accs, bases):
        E = torch.zeros(C_out.shape[1], C_in.shape[1], dtype=torch.float64)
        E[1:] = acc.pow(2).sum(dim=(0, 2))
        results.append(E)
    return results


def jacobian_gram_for_batch(sp: SectionPass, C_out: torch.Tensor, chunk_elements: int,
                            probes: torch.Tensor | None = None) -> torch.Tensor:
    """∑_x ∑_s ∑_{t,i} J_{(t,i),(s,j)} J_{(t,i),(s,j′)} over one batch, shape (d, d).

    With probes r (S, B, T): (1/S) ∑_r ∑_i (∑_t r_t J_{(t,i),s·})ᵀ(…) — unbiased since E[r rᵀ] = I,
    and exact when there is a single output position (r_t² = 1).
    """
    d = sp.clean.shape[-1]
    M = torch.zeros(d, d, dtype=torch.float64)
    for _, g in batched_vjp(sp, Cotangents(C_out[1:, 1:], sp.out, probes), chunk_elements):
        rows = g.to(torch.float64).reshape(-1, d)
        M += rows.T @ rows
    if probes is not None:
        M /= probes.shape[0]
    return M


def rademacher(n_sources: int, batch: int, positions: int, generator: torch.Generator) -> torch.Tensor:
    """(S, B, T) independent ±1 entries."""
    return torch.randint(0, 2, (n_sources, batch, positions), generator=generator).mul_(2).sub_(1).double()


__all__ = [
    "INTEGRATION_RULES", "OUTPUT", "Cotangents", "SectionPass", "as_positions", "batched_vjp", "edges_for_batch",
    "integration_rule", "jacobian_gram_for_batch", "rademacher", "section_forward",
]
