"""Shared by lib_edges, pca_edges and neuron_edges: the fraction of edges holding 90 % of the edge weight."""


def edge_fraction_90(summary: dict, side: str) -> float | None:
    """∑_l n90_l / ∑_l N_l over the edge layers, in basis ``side`` ("lib", "pca" or "neuron")."""
    n90 = sum(e[side]["edges_90"] for e in summary["edges"].values())
    total = sum(e[side]["n_edges"] for e in summary["edges"].values())
    return n90 / total if total else None
