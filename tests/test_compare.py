"""`interp-eval compare` on tiny real recipe runs (digits MLP, a few steps) trained in the test setup."""

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from evaluation.cli import main as eval_main
from evaluation.compare import MeasureOptions, build_report, discover_runs, run_compare, runs_from_paths
from evaluation.compare import measure as measure_mod
from evaluation.compare.measure import measure_run
from evaluation.compare.report import render_markdown
from evaluation.compare.stats import adjust_pvalues, compare_groups
from test_active_edges import naive_active  # the loop-by-loop reference, no code shared with lib_summary

OPTIONS = MeasureOptions(max_samples=64)

TINY = """
seed_everything: 0
trainer:
  max_steps: 4
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {{d_in: 64, hidden: {hidden}, d_out: 10}}
  lr: {lr}
data:
  class_path: interp_train.data.digits.DigitsDataModule
  init_args: {{batch_size: 64}}
"""


def _train(tmp, root, variant, seed, lr=0.01, hidden="[12, 12]"):
    from interp_train.cli import main as train_main

    cfg = tmp / f"{variant}_{lr}_{hidden.replace(' ', '')}.yaml"
    cfg.write_text(TINY.format(lr=lr, hidden=hidden))
    train_main(["fit", "--config", str(cfg), "--variant", variant, "--seed_everything", str(seed),
                "--checkpoint_root", str(root), "--test_after_fit", "false"])
    return root / "digits" / variant / f"seed{seed}"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """checkpoints/digits/{baseline, fast}/seed{0,1} plus, outside that tree, a 1-seed variant and a
    run with another architecture."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("compare_runs")
    root = tmp / "checkpoints"
    for seed in (0, 1):
        _train(tmp, root, "baseline", seed)
        _train(tmp, root, "fast", seed, lr=0.05)
    extra = tmp / "extra"
    single = _train(tmp, extra, "single", 0, lr=0.05)
    wide = _train(tmp, extra, "wide", 0, hidden="[8, 16]")
    return {"task_dir": root / "digits", "single": single, "wide": wide, "tmp": tmp}


def test_discovery_and_empty_dir(runs, tmp_path):
    found = discover_runs(runs["task_dir"])
    assert {v: [r.seed for r in rs] for v, rs in found.items()} == {"baseline": ["seed0", "seed1"],
                                                                      "fast": ["seed0", "seed1"]}
    assert found["fast"][1].checkpoint.name == "last.ckpt"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no runs under .*found: notes/readme.txt"):
        discover_runs(tmp_path)
    with pytest.raises(ValueError, match=r"holds runs of several tasks"):
        discover_runs(runs["task_dir"].parent)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_runs(tmp_path / "missing")


def test_a_run_given_twice_is_refused_and_same_named_runs_are_told_apart(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "seed0" / "checkpoints").mkdir(parents=True)
        (tmp_path / parent / "seed0" / "config.yaml").write_text("seed_everything: 0\n")
        (tmp_path / parent / "seed0" / "checkpoints" / "last.ckpt").write_bytes(b"")
    run = tmp_path / "a" / "seed0"
    with pytest.raises(ValueError, match=r"variant 'x': checkpoint .*a/seed0/checkpoints/last.ckpt' is given twice"):
        runs_from_paths("x", [run, run / "checkpoints" / "last.ckpt"])
    assert [r.seed for r in runs_from_paths("x", [run, tmp_path / "b" / "seed0"])] == ["seed0_0", "seed0_1"]


def test_report_matches_the_underlying_api(runs, tmp_path):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.metrics.lib_summary import summarize
    from evaluation.metrics.robustness import evaluate_accuracy, manifold_robustness
    from interp_train.tangents import LocalPCATangents

    result = run_compare(discover_runs(runs["task_dir"]), tmp_path / "out", OPTIONS, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {"report.json", "report.md", "metrics.png", "alignment_hist.png", "edge_curves.png"} <= \
        {p.name for p in (tmp_path / "out").iterdir()}
    assert report == json.loads(json.dumps(result.report))

    # recompute baseline/seed1 by hand through the evaluation API
    loaded = load_checkpoint(runs["task_dir"] / "baseline" / "seed1" / "checkpoints" / "last.ckpt")
    model, dm = loaded.model, loaded.datamodule
    dm.setup("fit")
    x_train = dm.splits["train"].tensors[0]
    x_test, y_test = dm.splits["test"].tensors
    acc = evaluate_accuracy(model, [(x_test, y_test)], progress=False)["accuracy"]
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:64]
    layers = ["input", "model.layers.1", "model.layers.3", "output"]
    fit = fit_lib(model, [(x_train[idx],)], layers, LIBConfig(), progress=False)
    summary = summarize(fit)
    edges = summary["edges"].values()
    active = {}  # naive active-edge fractions (tests/test_active_edges.py), straight from the fit
    for side, bases, side_edges in (("lib", fit.lib, fit.lib_edges), ("pca", fit.pca, fit.pca_edges)):
        counts = [naive_active(side_edges[a].numpy(), bases[a].Lambda.numpy(),
                               None if b == layers[-1] else bases[b].Lambda.numpy())
                  for a, b in zip(layers[:-1], layers[1:])]
        active[side] = sum(n for n, _ in counts) / sum(t for _, t in counts)
    lib_frac = sum(e["lib"]["edges_90"] for e in edges) / sum(e["lib"]["n_edges"] for e in edges)
    pca_frac = sum(e["pca"]["edges_90"] for e in edges) / sum(e["pca"]["n_edges"] for e in edges)
    features = sum(summary["layers"][l]["lib"]["features_99"] for l in layers[:-1])
    idx_test = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:64]
    batch = [(x_test[idx_test], y_test[idx_test])]
    tangents = LocalPCATangents(x_train)
    align = gradient_alignment(model, batch, tangents, progress=False)
    rob = manifold_robustness(model, batch, tangents, eps=[0.03, 0.1, 0.3], n_draws=4, seed=0, progress=False)

    got = {m: s["values"][1] for m, s in report["variants"]["baseline"]["metrics"].items()}
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["lib_edge_fraction_90"] == pytest.approx(lib_frac, rel=1e-9)
    assert got["lib_pca_edge_ratio"] == pytest.approx(lib_frac / pca_frac, rel=1e-9)
    assert got["lib_active_edge_fraction_90"] == pytest.approx(active["lib"], rel=1e-9)
    assert got["pca_active_edge_fraction_90"] == pytest.approx(active["pca"], rel=1e-9)
    assert got["lib_pca_active_edge_ratio"] == pytest.approx(active["lib"] / active["pca"], rel=1e-9)
    assert got["lib_features_99"] == features
    assert got["modularity_q"] == pytest.approx(summary["modularity"]["lib"]["gamma_1.0"]["Q"], rel=1e-9)
    assert got["alignment"] == pytest.approx(align.mean, rel=1e-9)
    assert got["robustness_ratio"] == pytest.approx(rob.ratio[1], rel=1e-9)
    assert "llc" not in got  # opt-in

    # statistics: mean/std over seeds and Welch p-values against scipy and stats.compare_groups,
    # Holm-adjusted over every tested comparison of the report, verdicts on the adjusted p
    tested = [(m, s["comparison"]) for m, s in report["variants"]["fast"]["metrics"].items()
              if s["comparison"]["p"] is not None]
    assert report["correction"] == "holm" and report["n_comparisons"] == len(tested) >= 6
    holm = adjust_pvalues([c["p"] for _, c in tested], "holm")
    for (_, c), want_adj in zip(tested, holm):
        assert c["p_adjusted"] == pytest.approx(want_adj, rel=1e-12) and c["p_adjusted"] >= c["p"]
        assert c["significant"] == (want_adj < 0.05)
        assert c["verdict"] == ("" if want_adj >= 0.05 else "✓" if c["improved"] else "✗")
    for metric in ("accuracy", "lib_edge_fraction_90", "alignment", "robustness_ratio"):
        base = report["variants"]["baseline"]["metrics"][metric]
        fast = report["variants"]["fast"]["metrics"][metric]
        assert base["mean"] == pytest.approx(np.mean(base["values"]))
        assert fast["std"] == pytest.approx(np.std(fast["values"], ddof=1))
        cmp = fast["comparison"]
        want = compare_groups(base["values"], fast["values"], higher_is_better=metric in ("accuracy", "alignment"))
        assert cmp["p"] == pytest.approx(want["p"], rel=1e-12)
        if np.std(base["values"]) + np.std(fast["values"]) > 0:
            scipy_p = scipy_stats.ttest_ind(fast["values"], base["values"], equal_var=False).pvalue
            assert cmp["p"] == pytest.approx(scipy_p, rel=1e-9)
        assert cmp["diff"] == pytest.approx(fast["mean"] - base["mean"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `fast` | 2 |" in md and "LLC**: not measured" in md


def test_deterministic_cli_and_cache_reuse(runs, tmp_path, monkeypatch):
    task = str(runs["task_dir"])
    run_compare(discover_runs(task), tmp_path / "a", OPTIONS, progress=False)
    rc = eval_main(["compare", task, "--out", str(tmp_path / "b"), "--max-samples", "64", "--quiet"])
    assert rc == 0
    first = (tmp_path / "a" / "report.json").read_bytes()
    assert first == (tmp_path / "b" / "report.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "cache" / "fast").iterdir()) == ["seed0.json", "seed1.json"]

    calls = []
    real = measure_mod.measure_metric

    def counting(metric, ctx):
        calls.append(f"{ctx.run.variant}/{ctx.run.seed}/{metric.name}")
        return real(metric, ctx)

    monkeypatch.setattr(measure_mod, "measure_metric", counting)
    run_compare(discover_runs(task), tmp_path / "a", OPTIONS, progress=False)
    assert calls == []  # everything from the cache
    assert (tmp_path / "a" / "report.json").read_bytes() == first
    variants = discover_runs(task)
    variants["single"] = runs_from_paths("single", [runs["single"]])
    run_compare(variants, tmp_path / "a", OPTIONS, progress=False)
    assert {c.rsplit("/", 1)[0] for c in calls} == {"single/seed0"}  # only the new checkpoint, every metric
    assert len(calls) == 12  # accuracy, lib/pca/neuron edge fractions, lib/pca ratio, their active-edge forms (3), features, modularity, alignment, robustness
    calls.clear()
    run_compare(discover_runs(task), tmp_path / "a", MeasureOptions(max_samples=64, n_draws=2), progress=False)
    # n_draws enters only the robustness ratio's key: exactly that metric is measured again, on every run
    assert sorted(calls) == [f"{v}/seed{s}/robustness_ratio" for v in ("baseline", "fast") for s in (0, 1)]
    calls.clear()
    rc = eval_main(["compare", task, "--out", str(tmp_path / "a"), "--max-samples", "64", "--quiet",
                    "--correction", "none"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    # back to the default n_draws: the robustness ratio again (a cache entry keeps one key per metric)
    assert rc == 0 and len(calls) == 4 and {c.rsplit("/", 1)[1] for c in calls} == {"robustness_ratio"}
    assert report["correction"] == "none"
    cmp = report["variants"]["fast"]["metrics"]["accuracy"]["comparison"]
    assert cmp["p_adjusted"] == cmp["p"] and cmp["correction"] == "none"
    calls.clear()
    # only the metrics asked for: measured (here from the cache) and reported, and said so
    only = run_compare(discover_runs(task), tmp_path / "c", OPTIONS, progress=False,
                       metrics=["lib_active_edge_fraction_90", "accuracy"]).report
    assert [m["name"] for m in only["metrics"]] == ["accuracy", "lib_active_edge_fraction_90"]
    assert sorted(calls) == sorted(f"{v}/seed{s}/{m}" for v in ("baseline", "fast") for s in (0, 1)
                                   for m in ("accuracy", "lib_active_edge_fraction_90"))
    assert any("measured only the metrics asked for: accuracy, lib_active_edge_fraction_90" in m for m in only["messages"])
    full = json.loads(first)
    assert only["variants"]["fast"]["metrics"]["lib_active_edge_fraction_90"]["values"] == \
        full["variants"]["fast"]["metrics"]["lib_active_edge_fraction_90"]["values"]
    with pytest.raises(ValueError, match=r"\['llc'\]: not among the metrics these options measure: accuracy, "):
        run_compare(discover_runs(task), tmp_path / "c", OPTIONS, progress=False, metrics=["llc"])
    rc = eval_main(["compare", task, "--out", str(tmp_path / "d"), "--max-samples", "64", "--quiet",
                    "--metrics", "lib_active_edge_fraction_90", "accuracy"])
    cli = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rc == 0 and [m["name"] for m in cli["metrics"]] == ["accuracy", "lib_active_edge_fraction_90"]
    rc = eval_main(["compare", task, "--out", str(tmp_path / "e"), "--quiet", "--metrics", "lib_edges"])
    assert rc == 2 and not (tmp_path / "e").exists()  # a clear error before anything is measured or written


def test_a_run_being_measured_elsewhere_is_waited_for_and_not_measured_twice(runs, tmp_path, monkeypatch):
    """Two compare processes sharing a cache (a study measured in parts): a run whose entry lock is
    held elsewhere is put last and waited for, and only what the holder left unmeasured is measured."""
    import contextlib
    import shutil
    import threading
    import time

    from evaluation.compare import cache

    variants = discover_runs(runs["task_dir"])
    reference = run_compare(variants, tmp_path / "ref", OPTIONS, progress=False).report
    shared = tmp_path / "shared"
    calls = []
    real = measure_mod.measure_metric

    def counting(metric, ctx):
        calls.append((f"{ctx.run.variant}/{ctx.run.seed}", metric.name))
        return real(metric, ctx)

    monkeypatch.setattr(measure_mod, "measure_metric", counting)
    result = {}
    with contextlib.ExitStack() as holder:  # the other process, measuring baseline/seed0 (first in order)
        assert holder.enter_context(cache.entry_lock(cache.lock_path(shared, "baseline", "seed0"), wait=False))
        worker = threading.Thread(target=lambda: result.update(
            report=run_compare(variants, shared, OPTIONS, progress=False).report))
        worker.start()
        others = {f"{v}/seed{s}" for v in ("baseline", "fast") for s in (0, 1)} - {"baseline/seed0"}
        deadline = time.monotonic() + 300
        while len([c for c in calls if c[0] in others]) < 27 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the holder finishes all but one metric, writes the entry and releases the lock
        entry = json.loads((tmp_path / "ref" / "cache" / "baseline" / "seed0.json").read_text())
        del entry["measured"]["robustness_ratio"]
        target = cache.cache_path(shared, "baseline", "seed0")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(entry))
        assert not any(run == "baseline/seed0" for run, _ in calls)  # not measured while the lock was held
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert [c for c in calls if c[0] == "baseline/seed0"] == [("baseline/seed0", "robustness_ratio")]
    assert len(calls) == 37  # 12 metrics on each of the 3 other runs, one on the locked run
    assert calls[-1] == ("baseline/seed0", "robustness_ratio")  # put last
    for variant, stats in reference["variants"].items():
        for name, metric in stats["metrics"].items():
            assert result["report"]["variants"][variant]["metrics"][name]["values"] == metric["values"], name
    with cache.entry_lock(cache.lock_path(shared, "baseline", "seed0"), wait=False) as held:
        assert held  # released by the worker
    shutil.rmtree(tmp_path / "ref")


def test_one_seed_variant_and_mismatched_architecture(runs, tmp_path, capsys):
    variants = {"baseline": discover_runs(runs["task_dir"])["baseline"],
                "single": runs_from_paths("single", [runs["single"]])}
    report = run_compare(variants, tmp_path / "one", OPTIONS, progress=False).report
    assert any("'single' has 1 seed; no significance test" in m for m in report["messages"])
    cmp = report["variants"]["single"]["metrics"]["accuracy"]["comparison"]
    assert cmp["p"] is None and cmp["improved"] is None and cmp["verdict"] == "" and cmp["arrow"] in "↑↓="
    assert "no test" in (tmp_path / "one" / "report.md").read_text()

    variants["wide"] = runs_from_paths("wide", [runs["wide"]])
    with pytest.raises(ValueError, match=r"disagree on the architecture .*wide/seed0 have model"):
        run_compare(variants, tmp_path / "two", OPTIONS, progress=False)
    assert not (tmp_path / "two").exists()  # checked before anything is measured or written
    rc = eval_main(["compare", "--variant", "baseline", str(runs["task_dir"] / "baseline" / "seed0"),
                    "--variant", "wide", str(runs["wide"]), "--out", str(tmp_path / "three"), "--quiet"])
    assert rc == 2 and "disagree on the architecture" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no baseline variant 'control'; variants found: baseline, single"):
        run_compare({k: v for k, v in variants.items() if k != "wide"}, tmp_path / "four", OPTIONS,
                    baseline="control", progress=False)


def _entries(values_by_seed, variant):
    return [{"seed": f"seed{i}", "run_dir": f"/runs/{variant}/seed{i}", "notes": [],
             "metrics": {"accuracy": a, "lib_edge_fraction_90": e}, "details": {"task": "toy"}}
            for i, (a, e) in enumerate(values_by_seed)]


def test_build_report_hand_computed_case():
    """Edges fall from {0.5, 0.6, 0.7} to {0.1, 0.2, 0.3}: every relabelling of the 6 values
    but the observed split and its mirror has a smaller |mean difference|, so the exact
    permutation p = 2 / C(6, 3) = 0.1; Welch: t = -0.4 / sqrt(0.01/3 + 0.01/3), df = 4."""
    measurements = {"baseline": _entries([(0.9, 0.5), (0.92, 0.6), (0.94, 0.7)], "baseline"),
                    "reg": _entries([(0.8, 0.1), (0.82, 0.2), (0.84, 0.3)], "reg")}
    perm = build_report(measurements, test="permutation", alpha=0.15, correction="none")
    edges = perm["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["comparison"]
    assert edges["p"] == pytest.approx(0.1) and edges["arrow"] == "↓" and edges["verdict"] == "✓"
    acc = perm["variants"]["reg"]["metrics"]["accuracy"]["comparison"]
    assert acc["p"] == pytest.approx(0.1) and acc["arrow"] == "↓" and acc["verdict"] == "✗"
    assert [m["name"] for m in perm["metrics"]] == ["accuracy", "lib_edge_fraction_90"]  # unmeasured dropped
    # Holm over the two comparisons: both p = 0.1 -> max(2 · 0.1, 1 · 0.1) = 0.2, no longer significant at 0.15
    holm = build_report(measurements, test="permutation", alpha=0.15)
    for name in ("accuracy", "lib_edge_fraction_90"):
        c = holm["variants"]["reg"]["metrics"][name]["comparison"]
        assert (c["p"], c["p_adjusted"], c["verdict"], c["significant"]) == (pytest.approx(0.1), pytest.approx(0.2),
                                                                              "", False)

    welch = build_report(measurements, test="welch")
    t = -0.4 / math.sqrt(0.01 / 3 + 0.01 / 3)
    want = 2 * scipy_stats.t.sf(abs(t), 4)
    # accuracy: Δ -0.1 with sd 0.02 in both groups; smaller raw p, so Holm multiplies it by 2, edges' by 1
    want_acc = 2 * scipy_stats.t.sf(0.1 / math.sqrt(0.0004 / 3 + 0.0004 / 3), 4)
    edges = welch["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["comparison"]
    assert edges["p"] == pytest.approx(want) and edges["p_adjusted"] == pytest.approx(max(want, 2 * want_acc))
    acc = welch["variants"]["reg"]["metrics"]["accuracy"]["comparison"]
    assert acc["p_adjusted"] == pytest.approx(2 * want_acc) and welch["n_comparisons"] == 2
    assert welch["variants"]["reg"]["metrics"]["lib_edge_fraction_90"]["mean"] == pytest.approx(0.2)
    md = render_markdown(welch)
    assert f"Δ -0.4 ↓ (p={max(want, 2 * want_acc):.3g} (holm; raw {want:.3g})) ✓" in md
    assert "holm-adjusted over the report's 2 comparisons" in md
    with pytest.raises(ValueError, match="unknown test 'ttest'; allowed: welch, permutation"):
        build_report(measurements, test="ttest")
    with pytest.raises(ValueError, match="unknown correction 'fdr'; allowed: holm, bonferroni, none"):
        build_report(measurements, correction="fdr")


def test_study_restat_rebuilds_the_same_report(monkeypatch):
    """study/run_study.py --restat reads per-seed values back out of a report.json; rebuilding from
    them gives the same report."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "run_study", Path(__file__).resolve().parents[1] / "study" / "run_study.py")
    run_study = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_study", run_study)  # dataclasses look their module up there
    spec.loader.exec_module(run_study)
    measurements = {"baseline": _entries([(0.9, 0.5), (0.92, 0.6), (0.94, 0.7)], "baseline"),
                    "reg": _entries([(0.8, 0.1), (0.82, 0.2), (0.84, 0.3)], "reg")}
    measurements["reg"][0]["notes"] = ["a note"]
    report = json.loads(json.dumps(build_report(measurements, options={"max_samples": 8})))
    again = build_report(run_study.measurements_from_report(report), report["baseline"], report["test"],
                         report["alpha"], report["options"], report["messages"])
    assert again == report


