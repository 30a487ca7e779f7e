"""Interaction sparsity in the LIB basis: ∑_l n90_l / ∑_l N_l, where n90_l is the fewest edges of
edge layer l (constant node excluded) holding 90 % of that layer's edge weight and N_l its edge
count. Lower: the computation is carried by fewer interactions."""

from evaluation.compare.metrics._edges import edge_fraction_90
from evaluation.compare.metrics.base import CompareMetric, register

LIB_OPTIONS = ("max_samples", "batch_size", "node_layers", "truncation", "seed", "lib_sources", "lib_edge_sources", "lib_jacobian_dtype")


@register
class LIBEdgeFraction(CompareMetric):
    name = "lib_edge_fraction_90"
    label = "LIB edges for 90 %"
    higher_is_better = False
    description = "fraction of LIB edges holding 90 % of edge weight"
    version = 3  # 2: default node layers at the last position for one target per sequence; 3: an image or
    # feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 10

    def measure(self, ctx):
        return edge_fraction_90(ctx.lib_summary, "lib")
