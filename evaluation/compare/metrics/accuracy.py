"""Held-out accuracy: the fraction of the whole test split classified correctly (argmax of the
logits; token models: every predicted position). The *cost* of a regularizer; higher is better."""

from evaluation.compare.metrics.base import CompareMetric, register


@register
class Accuracy(CompareMetric):
    name = "accuracy"
    label = "accuracy"
    higher_is_better = True
    description = "held-out accuracy (the cost; higher is better)"
    version = 1
    options = ("batch_size",)
    order = 0

    def measure(self, ctx):
        from evaluation.metrics.robustness import evaluate_accuracy

        return evaluate_accuracy(ctx.module, ctx.batches(ctx.test), progress=False)["accuracy"]
