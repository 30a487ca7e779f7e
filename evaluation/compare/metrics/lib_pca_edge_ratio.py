"""LIB's interaction sparsity relative to the PCA baseline of the same fit:

    ratio = lib_edge_fraction_90 / pca_edge_fraction_90

(each the fraction of edges holding 90 % of edge weight, lib_edges / pca_edges). Below 1: LIB's
graph is sparser than PCA's; the LIB paper found it barely below 1 on language models. Per run, so
a regularizer's effect on it gets its own test. Lower: LIB beats PCA by more. None when the PCA
fraction is 0 or undefined."""

from evaluation.compare.metrics._edges import edge_fraction_90
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class LIBPCAEdgeRatio(CompareMetric):
    name = "lib_pca_edge_ratio"
    label = "LIB / PCA edges for 90 %"
    higher_is_better = False
    description = "LIB edges for 90 % of edge weight divided by PCA's (below 1: LIB sparser)"
    version = 2  # 2: an image or feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 21

    def measure(self, ctx):
        lib, pca = edge_fraction_90(ctx.lib_summary, "lib"), edge_fraction_90(ctx.lib_summary, "pca")
        return None if lib is None or not pca else lib / pca
