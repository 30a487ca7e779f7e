"""``interp-eval compare``: is a regularized variant more interpretable than standard training,
at what accuracy cost, and is the difference real? (docs/DESIGN.md §5.8.)

Runs are recipe run directories ``<root>/<variant>/seed<k>/`` (``config.yaml``,
``checkpoints/last.ckpt``) as written by ``interp-train fit``. Modules, by job:

* runs.py — finding runs (``discover_runs``, ``runs_from_paths``) and ``check_consistent``.
* options.py — ``MeasureOptions``; metrics/ — one file per metric (see its package docstring for
  how to add one); context.py — ``RunContext``, what a run's metrics share (model, data, LIB fit,
  tangents), computed once; data.py, tangents.py — its helpers.
* measure.py + cache.py — measuring every run, each metric's value cached under a key of the
  checkpoint, the metric's version and the options it depends on.
* stats.py — Welch / permutation tests, Holm correction; report.py — ``build_report`` (mean ± std
  over seeds, ddof = 1, tests against the baseline, p corrected over the report's comparisons)
  and ``render_markdown``; plots.py — figures; command.py — ``run_compare``.

Metrics, with the direction counted as "more interpretable" (``higher_is_better``):

* accuracy — held-out (test split) accuracy; the *cost* of a regularizer, higher is better.
* lib_edge_fraction_90 / pca_edge_fraction_90 — interaction sparsity: ∑_l n90_l / ∑_l N_l, the
  fewest edges holding 90 % of each edge layer's weight over all edges (constant node excluded),
  in the LIB / PCA basis. Lower: the computation is carried by fewer interactions.
* lib_active_edge_fraction_90 / pca_active_edge_fraction_90 / lib_pca_active_edge_ratio — the
  same among the *active* edges only, between each layer's features for 99 % of its ∑Λ (PCA: of
  its variance), so activations collapsing onto fewer directions do not read as sparser
  interactions (docs/DESIGN.md §5.1).
* lib_features_99 — ∑ over non-output node layers of the LIB directions holding 99 % of ∑Λ.
  Lower: fewer features take part in the computation.
* modularity_q — Louvain modularity Q (γ = 1) of the LIB interaction graph. Higher: the graph
  splits into more separate modules.
* alignment — mean of ||UUᵀg|| / ||g|| for input gradients g of the per-example loss (U the
  tangent space of the data). Higher: the model's sensitivity lies along the data manifold.
* robustness_ratio — Δ_off(ε)/Δ_on(ε) at one radius ε (evaluation.metrics.robustness). Lower: the
  model ignores off-manifold perturbations relative to on-manifold ones, which is the
  behaviour that aligned gradients imply.
* llc, llc_objective — local learning coefficient (opt-in, SGLD via devinterp) on the task loss
  and on the training objective (task loss + the run's weighted regularizer terms: the loss the
  weights minimise). Lower: a more degenerate, effectively simpler solution.

Token models (integer inputs) are measured at the embedding (site "hook_embed"): the tangent
spaces come from ``LocalPCATangents`` fitted on the flattened token embeddings (B, T·d_model) of
the training inputs, its dimension k chosen by explained variance (``embedding_tangents``); k, d,
the random baseline sqrt(k/d) and the embedding scale are recorded in details["tangents"]. On a
discrete token set the "manifold" is a point cloud: the local tangent space of an input is the
span of the (centred) embeddings of its nearest other inputs, which for modular addition (p²
points (E_a, E_b, E_=) in 3·d_model dimensions) are mostly the inputs that differ in one token
(a or b) by a token with a nearby embedding. Alignment then reads "the fraction of the embedding
gradient along directions in which the embeddings of nearby valid inputs differ"; directions no
input change can produce (the constant "=" slot, the part of R^{d_model} the embedding table does
not use) count as off-manifold. See ``MeasureOptions`` for the neighbour count and variance.
"""

from importlib import import_module

_PUBLIC = {"run_compare": "command", "CompareResult": "command", "MeasureOptions": "options",
           "discover_runs": "runs", "runs_from_paths": "runs", "Run": "runs", "build_report": "report",
           "render_markdown": "report", "measure_run": "measure", "measure_all": "measure"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
