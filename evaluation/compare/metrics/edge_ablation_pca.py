"""Edge-ablation sparsity in the PCA basis (opt-in: ``MeasureOptions.edge_ablation``): Σ_l n*_l,
n*_l the fewest top-weight edges of section l whose retention, the other edges ablated in the PCA
basis (mean ablation, or zero with ``edge_ablation_mode="zero"``), keeps the accuracy on the test
subset within ``edge_ablation_tolerance`` of the unablated model (bisection; evaluation.metrics.edge_ablation).
A count, not a fraction: the number of candidate edges N_l depends on the basis's truncation, which
a regularizer moves (the fraction Σ n*_l / Σ N_l is in the details). Lower: fewer interactions
carry the task."""

from evaluation.compare.metrics._edge_ablation import EDGE_ABLATION_OPTIONS, edge_ablation_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class EdgeAblationPCA(CompareMetric):
    name = "edge_ablation_pca"
    label = "PCA edges kept"
    higher_is_better = False
    description = "fewest top PCA edges whose retention (the rest ablated) keeps accuracy within tolerance"
    version = 1
    options = EDGE_ABLATION_OPTIONS
    switch = "edge_ablation"
    order = 91

    def measure(self, ctx):
        return edge_ablation_measurement(ctx, "pca")
