"""Shared by llc and llc_objective: one SGLD estimate per run and loss (evaluation.metrics.llc.
estimate_llc on the training split, devinterp's sampler), kept on the run's context.

``llc`` samples the task loss (per-example cross-entropy); ``llc_objective`` the training objective
the run minimised: the task loss plus the weighted terms of the regularizers rebuilt from the
checkpoint (its config and their saved state, at the weights of the final step). A run whose
regularizers add no loss term (the baseline; WeightSparsity, a constraint applied after the
optimizer step) has objective = task loss, and the task-loss estimate is reused.
"""

from __future__ import annotations

import torch

from evaluation.compare.context import finite_or_none
from evaluation.compare.metrics.base import Measurement

LLC_OPTIONS = ("batch_size", "seed", "llc_chains", "llc_draws", "llc_lr", "llc_localization", "llc_burnin")


def objective_regularizers(ctx) -> list:
    """The run's regularizers that add a term to its training loss (set up as in training: e.g.
    tangent spaces fitted from the data module); [] when the objective is the task loss."""
    from interp_train.regularizers.base import regularized_loss
    from interp_train.losses import per_example_cross_entropy
    from interp_train.lightning import default_batch_fn

    regs = [r for r in getattr(ctx.module, "regularizers", []) if r.current_weight() > 0]
    if not regs:
        return []
    for reg in regs:
        reg.setup(ctx.module, ctx.datamodule)
    inputs, targets, extras = default_batch_fn(ctx.batches(ctx.train)[0])
    with torch.enable_grad():  # terms may differentiate inside (input gradients)
        probe = regularized_loss(ctx.module, inputs, targets, regs, loss_fn=per_example_cross_entropy,
                                 extras=extras, advance=False)
    replaced = any(r.replaces_task_loss for r in regs)
    return regs if probe.terms or replaced else []


def llc_measurement(ctx, objective: bool) -> Measurement:
    """λ̂ of the context's run on the task loss or (``objective``) on the training objective."""
    from evaluation.metrics.llc import estimate_llc
    from interp_train.losses import per_example_cross_entropy

    cache = ctx.__dict__.setdefault("_llc_results", {})
    regs = objective_regularizers(ctx) if objective else []
    key = tuple(r.name for r in regs)
    if key not in cache:
        opts = ctx.options
        with torch.enable_grad():
            cache[key] = estimate_llc(ctx.module, ctx.batches(ctx.train), per_example_cross_entropy, lr=opts.llc_lr,
                                      localization=opts.llc_localization, num_burnin_steps=opts.llc_burnin,
                                      num_chains=opts.llc_chains, num_draws=opts.llc_draws, seed=opts.seed,
                                      progress=False, regularizers=regs)
    llc = cache[key]
    notes = [] if llc.healthy else [f"LLC chains unhealthy: {'; '.join(llc.warnings)}"]
    if objective:
        loss = ("task loss + " + " + ".join(f"{r.current_weight():g}·{r.name}" for r in regs)) if regs else \
            "task loss (no regularizer adds a loss term)"
        details = {"llc_objective": {**llc.to_dict(include_traces=False), "loss": loss}}
    else:
        details = {"llc": llc.to_dict(include_traces=False)}
    return Measurement(finite_or_none(llc.mean), details, notes)
