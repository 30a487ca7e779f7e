"""Circuit size by pruning with zero ablation (opt-in: ``MeasureOptions.circuit_zero``): as
circuit_nodes, the pruned nodes set to 0 instead of their mean activation — the replication of Gao
et al. (2025) found smaller circuits this way, so the study reports both. Lower: a smaller circuit."""

from evaluation.compare.metrics._circuit import CIRCUIT_OPTIONS_ADDED, CIRCUIT_ZERO_OPTIONS, circuit_result
from evaluation.compare.metrics.base import CompareMetric, register


@register
class CircuitNodesZero(CompareMetric):
    name = "circuit_nodes_zero"
    label = "circuit nodes (zero abl.)"
    higher_is_better = False
    description = "fewest nodes keeping the loss within delta, pruned nodes zeroed (pruning)"
    version = 1
    options = CIRCUIT_ZERO_OPTIONS
    options_added = CIRCUIT_OPTIONS_ADDED
    switch = "circuit_zero"
    order = 82

    def measure(self, ctx):
        return float(circuit_result(ctx, "zero").nodes_kept)
