"""Figures for a LIB fit (matplotlib, Agg backend). Each function writes one PNG and returns its path.

Spectra and edge curves exclude the constant feature (index 0), as the metrics do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

LIB_COLOR, PCA_COLOR, NEURON_COLOR = "tab:blue", "tab:orange", "tab:green"
# Axes titles at y = 1 (just above the axes, the pad apart), where matplotlib's automatic placement
# puts them in these figures (nothing drawn above the axes: no top ticks or labels, no offset text).
# Given explicitly, matplotlib skips that placement, which measures every y tick label at each
# draw (the four report figures: 1.39 -> 1.29 s CPU, best of 6 under load); the PNGs are byte-identical.
TITLE_Y = 1.0


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _save(fig, path, tight: bool = True) -> Path:
    """tight: lay the figure out with ``tight_layout`` (one more text-measuring draw than the save;
    the panel grids place their axes themselves, see ``_grid``)."""
    path = Path(path)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(n: int, width: float = 4.2, height: float = 3.4, left: float = 1.0):
    """A figure of n panels, 3 a row, with fixed margins in inches (what ``tight_layout`` chooses for
    these panels: ``left`` for the y tick labels and label, room for a title above each panel and the
    figure's title) -- fixed so that saving needs no extra layout pass."""
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    W, H = width * cols, height * rows
    right, bottom, top, gap_w, gap_h = 0.15, 0.6, 0.66, left - 0.05, 0.8
    axis_w = (W - left - right - (cols - 1) * gap_w) / cols
    axis_h = (H - bottom - top - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(left=left / W, right=1 - right / W, bottom=bottom / H, top=1 - top / H,
                        wspace=gap_w / axis_w, hspace=gap_h / axis_h)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def plot_spectra(result, path) -> Path:
    """Per node layer: sorted LIB Λ_j / ∑Λ and PCA variance_j / ∑variance (log scale)."""
    layers = [l for l in result.node_layers if l in result.lib]
    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers):
        for side, bases, color in (("LIB Λ", result.lib, LIB_COLOR), ("PCA variance", result.pca, PCA_COLOR)):
            lam = np.sort(_np(bases[layer].Lambda)[1:])[::-1]
            if lam.size and lam.sum() > 0:
                ax.semilogy(np.arange(1, lam.size + 1), lam / lam.sum(), ".-", color=color, ms=3, label=side)
        same = result.lib[layer] is result.pca[layer]  # final layer: one shared (neuron / PCA) basis
        ax.set_title(f"{layer} (shared basis)" if same else layer, fontsize=10, y=TITLE_Y)
        ax.set_xlabel("direction (sorted)")
        ax.set_ylabel("share of total")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Spectra: LIB vs PCA")
    return _save(fig, path, tight=False)


def cumulative_edge_weight(E) -> np.ndarray:
    """c_n = (sum of the n largest non-constant edges) / (sum of all non-constant edges)."""
    values = np.sort(_np(E)[1:, 1:].ravel())[::-1]
    total = values.sum()
    return np.cumsum(values) / total if total > 0 else np.zeros_like(values)


def plot_edge_curves(result, path) -> Path:
    """Per edge layer: cumulative share of edge weight against the number of edges kept."""
    layers = [l for l in result.node_layers[:-1] if l in result.lib_edges]
    fig, axes = _grid(len(layers), left=0.7)  # linear y axis: narrower tick labels
    for ax, layer in zip(axes, layers):
        named = getattr(result, "edges", None) or {"lib": result.lib_edges, "pca": result.pca_edges}
        colors = {"lib": LIB_COLOR, "pca": PCA_COLOR, "neuron": NEURON_COLOR}
        for side, edges in named.items():
            side, color = side.upper(), colors.get(side, "grey")
            c = cumulative_edge_weight(edges[layer])
            ax.semilogx(np.arange(1, c.size + 1), c, color=color, label=side)
        for frac in (0.9, 0.99):
            ax.axhline(frac, color="grey", lw=0.7, ls="--")
        ax.set_title(f"edges out of {layer}", fontsize=10, y=TITLE_Y)
        ax.set_xlabel("number of edges (largest first)")
        ax.set_ylabel("share of total edge weight")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Interaction sparsity: LIB vs PCA" + (" vs neuron" if "neuron" in (getattr(result, "edges", None) or {})
                                                          else ""))
    return _save(fig, path, tight=False)


GREY = (0.82, 0.82, 0.82, 1.0)
N_COLOURED = 9  # distinct colours for the largest communities; the rest are grey


