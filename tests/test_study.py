"""study/run_study.py's sweep harness: strength scaling of recipe weights, run-directory naming,
resume skipping, trade-off curves and the summary — no real training (fit is replaced by a fake),
except the slow end-to-end test."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from study import run_study  # noqa: E402
from study.sweep import (Family, TaskPlan, cells, derived_recipe, multiplier_label, parse_variant, run_dir,  # noqa: E402
                         scale_weight, scaled_recipe, variant_name)
from study.tradeoff import best_within, plot_tradeoff, series  # noqa: E402


def schedule_from(weight):
    """The weight as interp_train builds it: a number, or the schedule class named by class_path."""
    from interp_train.schedules import as_schedule

    if isinstance(weight, dict):
        module, _, name = weight["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**weight["init_args"])
    return as_schedule(weight)


@pytest.mark.parametrize("weight", [
    0.01, 3,
    {"class_path": "interp_train.schedules.LinearWarmup", "init_args": {"value": 0.1, "warmup_steps": 200}},
    {"class_path": "interp_train.schedules.LinearWarmup", "init_args": {"value": 0.5, "warmup_steps": 10, "start": 0.2}},
    {"class_path": "interp_train.schedules.Cosine",
     "init_args": {"value": 1.0, "total_steps": 100, "warmup_steps": 10, "final": 0.1}},
    {"class_path": "interp_train.schedules.Constant", "init_args": {"value": 2.0}},
])
@pytest.mark.parametrize("multiplier", [0.1, 1.0, 10.0])
def test_scaled_weight_is_multiplier_times_the_schedule_at_every_step(weight, multiplier):
    """w'(t) = m · w(t) for every step t, evaluated by the schedule classes themselves."""
    original, scaled = schedule_from(weight), schedule_from(scale_weight(weight, multiplier))
    for step in (0, 1, 5, 10, 50, 99, 100, 200, 1000):
        assert scaled(step) == pytest.approx(multiplier * original(step), rel=1e-12, abs=0)


def test_scale_weight_keeps_the_schedule_shape_and_the_input():
    weight = {"class_path": "interp_train.schedules.LinearWarmup", "init_args": {"value": 0.1, "warmup_steps": 200}}
    scaled = scale_weight(weight, 10.0)
    assert scaled == {"class_path": "interp_train.schedules.LinearWarmup",
                      "init_args": {"value": pytest.approx(1.0), "warmup_steps": 200}}
    assert weight["init_args"]["value"] == 0.1  # not modified in place


def test_scaled_recipe_scales_every_regularizer_and_nothing_else():
    recipe = yaml.safe_load((REPO / "recipes/digits/degeneracy.yaml").read_text())  # two regularizers, 0.01 each
    scaled = scaled_recipe(recipe, 10.0)
    assert [r["init_args"]["weight"] for r in scaled["model"]["regularizers"]] == [pytest.approx(0.1)] * 2
    assert [r["init_args"]["weight"] for r in recipe["model"]["regularizers"]] == [0.01, 0.01]
    for reg in scaled["model"]["regularizers"]:
        reg["init_args"]["weight"] = 0.01
    assert scaled == recipe  # everything but the weights is the recipe's
    no_weight = {"model": {"regularizers": [{"class_path": "x.Y", "init_args": {}}]}}
    assert scaled_recipe(no_weight, 0.1)["model"]["regularizers"][0]["init_args"]["weight"] == pytest.approx(0.1)


def test_adversarial_training_is_swept_by_its_radius_not_its_weight():
    """PGD adversarial training replaces the task loss, so its weight only rescales the loss (AdamW's
    update is invariant to that): scaling it is refused; the family scales epsilon instead."""
    recipe = yaml.safe_load((REPO / "recipes/digit_manifold/adversarial.yaml").read_text())  # epsilon 1.0
    with pytest.raises(ValueError, match="replaces the task loss, so its weight only rescales the loss"):
        scaled_recipe(recipe, 10.0)
    scaled = scaled_recipe(recipe, 0.1, strength="epsilon")["model"]["regularizers"][0]["init_args"]
    assert scaled["epsilon"] == pytest.approx(0.1) and scaled["weight"] == 1.0
    with pytest.raises(ValueError, match="no regularizer sets 'sigma' in its init_args"):
        scaled_recipe(recipe, 0.1, strength="sigma")
    for task, plan in run_study.PLANS.items():
        if "adversarial" in plan.families:
            assert plan.family("adversarial").strength == "epsilon", task
    plan = TaskPlan("recipes/digit_manifold", "baseline", {"adversarial": Family("adversarial", "epsilon")})
    (cell,) = cells(plan, "t", [0], Path("r"), REPO, families=["adversarial"], multipliers=[10])
    assert cell.strength == "epsilon" and cell.recipe == REPO / "recipes/digit_manifold/adversarial.yaml"