def test_zero_spread_is_not_p_zero():
    """LIB features 21, 21, 21 against 19, 19, 19: Welch's t is infinite; the report uses the exact
    permutation test, whose p cannot go below 2 / C(6, 3) = 0.1, so it is not significant."""
    measurements = {"baseline": [{"seed": f"seed{i}", "run_dir": "b", "metrics": {"lib_features_99": 21.0}}
                                 for i in range(3)],
                    "reg": [{"seed": f"seed{i}", "run_dir": "r", "metrics": {"lib_features_99": 19.0}}
                            for i in range(3)]}
    c = build_report(measurements)["variants"]["reg"]["metrics"]["lib_features_99"]["comparison"]
    assert c["test"] == "permutation" and c["p"] == pytest.approx(0.1) and c["verdict"] == ""
    assert "Welch's t is undefined" in c["note"] and "smallest possible p = 0.1" in c["note"]


def test_bad_options():
    with pytest.raises(ValueError, match=r"ratio_eps 0.5 must be one of robustness_eps \[0.03, 0.1, 0.3\]"):
        MeasureOptions(ratio_eps=0.5)
    with pytest.raises(ValueError, match="unknown tangents 'pca'; allowed: auto, exact, local_pca, global_pca"):
        MeasureOptions(tangents="pca")
    with pytest.raises(ValueError, match="max_samples must be an integer >= 2, got 1"):
        MeasureOptions(max_samples=1)


