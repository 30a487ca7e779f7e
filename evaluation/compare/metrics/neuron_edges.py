"""Interaction sparsity in the neuron basis (the unrotated layers, C = I; rib's "neuron" basis):
the fraction of edges holding 90 % of edge weight, as in lib_edges. Lower: sparser. This is the
basis in which weight sparsity lives: a zero weight between two neurons is a zero edge here."""

from evaluation.compare.metrics._edges import edge_fraction_90
from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class NeuronEdgeFraction(CompareMetric):
    name = "neuron_edge_fraction_90"
    label = "neuron edges for 90 %"
    higher_is_better = False
    description = "fraction of neuron-basis edges holding 90 % of edge weight"
    version = 2  # 2: an image or feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 25

    def measure(self, ctx):
        return edge_fraction_90(ctx.lib_summary, "neuron")
