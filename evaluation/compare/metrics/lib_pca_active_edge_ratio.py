"""LIB's interaction sparsity relative to PCA's, among the features in use:

    ratio = lib_active_edge_fraction_90 / pca_active_edge_fraction_90

Below 1: among the features that carry 99 % of ∑Λ (LIB) or of the variance (PCA), LIB's graph is
sparser. PCA usually keeps more directions for 99 % of its variance, so the two fractions have
different denominators: read the ratio beside both. None when the PCA fraction is 0 or undefined."""

from evaluation.compare.metrics._edges import active_edge_fraction_90
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class LIBPCAActiveEdgeRatio(CompareMetric):
    name = "lib_pca_active_edge_ratio"
    label = "LIB / PCA active edges"
    higher_is_better = False
    description = "LIB active edges for 90 % divided by PCA's (below 1: LIB sparser among the features in use)"
    version = 1
    options = LIB_OPTIONS
    order = 23

    def measure(self, ctx):
        lib, pca = active_edge_fraction_90(ctx.lib_summary, "lib"), active_edge_fraction_90(ctx.lib_summary, "pca")
        return None if lib is None or not pca else lib / pca
