"""Measurements of a LIB / PCA fit (docs/DESIGN.md §5.1–§5.3): feature counts, edge sparsity,
Gini coefficient, modularity, node ablation.

Conventions: every ``LayerBasis`` has the constant (bias) feature at index 0; edge matrices E
have shape (k_out, k_in) with the constant feature at row 0 / column 0. The constant feature
is excluded from counts by default: it carries the mean, not a computed direction.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from evaluation.metrics.graph import interaction_graph, modularity

FRACTIONS = (0.9, 0.99)
RESOLUTIONS = (0.5, 1.0)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_frac(frac: float) -> None:
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")


# negative entries this small relative to the largest are float roundoff of a quantity that is >= 0
ROUNDOFF = 1e-9


def nonnegative(values: np.ndarray) -> np.ndarray:
    """``values`` (edge weights, sums of squares; or Λ, eigenvalues of a PSD matrix) with roundoff
    below zero set to 0; raises for a negative beyond ROUNDOFF × the largest (an edge weight of
    -6e-28 next to 1e-12 was seen on a collapsed model)."""
    if values.size and values.min() < -ROUNDOFF * max(values.max(), 0.0):
        raise ValueError(f"weights must be >= 0, got a minimum of {values.min():g} (largest {values.max():g})")
    return np.maximum(values, 0.0)


def _count_for_fraction(values: np.ndarray, frac: float) -> int:
    """Smallest n with (sum of the n largest values) >= frac * sum(values)."""
    values = np.sort(values.ravel())[::-1]
    if values.size == 0:
        return 0
    values = nonnegative(values)
    total = values.sum()
    if total <= 0:
        return 0
    # relative slack so that frac = 1 is reached despite rounding in the cumulative sum
    return min(int(np.searchsorted(np.cumsum(values), frac * total * (1 - 1e-12))) + 1, values.size)


def feature_count(Lambda, frac: float = 0.99, exclude_constant: bool = True) -> int:
    """n_frac = min{n : ∑_{j≤n} λ_(j) ≥ frac · ∑_j λ_j}, λ_(1) ≥ λ_(2) ≥ ... the non-constant
    eigenvalues (LIB: Λ; PCA: variances). ``exclude_constant`` drops Λ[0], the constant feature."""
    _check_frac(frac)
    lam = _np(Lambda).ravel()
    return _count_for_fraction(lam[1:] if exclude_constant else lam, frac)


def edges_for_fraction(E, frac: float, exclude_constant: bool = True) -> tuple[int, float]:
    """(n, n / N): the fewest edges n whose weights sum to ≥ frac · ∑_ij E_ij, N the number of
    edges considered. With ``exclude_constant`` row 0 and column 0 (edges to/from the constant
    node) are left out of both the sum and N."""
    _check_frac(frac)
    E = _np(E)
    if E.ndim != 2:
        raise ValueError(f"an edge matrix must be 2-D (k_out, k_in), got shape {E.shape}")
    if exclude_constant:
        E = E[1:, 1:]
    n = _count_for_fraction(E, frac)
    return n, (n / E.size if E.size else float("nan"))


def gini(E, exclude_constant: bool = False) -> float:
    """Gini coefficient of the entries x_1 ≤ ... ≤ x_n of E (sorted ascending):
    G = ∑_i (2i − n − 1) x_i / (n ∑_i x_i). 0 for equal weights, 1 − 1/n for a single non-zero."""
    E = _np(E)
    if exclude_constant:
        E = E[1:, 1:]
    x = np.sort(E.ravel())
    n = x.size
    if n == 0 or x.sum() <= 0:
        return float("nan")
    x = nonnegative(x)
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def _edge_stats(E) -> dict:
    out = {"n_edges": int((_np(E).shape[0] - 1) * (_np(E).shape[1] - 1)),
           "total_weight": float(_np(E)[1:, 1:].sum()), "gini": gini(E, exclude_constant=True)}
    for frac in FRACTIONS:
        n, f = edges_for_fraction(E, frac)
        out[f"edges_{round(frac * 100)}"] = n
        out[f"fraction_{round(frac * 100)}"] = f
    return out


def top_features(Lambda, frac: float = 0.99) -> np.ndarray:
    """Indices (into Λ, so ≥ 1) of the fewest non-constant features holding ``frac`` of their ∑Λ,
    largest Λ first: the features a layer's computation uses (docs/DESIGN.md §5.1, active edges)."""
    lam = _np(Lambda).ravel()[1:]
    order = np.argsort(-lam, kind="stable")
    return 1 + order[:_count_for_fraction(lam, frac)]