def test_bad_weights_and_recipes_are_refused():
    with pytest.raises(ValueError, match="no model.regularizers to scale"):
        scaled_recipe(yaml.safe_load((REPO / "recipes/digits/baseline.yaml").read_text()), 10.0)
    with pytest.raises(ValueError, match="a weight must be a number or a schedule, got True"):
        scale_weight(True, 10.0)
    with pytest.raises(ValueError, match="schedule 'my.Schedule' has no 'value' to scale"):
        scale_weight({"class_path": "my.Schedule", "init_args": {"level": 1.0}}, 10.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match="a strength multiplier must be a finite number > 0"):
            variant_name("grad_norm", bad)


def test_names_and_directories():
    assert [multiplier_label(m) for m in (0.1, 1.0, 10.0, 1, 0.03, 100.0)] == ["x0.1", "x1", "x10", "x1", "x0.03", "x100"]
    assert variant_name("off_manifold_grad", 0.1) == "off_manifold_grad_x0.1"
    assert parse_variant("off_manifold_grad_x0.1") == ("off_manifold_grad", 0.1)
    assert parse_variant("grad_norm_x10") == ("grad_norm", 10.0)
    assert parse_variant("baseline") == ("baseline", None)
    with pytest.raises(ValueError, match="not a study cell name"):
        parse_variant("grad_norm")
    assert run_dir(Path("r"), "digits", "grad_norm_x10", 3) == Path("r/digits/grad_norm_x10/seed3")


def test_cells_of_a_plan(tmp_path):
    plan = TaskPlan("recipes/digit_manifold", "cnn_baseline", {"adversarial": "cnn_adversarial", "grad_norm": "cnn_grad_norm"})
    got = list(cells(plan, "dm_cnn", [0, 1, 2, 3, 4], tmp_path, REPO))
    assert len(got) == 5 * (1 + 2 * 3)
    names = sorted({str(c.directory.relative_to(tmp_path).parent) for c in got})
    assert names == ["dm_cnn/adversarial_x0.1", "dm_cnn/adversarial_x1", "dm_cnn/adversarial_x10", "dm_cnn/baseline",
                     "dm_cnn/grad_norm_x0.1", "dm_cnn/grad_norm_x1", "dm_cnn/grad_norm_x10"]
    base = [c for c in got if c.variant == "baseline"]
    assert [c.seed for c in base] == [0, 1, 2, 3, 4] and {c.recipe.name for c in base} == {"cnn_baseline.yaml"}
    assert {c.recipe.name for c in got if c.family == "grad_norm"} == {"cnn_grad_norm.yaml"}
    part = list(cells(plan, "dm_cnn", [0], tmp_path, REPO, families=["grad_norm"], multipliers=[10]))
    assert [(c.variant, c.seed) for c in part] == [("grad_norm_x10", 0)]  # no baseline unless asked for
    with pytest.raises(ValueError, match="no family 'interaction'; allowed: baseline, adversarial, grad_norm"):
        list(cells(plan, "dm_cnn", [0], tmp_path, REPO, families=["interaction"]))
    with pytest.raises(ValueError, match="may not be called 'baseline'"):
        TaskPlan("recipes/digits", "baseline", {"baseline": "grad_norm"})
    fixed = TaskPlan("recipes/modular_addition", "cpu", {"degeneracy": "cpu_degeneracy"},
                     fixed={"weight_sparsity_d0.1": "cpu_weight_sparsity_strong"})
    got = list(cells(fixed, "ma", [0, 1], tmp_path, REPO))
    assert [(c.variant, c.seed, c.multiplier) for c in got[-2:]] == [("weight_sparsity_d0.1_x1", 0, None),
                                                                      ("weight_sparsity_d0.1_x1", 1, None)]
    assert len(got) == 2 * (1 + 3 + 1) and parse_variant("weight_sparsity_d0.1_x1") == ("weight_sparsity_d0.1", 1.0)
    ws = got[-1]
    assert derived_recipe(ws) == yaml.safe_load(ws.recipe.read_text())  # as it is: WeightSparsity has no weight
    part = list(cells(fixed, "ma", [0], tmp_path, REPO, families=["weight_sparsity_d0.1"], multipliers=[10]))
    assert [c.variant for c in part] == ["weight_sparsity_d0.1_x1"]  # not swept, whatever --multipliers says
    with pytest.raises(ValueError, match="both swept and fixed"):
        TaskPlan("recipes/digits", "baseline", {"a": "grad_norm"}, fixed={"a": "grad_norm"})
    with pytest.raises(ValueError, match="no family 'x'; allowed: baseline, degeneracy, weight_sparsity_d0.1"):
        list(cells(fixed, "ma", [0], tmp_path, REPO, families=["x"]))
    for task, plan in run_study.PLANS.items():  # every planned recipe file exists
        for c in cells(plan, task, [0], tmp_path, REPO):
            assert c.recipe.is_file(), c.recipe


