"""Interaction sparsity in the PCA basis (the baseline basis of the LIB fit): the fraction of
edges holding 90 % of edge weight, as in lib_edges. Lower: sparser."""

from evaluation.compare.metrics._edges import edge_fraction_90
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class PCAEdgeFraction(CompareMetric):
    name = "pca_edge_fraction_90"
    label = "PCA edges for 90 %"
    higher_is_better = False
    description = "fraction of PCA edges holding 90 % of edge weight"
    version = 3  # 2: default node layers at the last position for one target per sequence; 3: an image or
    # feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 20

    def measure(self, ctx):
        return edge_fraction_90(ctx.lib_summary, "pca")