MANIFOLD = """
seed_everything: 0
trainer: {max_steps: 3, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {d_in: 16, hidden: [12, 12], d_out: 3}
data:
  class_path: interp_train.data.manifold.ManifoldDataModule
  init_args: {latent_dim: 2, ambient_dim: 16, n_classes: 3, n_train: 300, n_val: 50, n_test: 100, hidden: 16}
"""

MODULAR = """
seed_everything: 0
trainer: {max_steps: 3, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.transformer.Transformer
    init_args: {d_vocab: 8, d_vocab_out: 7, n_ctx: 3, d_model: 8, n_heads: 2, d_head: 4, d_mlp: 16}
data:
  class_path: interp_train.data.modular.ModularAdditionDataModule
  init_args: {p: 7, train_fraction: 0.5}
"""


def _train_yaml(tmp, text, name):
    from interp_train.cli import main as train_main

    (tmp / f"{name}.yaml").write_text(text)
    train_main(["fit", "--config", str(tmp / f"{name}.yaml"), "--variant", "baseline", "--run_dir", str(tmp / name),
                "--test_after_fit", "false"])
    return runs_from_paths("baseline", [tmp / name])[0]


def test_manifold_run_uses_exact_tangents(runs):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint

    run = _train_yaml(runs["tmp"], MANIFOLD, "manifold")
    entry = measure_run(run, OPTIONS)
    loaded = load_checkpoint(run.checkpoint)
    dm = loaded.datamodule
    x, y, z = dm.splits["test"].tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:64]
    # exact tangents read the latents z from the batch's third element
    want = gradient_alignment(loaded.model, [(x[idx], y[idx], z[idx])], dm.tangent_provider("exact"), progress=False)
    assert entry["details"]["alignment"]["provider"].startswith("ExactTangents")
    assert entry["details"]["alignment"]["k"] == 2 and entry["details"]["alignment"]["d"] == 16
    assert entry["metrics"]["alignment"] == pytest.approx(want.mean, rel=1e-9)