def graph_drawing(G, max_rank: int | None = None, edge_share: float = 0.9, max_edges: int = 300) -> dict:
    """What ``plot_interaction_graph`` draws: nodes (all, or index ≤ ``max_rank``), the strongest
    edges that carry ``edge_share`` of the total weight among them but at most ``max_edges`` (more
    is a hairball; ``share`` is the weight share actually drawn), and a colour per node —
    distinct for the ``N_COLOURED`` largest communities with at least 2 members (communities are
    numbered largest first, see evaluation.metrics.graph.modularity), grey for the rest."""
    nodes = [n for n, d in G.nodes(data=True) if max_rank is None or d["index"] <= max_rank]
    keep = set(nodes)
    edges = sorted(((u, v, float(w)) for u, v, w in G.edges(data="weight") if u in keep and v in keep),
                   key=lambda e: -e[2])
    total = sum(w for *_, w in edges)
    drawn, acc = [], 0.0
    for u, v, w in edges:
        if (total > 0 and acc >= edge_share * total) or len(drawn) >= max_edges:
            break
        drawn.append((u, v, w))
        acc += w
    sizes: dict[int, int] = {}
    for n in nodes:
        c = G.nodes[n].get("community")
        if c is not None:
            sizes[c] = sizes.get(c, 0) + 1
    coloured = [c for c in sorted(sizes, key=lambda c: (-sizes[c], c)) if sizes[c] >= 2][:N_COLOURED]
    cmap = plt.get_cmap("tab10")
    palette = [cmap(i) for i in range(10) if i != 7][:N_COLOURED]  # tab10's 7 is grey
    colour_of = {c: palette[i] for i, c in enumerate(coloured)}
    colours = {n: colour_of.get(G.nodes[n].get("community"), GREY) for n in nodes}
    return {"nodes": nodes, "edges": drawn, "n_edges": len(edges), "colours": colours,
            "share": acc / total if total > 0 else 0.0,
            "communities": [(c, sizes[c]) for c in coloured], "n_communities": len(sizes)}


def plot_interaction_graph(G, path, title: str = "interaction graph", order: str = "Λ",
                           max_rank: int | None = None, edge_share: float = 0.9, max_edges: int = 300) -> Path:
    """Nodes at x = node-layer position, y = feature index (0 = the largest by ``order``, after
    the constant), coloured by community (see ``graph_drawing``); the strongest edges carrying
    ``edge_share`` of the weight (at most ``max_edges``), opacity and width ∝ weight / max weight.
    The title says what was left out."""
    plan = graph_drawing(G, max_rank, edge_share, max_edges)
    nodes = plan["nodes"]
    pos = {n: (G.nodes[n]["layer_index"], G.nodes[n]["index"]) for n in nodes}
    layers = sorted({(d["layer_index"], d["layer"]) for _, d in G.nodes(data=True)})
    height = max(3.5, min(14.0, 0.06 * max((p[1] for p in pos.values()), default=1) + 2.5))
    fig, ax = plt.subplots(figsize=(2.5 + 2.2 * max(len(layers), 1), height))
    w_max = max((w for *_, w in plan["edges"]), default=1.0) or 1.0
    drawn = list(reversed(plan["edges"]))  # strongest drawn last, on top
    share = np.clip(np.array([w for *_, w in drawn]) / w_max, 0.05, 1.0)
    ax.add_collection(LineCollection([[pos[u], pos[v]] for u, v, _ in drawn], zorder=1, capstyle="projecting",
                                     colors=[(0.0, 0.0, 0.0, a) for a in share], linewidths=0.3 + 1.5 * share))
    grey = [n for n in nodes if plan["colours"][n] == GREY]
    ax.scatter([pos[n][0] for n in grey], [pos[n][1] for n in grey], s=10, c=[GREY], zorder=2, linewidths=0)
    for rank, (c, size) in enumerate(plan["communities"], 1):
        members = [n for n in nodes if G.nodes[n].get("community") == c]
        ax.scatter([pos[n][0] for n in members], [pos[n][1] for n in members], s=30, zorder=3,
                   color=plan["colours"][members[0]], edgecolors="k", linewidths=0.3,
                   label=f"community {rank} ({size})")
    ax.set_xticks([i for i, _ in layers], [name for _, name in layers], rotation=20, fontsize=8)
    ax.set_ylabel(f"feature index (sorted by {order}, 0 = largest)")
    ax.invert_yaxis()
    left_out = [] if max_rank is None else [f"features > {max_rank} not shown"]
    left_out.append(f"{len(plan['edges'])} strongest of {plan['n_edges']} edges ({plan['share']:.0%} of the weight)")
    others = plan["n_communities"] - len(plan["communities"])
    if others > 0:
        left_out.append(f"grey: {others} smaller communities")
    ax.set_title(f"{title}\n" + "; ".join(left_out), fontsize=9, y=TITLE_Y)
    if plan["communities"]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(fig, path)


def plot_ablation(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path, layer: str,
                  metric: str = "accuracy") -> Path:
    """metric against k (directions kept), one line per basis ("lib", "pca")."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    styles = {"lib": ("o-", LIB_COLOR, 5), "pca": ("s--", PCA_COLOR, 3)}  # distinct so overlaps stay visible
    for basis, (ks, values) in curves.items():
        fmt, color, ms = styles.get(basis, ("^-", None, 3))
        ax.plot(list(ks), list(values), fmt, ms=ms, color=color, label=basis.upper())
    ax.set_xlabel("directions kept (k)")
    ax.set_ylabel(metric)
    ax.set_title(f"node ablation at {layer}", fontsize=10, y=TITLE_Y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
