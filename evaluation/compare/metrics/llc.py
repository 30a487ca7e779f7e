"""Local learning coefficient λ̂ on the task loss (opt-in: ``MeasureOptions.llc``): SGLD around the
trained weights on the training split (evaluation.metrics.llc.estimate_llc, devinterp's sampler),
sampling the per-example cross-entropy, mean over chains. Lower: a more degenerate, effectively
simpler solution. A regularized run's weights minimise task loss + penalty, not this loss (see
llc_objective, docs/DESIGN.md §5.6). Unhealthy chains are noted."""

from evaluation.compare.metrics._llc import LLC_OPTIONS, llc_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class LLC(CompareMetric):
    name = "llc"
    label = "LLC (task loss)"
    higher_is_better = False
    description = ("local learning coefficient on the task loss (cross-entropy), SGLD around the trained weights "
                   "(devinterp); for a regularized run the weights minimise task loss + penalty, not this loss")
    version = 2  # 2: estimate_llc drops the chains' initial transient (evaluation/metrics/llc.py)
    options = LLC_OPTIONS
    switch = "llc"
    order = 70

    def measure(self, ctx):
        return llc_measurement(ctx, objective=False)
