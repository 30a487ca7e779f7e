"""Shared by the edge-fraction metrics: the fraction of edges holding 90 % of the edge weight,
over all edges or over the active ones (docs/DESIGN.md §5.1)."""


def edge_fraction_90(summary: dict, side: str) -> float | None:
    """∑_l n90_l / ∑_l N_l over the edge layers, in basis ``side`` ("lib", "pca" or "neuron")."""
    n90 = sum(e[side]["edges_90"] for e in summary["edges"].values())
    total = sum(e[side]["n_edges"] for e in summary["edges"].values())
    return n90 / total if total else None


def active_edge_fraction_90(summary: dict, side: str) -> float | None:
    """∑_l n90_active_l / ∑_l N_active_l: the same among the edges between each layer's features for
    99 % of its ∑Λ (variance for PCA); ``side`` "lib" or "pca" (``lib_summary.active_edge_stats``)."""
    if any("active" not in e[side] for e in summary["edges"].values()):
        raise ValueError(f"the {side} edges do not match the sizes of their layers' bases, so they have no "
                         f"active-edge statistics: {sorted(summary['edges'])}")
    active = [e[side]["active"] for e in summary["edges"].values()]
    total = sum(a["n_edges"] for a in active)
    return sum(a["edges_90"] for a in active) / total if total else None


def active_edge_measurement(summary: dict, side: str):
    """``active_edge_fraction_90`` with details {"<side>_active_edges": {input layer: {n_in, n_out,
    n_edges, edges_90, fraction_90}}}: where in the network it comes from (one key per side: a run's
    details are merged)."""
    from evaluation.compare.metrics.base import Measurement

    return Measurement(active_edge_fraction_90(summary, side),
                       details={f"{side}_active_edges": {layer: e[side]["active"] for layer, e in summary["edges"].items()}})
