"""circuit_nodes / circuit_edges in ``interp-eval compare``: opt-in, equal to the Python call on the
same data, one search shared by both metrics, options validated."""

import pytest
import torch

from evaluation.compare import MeasureOptions, discover_runs
from evaluation.compare.context import RunContext
from evaluation.compare.measure import measure_run
from evaluation.metrics.circuit import CircuitConfig, prune_circuit
from tests.test_compare import runs  # noqa: F401 - the tiny digits runs fixture


def test_circuit_metrics_are_opt_in_and_match_the_python_call(runs, monkeypatch):  # noqa: F811
    run = discover_runs(runs["task_dir"])["baseline"][0]
    off = measure_run(run, MeasureOptions(max_samples=64, alignment=False))
    assert off["metrics"]["circuit_nodes"] is None and "circuit_nodes" not in off["measured"]

    from evaluation.metrics import circuit as circuit_mod

    calls = []
    real = circuit_mod.prune_circuit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(circuit_mod, "prune_circuit", counting)
    options = MeasureOptions(max_samples=64, alignment=False, circuit=True, circuit_ablation="zero")
    entry = measure_run(run, options)
    assert len(calls) == 1  # one search for both metrics

    ctx = RunContext(run, options)
    x, y = ctx.eval_set[0], ctx.eval_set[1]
    direct = real(ctx.module, x, y, CircuitConfig(ablation="zero"))
    assert entry["metrics"]["circuit_nodes"] == direct.nodes_kept <= direct.nodes_total == 24  # hidden [12, 12]
    assert entry["metrics"]["circuit_edges"] == direct.edges
    details = entry["measured"]["circuit_edges"]["details"]["circuit"]
    assert details["ablation"] == "zero" and details["loss"] <= details["target_loss"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(circuit_delta=0.0), "circuit_delta must be a finite number > 0"),
    (dict(circuit_ablation="resample"), "unknown circuit_ablation 'resample'"),
])
def test_bad_circuit_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeasureOptions(**kwargs)
