"""edge_ablation_lib / _pca / _neuron in ``interp-eval compare``: opt-in, equal to the Python call
on the same data, options validated."""

import pytest

from evaluation.compare import MeasureOptions, discover_runs
from evaluation.compare.context import RunContext
from evaluation.compare.measure import measure_run
from evaluation.metrics.edge_ablation import EdgeAblationConfig, edge_ablation_sparsity
from tests.test_compare import runs  # noqa: F401 - the tiny digits runs fixture

METRICS = ("edge_ablation_lib", "edge_ablation_pca", "edge_ablation_neuron")


def test_edge_ablation_metrics_are_opt_in_and_match_the_python_call(runs):  # noqa: F811
    run = discover_runs(runs["task_dir"])["baseline"][0]
    off = measure_run(run, MeasureOptions(max_samples=64, alignment=False))
    assert all(off["metrics"][m] is None and m not in off["measured"] for m in METRICS)

    options = MeasureOptions(max_samples=64, alignment=False, edge_ablation=True, edge_ablation_mode="zero",
                             edge_ablation_tolerance=0.02)
    entry = measure_run(run, options)
    ctx = RunContext(run, options)
    data = [b[:2] for b in ctx.batches(ctx.eval_set)]
    for basis in ("lib", "pca", "neuron"):
        direct = edge_ablation_sparsity(ctx.module, data, ctx.lib, basis,
                                        EdgeAblationConfig(tolerance=0.02, ablation="zero"))
        assert entry["metrics"][f"edge_ablation_{basis}"] == direct.total_kept
        assert 0 <= direct.fraction <= 1 and direct.total_edges > 0
        details = entry["measured"][f"edge_ablation_{basis}"]["details"]["edge_ablation"][basis]
        assert details["fraction"] == pytest.approx(direct.fraction) and details["ablation"] == "zero"
        assert all(s["accuracy"] >= direct.accuracy - 0.02 for s in details["sections"].values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(edge_ablation_tolerance=-0.1), r"edge_ablation_tolerance must be a number in \[0, 1\).*-0.1"),
    (dict(edge_ablation_mode="resample"), "unknown edge_ablation_mode 'resample'; allowed: mean, zero"),
])
def test_bad_edge_ablation_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeasureOptions(**kwargs)
