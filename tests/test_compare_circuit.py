"""circuit_nodes / circuit_edges in ``interp-eval compare``: opt-in, equal to the Python call on the
same data, one search shared by both metrics, options validated."""

import json

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
    (dict(circuit_search="greedy"), "unknown circuit_search 'greedy'; allowed: penalty, lagrangian"),
])
def test_bad_circuit_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeasureOptions(**kwargs)


def test_zero_ablation_metrics_sit_beside_the_mean_ones(runs, tmp_path, monkeypatch):  # noqa: F811
    """circuit_zero adds circuit_nodes_zero / circuit_edges_zero (a second search, zero ablation) to
    the mean-ablation pair, each equal to the Python call; the CLI flags reach MeasureOptions."""
    from evaluation.cli import main as eval_main
    from evaluation.compare import measure as measure_mod

    run = discover_runs(runs["task_dir"])["baseline"][0]
    options = MeasureOptions(max_samples=64, alignment=False, circuit=True, circuit_zero=True)
    entry = measure_run(run, options)
    ctx = RunContext(run, options)
    x, y = ctx.eval_set[0], ctx.eval_set[1]
    mean = prune_circuit(ctx.module, x, y, CircuitConfig(ablation="mean"))
    zero = prune_circuit(ctx.module, x, y, CircuitConfig(ablation="zero"))
    assert entry["metrics"]["circuit_nodes"] == mean.nodes_kept and entry["metrics"]["circuit_edges"] == mean.edges
    assert entry["metrics"]["circuit_nodes_zero"] == zero.nodes_kept
    assert entry["metrics"]["circuit_edges_zero"] == zero.edges
    assert entry["measured"]["circuit_nodes_zero"]["details"]["circuit_zero"]["ablation"] == "zero"
    assert entry["measured"]["circuit_nodes"]["details"]["circuit"]["ablation"] == "mean"

    names = []
    real = measure_mod.measure_metric
    monkeypatch.setattr(measure_mod, "measure_metric", lambda metric, c: names.append(metric.name) or real(metric, c))
    rc = eval_main(["compare", "--variant", "baseline", str(run.run_dir), "--out", str(tmp_path / "cli"),
                    "--max-samples", "64", "--no-alignment", "--quiet", "--circuit", "--circuit-zero",
                    "--circuit-delta", "0.05"])
    assert rc == 0 and {"circuit_nodes", "circuit_edges", "circuit_nodes_zero", "circuit_edges_zero"} <= set(names)
    cached = json.loads(next((tmp_path / "cli" / "cache" / "baseline").iterdir()).read_text())
    details = cached["measured"]["circuit_nodes"]["details"]["circuit"]
    assert details["target_loss"] - details["full_loss"] == pytest.approx(0.05)
    assert "- **Circuit settings**: penalty search, δ = 0.05 nats;" in (tmp_path / "cli" / "report.md").read_text()


def test_option_choices_are_the_circuit_modules():
    """options.py copies the choices (it must not import torch); the copies must not drift."""
    from evaluation.compare import options
    from evaluation.metrics import circuit, edge_ablation

    assert options.CIRCUIT_ABLATIONS == circuit.ABLATIONS and options.CIRCUIT_SEARCHES == circuit.SEARCHES
    assert options.EDGE_ABLATION_MODES == edge_ablation.ABLATIONS


def test_circuit_search_keeps_the_keys_of_records_cached_before_it(tmp_path):
    """At circuit_search="penalty" a circuit metric's cache key is the one computed before the option
    existed (rebuilt here by hand from the key's definition), so no cached search is redone; the
    Lagrangian search gets keys of its own."""
    import dataclasses
    import hashlib

    from evaluation.compare.cache import metric_key, run_digest
    from evaluation.compare.metrics import get_metric

    ckpt, cfg = tmp_path / "last.ckpt", tmp_path / "config.yaml"
    ckpt.write_bytes(b"weights"), cfg.write_text("model: {}")
    digest = run_digest(ckpt, cfg)
    options = dataclasses.asdict(MeasureOptions())
    legacy = {"circuit_nodes": {"max_samples": 512, "seed": 0, "circuit_delta": 0.01, "circuit_ablation": "mean"},
              "circuit_edges_zero": {"max_samples": 512, "seed": 0, "circuit_delta": 0.01}}
    for name, legacy_options in legacy.items():
        metric = get_metric(name)
        text = json.dumps({"run": digest, "metric": name, "version": metric.version, "options": legacy_options},
                          sort_keys=True)
        assert metric_key(digest, metric, options) == hashlib.sha256(text.encode()).hexdigest()
        assert metric_key(digest, metric, {**options, "circuit_search": "lagrangian"}) != metric_key(digest, metric, options)


def test_lagrangian_search_through_compare_matches_the_python_call(runs, tmp_path):  # noqa: F811
    """--circuit-search lagrangian reaches both searches (mean and zero ablation) and equals
    prune_circuit(search="lagrangian") on the same data; the details name the search."""
    from evaluation.cli import main as eval_main

    run = discover_runs(runs["task_dir"])["baseline"][0]
    rc = eval_main(["compare", "--variant", "baseline", str(run.run_dir), "--out", str(tmp_path / "cli"),
                    "--max-samples", "64", "--no-alignment", "--quiet", "--circuit", "--circuit-zero",
                    "--circuit-search", "lagrangian"])
    assert rc == 0
    cached = json.loads(next((tmp_path / "cli" / "cache" / "baseline").iterdir()).read_text())
    ctx = RunContext(run, MeasureOptions(max_samples=64, alignment=False))
    x, y = ctx.eval_set[0], ctx.eval_set[1]
    for metric, detail, ablation in (("circuit_nodes", "circuit", "mean"), ("circuit_nodes_zero", "circuit_zero", "zero")):
        direct = prune_circuit(ctx.module, x, y, CircuitConfig(ablation=ablation, search="lagrangian"))
        record = cached["measured"][metric]
        assert record["value"] == direct.nodes_kept
        assert record["details"][detail]["search"] == "lagrangian"
        assert record["details"][detail]["kept"] == direct.kept
    report = (tmp_path / "cli" / "report.md").read_text()
    assert ("- **Circuit settings**: lagrangian search, δ = 0.01 nats; circuit nodes/edges: mean ablation; "
            "the *zero* columns: zero ablation") in report
