"""LIB feature count: ∑ over the non-output node layers of the fewest LIB directions holding 99 %
of ∑Λ (constant direction excluded). Lower: fewer features take part in the computation."""

from evaluation.compare.metrics.base import CompareMetric, register
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS


@register
class LIBFeatures(CompareMetric):
    name = "lib_features_99"
    label = "LIB features (99 %)"
    higher_is_better = False
    description = "LIB directions holding 99 % of ∑Λ, summed over layers"
    version = 3  # 2: default node layers at the last position for one target per sequence; 3: an image or
    # feature-map node layer is one position of all its units
    options = LIB_OPTIONS
    order = 30

    def measure(self, ctx):
        layers = ctx.lib_summary["layers"]
        return float(sum(layers[l]["lib"]["features_99"] for l in ctx.node_layers[:-1]))
