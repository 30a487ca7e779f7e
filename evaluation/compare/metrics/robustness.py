"""Off/on-manifold robustness ratio Δ_off(ε)/Δ_on(ε) at ε = ``ratio_eps``: mean output change
||softmax f(x+εu) − softmax f(x)||₁ for u off the manifold over u along it
(evaluation.metrics.robustness), same examples and tangents as alignment. Lower: the model
ignores off-manifold perturbations relative to on-manifold ones."""

from evaluation.compare.context import finite_or_none
from evaluation.compare.metrics.alignment import TANGENT_OPTIONS
from evaluation.compare.metrics.base import CompareMetric, Measurement, register


@register
class RobustnessRatio(CompareMetric):
    name = "robustness_ratio"
    label = "off/on robustness"
    higher_is_better = False
    description = "Δ_off/Δ_on: output change off vs on the manifold"
    version = 1
    options = TANGENT_OPTIONS + ("robustness_eps", "ratio_eps", "n_draws")
    switch = "alignment"
    order = 60

    def measure(self, ctx):
        from evaluation.metrics.robustness import manifold_robustness

        opts = ctx.options
        tangents, site = ctx.tangents
        rob = manifold_robustness(ctx.module, ctx.batches(ctx.eval_set), tangents, eps=list(opts.robustness_eps),
                                  n_draws=opts.n_draws, seed=opts.seed, site=site, progress=False)
        return Measurement(finite_or_none(rob.ratio[rob.eps.index(opts.ratio_eps)]), {"robustness": rob.to_dict()})
