"""Edge-ablation sparsity in the PCA basis (opt-in: ``MeasureOptions.edge_ablation``): Σ_l n*_l / Σ_l N_l,
n*_l the fewest top-weight edges of section l whose retention, the other edges ablated in the PCA
basis (mean ablation, or zero with ``edge_ablation_mode="zero"``), keeps the accuracy on the test
subset within ``edge_ablation_tolerance`` of the unablated model (bisection; evaluation.metrics.edge_ablation).
Lower: fewer interactions carry the task."""

from evaluation.compare.metrics._edge_ablation import EDGE_ABLATION_OPTIONS, edge_ablation_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class EdgeAblationPCA(CompareMetric):
    name = "edge_ablation_pca"
    label = "PCA edges kept"
    higher_is_better = False
    description = "fraction of PCA edges whose retention (the rest ablated) keeps accuracy within tolerance"
    version = 1
    options = EDGE_ABLATION_OPTIONS
    switch = "edge_ablation"
    order = 91

    def measure(self, ctx):
        return edge_ablation_measurement(ctx, "pca")