class FakeFit:
    """Stands in for InterpTrainCLI: records the arguments, writes metrics.json (fails for one run dir)."""

    calls: list = []
    fail_in: str | None = None

    def __init__(self, args):
        FakeFit.calls.append(args)
        directory = Path(args[args.index("--run_dir") + 1])
        if FakeFit.fail_in and FakeFit.fail_in in str(directory):
            raise RuntimeError("diverged")
        (directory / "metrics.json").write_text("{}")


def test_train_skips_done_runs_writes_the_derived_recipe_and_survives_a_failure(tmp_path, monkeypatch):
    import interp_train.cli

    monkeypatch.setattr(interp_train.cli, "InterpTrainCLI", FakeFit)
    FakeFit.calls, FakeFit.fail_in = [], "grad_norm_x10/seed1"
    plan = run_study.PLANS["digits"]
    todo = list(cells(plan, "digits", [0, 1], tmp_path, REPO, families=["baseline", "grad_norm"]))
    done = run_dir(tmp_path, "digits", "grad_norm_x0.1", 0)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    logs = []
    failed = run_study.train(plan, todo, "cmd", log=logs.append)
    trained = [Path(a[a.index("--run_dir") + 1]).relative_to(tmp_path) for a in FakeFit.calls]
    assert len(trained) == 2 * 4 - 1 and Path("digits/grad_norm_x0.1/seed0") not in trained
    assert [(c.variant, c.seed) for c in failed] == [("grad_norm_x10", 1)]
    assert any("FAILED" in m and "diverged" in m for m in logs)
    assert any("grad_norm_x0.1 seed0: done already" in m for m in logs)
    args = FakeFit.calls[trained.index(Path("digits/grad_norm_x10/seed0"))]
    assert args[args.index("--seed_everything") + 1] == "0"
    recipe = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    assert Path(args[args.index("--config") + 1]) == tmp_path / "digits/grad_norm_x10/seed0/study_recipe.yaml"
    assert recipe["model"]["regularizers"][0]["init_args"]["weight"]["init_args"]["value"] == pytest.approx(1.0)
    info = json.loads((tmp_path / "digits/grad_norm_x10/seed0/study.json").read_text())
    assert info["multiplier"] == 10.0 and info["command"] == "cmd" and info["train_seconds"] >= 0
    base = yaml.safe_load((tmp_path / "digits/baseline/seed1/study_recipe.yaml").read_text())
    assert base == yaml.safe_load((REPO / "recipes/digits/baseline.yaml").read_text())
    assert info["fit_args"] == args
    pin = args.index("--model.shared_forward")  # the committed runs' separate task forward pass
    assert args[pin + 1] == "false"
    FakeFit.calls, FakeFit.fail_in = [], None
    logs.clear()
    assert run_study.train(plan, todo, "cmd", log=logs.append) == []  # a rerun trains only the failed run
    assert [Path(a[a.index("--run_dir") + 1]).relative_to(tmp_path) for a in FakeFit.calls] == \
        [Path("digits/grad_norm_x10/seed1")]
    assert not any("WARNING" in m for m in logs)
    recorded = tmp_path / "digits/grad_norm_x10/seed0/study.json"  # as written before the pin was
    recorded.write_text(json.dumps({**info, "fit_args": args[:pin] + args[pin + 2:]}))
    run_study.train(plan, [c for c in todo if c.directory == recorded.parent], "cmd", log=logs.append)
    assert "grad_norm_x10 seed0: done already" in logs[-1] and "WARNING" not in logs[-1]
    changed = TaskPlan(plan.recipe, plan.baseline, plan.families, extra=("--trainer.max_epochs", "5"))
    run_study.train(changed, todo[:1], "cmd", log=logs.append)  # a finished run trained with other settings
    assert "WARNING: trained with other settings: fit arguments" in logs[-1] and "--trainer.max_epochs 5" in logs[-1]
    recipe_file = tmp_path / "digits/grad_norm_x10/seed0/study_recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace("value: 1.0", "value: 2.0"))
    run_study.train(plan, [c for c in todo if c.directory == recipe_file.parent], "cmd", log=logs.append)
    assert "study_recipe.yaml differs from" in logs[-1] and "grad_norm.yaml x 10" in logs[-1]


