"""Shared by circuit_nodes and circuit_edges: one pruning search per run and setting
(evaluation.metrics.circuit.prune_circuit on the seeded ``max_samples`` test subset), kept on the
run's context so the two metrics cost one search."""

from __future__ import annotations

CIRCUIT_OPTIONS = ("max_samples", "seed", "circuit_delta", "circuit_ablation")


def circuit_result(ctx):
    """The pruned circuit of the context's run (computed once per context and setting)."""
    from evaluation.metrics.circuit import CircuitConfig, prune_circuit

    opts = ctx.options
    cache = ctx.__dict__.setdefault("_circuit_results", {})
    key = (opts.circuit_delta, opts.circuit_ablation)
    if key not in cache:
        inputs, targets = ctx.eval_set[0], ctx.eval_set[1]
        cache[key] = prune_circuit(ctx.module, inputs, targets,
                                   CircuitConfig(delta=opts.circuit_delta, ablation=opts.circuit_ablation))
    result = cache[key]
    ctx._use("circuit", details={"circuit": result.to_dict()})
    return result
