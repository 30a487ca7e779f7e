"""Sections between node layers: batched Jacobians, the Jacobian Gram M′ and LIB edges.

A *section* maps node layer l to node layer l+1: the activation at l is replaced by a leaf
tensor x (``run_model(edit=...)``) and the activation at l+1 is recorded, so that vector-Jacobian
products ∂(v·f^{l+1})/∂x come from one forward pass and a batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over cotangents).

Shapes: every activation is viewed as (B, P, d) — P positions (1 for an MLP layer) and d units.
Bases act on the augmented activation a = [1, f] (constant first): LIB features are f̂ = a C.

Formulas (docs/DESIGN.md §4.4 and §4.6, N examples, P input positions, t/s output/input positions):

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
from evaluation.lib.positions import insert, select, site_of

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
    """View an activation as (B, P, d): (B,) and (B, d) as one position; (B, P, d) (a sequence
    model's positions) as is; an activation of 4 or more axes, (B, C, H, W) — an image fed to an MLP
    that flattens it, a CNN's feature map — as one position of all its units (B, 1, C·H·W), in
    the order ``flatten(1)`` gives (its last axis is not a feature axis that positions share)."""
    if act.dim() == 1:
        return act.reshape(-1, 1, 1)
    if act.dim() == 2:
        return act.unsqueeze(1)
    if act.dim() == 3:
        return act
    return act.reshape(act.shape[0], 1, -1)


@dataclass
class SectionPass:
    """One forward pass through a section: the leaf x (= α·f^l), its clean value and f^{l+1}."""

    x: torch.Tensor          # leaf (B, P, d) that replaced node layer l (its positions only)
    clean: torch.Tensor      # f^l as (B, P, d), detached
    out: torch.Tensor        # f^{l+1} as (B, T, d) (its positions only), attached to x


class _ReachedOutputLayer(Exception):
    """Raised by the recording hook of a section's output layer to skip the rest of the model."""


def section_forward(model: nn.Module, inputs, in_layer: str, out_layer: str, alpha: float = 1.0) -> SectionPass:
    """Runs the model with the activation at ``in_layer`` replaced by the leaf α·f^l.

    The forward pass stops once ``out_layer`` is computed (the layers after it cannot change the
    section's Jacobian), so a section costs only the model up to its output layer.
    Position-indexed layers (evaluation.lib.positions): only the chosen input position is the leaf
    (the others keep their clean values), and only the chosen output position is returned.
    """
    holder: dict[str, torch.Tensor] = {}
    in_site, out_site = site_of(in_layer), site_of(out_layer)

    def replace(act: torch.Tensor) -> torch.Tensor:
        clean = select(in_layer, act.detach())
        holder["clean"] = clean
        holder["x"] = (alpha * clean).requires_grad_(True)
        return insert(in_layer, act.detach(), holder["x"])  # other positions keep their clean values

    def stop(act: torch.Tensor) -> torch.Tensor:
        holder["out"] = select(out_layer, act)
        raise _ReachedOutputLayer

    with torch.enable_grad():
        if out_site == OUTPUT:
            holder["out"] = select(out_layer, run_model(model, inputs, edit={in_site: replace}).output)
        else:
            try:
                run_model(model, inputs, edit={in_site: replace, out_site: stop})
            except _ReachedOutputLayer:
                pass
    out = holder.get("out")
    if "x" not in holder or out is None or not out.requires_grad:
        raise ValueError(
            f"node layer {out_layer!r} does not depend on node layer {in_layer!r}; "
            "node_layers must be listed in forward order, each computed from the previous one"
        )
    return SectionPass(x=holder["x"], clean=holder["clean"], out=out)


def output_dependence(sp: SectionPass, chunk_elements: int) -> torch.Tensor:
    """D (T, P) bool: D[t, s] is True when output position t depends on input position s in this batch.

    One VJP per output position t with a random Gaussian cotangent at t (all units, all examples):
    ∂/∂x_s is exactly 0 where the graph has no path from s to t (e.g. s > t in a causal model, s ≠ t
    in a position-wise MLP), and nonzero with probability 1 otherwise.
    """
    out = as_positions(sp.out)
    B, T, d = out.shape
    dev = out.device
    noise = torch.randn(T, B, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dev, out.dtype)
    dep = torch.zeros(T, sp.clean.shape[1], dtype=torch.bool)  # small, CPU: it decides the grouping
    size = max(1, chunk_elements // max(sp.x.numel(), out.numel(), 1))
    for start in range(0, T, size):
        ts = torch.arange(start, min(start + size, T), device=dev)
        cot = torch.zeros(len(ts), B, T, d, dtype=out.dtype, device=dev)
        cot[torch.arange(len(ts), device=dev), :, ts, :] = noise[ts]
        (g,) = torch.autograd.grad(sp.out, sp.x, grad_outputs=cot.reshape(len(ts), *sp.out.shape),
                                   is_grads_batched=True, retain_graph=True)
        dep[ts.cpu()] = g.reshape(len(ts), *sp.clean.shape).ne(0).any(dim=3).any(dim=1).cpu()
    return dep


def position_groups(dep: torch.Tensor) -> list[list[int]]:
    """Output positions grouped so that the input supports {s: D[t, s]} within a group are disjoint.

    One cotangent over a whole group then gives each input position s the gradient of the single
    group member t that depends on s, exactly (a position-wise layer: one group of all T positions;
    a causal layer: every position alone). Greedy, in position order; positions that depend on no
    input position are left out, their Jacobian is 0.
    """
    groups, used = [], []
    for t in range(dep.shape[0]):
        if not dep[t].any():
            continue
        for members, support in zip(groups, used):
            if not (support & dep[t]).any():
                members.append(t)
                support |= dep[t]
                break
        else:
            groups.append([t])
            used.append(dep[t].clone())
    return groups


@dataclass
class PositionSources:
    """How output positions enter the cotangents of one section pass, and where gradients land.

    patterns (Q, B or 1, T): cotangent (q, i) = patterns[q, b, t] · W[:, i] at output position t;
    owner (Q, slots, P): the gradient at input position s of pattern q belongs to slot m with weight
    owner[q, m, s]; scale: estimates are divided by it.
    Exact: one pattern per position group, slots = output positions, scale 1.
    Probes r (S, B, T): patterns = r, slot q takes every input position of probe q, scale S.
    """

    patterns: torch.Tensor
    owner: torch.Tensor
    scale: float

    @classmethod
    def exact(cls, sp: SectionPass, chunk_elements: int) -> "PositionSources":
        T, P = as_positions(sp.out).shape[1], sp.clean.shape[1]
        if T == 1:
            dep = torch.ones(1, P, dtype=torch.bool)
        else:
            dep = output_dependence(sp, chunk_elements)
        groups = position_groups(dep)
        patterns = torch.zeros(len(groups), 1, T, dtype=torch.float64)
        owner = torch.zeros(len(groups), T, P, dtype=torch.float64)
        for q, members in enumerate(groups):
            patterns[q, 0, members] = 1.0
            owner[q, members] = dep[members].double()
        return cls(patterns.to(sp.clean.device), owner.to(sp.clean.device), 1.0)

    @classmethod
    def probes(cls, probes: torch.Tensor, P: int) -> "PositionSources":
        S = probes.shape[0]
        owner = torch.eye(S, dtype=torch.float64, device=probes.device)[:, :, None].expand(S, S, P)
        return cls(probes, owner, float(S))


class Cotangents:
    """Cotangents selecting output features ĥ = f^{l+1} · W, built chunk by chunk.

    Per unit (hidden None): cotangent (q, i) = patterns[q, b, t] W[:, i], n = Q·k, q-major.
    Hidden probes r (S, B, T, k): cotangent q = ∑_i r[q, b, t, i] W[:, i], n = S (units probed too).
    W = C_next[1:, 1:]: the constant column 0 has no derivative and is skipped (its edges are 0).
    """

    def __init__(self, W: torch.Tensor, out: torch.Tensor, patterns: torch.Tensor | None = None,
                 hidden: torch.Tensor | None = None):
        self.out_shape = out.shape
        self.B, self.T, self.d = as_positions(out).shape
        self.W = W.to(out.dtype)
        self.hidden = None if hidden is None else hidden.to(out.dtype)
        if hidden is None:
            if patterns is None:  # every output position alone
                patterns = torch.eye(self.T, dtype=torch.float64, device=out.device)[:, None, :]
            self.patterns = patterns.to(out.dtype)
        self.k = 1 if hidden is not None else W.shape[1]
        self.n = hidden.shape[0] if hidden is not None else self.patterns.shape[0] * self.k

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        if self.hidden is not None:
            return (self.hidden[start:stop] @ self.W.T).reshape(stop - start, *self.out_shape)
        idx = torch.arange(start, stop, device=self.W.device)
        outer, unit = idx // self.k, idx % self.k
        cols = self.W.T[unit]                                                  # (n, d)
        cot = self.patterns[outer][:, :, :, None] * cols[:, None, None, :]     # (n, B or 1, T, d)
        return cot.expand(-1, self.B, -1, -1).reshape(stop - start, *self.out_shape)


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
                    chunk_elements: int, probes: torch.Tensor | None = None) -> list[torch.Tensor]:
    """∑_x ∑_t (∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} f̂_{s,j})² over one batch, (k_out, k_in) per basis.

    bases: (C_in, C_in_pinv, C_out) triples sharing the forward passes (e.g. LIB and PCA).
    ∂ĥ/∂f̂_{s,j} = ∑_d (∂ĥ/∂f_{s,d}) C⁺_{j,1+d} since f = f̂ C⁺ restricted to the non-constant rows.
    Exact (probes None): output positions with disjoint input supports share cotangents
    (position_groups), so a position-wise section needs k VJPs instead of T·k.
    probes r (S, B, T) of ±1 over output positions (the same for every α): with
    A_t = ∑_α w_α ∑_s ∂ĥ_{t,i}/∂f̂_{s,j} f̂_{s,j}, returns (1/S) ∑_r (∑_t r_t A_t)² — unbiased since
    E[(∑_t r_t A_t)²] = ∑_t A_t², exact with one output position; S·k VJPs per pass.
    When the bases together have more output features than the layer has units, the gradients
    of every raw output unit o are computed once and projected: ∂ĥ_{t,i} = ∑_o C_out[1+o, i] ∂f_{t,o}.
    Row 0 (the constant output feature) stays 0.
    """
    _, first = passes[0]
    clean = first.clean.to(torch.float64)
    B, P, _ = clean.shape
    dev = clean.device
    aug = torch.cat([torch.ones(B, P, 1, dtype=torch.float64, device=dev), clean], dim=-1)
    T, d_out = as_positions(first.out).shape[1:]
    slots = T if probes is None else probes.shape[0]
    W_out = [C_out[1:, 1:].to(torch.float64) for _, _, C_out in bases]
    f_hats = [aug @ C_in for C_in, _, _ in bases]
    accs = [torch.zeros(slots, W.shape[1], B, C_in.shape[1], dtype=torch.float64, device=dev)
            for W, (C_in, _, _) in zip(W_out, bases)]
    shared = sum(W.shape[1] for W in W_out) > d_out
    jobs = [(torch.eye(d_out, dtype=torch.float64, device=dev), None)] if shared else [(W, b) for b, W in enumerate(W_out)]
    for weight, sp in passes:
        sources = PositionSources.exact(sp, chunk_elements) if probes is None else PositionSources.probes(probes, P)
        for W, only in jobs:
            cot = Cotangents(W, sp.out, sources.patterns)
            # per-example products in the section's dtype (float32 Jacobians stay float32), sums in float64
            pinvs = [C_pinv[:, 1:].T.to(sp.out.dtype) for _, C_pinv, _ in bases]
            f_hats_sp = [f.to(sp.out.dtype) for f in f_hats]
            for start, g in batched_vjp(sp, cot, chunk_elements):
                g = weight * g
                idx = torch.arange(start, start + g.shape[0], device=dev)
                q_of, unit = idx // cot.k, idx % cot.k
                for b, (C_in, C_pinv, _) in enumerate(bases):
                    if only is not None and b != only:
                        continue
                    h = ((g @ pinvs[b]) * f_hats_sp[b]).to(torch.float64)          # (n, B, P, k_in)
                    for q in q_of.unique().tolist():
                        sel = q_of == q
                        owner = sources.owner[q]
                        ms = owner.any(dim=1).nonzero().flatten()                   # slots fed by pattern q
                        hq = torch.einsum("nbsj,ms->nmbj", h[sel], owner[ms])
                        if shared:
                            accs[b][ms] += torch.einsum("ni,nmbj->mibj", W_out[b][unit[sel]], hq)
                        else:
                            accs[b][ms[:, None], unit[sel][None, :]] += hq.transpose(0, 1)
    scale = 1.0 if probes is None else float(probes.shape[0])
    results = []
    for acc, (C_in, _, C_out) in zip(accs, bases):
        E = torch.zeros(C_out.shape[1], C_in.shape[1], dtype=torch.float64, device=dev)
        E[1:] = acc.pow(2).sum(dim=(0, 2)) / scale
        results.append(E)
    return results


def jacobian_gram_for_batch(sp: SectionPass, C_out: torch.Tensor, chunk_elements: int,
                            probes: torch.Tensor | None = None) -> torch.Tensor:
    """∑_x ∑_s ∑_{t,i} J_{(t,i),(s,j)} J_{(t,i),(s,j′)} over one batch, shape (d, d).

    Exact (probes None): output positions with disjoint input supports share a cotangent
    (position_groups): k VJPs for a position-wise section, T·k for a causal one.
    probes r (S, B, T) over output positions: (1/S) ∑_r ∑_i (∑_t r_t J_{(t,i),s·})ᵀ(…), S·k VJPs;
    exact when there is a single output position (r_t² = 1).
    probes r (S, B, T, k) over output positions and hidden units (LIB features i of the next layer):
    (1/S) ∑_r (∑_{t,i} r_{t,i} J_{(t,i),s·})ᵀ(…), S VJPs. Both unbiased since E[r rᵀ] = I.
    """
    d = sp.clean.shape[-1]
    M = torch.zeros(d, d, dtype=torch.float64, device=sp.clean.device)
    W = C_out[1:, 1:]
    if probes is None:
        cot = Cotangents(W, sp.out, PositionSources.exact(sp, chunk_elements).patterns)
    elif probes.dim() == 3:
        cot = Cotangents(W, sp.out, probes)
    else:
        cot = Cotangents(W, sp.out, hidden=probes)
    for _, g in batched_vjp(sp, cot, chunk_elements):
        rows = g.to(torch.float64).reshape(-1, d)
        M += rows.T @ rows
    if probes is not None:
        M /= probes.shape[0]
    return M


def rademacher(n_sources: int, batch: int, positions: int, generator: torch.Generator,
               hidden: int | None = None) -> torch.Tensor:
    """(S, B, T) independent ±1 entries, or (S, B, T, hidden) to probe hidden units as well.

    Drawn on the CPU from ``generator`` (the same probes on every device); callers move them to the data."""
    shape = (n_sources, batch, positions) + (() if hidden is None else (hidden,))
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).double()


__all__ = [
    "INTEGRATION_RULES", "OUTPUT", "Cotangents", "PositionSources", "SectionPass", "as_positions", "batched_vjp",
    "edges_for_batch", "integration_rule", "jacobian_gram_for_batch", "output_dependence", "position_groups",
    "rademacher", "section_forward",
]
