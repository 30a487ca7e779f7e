"""The metrics of ``interp-eval compare``: one metric, one module, no central list.

Adding a metric is one file here plus its test::

    # evaluation/compare/metrics/my_metric.py
    from evaluation.compare.metrics.base import CompareMetric, Measurement, register

    @register
    class MyMetric(CompareMetric):
        name = "my_metric"                 # key in report.json and in the cache
        label = "my metric"                # column title
        higher_is_better = False           # the interpretable direction
        description = "what it is, as a formula in words"
        version = 1                        # bump when its definition or code changes
        options = ("max_samples", "seed")  # the MeasureOptions fields its value depends on
        switch = None                      # or a boolean MeasureOptions field that turns it on
        order = 100                        # column position (built-ins use 0-70)

        def measure(self, ctx):            # ctx: evaluation.compare.context.RunContext
            summary = ctx.lib_summary      # shared with the other metrics, computed once per run
            return Measurement(value, details={...}, notes=[...])   # or just a float / None

``all_metrics()`` imports every module of this package (modules named ``_*`` and ``base`` are
helpers), so ``@register`` is all the registration there is. The context (``RunContext``) loads
the checkpoint, its data, the LIB fit, the tangent spaces ... lazily and once per run, whichever
metric asks first.

Caching (evaluation.compare.measure): each metric's value on a run is cached under
sha256(checkpoint and config bytes, the metric's name and version, the values of its
``options``). On a re-run only the metrics whose key changed are measured — a new metric, a
bumped version, a changed option it depends on, a retrained checkpoint — and nothing else;
a metric missing from an old cache entry is measured, never dropped.

Built-in metrics (order of the report's columns): accuracy (the cost), lib_edge_fraction_90,
lib_active_edge_fraction_90, pca_edge_fraction_90, lib_pca_edge_ratio, pca_active_edge_fraction_90,
lib_pca_active_edge_ratio, neuron_edge_fraction_90, lib_features_99, modularity_q, alignment,
robustness_ratio, llc and llc_objective (opt-in), the circuit and edge-ablation metrics (opt-in).
"""

from evaluation.compare.metrics.base import CompareMetric, Measurement, all_metrics, get_metric, register, unregister

__all__ = ["CompareMetric", "Measurement", "all_metrics", "get_metric", "register", "unregister"]
