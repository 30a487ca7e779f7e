"""Modularity: Louvain modularity Q (γ = 1, networkx) of the LIB interaction graph (weights
log10(E/ε)⁺, evaluation.metrics.graph). Higher: the graph splits into more separate modules.
Undefined (None) with fewer than 3 node layers."""

from evaluation.compare.context import finite_or_none
from evaluation.compare.metrics.base import CompareMetric, Measurement, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class Modularity(CompareMetric):
    name = "modularity_q"
    label = "modularity Q"
    higher_is_better = True
    description = "Louvain modularity (γ = 1) of the LIB interaction graph"
    version = 3  # 2: default node layers at the last position for one target per sequence; 3: an image or
    # feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 40

    def measure(self, ctx):
        q = ctx.lib_summary.get("modularity", {}).get("lib", {}).get("gamma_1.0", {}).get("Q")
        notes = ["modularity needs at least 3 node layers"] if len(ctx.node_layers) < 3 else []
        return Measurement(finite_or_none(q), notes=notes)