def _embeddings(model, tokens):
    """hook_embed activations of a recipe module, read by a plain forward hook (not through interp_train.sites)."""
    seen = []
    handle = model.model.hook_dict["hook_embed"].register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen[0].reshape(tokens.shape[0], -1)


def test_token_run_measures_alignment_at_the_embedding(runs):
    from evaluation.metrics.alignment import gradient_alignment
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.metrics.robustness import manifold_robustness
    from interp_train.tangents import LocalPCATangents

    run = _train_yaml(runs["tmp"], MODULAR, "modular")
    entry = measure_run(run, OPTIONS)
    # modular addition reads only the last position: the paper's layout by default
    assert entry["details"]["node_layers"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]",
                                                "blocks.0.hook_resid_post[-1]", "output[-1]"]
    assert entry["metrics"]["lib_edge_fraction_90"] is not None

    # the same measurement by hand: local PCA over the embeddings of all 24 training pairs (p = 7,
    # train fraction 0.5), 32 neighbours clamped to N − 2 = 22, then the evaluation API at hook_embed
    loaded = load_checkpoint(run.checkpoint)
    model, dm = loaded.model.eval(), loaded.datamodule
    dm.setup("fit")
    x_train = dm.splits["train"].tensors[0]
    x_test, y_test = dm.splits["test"].tensors
    embeds = _embeddings(model, x_train)
    assert embeds.shape == (24, 3 * 8)
    tangents = LocalPCATangents(embeds, n_neighbors=22, explained_variance=0.9, seed=0)
    batch = [(x_test, y_test)]  # all 25 held-out pairs, in order (max_samples 64 > 25: no subset drawn)
    want = gradient_alignment(model, batch, tangents, target="loss", site="hook_embed", progress=False)
    rob = manifold_robustness(model, batch, tangents, eps=[0.03, 0.1, 0.3], n_draws=4, seed=0, site="hook_embed",
                              progress=False)
    assert entry["metrics"]["alignment"] == pytest.approx(want.mean, rel=1e-9)
    assert entry["metrics"]["robustness_ratio"] == pytest.approx(rob.ratio[1], rel=1e-9)
    info = entry["details"]["tangents"]
    k = tangents.dim
    assert (info["k"], info["d"], info["n_neighbors"], info["n_reference"]) == (k, 24, 22, 24)
    assert 1 <= k < 22 and info["baseline"] == pytest.approx(math.sqrt(k / 24))
    assert entry["details"]["alignment"]["site"] == "hook_embed" and entry["details"]["alignment"]["k"] == k
    assert info["explained_variance_curve"][-1] >= 0.9 > (info["explained_variance_curve"][-2] if k > 1 else 0)
    # the nearest other training embedding, by brute force
    dist = torch.cdist(embeds.double(), embeds.double()) + torch.diag(torch.full((24,), math.inf))
    assert info["median_nearest_distance"] == pytest.approx(float(dist.min(dim=1).values.median()), rel=1e-5)
    # neighbours differing in one token: counted by explicit loops
    near = dist.topk(22, dim=1, largest=False).indices
    one = sum(int((x_train[j] != x_train[i]).sum() == 1) for i in range(24) for j in near[i].tolist())
    assert info["neighbours_one_token_change"] == pytest.approx(one / (24 * 22))
    assert any("hook_embed" in n and f"k = {k} of d = 24" in n for n in entry["notes"])