def test_dry_run_and_argument_errors(tmp_path, capsys):
    run_study.main(["--tasks", "digit_manifold", "--seeds", "0", "--root", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "[digit_manifold] 0/16 runs done" in out
    assert f"todo  {tmp_path}/digit_manifold/adversarial_x10/seed0  (adversarial.yaml × 10)" in out
    with pytest.raises(SystemExit):
        run_study.main(["--tasks", "digits", "manifold", "--families", "grad_norm", "--dry-run"])
    assert "--families needs exactly one task" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no family 'adversarial'"):
        run_study.main(["--tasks", "digits", "--families", "adversarial", "--root", str(tmp_path), "--dry-run"])
    with pytest.raises(SystemExit, match=r"\[text_3000\] --metrics: metrics \['llc'\]: not among the metrics .*circuit_nodes"):
        run_study.main(["--tasks", "text_3000", "--compare-only", "--metrics", "llc", "--root", str(tmp_path)])


def test_a_repeated_seed_is_one_run():
    assert run_study.parse_args(["--seeds", "3", "0", "3"]).seeds == [3, 0]  # `--seeds 0 {}` with {} = 0


def test_llc_flags_override_the_plan_and_exclude_each_other(capsys):
    with pytest.raises(SystemExit):  # --metrics chooses what to measure: only with --compare-only
        run_study.parse_args(["--tasks", "text", "--metrics", "accuracy"])
    assert run_study.parse_args(["--tasks", "text", "--compare-only", "--metrics", "accuracy"]).metrics == ["accuracy"]
    assert run_study.parse_args(["--tasks", "text"]).llc is None  # the plan decides
    assert run_study.parse_args(["--tasks", "text", "--llc"]).llc is True
    assert run_study.parse_args(["--tasks", "modular_addition", "--no-llc"]).llc is False
    with pytest.raises(SystemExit):
        run_study.parse_args(["--llc", "--no-llc"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [([], {"text": False, "digits": True}), (["--llc"], {"text": True, "digits": True}),
                                             (["--no-llc"], {"text": False, "digits": False})])
def test_llc_flag_reaches_the_measure_options_of_each_task(tmp_path, monkeypatch, flags, expected):
    """What ``--llc`` / ``--no-llc`` / neither hand to compare: the flag when given, else the plan's."""
    import evaluation.compare

    class Measured(Exception):
        pass

    seen = {}

    def fake_run_compare(variants, cache_dir, options, **kwargs):
        seen[cache_dir.parent.name] = options
        raise Measured

    monkeypatch.setattr(evaluation.compare, "run_compare", fake_run_compare)
    monkeypatch.setattr(evaluation.compare, "runs_from_paths", lambda variant, paths: list(paths))
    monkeypatch.setattr(run_study, "other_architectures", lambda variants, baseline: [])  # the fake runs have no config
    for task in expected:
        done = run_dir(tmp_path, task, "baseline", 0)
        done.mkdir(parents=True)
        (done / "metrics.json").write_text("{}")
        with pytest.raises(Measured):
            run_study.main(["--tasks", task, "--families", "baseline", "--seeds", "0", "--root", str(tmp_path),
                            "--out", str(tmp_path / "out"), "--compare-only", *flags])
    assert {task: options.llc for task, options in seen.items()} == expected
    assert run_study.PLANS["text"].llc is False and run_study.PLANS["digits"].llc is True  # what the default row assumes
    assert seen["text"].edge_ablation is False and seen["text"].circuit is True  # the plan's other options still apply


def sweep_report():
    """A compare report of a sweep: baseline and two families at 0.1 / 1 / 10, 3 seeds each."""
    from evaluation.compare import build_report

    def entries(variant, acc, align):
        return [{"seed": f"seed{i}", "run_dir": f"{variant}/seed{i}", "details": {"task": "t"},
                 "metrics": {"accuracy": acc + 0.001 * i, "alignment": align + 0.01 * i}} for i in range(3)]

    m = {"baseline": entries("baseline", 0.95, 0.30)}
    for mult, (acc, align) in {0.1: (0.95, 0.32), 1: (0.945, 0.50), 10: (0.90, 0.70)}.items():
        m[variant_name("noise", mult)] = entries("noise", acc, align)
    for mult, (acc, align) in {0.1: (0.951, 0.30), 1: (0.952, 0.31), 10: (0.953, 0.33)}.items():
        m[variant_name("wd", mult)] = entries("wd", acc, align)
    return json.loads(json.dumps(build_report(m)))


def test_tradeoff_series_best_cell_and_plot(tmp_path):
    report = sweep_report()
    got = series(report, "alignment")
    assert list(got) == ["noise", "wd"]
    assert [p["multiplier"] for p in got["noise"]] == [0.1, 1.0, 10.0]
    assert [p["mean"] for p in got["noise"]] == pytest.approx([0.33, 0.51, 0.71])
    best = best_within(report, "alignment", max_accuracy_drop=0.01)  # noise_x10 costs 5 points: excluded
    assert best["variant"] == "noise_x1" and best["ratio"] == pytest.approx(0.51 / 0.31)
    assert best["accuracy_diff"] == pytest.approx(-0.005)
    assert best_within(report, "alignment", max_accuracy_drop=0.1)["variant"] == "noise_x10"
    assert plot_tradeoff(report, tmp_path / "tradeoff.png") == "tradeoff.png"
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_and_restat(tmp_path):
    from study.summary import write_summary

    report = sweep_report()
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "report.json").write_text(json.dumps(report))
    (tmp_path / "digits" / "study.json").write_text(json.dumps({
        "seeds": [0, 1, 2], "cells": ["baseline"], "n_runs": 21, "train_seconds": 600.0, "runs_without_time": 0,
        "train_commands": ["python study/run_study.py --tasks digits --train-only"],
        "compares": [{"command": "python study/run_study.py --tasks digits --compare-only", "seconds": 90.0,
                      "date": "2026-12-02 06:00:00 UTC"}],
        "alignment_random_baseline": {"k": 10, "d": 256, "baseline": 0.1976}}))
    text = write_summary(tmp_path, ["digits", "manifold"]).read_text()
    assert "## digits" in text and "## manifold" not in text
    assert "21 runs, training 10.0 min" in text and "compare 1.5 min (first)" in text
    assert "`noise_x1` 0.31 → 0.51 (×1.65" in text and "-0.50 points of accuracy" in text
    assert "√(10/256) = 0.198" in text and "2026-12-02 06:00:00 UTC" in text
    assert "| `noise_x10` | 3 |" in text
    run_study.restat(tmp_path, tmp_path / "figures", ["digits"], log=lambda m: None)
    assert json.loads((tmp_path / "digits" / "report.json").read_text()) == report
    assert (tmp_path / "figures" / "digits_tradeoff.png").is_file()


TINY_MANIFOLD = ["--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--data.init_args.n_train", "64",
                 "--data.init_args.n_val", "32", "--data.init_args.n_test", "32"]


@pytest.mark.slow
def test_train_and_compare_end_to_end(tmp_path):
    """Two seeds of the manifold baseline and of grad_norm at 0.1 and 10, a few steps each: the
    report holds every cell, the trade-off plot and the cost record."""
    plan = TaskPlan("recipes/manifold", "baseline", {"grad_norm": "grad_norm"}, multipliers=(0.1, 10.0),
                    extra=tuple(TINY_MANIFOLD), measure={"max_samples": 16})
    todo = list(cells(plan, "manifold", [0, 1], tmp_path / "runs", REPO))
    assert run_study.train(plan, todo, "cmd", log=lambda m: None) == []
    config = yaml.safe_load((tmp_path / "runs/manifold/grad_norm_x10/seed1/config.yaml").read_text())
    weight = config["model"]["regularizers"][0]["init_args"]["weight"]
    assert weight["init_args"]["value"] == pytest.approx(1.0)  # 10 × the recipe's 0.1, what fit trained with
    result = run_study.compare(plan, "manifold", todo, tmp_path / "runs", tmp_path / "out", "cmd",
                               figures=tmp_path / "fig", log=lambda m: None)
    assert sorted(result.report["variants"]) == ["baseline", "grad_norm_x0.1", "grad_norm_x10"]
    assert (tmp_path / "out/manifold/tradeoff.png").is_file() and (tmp_path / "fig/manifold_tradeoff.png").is_file()
    info = json.loads((tmp_path / "out/manifold/study.json").read_text())
    assert info["n_runs"] == 6 and info["seeds"] == [0, 1] and info["train_seconds"] > 0
    again = run_study.compare(plan, "manifold", todo, tmp_path / "runs", tmp_path / "out2", "cmd", log=lambda m: None,
                              cached=True)  # from the cache alone: the same report, nothing measured
    assert again.report["variants"] == result.report["variants"]
    assert info["missing"] == []
    # a part asked for (grad_norm 0.1x, seeds 0-2): the report still covers every trained cell, and
    # "missing" lists what of that part is not trained
    part = list(cells(plan, "manifold", [0, 1, 2], tmp_path / "runs", REPO, ["grad_norm"], [0.1]))
    run_study.compare(plan, "manifold", todo, tmp_path / "runs", tmp_path / "out3", "cmd", log=lambda m: None,
                      cached=True, selected=part)
    info3 = json.loads((tmp_path / "out3/manifold/study.json").read_text())
    assert info3["missing"] == ["grad_norm_x0.1/seed2"] and info3["n_runs"] == 6
    rand = info["alignment_random_baseline"]  # the recipe's latent_dim 4 in ambient_dim 64: sqrt(4/64)
    assert (rand["k"], rand["d"]) == (4, 64) and rand["baseline"] == pytest.approx(0.25)


def test_merge_reports_equals_one_report_of_all_runs_and_refuses_disagreeing_runs():
    """Merging a report of {baseline, noise} with one of {baseline seeds 0-1, wd} gives, after the
    statistics are rebuilt, the report ``build_report`` makes from all runs at once (the reference)."""
    from evaluation.compare import build_report
    from study.merge_reports import merge_reports

    def entries(variant, acc, align, seeds=range(3)):
        return [{"seed": f"seed{i}", "run_dir": f"{variant}/seed{i}", "details": {"task": "t"},
                 "metrics": {"accuracy": acc + 0.001 * i, "alignment": align + 0.01 * i}} for i in seeds]

    full = build_report({"baseline": entries("baseline", 0.95, 0.30), "noise_x1": entries("noise", 0.94, 0.5),
                         "wd_x1": entries("wd", 0.96, 0.31)})
    old = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.95, 0.30),
                                              "noise_x1": entries("noise", 0.94, 0.5)})))
    new = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.95, 0.30, seeds=(0, 1)),
                                              "wd_x1": entries("wd", 0.96, 0.31)})))
    merged = merge_reports(old, new)
    rebuilt = build_report(run_study.measurements_from_report(merged), merged["baseline"], merged["test"],
                           merged["alpha"], merged["options"], [], correction=merged["correction"])
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(full))
    assert rebuilt["n_comparisons"] == 4  # 2 variants x 2 metrics: the family the Holm correction covers

    new["variants"]["baseline"]["metrics"]["alignment"]["values"][1] += 1e-6
    with pytest.raises(ValueError, match=r"baseline/seed1: alignment = .* in the earlier report"):
        merge_reports(old, new)
    new["variants"]["baseline"]["metrics"]["alignment"]["values"][1] -= 1e-6
    # an option added after the earlier report was written: absent there, it reads as the value
    # that report was measured at (the circuit search: "penalty"); any other value differs
    for search, merges in (("penalty", True), ("lagrangian", False)):
        later = {**json.loads(json.dumps(new)), "options": {**new.get("options", {}), "circuit_search": search}}
        earlier = {**old, "options": {k: v for k, v in old.get("options", {}).items() if k != "circuit_search"}}
        if merges:
            assert merge_reports(earlier, later)["options"]["circuit_search"] == "penalty"
        else:
            with pytest.raises(ValueError, match="circuit_search='penalty' vs 'lagrangian'"):
                merge_reports(earlier, later)
    new["options"] = {**new.get("options", {}), "max_samples": 64}
    with pytest.raises(ValueError, match="measurement options differ.*max_samples"):
        merge_reports(old, new)
    new["options"] = old["options"]
    # a metric's version bumped between the reports: a shared run that agrees shows the bump does
    # not touch this task; without one the merge refuses
    bumped = {**new, "metrics": [{**m, "version": m["version"] + 1} if m["name"] == "alignment" else m
                                 for m in new["metrics"]]}
    assert merge_reports(old, bumped)["variants"]["noise_x1"]["seeds"] == ["seed0", "seed1", "seed2"]
    disjoint = {**bumped, "variants": {"baseline": {**bumped["variants"]["baseline"], "seeds": ["seed7", "seed8"]},
                                       "wd_x1": bumped["variants"]["wd_x1"]}}
    with pytest.raises(ValueError, match=r"different versions of a metric.*alignment \(version 1 vs 2\)"):
        merge_reports(old, disjoint)


