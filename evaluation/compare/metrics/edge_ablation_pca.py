"""Edge-ablation sparsity in the PCA basis (opt-in: ``MeasureOptions.edge_ablation``); the
definition, Σ_l n*_l, is in evaluation.compare.metrics._edge_ablation."""

from evaluation.compare.metrics._edge_ablation import EDGE_ABLATION_OPTIONS, edge_ablation_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class EdgeAblationPCA(CompareMetric):
    name = "edge_ablation_pca"
    label = "PCA edges kept"
    higher_is_better = False
    description = "fewest top PCA edges whose retention (the rest ablated) keeps accuracy within tolerance"
    version = 2  # 2: an image or feature-map node layer is one position of all its units
    options = EDGE_ABLATION_OPTIONS
    switch = "edge_ablation"
    order = 91

    def measure(self, ctx):
        return edge_ablation_measurement(ctx, "pca")