TEXT = """
seed_everything: 0
trainer: {max_steps: 2, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.transformer.Transformer
    init_args: {d_vocab: 256, d_vocab_out: 256, n_ctx: 8, d_model: 8, n_heads: 2, d_head: 4, d_mlp: 16,
      n_layers: 1, act_fn: gelu, normalization_type: LN}
data:
  class_path: interp_train.data.text.ByteTextDataModule
  init_args: {source: pydoc, seq_len: 8, max_bytes: 2000, batch_size: 16}
"""


def test_byte_lm_alignment_at_the_embedding(runs):
    run = _train_yaml(runs["tmp"], TEXT, "bytes")
    options = MeasureOptions(max_samples=16, embed_reference=64, embed_n_neighbors=10, node_layers=(
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "output"))
    entry = measure_run(run, options)
    info = entry["details"]["tangents"]
    assert (info["d"], info["n_reference"], info["n_neighbors"]) == (8 * 8, 64, 10)
    assert info["baseline"] == pytest.approx(math.sqrt(info["k"] / 64))
    align = entry["details"]["alignment"]
    assert align["n"] == 13 and align["site"] == "hook_embed"  # 249 windows of 8 bytes, 5 % test split: 13 < 16
    assert 0 < entry["metrics"]["alignment"] <= 1 and entry["metrics"]["robustness_ratio"] > 0