def test_merge_reports_adds_a_metric_measured_afterwards_on_every_run():
    """The earlier report (accuracy, alignment) merged with one that measured accuracy and a new
    metric on every run (``run_study.py --compare-only --metrics``): after --restat, the report
    ``build_report`` makes from all three metrics at once. A new report missing one of the earlier
    runs leaves the new metric out (it would be measured on some runs only)."""
    from evaluation.compare import build_report
    from study.merge_reports import merge_reports

    def entries(variant, acc, names, seeds=range(3)):
        values = {"accuracy": acc, "alignment": 0.3 + acc, "lib_active_edge_fraction_90": 0.2 - acc / 10}
        return [{"seed": f"seed{i}", "run_dir": f"{variant}/seed{i}", "details": {"task": "t"},
                 "metrics": {n: values[n] + 0.001 * i * (1 + k) for k, n in enumerate(names)}} for i in seeds]

    every = ("accuracy", "alignment", "lib_active_edge_fraction_90")
    full = build_report({"baseline": entries("baseline", 0.9, every), "as_x1": entries("as", 0.8, every)})
    old = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.9, every[:2]),
                                              "as_x1": entries("as", 0.8, every[:2])})))
    later = ("accuracy", "lib_active_edge_fraction_90")
    new = build_report({"baseline": entries("baseline", 0.9, later), "as_x1": entries("as", 0.8, later)})
    # the new report's accuracy is its own (k = 0 in both), its active fraction has k = 1 like full's third metric
    for row, variant, acc in ((new["variants"]["baseline"], "baseline", 0.9), (new["variants"]["as_x1"], "as", 0.8)):
        row["metrics"]["lib_active_edge_fraction_90"]["values"] = [0.2 - acc / 10 + 0.003 * i for i in range(3)]
    new["messages"] = ["measured only the metrics asked for: accuracy, lib_active_edge_fraction_90"]  # as run_compare says
    new = json.loads(json.dumps(new))
    merged = merge_reports(old, new)
    assert merged["messages"] == []  # the merged report holds every metric again
    assert [m["name"] for m in merged["metrics"]] == ["accuracy", "lib_active_edge_fraction_90", "alignment"]
    rebuilt = build_report(run_study.measurements_from_report(merged), merged["baseline"], merged["test"],
                           merged["alpha"], merged["options"], [], correction=merged["correction"])
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(full))
    assert rebuilt["n_comparisons"] == 3
    partial = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.9, later, seeds=(0, 1)),
                                                  "as_x1": entries("as", 0.8, later)})))
    assert [m["name"] for m in merge_reports(old, partial)["metrics"]] == ["accuracy", "alignment"]
    new["variants"]["as_x1"]["metrics"]["accuracy"]["values"][2] += 1e-3  # another checkpoint than the earlier one
    with pytest.raises(ValueError, match=r"as_x1/seed2: accuracy"):
        merge_reports(old, new)


