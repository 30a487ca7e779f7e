"""Edges of the zero-ablation pruned circuit (opt-in: ``MeasureOptions.circuit_zero``; see
circuit_nodes_zero and circuit_edges): non-zero weights between kept nodes. Lower: a sparser circuit."""

from evaluation.compare.metrics._circuit import CIRCUIT_OPTIONS_ADDED, CIRCUIT_ZERO_OPTIONS, circuit_result
from evaluation.compare.metrics.base import CompareMetric, register


@register
class CircuitEdgesZero(CompareMetric):
    name = "circuit_edges_zero"
    label = "circuit edges (zero abl.)"
    higher_is_better = False
    description = "non-zero weights between the zero-ablation pruned circuit's nodes"
    version = 1
    options = CIRCUIT_ZERO_OPTIONS
    options_added = CIRCUIT_OPTIONS_ADDED
    switch = "circuit_zero"
    order = 83

    def measure(self, ctx):
        edges = circuit_result(ctx, "zero").edges
        return None if edges is None else float(edges)