def test_every_option_is_part_of_a_metric_key(tmp_path):
    """Each MeasureOptions field switches a metric on or enters the key of the metrics that name
    it, and only theirs."""
    from evaluation.compare.cache import metric_key, run_digest
    from evaluation.compare.metrics import all_metrics

    ckpt, cfg = tmp_path / "last.ckpt", tmp_path / "config.yaml"
    ckpt.write_bytes(b"weights"), cfg.write_text("model: {}")
    digest = run_digest(ckpt, cfg)
    base = dataclasses.asdict(OPTIONS)
    metrics = all_metrics()
    covered = {o for m in metrics for o in m.options} | {m.switch for m in metrics if m.switch}
    assert covered == set(base) - {"device"}  # where a run is measured, not what: results agree across devices
    changed = {"embed_n_neighbors": 8, "llc_burnin": 0, "llc_lr": 1e-4, "max_samples": 7, "n_draws": 2,
               "circuit_search": "lagrangian"}
    for name, value in changed.items():
        other = {**base, name: value}
        moved = {m.name for m in metrics if metric_key(digest, m, other) != metric_key(digest, m, base)}
        assert moved == {m.name for m in metrics if name in m.options}, name
    cfg.write_text("model: {x: 1}")
    assert all(metric_key(run_digest(ckpt, cfg), m, base) != metric_key(digest, m, base) for m in metrics)
    with pytest.raises(ValueError, match="embed_n_neighbors must be an integer >= 3, got 2"):
        MeasureOptions(embed_n_neighbors=2)
    with pytest.raises(ValueError, match=r"embed_explained_variance must be in \(0, 1\], got 1.5"):
        MeasureOptions(embed_explained_variance=1.5)