def test_merge_reports_joins_reports_that_differ_only_in_metric_switches():
    """A report measured without circuits (circuit=False) and a pass of circuits over every run
    (circuit=True): they merge, the circuit metric joins, and the merged report says circuit=True;
    when the circuit pass misses a run the metric stays out and the switch reads False. An option
    that changes values (max_samples) still refuses."""
    from evaluation.compare import build_report
    from study.merge_reports import merge_reports

    def entries(variant, acc, names, seeds=range(3)):
        values = {"accuracy": acc, "alignment": 0.3 + acc, "circuit_nodes": 100 * acc}
        return [{"seed": f"seed{i}", "run_dir": f"{variant}/seed{i}", "details": {"task": "t"},
                 "metrics": {n: values[n] + 0.001 * i for n in names}} for i in seeds]

    base = {"max_samples": 256, "circuit": False, "alignment": True}
    old = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.9, ("accuracy", "alignment")),
                                              "ws_x1": entries("ws", 0.8, ("accuracy", "alignment"))},
                                             options=base)))
    circuits = ("accuracy", "circuit_nodes")
    new = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.9, circuits),
                                              "ws_x1": entries("ws", 0.8, circuits)},
                                             options={**base, "circuit": True, "alignment": False})))
    merged = merge_reports(old, new)
    assert sorted(m["name"] for m in merged["metrics"]) == ["accuracy", "alignment", "circuit_nodes"]
    assert merged["options"]["circuit"] is True and merged["options"]["alignment"] is True
    assert merged["variants"]["ws_x1"]["metrics"]["circuit_nodes"]["values"] == pytest.approx([80.0, 80.001, 80.002])
    partial = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.9, circuits, seeds=(0, 1)),
                                                  "ws_x1": entries("ws", 0.8, circuits)},
                                                 options={**base, "circuit": True})))
    merged = merge_reports(old, partial)
    assert "circuit_nodes" not in [m["name"] for m in merged["metrics"]] and merged["options"]["circuit"] is False
    with pytest.raises(ValueError, match="measurement options differ.*max_samples=256 vs 64"):
        merge_reports(old, {**new, "options": {**new["options"], "max_samples": 64}})


