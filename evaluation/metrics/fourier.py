"""Fourier content of features of a modular-addition transformer (inputs ``a b =``, docs/DESIGN.md §5.7).

A feature at a node layer (a column of a basis C, or any direction) is evaluated on ALL p² inputs
(a, b) at chosen token positions, giving values v_s(a, b) per position s. With the mean over the
p² inputs removed per position (the position offset is not a function of the inputs), v is
regressed on the Fourier basis

    φ_{t,k}^{cos}(a, b) = cos(2π k x_t / p),  φ_{t,k}^{sin}(a, b) = sin(2π k x_t / p),
    x_t ∈ {a, b, a + b} (``TERMS``),  k = 1 .. ⌊(p − 1)/2⌋.

For 1 ≤ k, k′ ≤ ⌊(p − 1)/2⌋ these functions are mutually orthogonal over the p² grid, each with
squared norm p²/2 (a sum over a full period of a non-zero frequency vanishes), so the regression
is a projection: with unit-norm φ̂ = φ / ‖φ‖,

    E_{k,t} = ∑_s ∑_{trig ∈ {cos, sin}} ⟨v_s − mean v_s, φ̂_{t,k}^{trig}⟩²,
    frac_k  = ∑_t E_{k,t} / ∑_s ‖v_s − mean v_s‖²,

and the fraction of variance explained by the best K frequencies (all three terms of each) is
the sum of the K largest frac_k (exact R² of the least-squares fit on those 6K functions).
Other content, e.g. cos(k(a − b)) from products cos(ka)·cos(kb), counts as unexplained.

Positions (``default_positions``): the answer is read at the last position ('='), used for every
layer except the first block's ``resid_pre`` (embeddings), where the last position is the constant
'=' token and the operands a and b sit at positions 0 and 1; there both are pooled (position 0
varies with a only, position 1 with b only). LIB/PCA bases are fitted over all positions pooled,
so ``variance_share`` reports which part of a feature's variance over inputs AND positions lies in
the input-dependent variance at the chosen positions (a direction that only separates positions
has share ≈ 0 and an undefined Fourier fraction: NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from interp_train.data.modular import modular_addition_table
from interp_train.sites import eval_mode, run_model

TERMS = ("a", "b", "a+b")
_TERM_FUNCTIONS = {"a": lambda a, b: a, "b": lambda a, b: b, "a+b": lambda a, b: a + b, "a-b": lambda a, b: a - b}


def _check_p(p) -> None:
    if not isinstance(p, int) or isinstance(p, bool) or p < 3:
        raise ValueError(f"p must be an integer >= 3 (at least one non-zero frequency), got {p!r}")


def frequencies(p: int) -> Tensor:
    """k = 1 .. ⌊(p − 1)/2⌋ (the distinct non-zero frequencies with orthogonal cos and sin)."""
    _check_p(p)
    return torch.arange(1, (p - 1) // 2 + 1)


def fourier_design(p: int, terms: Sequence[str] = TERMS) -> Tensor:
    """Unit-norm basis functions on the p² grid (row a·p + b, the order of modular_addition_table):
    shape (p², F, len(terms), 2), [..., 0] = cos(2π k x_t / p) / ‖·‖, [..., 1] = sin(...) / ‖·‖."""
    ks = frequencies(p).to(torch.float64)
    unknown = [t for t in terms if t not in _TERM_FUNCTIONS]
    if unknown or not terms:
        raise ValueError(f"unknown Fourier terms {unknown or terms!r}; allowed: {', '.join(_TERM_FUNCTIONS)}")
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    cols = []
    for t in terms:
        angle = 2 * math.pi * torch.outer(_TERM_FUNCTIONS[t](a, b), ks) / p  # (p², F)
        cols.append(torch.stack([angle.cos(), angle.sin()], dim=-1))
    return torch.stack(cols, dim=2) / math.sqrt(p * p / 2)


@dataclass
class FourierFit:
    """Per feature (row): frequencies sorted by explained fraction (best first), their fractions,
    the split of each over the terms, and the total (mean-removed) variance.

    frequencies: (n, F) int; fractions: (n, F) float64 (frac_k, descending);
    term_fractions: (n, F, len(terms)); variance: (n,) = ∑_s ‖v_s − mean v_s‖² / p².
    Fractions are NaN for a feature without variance.
    """

    terms: tuple[str, ...]
    frequencies: Tensor
    fractions: Tensor
    term_fractions: Tensor
    variance: Tensor

    def top_fraction(self, K: int) -> Tensor:
        """(n,) fraction of each feature's variance explained by its best K frequencies."""
        if not isinstance(K, int) or not 1 <= K <= self.fractions.shape[1]:
            raise ValueError(f"K must be an integer in [1, {self.fractions.shape[1]}], got {K!r}")
        return self.fractions[:, :K].sum(1)


def fourier_fractions(values: Tensor, p: int, terms: Sequence[str] = TERMS, rel_tol: float = 1e-20) -> FourierFit:
    """Fourier fit of features given by their values on all p² inputs.

    values: (p², n) — n features at one position — or (P, p², n) — pooled over P positions
    (energies and variances summed over positions). Row order a·p + b. A feature whose variance
    is ≤ rel_tol × (the largest variance) gets NaN fractions.
    """
    phi = fourier_design(p, terms)
    v = torch.as_tensor(values).to(torch.float64)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or v.shape[1] != p * p:
        raise ValueError(f"values must have shape (p², n) or (P, p², n) with p² = {p * p}, got {tuple(values.shape)}")
    v = v - v.mean(dim=1, keepdim=True)
    proj = torch.einsum("sxn,xftc->snftc", v, phi)
    energy = proj.pow(2).sum(dim=(0, 4))                 # (n, F, T)
    total = v.pow(2).sum(dim=(0, 1))                    # (n,)
    degenerate = total <= rel_tol * total.max().clamp_min(torch.finfo(torch.float64).tiny)
    safe = torch.where(degenerate, torch.ones_like(total), total)
    term_frac = energy / safe[:, None, None]
    frac = term_frac.sum(-1)
    frac, order = frac.sort(dim=1, descending=True)
    term_frac = torch.gather(term_frac, 1, order[..., None].expand_as(term_frac))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    frac = torch.where(degenerate[:, None], nan, frac)
    term_frac = torch.where(degenerate[:, None, None], nan, term_frac)
    return FourierFit(tuple(terms), frequencies(p)[order], frac, term_frac, total / (p * p))


