"""``MeasureOptions``: what ``interp-eval compare`` measures and how (validated, frozen).

Each compare metric names the fields its value depends on (``CompareMetric.options``); those
fields, with the checkpoint and the metric's version, make its cache key (evaluation.compare.cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TANGENT_CHOICES = ("auto", "exact", "local_pca", "global_pca")
CIRCUIT_ABLATIONS = ("mean", "zero")  # evaluation.metrics.circuit.ABLATIONS (copied: that module imports torch)
CIRCUIT_SEARCHES = ("penalty", "lagrangian")  # evaluation.metrics.circuit.SEARCHES
EDGE_ABLATION_MODES = ("mean", "zero")  # evaluation.metrics.edge_ablation.ABLATIONS


@dataclass(frozen=True)
class MeasureOptions:
    """What ``measure_run`` computes; each metric's cache key holds the fields it depends on.

    max_samples: training examples for the LIB fit and test examples for alignment/robustness
    (a seeded random subset; accuracy always uses the whole test split). node_layers: LIB node
    layers (None: input + hidden activations + output for MLPs, the residual stream for
    transformers). tangents: "auto" = exact where the data module has a generator, else local PCA.
    robustness_eps: radii; ratio_eps: the radius whose off/on ratio is the headline number.
    llc: opt-in (slow); llc_*: its chains, draws, step size, localization and burn-in, at
    estimate_llc's calibrated values (lr 3e-4, γ = 100, 200 burn-in steps; see its docstring:
    with lr 1e-4 and no burn-in the chains had not settled and λ̂ grew with the step size).
    lib_sources / lib_edge_sources / lib_jacobian_dtype: LIBConfig's Rademacher probes over
    output positions and hidden units for M′ (None: exact), over output positions for the edges,
    and the dtype of the Jacobian passes — for long sequences, where exact LIB costs T·k
    vector-Jacobian products per section and example.
    embed_*: token models only (see ``embedding_tangents``): the embedding reference set holds up
    to ``embed_reference`` training inputs; local PCA over ``embed_n_neighbors`` nearest
    neighbours, k = fewest directions explaining ``embed_explained_variance`` of the local
    variance. 32 neighbours: enough for the modular-addition embedding cloud to show the
    directions of both varying tokens (a neighbourhood is mostly one-token changes) while staying
    local (p = 59 gives 2·58 one-token neighbours).
    circuit: opt-in pruned-circuit size (circuit_nodes, circuit_edges; one gradient search per run
    on the ``max_samples`` test subset); circuit_delta: allowed loss increase over the full model
    (nats); circuit_ablation: "mean" or "zero" for the pruned nodes. circuit_zero: opt-in second
    search with zero ablation (circuit_nodes_zero, circuit_edges_zero), so one report holds both.
    circuit_search: "penalty" (the default, the search every earlier record used) or "lagrangian"
    (``CircuitConfig.search``; on TransformerLens models the penalty search's gradient phase leaves
    the gates tied and its circuit is the greedy pass's, docs/DESIGN.md §6.2), for both searches.
    edge_ablation: opt-in edge-ablation sparsity in the LIB, PCA and neuron bases
    (edge_ablation_lib/_pca/_neuron; a bisection per section and basis on the ``max_samples`` test
    subset, evaluation.metrics.edge_ablation); edge_ablation_tolerance: allowed accuracy drop;
    edge_ablation_mode: "mean" or "zero" for the ablated basis features.
    """

    max_samples: int = 512
    batch_size: int = 256
    node_layers: tuple[str, ...] | None = None
    truncation: float = 1e-12
    alignment: bool = True
    tangents: str = "auto"
    robustness_eps: tuple[float, ...] = (0.03, 0.1, 0.3)
    ratio_eps: float = 0.1
    n_draws: int = 4
    llc: bool = False
    llc_chains: int = 4
    llc_draws: int = 200
    llc_lr: float = 3e-4
    llc_localization: float = 100.0
    seed: int = 0
    llc_burnin: int = 200
    lib_sources: int | None = None
    lib_edge_sources: int | None = None
    lib_jacobian_dtype: str | None = None
    embed_reference: int = 4096
    embed_n_neighbors: int = 32
    embed_explained_variance: float = 0.9
    circuit: bool = False
    circuit_delta: float = 0.01
    circuit_ablation: str = "mean"
    circuit_zero: bool = False
    circuit_search: str = "penalty"
    edge_ablation: bool = False
    edge_ablation_tolerance: float = 0.001
    edge_ablation_mode: str = "mean"
    device: str = "cpu"  # where runs are measured ("auto", "cpu", "cuda"); no metric's value depends on it

    def __post_init__(self):
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 2:
            raise ValueError(f"max_samples must be an integer >= 2, got {self.max_samples!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.tangents not in TANGENT_CHOICES:
            raise ValueError(f"unknown tangents {self.tangents!r}; allowed: {', '.join(TANGENT_CHOICES)}")
        for name in ("embed_reference", "embed_n_neighbors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 3:
                raise ValueError(f"{name} must be an integer >= 3, got {value!r}")
        if isinstance(self.llc_burnin, bool) or not isinstance(self.llc_burnin, int) or self.llc_burnin < 0:
            raise ValueError(f"llc_burnin must be a non-negative integer, got {self.llc_burnin!r}")
        if not 0 < self.embed_explained_variance <= 1:
            raise ValueError(f"embed_explained_variance must be in (0, 1], got {self.embed_explained_variance!r}")
        if not (isinstance(self.circuit_delta, (int, float)) and math.isfinite(self.circuit_delta)
                and self.circuit_delta > 0):
            raise ValueError(f"circuit_delta must be a finite number > 0, got {self.circuit_delta!r}")
        if self.circuit_ablation not in CIRCUIT_ABLATIONS:
            raise ValueError(f"unknown circuit_ablation {self.circuit_ablation!r}; allowed: {', '.join(CIRCUIT_ABLATIONS)}")
        if self.circuit_search not in CIRCUIT_SEARCHES:
            raise ValueError(f"unknown circuit_search {self.circuit_search!r}; allowed: {', '.join(CIRCUIT_SEARCHES)}")
        tol = self.edge_ablation_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and 0 <= tol < 1):
            raise ValueError(f"edge_ablation_tolerance must be a number in [0, 1) (an accuracy drop), got {tol!r}")
        if self.edge_ablation_mode not in EDGE_ABLATION_MODES:
            raise ValueError(f"unknown edge_ablation_mode {self.edge_ablation_mode!r}; "
                             f"allowed: {', '.join(EDGE_ABLATION_MODES)}")
        if self.ratio_eps not in self.robustness_eps:
            raise ValueError(f"ratio_eps {self.ratio_eps!r} must be one of robustness_eps {list(self.robustness_eps)}")
