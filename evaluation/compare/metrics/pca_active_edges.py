"""``lib_active_edges`` in the PCA basis of the same fit: the edges-for-90 % fraction among the
edges between each layer's principal directions for 99 % of its variance (docs/DESIGN.md §5.1)."""

from evaluation.compare.metrics._edges import active_edge_measurement
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class PCAActiveEdgeFraction(CompareMetric):
    name = "pca_active_edge_fraction_90"
    label = "PCA active edges for 90 %"
    higher_is_better = False
    description = "fraction of the edges among the PCA directions for 99 % of variance holding 90 % of their weight"
    version = 1
    options = LIB_OPTIONS
    order = 22

    def measure(self, ctx):
        return active_edge_measurement(ctx.lib_summary, "pca")
