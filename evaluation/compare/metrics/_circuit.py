"""Shared by circuit_nodes / circuit_edges (ablation ``circuit_ablation``) and circuit_nodes_zero /
circuit_edges_zero (zero ablation): one pruning search per run and setting
(evaluation.metrics.circuit.prune_circuit with search ``circuit_search``, on the seeded
``max_samples`` test subset), kept on the run's context so a node count and its edge count cost one
search."""

from __future__ import annotations

from types import MappingProxyType

CIRCUIT_OPTIONS = ("max_samples", "seed", "circuit_delta", "circuit_ablation", "circuit_search")
CIRCUIT_ZERO_OPTIONS = ("max_samples", "seed", "circuit_delta", "circuit_search")
# records cached before circuit_search existed were penalty searches: their keys stay valid
CIRCUIT_OPTIONS_ADDED = MappingProxyType({"circuit_search": "penalty"})


def circuit_result(ctx, ablation: str | None = None):
    """The pruned circuit of the context's run (computed once per context and setting). ``ablation``
    None: the options' ``circuit_ablation``, details under "circuit"; "zero": details under "circuit_zero"."""
    from evaluation.metrics.circuit import CircuitConfig, prune_circuit

    opts = ctx.options
    detail = "circuit" if ablation is None else f"circuit_{ablation}"
    ablation = opts.circuit_ablation if ablation is None else ablation
    cache = ctx.__dict__.setdefault("_circuit_results", {})
    key = (opts.circuit_delta, ablation, opts.circuit_search)
    if key not in cache:
        inputs, targets = ctx.eval_set[0], ctx.eval_set[1]
        config = CircuitConfig(delta=opts.circuit_delta, ablation=ablation, search=opts.circuit_search)
        cache[key] = prune_circuit(ctx.module, inputs, targets, config)
    result = cache[key]
    ctx._use(detail, details={detail: result.to_dict()})
    return result
