"""Edge-ablation sparsity in the LIB basis (opt-in: ``MeasureOptions.edge_ablation``); the
definition, Σ_l n*_l, is in evaluation.compare.metrics._edge_ablation."""

from evaluation.compare.metrics._edge_ablation import EDGE_ABLATION_OPTIONS, edge_ablation_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class EdgeAblationLIB(CompareMetric):
    name = "edge_ablation_lib"
    label = "LIB edges kept"
    higher_is_better = False
    description = "fewest top LIB edges whose retention (the rest ablated) keeps accuracy within tolerance"
    version = 2  # 2: an image or feature-map node layer is one position of all its units
    options = EDGE_ABLATION_OPTIONS
    switch = "edge_ablation"
    order = 90

    def measure(self, ctx):
        return edge_ablation_measurement(ctx, "lib")