def test_lib_probe_options_reach_fit_lib(monkeypatch, runs):
    from evaluation.lib import fit as lib_mod

    seen = []
    real = lib_mod.fit_lib

    def spy(model, data, layers, config, **kw):
        seen.append(config)
        return real(model, data, layers, config, **kw)

    monkeypatch.setattr(lib_mod, "fit_lib", spy)
    run = discover_runs(runs["task_dir"])["baseline"][0]
    options = MeasureOptions(max_samples=16, alignment=False, lib_sources=3, lib_edge_sources=2,
                             lib_jacobian_dtype="float32")
    entry = measure_run(run, options)
    (config,) = seen
    assert (config.stochastic_sources, config.stochastic_over, config.edge_sources, config.jacobian_dtype) == (
        3, "positions_and_hidden", 2, "float32")
    assert entry["metrics"]["lib_edge_fraction_90"] > 0


TOY_METRIC = '''
from evaluation.compare.metrics.base import CompareMetric, Measurement, register


@register
class ToyParameterCount(CompareMetric):
    name = "toy_parameter_count"
    label = "parameters"
    higher_is_better = False
    description = "number of trainable parameters (a test metric)"
    version = {version}
    options = ()
    order = 99

    def measure(self, ctx):
        n = sum(p.numel() for p in ctx.module.parameters())
        return Measurement(float(n + {version} - 1), notes=["toy v{version}"])
'''