def active_edge_stats(E, Lambda_in, Lambda_out=None, frac: float = 0.99) -> dict:
    """Edges for 90 % of the weight among the *active* edges only: those between the input layer's
    features holding ``frac`` of its ∑Λ and the output layer's (every output feature when
    ``Lambda_out`` is None: the last node layer is the function's output, not a fitted basis).

        n90_active = edges_for_fraction(E[K_out, K_in], 0.9),  N_active = |K_out|·|K_in|

    Unlike the fraction over all edges, this does not fall when a layer's activations occupy fewer
    directions (a collapsed rank leaves fewer active features, not sparser interactions among them).
    {"n_in", "n_out", "n_edges", "edges_90", "fraction_90"}."""
    E = _np(E)
    n_in, n_out = _np(Lambda_in).size, None if Lambda_out is None else _np(Lambda_out).size
    if E.ndim != 2 or E.shape[1] != n_in or (n_out is not None and E.shape[0] != n_out):
        raise ValueError(f"edge matrix of shape {E.shape} does not match Λ of sizes "
                         f"{'(any)' if n_out is None else n_out} (out) and {n_in} (in)")
    k_in = top_features(Lambda_in, frac)
    k_out = np.arange(1, E.shape[0]) if Lambda_out is None else top_features(Lambda_out, frac)
    sub = E[np.ix_(k_out, k_in)]
    n = _count_for_fraction(sub, 0.9)
    return {"n_in": int(k_in.size), "n_out": int(k_out.size), "n_edges": int(sub.size), "edges_90": n,
            "fraction_90": n / sub.size if sub.size else float("nan")}


def _matches(E, basis_in, basis_out) -> bool:
    """Whether E (k_out, k_in) joins these two bases; a fit's always do, a hand-built result's
    (tests, a caller's own edges) need not, and then has no active-edge statistics."""
    return (basis_in is not None and basis_out is not None
            and tuple(_np(E).shape) == (_np(basis_out.Lambda).size, _np(basis_in.Lambda).size))


def active_edges(result, frac: float = 0.99) -> dict:
    """{"lib" | "pca": {input layer: active_edge_stats}} of a fit, with the features for ``frac`` of
    each layer's ΣΛ (variance for PCA) and every output feature at the last node layer; sections
    whose edges do not join their two bases (``_matches``) are left out."""
    layers, sides = list(result.node_layers), named_edges(result)
    return {side: {a: active_edge_stats(sides[side][a], bases[a].Lambda,
                                        None if b == layers[-1] else bases[b].Lambda, frac)
                   for a, b in zip(layers[:-1], layers[1:])
                   if a in sides[side] and _matches(sides[side][a], bases.get(a), bases.get(b))}
            for side, bases in (("lib", result.lib), ("pca", result.pca))}


def _layer_stats(basis) -> dict:
    lam = _np(basis.Lambda)
    return {"n_features": int(lam.size - 1), "sum_Lambda": float(lam[1:].sum()),
            "features_99": feature_count(lam, 0.99), "features_90": feature_count(lam, 0.9)}


def _modularity_stats(edges, layers, seed: int, graphs: dict | None = None, side: str = "") -> dict:
    G = interaction_graph(edges, layers)
    out = {}
    for gamma in RESOLUTIONS:
        Q, communities = modularity(G, resolution=gamma, seed=seed)
        if graphs is not None and gamma == 1.0:
            graphs[side] = (G, communities)
        out[f"gamma_{gamma}"] = {"Q": None if math.isnan(Q) else Q, "n_communities": len(communities),
                                 "community_sizes": [len(c) for c in communities]}
    return out


def named_edges(result) -> dict:
    """{basis name: {input layer: E}} of a fit: ``result.edges`` (lib, pca and, where computed,
    neuron), or lib and pca for a result without named edges."""
    edges = getattr(result, "edges", None)
    return dict(edges) if edges else {"lib": result.lib_edges, "pca": result.pca_edges}


def summarize(result, seed: int = 0, graphs: dict | None = None) -> dict:
    """Per node layer, per edge layer and for the whole graph, in each named basis (LIB, PCA and,
    where the fit computed its edges, the neuron basis, C = I):

    {"layers": {layer: {"lib": {n_features, sum_Lambda, features_90, features_99}, "pca": ...}},
     "edges": {input_layer: {"lib": {n_edges, total_weight, gini, edges_90, fraction_90,
                                     edges_99, fraction_99, active: active_edge_stats},
                             "pca": ..., "neuron": ... (no "active")}},
     "modularity": {"lib": {"gamma_0.5": {Q, n_communities, community_sizes}, "gamma_1.0": ...},
                    "pca": ..., "neuron": ...}}
    (Q is None where the graph has no edges.)
    graphs: if given, filled with {basis name: (interaction graph, its Louvain communities at γ = 1)}
    for a caller that writes them (evaluation.lib.report), so they are not computed twice.
    """
    layers = list(result.node_layers)
    sides = named_edges(result)
    summary = {"node_layers": layers, "layers": {}, "edges": {}, "modularity": {}}
    for layer in layers:
        if layer in result.lib:
            summary["layers"][layer] = {"lib": _layer_stats(result.lib[layer]),
                                        "pca": _layer_stats(result.pca[layer])}
    for layer in layers[:-1]:
        if layer in sides["lib"]:
            summary["edges"][layer] = {side: _edge_stats(edges[layer]) for side, edges in sides.items()}
    for side, per_layer in active_edges(result).items():
        for layer, stats in per_layer.items():
            if layer in summary["edges"]:
                summary["edges"][layer][side]["active"] = stats
    if len(layers) >= 3:  # the graph needs one section between non-output layers
        for side, edges in sides.items():
            summary["modularity"][side] = _modularity_stats(edges, layers, seed, graphs, side)
    return summary


