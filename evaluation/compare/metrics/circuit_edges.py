"""Edges of the pruned circuit (opt-in: ``MeasureOptions.circuit``; see circuit_nodes): non-zero
weights between kept nodes (evaluation.metrics.circuit.count_edges); None for model layouts other
than TransformerLens models and MLPs. Lower: a sparser circuit."""

from evaluation.compare.metrics._circuit import CIRCUIT_OPTIONS, CIRCUIT_OPTIONS_ADDED, circuit_result
from evaluation.compare.metrics.base import CompareMetric, register


@register
class CircuitEdges(CompareMetric):
    name = "circuit_edges"
    label = "circuit edges"
    higher_is_better = False
    description = "non-zero weights between the pruned circuit's nodes"
    version = 1
    options = CIRCUIT_OPTIONS
    options_added = CIRCUIT_OPTIONS_ADDED
    switch = "circuit"
    order = 81

    def measure(self, ctx):
        edges = circuit_result(ctx).edges
        return None if edges is None else float(edges)
