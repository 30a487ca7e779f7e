"""Circuit size by pruning (opt-in: ``MeasureOptions.circuit``): the fewest nodes — MLP neurons,
attention heads, residual-stream channels — whose hard gates keep the task loss on the test subset
≤ the full model's + δ, the others mean-ablated (``circuit_ablation="zero"``: zeroed);
evaluation.metrics.circuit. Lower: a smaller circuit does the task."""

from evaluation.compare.metrics._circuit import CIRCUIT_OPTIONS, CIRCUIT_OPTIONS_ADDED, circuit_result
from evaluation.compare.metrics.base import CompareMetric, register


@register
class CircuitNodes(CompareMetric):
    name = "circuit_nodes"
    label = "circuit nodes"
    higher_is_better = False
    description = "fewest nodes (neurons, heads, residual channels) keeping the loss within delta (pruning)"
    version = 1
    options = CIRCUIT_OPTIONS
    options_added = CIRCUIT_OPTIONS_ADDED
    switch = "circuit"
    order = 80

    def measure(self, ctx):
        return float(circuit_result(ctx).nodes_kept)