# ---------------------------------------------------------------------------- model features


def default_positions(layer: str, n_ctx: int = 3) -> tuple[int, ...]:
    """(0, 1) for the embeddings ("blocks.0.hook_resid_pre", "hook_embed"), else (n_ctx − 1,)."""
    if layer in ("blocks.0.hook_resid_pre", "hook_embed"):
        return (0, 1)
    return (n_ctx - 1,)


def layer_activations(model: nn.Module, layer: str, p: int, batch_size: int = 4096) -> Tensor:
    """Activations (p², T, d) float64 of ``layer`` ("output" = logits) on all inputs (a, b, =)."""
    _check_p(p)
    tokens, _ = modular_addition_table(p)
    chunks = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            res = run_model(model, tokens[i:i + batch_size], record=[] if layer == "output" else [layer])
            chunks.append((res.output if layer == "output" else res.activations[layer]).to(torch.float64))
    act = torch.cat(chunks)
    if act.ndim != 3:
        raise ValueError(f"layer {layer!r} has activations of shape {tuple(act.shape)}; expected (batch, positions, d)")
    return act


def direction_values(act: Tensor, directions: Tensor, positions: Sequence[int]) -> Tensor:
    """Values (P, p², n) = act[:, s, :] @ directions for s in positions (act (p², T, d); directions
    (d, n), e.g. basis.C[1:, j] — the constant row of C only shifts a feature, which is removed)."""
    T = act.shape[1]
    bad = [s for s in positions if not -T <= s < T]
    if bad or not len(positions):
        raise ValueError(f"positions {list(positions)!r} must be non-empty indices into {T} token positions")
    return torch.stack([act[:, s, :] @ directions.to(torch.float64) for s in positions])


def variance_share(act: Tensor, directions: Tensor, positions: Sequence[int]) -> Tensor:
    """(n,) ∑_{s∈positions} Var_{a,b}(v_s) / (T · Var_{a,b,s}(v)): the part of a direction's
    variance (over inputs and all T positions, as in the LIB/PCA fit) found within the chosen
    positions. Sums to ≤ 1 over disjoint position sets; the rest is between-position variance."""
    all_vals = torch.einsum("xtd,dn->txn", act, directions.to(torch.float64))
    total = all_vals.reshape(-1, all_vals.shape[-1]).var(dim=0, unbiased=False)
    within = direction_values(act, directions, positions).var(dim=1, unbiased=False).sum(0)
    return within / (act.shape[1] * total)


def random_directions(d: int, n: int, seed: int = 0) -> Tensor:
    """(d, n) independent Gaussian directions, normalised to unit length (the chance baseline)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, n, generator=g, dtype=torch.float64)
    return u / u.norm(dim=0, keepdim=True)


def fourier_table(model: nn.Module, result, p: int, layers: Sequence[str] | None = None, n_top: int = 6,
                  Ks: Sequence[int] = (1, 2), n_random: int = 6, positions: dict | None = None, seed: int = 0,
                  terms: Sequence[str] = TERMS) -> dict:
    """Fourier fractions of the top ``n_top`` non-constant LIB and PCA features (by Λ / variance)
    and of ``n_random`` random directions, per node layer of a LIBResult (the final layer, left in
    the neuron basis, is skipped unless listed); ``terms`` as in fourier_fractions:

    {layer: {"positions": [...], "lib"|"pca"|"random": [{"index", "frequencies" (best 3),
             "top_K": fraction for K in Ks, "variance_share"}, ...]}}
    """
    layers = list(layers) if layers is not None else list(result.node_layers[:-1])
    n_ctx = getattr(model, "n_ctx", 3)
    out = {}
    for layer in layers:
        if layer not in result.lib:
            raise ValueError(f"layer {layer!r} is not a node layer of the fit; allowed: {result.node_layers}")
        pos = tuple((positions or {}).get(layer, default_positions(layer, n_ctx)))
        act = layer_activations(model, layer, p)
        entry = {"positions": list(pos)}
        candidates = {"lib": result.lib[layer].C[1:, 1:1 + n_top], "pca": result.pca[layer].C[1:, 1:1 + n_top],
                      "random": random_directions(act.shape[-1], n_random, seed)}
        for name, dirs in candidates.items():
            fit = fourier_fractions(direction_values(act, dirs, pos), p, terms)
            share = variance_share(act, dirs, pos)
            rows = []
            for j in range(dirs.shape[1]):
                row = {"index": j + (1 if name != "random" else 0), "frequencies": fit.frequencies[j, :3].tolist(),
                       "variance_share": float(share[j])}
                for K in Ks:
                    row[f"top_{K}"] = float(fit.top_fraction(K)[j])
                rows.append(row)
            entry[name] = rows
        out[layer] = entry
    return out


__all__ = ["TERMS", "FourierFit", "default_positions", "direction_values", "fourier_design", "fourier_fractions",
           "fourier_table", "frequencies", "layer_activations", "random_directions", "variance_share"]