def _import_toy_metric(tmp_path, version):
    """A metric defined in a module of its own (outside the package), registered on import."""
    import importlib.util

    path = tmp_path / f"toy_metric_v{version}.py"
    path.write_text(TOY_METRIC.format(version=version))
    spec = importlib.util.spec_from_file_location("toy_compare_metric", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_a_new_metric_is_measured_alone_and_versioned(runs, tmp_path, monkeypatch):
    """A metric added after the runs were cached is measured on every cached run, nothing else is
    recomputed, and bumping its version re-measures it alone."""
    from evaluation.compare.metrics import unregister

    variants = discover_runs(runs["task_dir"])
    before = run_compare(variants, tmp_path / "out", OPTIONS, progress=False).report
    calls = []
    real = measure_mod.measure_metric

    def counting(metric, ctx):
        calls.append((f"{ctx.run.variant}/{ctx.run.seed}", metric.name, metric.version))
        return real(metric, ctx)

    monkeypatch.setattr(measure_mod, "measure_metric", counting)
    try:
        _import_toy_metric(tmp_path, 1)
        report = run_compare(variants, tmp_path / "out", OPTIONS, progress=False).report
        runs_ = [f"{v}/seed{s}" for v in ("baseline", "fast") for s in (0, 1)]
        assert sorted(calls) == [(r, "toy_parameter_count", 1) for r in runs_]
        n_params = 64 * 12 + 12 + 12 * 12 + 12 + 12 * 10 + 10  # MLP 64 -> 12 -> 12 -> 10
        assert report["variants"]["fast"]["metrics"]["toy_parameter_count"]["values"] == [n_params] * 2
        assert report["metrics"][-1] == {"name": "toy_parameter_count", "label": "parameters",
                                         "higher_is_better": False, "version": 1,
                                         "description": "number of trainable parameters (a test metric)"}
        for name, stats in before["variants"]["fast"]["metrics"].items():  # the others: the cached values
            assert report["variants"]["fast"]["metrics"][name]["values"] == stats["values"]
        assert "toy v1" in report["variants"]["fast"]["notes"]

        calls.clear()
        _import_toy_metric(tmp_path, 2)  # same class, version 2, and its value moves by one
        report = run_compare(variants, tmp_path / "out", OPTIONS, progress=False).report
        assert sorted(calls) == [(r, "toy_parameter_count", 2) for r in runs_]
        assert report["variants"]["fast"]["metrics"]["toy_parameter_count"]["values"] == [n_params + 1] * 2
        assert "toy v2" in report["variants"]["fast"]["notes"] and "toy v1" not in report["variants"]["fast"]["notes"]
    finally:
        unregister("toy_parameter_count")
    calls.clear()
    report = run_compare(variants, tmp_path / "out", OPTIONS, progress=False).report
    assert calls == [] and "toy_parameter_count" not in report["variants"]["fast"]["metrics"]


def test_metric_registration_is_checked():
    from evaluation.compare.metrics import CompareMetric, register

    class NoOptions(CompareMetric):
        name, label, description = "bad_metric", "bad", "a metric naming an option that does not exist"
        options = ("max_sample",)

        def measure(self, ctx):
            return 0.0

    with pytest.raises(ValueError, match=r"unknown MeasureOptions field\(s\) \['max_sample'\]"):
        register(NoOptions)

    class Duplicate(NoOptions):
        name, options = "accuracy", ()

    with pytest.raises(ValueError, match="compare metric 'accuracy' is defined twice"):
        register(Duplicate)

    class StrayAdded(NoOptions):
        name, options, options_added = "bad_metric", ("max_samples",), {"seed": 0}

    with pytest.raises(ValueError, match=r"options_added names \['seed'\], which are not in its options \['max_samples'\]"):
        register(StrayAdded)


def test_default_node_layers_of_a_cnn_are_sites_with_the_expected_shapes():
    """SmallCNN: the input, each conv block's pooled map, the head's hidden ReLU and the logits."""
    from evaluation.compare.context import default_node_layers
    from interp_train.models.mlp import SmallCNN
    from interp_train.sites import run_model

    wrapper = torch.nn.Module()
    wrapper.model = SmallCNN(in_channels=1, channels=[4, 8], hidden=16, n_classes=3, image_size=8)
    layers = default_node_layers(wrapper)
    assert layers == ["input", "model.features.2", "model.features.5", "model.head.2", "output"]
    res = run_model(wrapper.model, torch.randn(5, 1, 8, 8), record=[name[len("model."):] for name in layers[1:-1]])
    assert [tuple(a.shape) for a in res.activations.values()] == [(5, 4, 4, 4), (5, 8, 2, 2), (5, 16)]
