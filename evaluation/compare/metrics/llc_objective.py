"""Local learning coefficient λ̂ on the training objective (opt-in with the LLC: ``MeasureOptions.llc``):
as ``llc``, but SGLD samples the loss the run minimised — the task loss plus the weighted terms of
its regularizers, rebuilt from the checkpoint (docs/DESIGN.md §5.6). Equal to ``llc`` for runs whose
regularizers add no loss term (the baseline)."""

from evaluation.compare.metrics._llc import LLC_OPTIONS, llc_measurement
from evaluation.compare.metrics.base import CompareMetric, register


@register
class LLCObjective(CompareMetric):
    name = "llc_objective"
    label = "LLC (objective)"
    higher_is_better = False
    description = ("local learning coefficient on the training objective: task loss + the run's weighted "
                   "regularizer terms at their final weights, the loss the trained weights minimise "
                   "(= the task-loss LLC for runs without loss-term regularizers)")
    version = 1
    options = LLC_OPTIONS
    switch = "llc"
    order = 71

    def measure(self, ctx):
        return llc_measurement(ctx, objective=True)
