"""The interaction graph of a LIB (or PCA) fit and its modularity (docs/DESIGN.md §5.2).

Nodes are the features of every non-output node layer, named ``"<layer>:<index>"``, with
attributes ``layer`` (name), ``layer_index`` (position in the node-layer list) and ``index``
(feature index; 0 is the constant feature, left out by default because it talks to every
feature and would glue all communities together). Edges join adjacent layers with weight
w_ij = max(0, log10(E_ij / ε_l)); edges with w = 0 are not added.

ε_l, per edge layer: keep the largest edges until they hold ``keep_fraction`` (default 99 %)
of the layer's total edge weight; ε_l is the largest weight that is *dropped*, so every kept
edge has w > 0 and every dropped one w = 0. If only zero edges are dropped, ε_l is half the
smallest kept edge.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import networkx as nx
import numpy as np
import torch
from networkx.algorithms.community import louvain_communities
from networkx.algorithms.community import modularity as nx_modularity


def _as_array(E) -> np.ndarray:
    if isinstance(E, torch.Tensor):
        E = E.detach().cpu().double().numpy()
    E = np.asarray(E, dtype=np.float64)
    if E.ndim != 2:
        raise ValueError(f"an edge matrix must be 2-D (k_out, k_in), got shape {E.shape}")
    return E


def node_id(layer: str, index: int) -> str:
    return f"{layer}:{index}"


def edge_threshold(E, keep_fraction: float = 0.99, exclude_constant: bool = True) -> float:
    """ε: the largest edge weight dropped when keeping the fewest largest edges that hold
    ``keep_fraction`` of ∑E (constant row/column excluded); half the smallest kept edge if only
    zero edges are dropped."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    E = _as_array(E)
    if exclude_constant:
        E = E[1:, 1:]
    values = np.sort(E.ravel())[::-1]
    total = values.sum()
    if values.size == 0 or total <= 0:
        return float("inf")
    n_keep = int(np.searchsorted(np.cumsum(values), keep_fraction * total * (1 - 1e-12))) + 1
    n_keep = min(n_keep, values.size)
    if n_keep < values.size and values[n_keep] > 0:
        return float(values[n_keep])
    return float(values[n_keep - 1] / 2)  # nothing (non-zero) to drop: half the smallest kept edge


def interaction_graph(
    edges: Mapping[str, object],
    layers: Sequence[str],
    keep_fraction: float = 0.99,
    thresholds: Mapping[str, float] | None = None,
    exclude_constant: bool = True,
) -> nx.Graph:
    """Graph over the features of ``layers[:-1]`` (the last layer is the output and left out).

    edges[layers[l]] is E of shape (k_{l+1}, k_l) for the section from layers[l] to layers[l+1].
    thresholds: ε per edge layer (overrides ``keep_fraction``). Graph attribute ``epsilon``
    records the ε used per edge layer.
    """
    layers = list(layers)
    if len(layers) < 2:
        raise ValueError(f"need at least two node layers (the last is the output), got {layers}")
    missing = [l for l in layers[:-1] if l not in edges]
    if missing:
        raise KeyError(f"no edges for node layer(s) {missing}; edges are given for {sorted(edges)}")
    G = nx.Graph()
    G.graph["epsilon"] = {}
    start = 1 if exclude_constant else 0
    for li, layer in enumerate(layers[:-1]):
        k = _as_array(edges[layer]).shape[1]
        for j in range(start, k):
            G.add_node(node_id(layer, j), layer=layer, layer_index=li, index=j)
    for li in range(len(layers) - 2):  # sections between non-output layers
        layer, nxt = layers[li], layers[li + 1]
        E = _as_array(edges[layer])
        eps = thresholds[layer] if thresholds and layer in thresholds else edge_threshold(E, keep_fraction,
                                                                                          exclude_constant)
        G.graph["epsilon"][layer] = float(eps)
        with np.errstate(divide="ignore"):
            W = np.log10(E / eps)
        for i, j in zip(*np.nonzero(W > 0)):
            if exclude_constant and (i == 0 or j == 0):
                continue
            G.add_edge(node_id(layer, int(j)), node_id(nxt, int(i)), weight=float(W[i, j]))
    return G


def modularity(G: nx.Graph, resolution: float = 1.0, seed: int = 0) -> tuple[float, list[set]]:
    """Louvain communities (networkx, ``seed`` fixed) and their modularity Q at ``resolution`` γ:

    Q = (1/2m) ∑_ij (A_ij − γ k_i k_j / 2m) δ(c_i, c_j), A the weighted adjacency.
    Q is NaN for a graph without edges. Communities are sorted by size (largest first).
    """
    if G.number_of_edges() == 0 or G.size(weight="weight") <= 0:
        return float("nan"), [{n} for n in G.nodes]
    communities = louvain_communities(G, weight="weight", resolution=resolution, seed=seed)
    communities = sorted((set(c) for c in communities), key=lambda c: (-len(c), sorted(c)))
    Q = nx_modularity(G, communities, weight="weight", resolution=resolution)
    return float(Q), communities


def set_communities(G: nx.Graph, communities: Sequence[set]) -> None:
    """Writes node attribute ``community`` (index into ``communities``)."""
    for ci, members in enumerate(communities):
        for n in members:
            G.nodes[n]["community"] = ci


def write_graphml(G: nx.Graph, path) -> None:
    """GraphML with node attributes layer, layer_index, index, community (if set) and edge weight."""
    H = G.copy()
    H.graph = {}  # graph-level dicts (epsilon) are not GraphML-serialisable
    nx.write_graphml(H, str(path))
