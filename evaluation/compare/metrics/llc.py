"""Local learning coefficient λ̂ (opt-in: ``MeasureOptions.llc``): SGLD around the trained
weights on the training split (evaluation.metrics.llc.estimate_llc, devinterp's sampler), mean
over chains. Lower: a more degenerate, effectively simpler solution. Unhealthy chains are noted."""

from evaluation.compare.context import finite_or_none
from evaluation.compare.metrics.base import CompareMetric, Measurement, register


@register
class LLC(CompareMetric):
    name = "llc"
    label = "LLC"
    higher_is_better = False
    description = "local learning coefficient (SGLD, devinterp)"
    version = 2  # 2: estimate_llc drops the chains' initial transient (evaluation/metrics/llc.py)
    options = ("batch_size", "seed", "llc_chains", "llc_draws", "llc_lr", "llc_localization", "llc_burnin")
    switch = "llc"
    order = 70

    def measure(self, ctx):
        from evaluation.metrics.llc import estimate_llc
        from interp_train.losses import per_example_cross_entropy

        opts = ctx.options
        llc = estimate_llc(ctx.module, ctx.batches(ctx.train), per_example_cross_entropy, lr=opts.llc_lr,
                           localization=opts.llc_localization, num_burnin_steps=opts.llc_burnin,
                           num_chains=opts.llc_chains, num_draws=opts.llc_draws, seed=opts.seed, progress=False)
        notes = [] if llc.healthy else [f"LLC chains unhealthy: {'; '.join(llc.warnings)}"]
        return Measurement(finite_or_none(llc.mean), {"llc": llc.to_dict(include_traces=False)}, notes)
