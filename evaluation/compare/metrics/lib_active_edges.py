"""Interaction sparsity among the LIB features in use: ∑_l n90_l / ∑_l N_l over each edge layer's
*active* edges, those between the input layer's features for 99 % of its ∑Λ and the output
layer's (every output feature at the last node layer). Lower: the features that carry the
computation interact through fewer edges. Unlike ``lib_edge_fraction_90`` it does not reward a
layer for using fewer directions (docs/DESIGN.md §5.1, active edges)."""

from evaluation.compare.metrics._edges import active_edge_measurement
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class LIBActiveEdgeFraction(CompareMetric):
    name = "lib_active_edge_fraction_90"
    label = "LIB active edges for 90 %"
    higher_is_better = False
    description = "fraction of the edges among the LIB features for 99 % of ∑Λ holding 90 % of their weight"
    version = 1
    options = LIB_OPTIONS
    order = 11

    def measure(self, ctx):
        return active_edge_measurement(ctx.lib_summary, "lib")