def test_restat_keeps_the_versions_the_values_were_measured_at(tmp_path):
    """A report measured before a metric's version bump: --restat rebuilds its statistics but leaves
    the recorded (earlier) version on the metric, and says so."""
    report = sweep_report()
    current = {m["name"]: m["version"] for m in report["metrics"]}
    name = report["metrics"][0]["name"]
    report["metrics"][0] = {**report["metrics"][0], "version": current[name] - 1}
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "report.json").write_text(json.dumps(report))
    logs = []
    run_study.restat(tmp_path, None, ["digits"], log=logs.append)
    rebuilt = json.loads((tmp_path / "digits" / "report.json").read_text())
    assert {m["name"]: m["version"] for m in rebuilt["metrics"]} == {**current, name: current[name] - 1}
    assert any(f"{name} (version {current[name] - 1}; the code: {current[name]})" in line for line in logs)


def test_merge_reports_replace_takes_a_retrained_cell_from_the_new_report_only():
    """A re-trained cell whose values changed: without --replace the merge refuses; with it the cell's
    runs are NEW's (seed 2, absent from NEW, is dropped too), other runs as before; a typo raises."""
    from evaluation.compare import build_report
    from study.merge_reports import merge_reports

    def entries(variant, acc, seeds=range(3), note="k = 22"):
        return [{"seed": f"seed{i}", "run_dir": f"{variant}/seed{i}", "details": {"task": "t"},
                 "metrics": {"accuracy": acc + 0.001 * i}, "notes": [f"{note} (seed {i})"]} for i in seeds]

    old = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.95),
                                              "ws_x1": entries("ws", 0.90)})))
    new = json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.95, seeds=(1,), note="k = 23"),
                                              "ws_x1": entries("ws", 0.80, seeds=(0, 1))})))
    with pytest.raises(ValueError, match="ws_x1/seed0: accuracy"):
        merge_reports(old, new)
    merged = merge_reports(old, new, replace=["ws_x1"])
    assert merged["variants"]["ws_x1"]["seeds"] == ["seed0", "seed1"]
    assert merged["variants"]["ws_x1"]["metrics"]["accuracy"]["values"] == pytest.approx([0.80, 0.801])
    assert merged["variants"]["baseline"]["seeds"] == ["seed0", "seed1", "seed2"]
    assert merged["variants"]["baseline"]["notes"] == ["k = 22 (seed 0)", "k = 22 (seed 1)", "k = 22 (seed 2)",
                                                        "k = 23 (seed 1)"]  # the notes of both reports' runs
    assert merged["variants"]["ws_x1"]["notes"] == ["k = 22 (seed 0)", "k = 22 (seed 1)"]  # replaced: NEW's only
    one = merge_reports(old, json.loads(json.dumps(build_report({"baseline": entries("baseline", 0.5, seeds=(1,))}))),
                        replace=["baseline/seed1"])
    assert one["variants"]["baseline"]["metrics"]["accuracy"]["values"] == pytest.approx([0.95, 0.501, 0.952])
    with pytest.raises(ValueError, match="--replace ws_x2: no such run.*ws_x1/seed0"):
        merge_reports(old, new, replace=["ws_x2"])


