"""Gradient alignment: mean over ``max_samples`` test examples of ||UUᵀg|| / ||g||, g the input
gradient of the per-example loss and U the tangent space of the data at the input (token
models: at "hook_embed", see evaluation.compare.tangents). Higher: the model's sensitivity lies
along the data manifold. details["alignment"] holds the per-example fractions (for the plot)."""

from evaluation.compare.metrics.base import CompareMetric, Measurement, register

TANGENT_OPTIONS = ("max_samples", "batch_size", "tangents", "seed", "embed_reference", "embed_n_neighbors",
                   "embed_explained_variance")


@register
class Alignment(CompareMetric):
    name = "alignment"
    label = "gradient alignment"
    higher_is_better = True
    description = "mean ||UUᵀg||/||g|| of input gradients (tangent space U)"
    version = 1
    options = TANGENT_OPTIONS
    switch = "alignment"
    order = 50

    def measure(self, ctx):
        from evaluation.metrics.alignment import gradient_alignment

        tangents, site = ctx.tangents
        align = gradient_alignment(ctx.module, ctx.batches(ctx.eval_set), tangents, target="loss", site=site,
                                   progress=False)
        return Measurement(align.mean, {"alignment": {**align.to_dict(),
                                                      "fractions": [float(v) for v in align.fractions]}})
