"""Shared by edge_ablation_lib, _pca and _neuron: edge-ablation sparsity of one basis per run and
setting (evaluation.metrics.edge_ablation on the seeded ``max_samples`` test subset, bases and
edges from the run's LIB fit), kept on the run's context.

The value is Σ_l n*_l, n*_l the fewest top-weight edges of section l whose retention, the other
edges ablated in that basis (mean ablation, or zero with ``edge_ablation_mode="zero"``), keeps the
accuracy on the test subset within ``edge_ablation_tolerance`` of the unablated model (bisection).
A count, not a fraction: the number of candidate edges N_l depends on the basis's truncation, which
a regularizer moves (the fraction Σ n*_l / Σ N_l is in the details). Lower: fewer interactions
carry the task."""

from __future__ import annotations

from evaluation.compare.metrics.base import Measurement
from evaluation.compare.metrics.lib_edges import LIB_OPTIONS

EDGE_ABLATION_OPTIONS = (*LIB_OPTIONS, "edge_ablation_tolerance", "edge_ablation_mode")


def edge_ablation_measurement(ctx, basis: str) -> Measurement:
    """Σ_l n*_l in ``basis``; details: the fraction, per-section n*_l, N_l and the probed accuracies."""
    from evaluation.metrics.edge_ablation import EdgeAblationConfig, basis_set, edge_ablation

    import torch

    opts = ctx.options
    if torch.is_floating_point(ctx.eval_set[1]):
        return Measurement(None, notes=[f"edge ablation ({basis}): undefined, the targets are not class indices"])
    cache = ctx.__dict__.setdefault("_edge_ablation", {})
    key = (basis, opts.edge_ablation_tolerance, opts.edge_ablation_mode)
    if key not in cache:
        result = ctx.lib
        bases, edges = basis_set(result, basis)
        data = [b[:2] for b in ctx.batches(ctx.eval_set)]
        config = EdgeAblationConfig(tolerance=opts.edge_ablation_tolerance, ablation=opts.edge_ablation_mode)
        cache[key] = edge_ablation(ctx.module, data, result.node_layers, bases, edges, config, basis)
    out = cache[key]
    return Measurement(float(out.total_kept), details={"edge_ablation": {basis: out.to_dict()}},
                       notes=[f"edge ablation ({basis}, {out.ablation}): {out.total_kept} of {out.total_edges} "
                              f"edges keep the accuracy within {out.tolerance} of {out.accuracy:.4f}"])