def test_a_run_another_process_is_training_is_skipped_not_trained_twice(tmp_path, monkeypatch):
    import subprocess
    import sys

    import interp_train.cli

    monkeypatch.setattr(interp_train.cli, "InterpTrainCLI", FakeFit)
    FakeFit.calls, FakeFit.fail_in = [], None
    plan = run_study.PLANS["digits"]
    todo = list(cells(plan, "digits", [0, 1], tmp_path, REPO, families=["baseline"]))
    lock = run_study.training_lock(todo[0])
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process, holding an flock of its own on seed 0's lock
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        logs = []
        assert run_study.train(plan, todo, "cmd", log=logs.append) == []
    finally:
        holder.kill()
        holder.wait()
    trained = [Path(a[a.index("--run_dir") + 1]).relative_to(tmp_path) for a in FakeFit.calls]
    assert trained == [Path("digits/baseline/seed1")]
    assert any("baseline seed0: being trained by another process" in m for m in logs)
    assert not (tmp_path / "digits/baseline/seed0/study_recipe.yaml").exists()
    run_study.train(plan, todo, "cmd", log=logs.append)  # the holder is gone: seed 0 is trained now
    assert [Path(a[a.index("--run_dir") + 1]).relative_to(tmp_path) for a in FakeFit.calls][1:] == \
        [Path("digits/baseline/seed0")]


def test_figures_follow_out_unless_given(tmp_path, monkeypatch):
    """A report written elsewhere (--out) must not overwrite the committed study/figures."""
    seen = []
    monkeypatch.setattr(run_study, "compare", lambda *a, figures=None, **k: seen.append(figures))
    import study.summary

    monkeypatch.setattr(study.summary, "write_summary", lambda *a, **k: tmp_path / "summary.md")
    base = ["--tasks", "digits", "--seeds", "0", "--root", str(tmp_path), "--compare-only"]
    run_study.main([*base, "--out", str(tmp_path / "out")])
    run_study.main([*base, "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")])
    run_study.main(base)
    assert seen == [tmp_path / "out" / "figures", tmp_path / "fig", Path("study/figures")]


def test_cells_of_another_model_are_left_out_of_a_task_report(tmp_path):
    """A wide_* cell (another d_model) is named and left out; a regularized cell of the baseline's
    model stays, whatever its regularizers."""
    from types import SimpleNamespace

    def run(name, d_model, regularizers=()):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({"model": {"model": {"class_path": "T", "init_args": {"d_model": d_model}},
                                              "regularizers": list(regularizers)}}))
        return SimpleNamespace(config=path)

    variants = {"baseline": [run("b0", 64), run("b1", 64)], "ws_x1": [run("w0", 64, ["WeightSparsity"])],
                "wide_baseline_x1": [run("v0", 128)], "mixed_x1": [run("m0", 64), run("m1", 128)]}
    assert run_study.other_architectures(variants, "baseline") == ["wide_baseline_x1", "mixed_x1"]