def edge_table(summary: dict) -> str:
    """Per edge layer, the edges holding 90 % of the edge weight in each basis, as text lines
    (and among the active edges, between the features for 99 % of ΣΛ, where computed)."""
    rows = []
    for layer, sides in summary["edges"].items():
        cells = [f"{side.upper()} {e['edges_90']}/{e['n_edges']}"
                 + (f" (active {e['active']['edges_90']}/{e['active']['n_edges']})" if "active" in e else "")
                 for side, e in sides.items()]
        rows.append(f"  {layer}: edges for 90 %: " + ", ".join(cells))
    return "\n".join(rows)


# ---------------------------------------------------------------- node ablation


def project_top_k(activation: torch.Tensor, basis, k: int) -> torch.Tensor:
    """Keeps the constant feature and the k non-constant features with largest Λ:

    a ↦ [(f_aug C_K) C⁺_K]_{1:}, f_aug = (1, a), K = {0} ∪ top-k, columns of C / rows of C⁺.
    The dropped features are set to their mean, which is 0 because every non-constant feature
    is centred (f_aug carries the mean through the constant feature); so this is mean ablation.
    """
    C = torch.as_tensor(basis.C, dtype=torch.float64)
    C_pinv = torch.as_tensor(basis.C_pinv, dtype=torch.float64)
    lam = torch.as_tensor(basis.Lambda, dtype=torch.float64)
    n = lam.numel() - 1
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the number of non-constant features), got {k}")
    order = 1 + torch.argsort(lam[1:], descending=True)
    keep = torch.cat([torch.zeros(1, dtype=torch.long, device=order.device), order[:k]])
    a = activation.to(torch.float64)
    f_aug = torch.cat([torch.ones(*a.shape[:-1], 1, dtype=torch.float64, device=a.device), a], dim=-1)
    recon = (f_aug @ C[:, keep].to(a.device)) @ C_pinv[keep].to(a.device)
    return recon[..., 1:].to(activation.dtype)


def _batches(data) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    return data


def node_ablation_curve(model, data, result, layer: str, ks: Sequence[int], basis: str = "lib",
                        metric: str = "accuracy") -> list[float]:
    """metric(k) for each k in ``ks`` when the activation at ``layer`` is replaced by its
    projection onto the constant + top-k features (``project_top_k``).

    data: (inputs, targets) or an iterable of such batches. metric "accuracy": fraction of
    correct argmax predictions; "loss": mean cross-entropy (per-example mean over positions;
    (B,) targets with (B, T, C) outputs are read at the last position, as in interp_train.losses).
    """
    from evaluation.lib.positions import insert, select, site_of
    from interp_train.losses import per_example_cross_entropy
    from interp_train.sites import run_model

    if basis not in ("lib", "pca"):
        raise ValueError(f"basis must be 'lib' or 'pca', got {basis!r}")
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    bases = result.lib if basis == "lib" else result.pca
    if layer not in bases:
        raise KeyError(f"no {basis} basis for layer {layer!r}; fitted layers: {sorted(bases)}")
    b = bases[layer]
    site = site_of(layer)  # a position-indexed layer is projected at its position only
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    values = []
    with torch.no_grad():
        for k in ks:
            total, count = 0.0, 0
            for inputs, targets in _batches(data):
                inputs, targets = inputs.to(device), targets.to(device)
                edit = {site: lambda a, k=k: insert(layer, a, project_top_k(select(layer, a), b, k))}
                out = run_model(model, inputs, edit=edit).output
                if metric == "loss":
                    per_example = per_example_cross_entropy(out, targets)
                    total += float(per_example.sum())
                    count += per_example.numel()
                else:
                    logits = out[:, -1] if out.ndim == 3 and targets.ndim == 1 else out
                    correct = (logits.argmax(-1) == targets).double()
                    total += float(correct.sum())
                    count += correct.numel()
            values.append(total / max(count, 1))
    return values
