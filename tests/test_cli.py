"""The interp-train command line: config validation, run directories, resume, sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interp_train.cli import InterpTrainCLI, main, write_json_atomic
from interp_train.sweep import run_sweep, sweep_commands

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(config: str, root: Path, *extra: str) -> InterpTrainCLI:
    return InterpTrainCLI(args=["fit", "--config", str(RECIPES / config), "--checkpoint_root", str(root), *QUIET, *extra])


def test_unknown_command_line_field_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(RECIPES / "digits/baseline.yaml"), "--model.learning_rate", "0.1"])
    err = capsys.readouterr().err.lower()
    assert "unrecognized arguments: --model.learning_rate 0.1" in err, err


def test_unknown_regularizer_argument_in_yaml_is_rejected(tmp_path, capsys):
    text = (RECIPES / "digits/noise.yaml").read_text().replace("sigma: 0.1", "sigmaa: 0.1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    err = capsys.readouterr().err
    assert "sigmaa" in err, err


def test_run_directory_holds_config_checkpoint_and_metrics(tmp_path):
    cli = fit("digits/baseline.yaml", tmp_path, "--seed_everything", "3", "--trainer.max_steps", "2")
    run_dir = tmp_path / "digits" / "baseline" / "seed3"
    assert cli.run_directory == run_dir
    for name in ("config.yaml", "checkpoints/last.ckpt", "metrics.json", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2.0 and 0.0 <= metrics["test/acc"] <= 1.0
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed_everything"] == 3 and saved["trainer"]["max_steps"] == 2
    assert saved["model"]["model"]["class_path"] == "interp_train.models.mlp.MLP"
    cli = fit("digits/baseline.yaml", tmp_path, "--trainer.fast_dev_run", "true", "--variant", "mine")
    assert cli.run_directory == tmp_path / "digits" / "mine" / "seed0"
    cli = fit("digits/baseline.yaml", tmp_path, "--trainer.fast_dev_run", "true", "--run_dir", str(tmp_path / "x"))
    assert cli.run_directory == tmp_path / "x"


def test_resume_restores_model_optimizer_and_regularizer_schedule(tmp_path):
    """4 steps + resume to 8 steps == 8 uninterrupted steps (full batch, so no data-order effects)."""
    common = ["--data.init_args.batch_size", "null", "--trainer.limit_val_batches", "0", "--test_after_fit", "false"]
    straight = fit("digits/grad_norm.yaml", tmp_path, "--run_dir", str(tmp_path / "a"), "--trainer.max_steps", "8", *common)
    fit("digits/grad_norm.yaml", tmp_path, "--run_dir", str(tmp_path / "b"), "--trainer.max_steps", "4", *common)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["state_dict"]["regularizers.0._extra_state"] == {"step": 4}
    resumed = fit("digits/grad_norm.yaml", tmp_path, "--run_dir", str(tmp_path / "b"), "--trainer.max_steps", "8",
                  "--ckpt_path", str(ckpt), *common)
    assert resumed.model.regularizers[0].step == 8 == straight.model.regularizers[0].step
    assert resumed.trainer.global_step == 8
    opt_state = resumed.trainer.optimizers[0].state_dict()["state"]
    assert all(int(s["step"]) == 8 for s in opt_state.values())
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_sweep_runs_every_variant_and_seed(tmp_path, capsys):
    cmds = sweep_commands(RECIPES / "digits", ["baseline", "noise"], [0, 1], ["--trainer.max_steps", "1"])
    assert [(Path(c[2]).stem, c[4]) for c in cmds] == [("baseline", "0"), ("baseline", "1"), ("noise", "0"), ("noise", "1")]
    main(["sweep", "--recipe", str(RECIPES / "digits"), "--variants", "baseline", "--seeds", "0", "1", "--dry_run"])
    assert capsys.readouterr().out.count("interp-train fit --config") == 2
    run_sweep(RECIPES / "digits", ["baseline"], [0, 1], ["--checkpoint_root", str(tmp_path), "--trainer.max_steps", "1",
                                                          "--test_after_fit", "false", *QUIET], launcher="inprocess")
    for seed in (0, 1):
        assert (tmp_path / "digits" / "baseline" / f"seed{seed}" / "metrics.json").is_file()
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\] in .*available: .*baseline"):
        sweep_commands(RECIPES / "digits", ["nope"], [0])


def test_metrics_json_is_written_atomically(tmp_path):
    target = tmp_path / "m" / "metrics.json"
    write_json_atomic(target, {"a": 1.0})
    write_json_atomic(target, {"a": 2.0})
    assert json.loads(target.read_text()) == {"a": 2.0}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_last_checkpoint_holds_the_final_weights_that_metrics_describe(tmp_path):
    # digits: 23 steps per epoch, validation once per epoch -> ModelCheckpoint last saves at step 23
    cli = fit("digits/baseline.yaml", tmp_path, "--run_dir", str(tmp_path / "r"), "--trainer.max_steps", "30")
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert ckpt["global_step"] == metrics["global_step"] == 30
    final = cli.model.state_dict()
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in final.items() if isinstance(v, torch.Tensor))
    assert not list((tmp_path / "r" / "checkpoints").glob(".*.tmp"))


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def test_resume_keeps_the_earlier_metrics_history(tmp_path, recwarn):
    """Resuming from last.ckpt keeps every row logged before the checkpoint's step, and the resumed
    history has the same (step, metric) entries as one uninterrupted run (reference)."""
    common = ["--trainer.log_every_n_steps", "5"]
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(tmp_path / "straight"), "--trainer.max_steps", "50", *common)
    run = tmp_path / "run"
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(run), "--trainer.max_steps", "30", *common)
    first = _csv_rows(run / "metrics.csv")
    ckpt = run / "checkpoints" / "last.ckpt"
    resume_step = torch.load(ckpt, weights_only=False)["global_step"]
    assert resume_step == 30
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(run), "--trainer.max_steps", "50", "--ckpt_path", str(ckpt),
        *common)
    resumed = _csv_rows(run / "metrics.csv")
    earlier = [r for r in first if float(r["step"]) < resume_step]
    assert len(earlier) >= 6 and resumed[:len(earlier)] == earlier  # every earlier row, unchanged
    assert any(float(r["step"]) >= resume_step for r in resumed)

    def entries(rows):
        return sorted((int(float(r["step"])), k) for r in rows for k in r if k not in ("step", "epoch"))

    assert entries(resumed) == entries(_csv_rows(tmp_path / "straight" / "metrics.csv"))
    import lightning
    import numpy

    provenance = json.loads((run / "provenance.json").read_text())  # the start and the resume, in order
    assert [p["resumed_from_step"] for p in provenance] == [None, 30]
    assert provenance[1]["packages"]["torch"] == torch.__version__
    assert provenance[1]["packages"]["lightning"] == lightning.__version__
    assert provenance[1]["packages"]["numpy"] == numpy.__version__
    assert provenance[1]["torch_threads"] == torch.get_num_threads()
    assert provenance[1]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [p["resumed_from_step"] for p in json.loads((tmp_path / "straight" / "provenance.json").read_text())] == [None]
    assert not [w for w in recwarn if "will be deleted" in str(w.message) or "exists and is not empty" in str(w.message)]


def test_resuming_a_finished_run_keeps_metrics_csv_and_json(tmp_path):
    run = tmp_path / "run"
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(run), "--trainer.max_steps", "25",
        "--trainer.log_every_n_steps", "5")
    rows_before = _csv_rows(run / "metrics.csv")
    before = json.loads((run / "metrics.json").read_text())
    assert {"train/loss", "val/acc", "test/acc"} <= set(before)
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(run), "--trainer.max_steps", "25",
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    after = json.loads((run / "metrics.json").read_text())
    assert set(before) <= set(after)
    for key in ("train/loss", "val/acc", "test/acc", "global_step"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key  # same final weights, same numbers
    rows_after = _csv_rows(run / "metrics.csv")
    assert [r for r in rows_before if float(r["step"]) < 25] == [r for r in rows_after if float(r["step"]) < 25]
    assert len(rows_after) == len(rows_before)  # the test row is logged again, not twice


def test_fit_prints_where_the_run_landed_and_its_test_metrics(tmp_path, capsys):
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(tmp_path / "r"), "--trainer.max_steps", "3")
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert f"run saved in {tmp_path / 'r'}/" in out
    assert f"test/acc {metrics['test/acc']:.4g}" in out


def test_diverging_loss_stops_the_run_with_a_reason(tmp_path, capsys):
    """A weight of 1e30 used to train to the end at chance accuracy with exit code 0."""
    text = (RECIPES / "digits/grad_norm.yaml").read_text()
    bad = tmp_path / "huge.yaml"
    bad.write_text(text.replace("init_args: {value: 0.1, warmup_steps: 200}", "init_args: {value: 1.0e30, warmup_steps: 1}"))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(bad), "--run_dir", str(tmp_path / "r"), "--trainer.max_steps", "50", *QUIET])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "exceeded the bound max_loss = 1e+06" in err and "reg/gradient_norm/grad_norm_sq_weighted" in err, err
    assert "Traceback" not in err
    failure = json.loads((tmp_path / "r" / "failure.json").read_text())
    assert failure["global_step"] < 50 and "max_loss" in failure["error"]
    assert not (tmp_path / "r" / "metrics.json").exists()  # not a finished run (demo/study would reuse it)


def test_accuracy_at_chance_is_flagged(tmp_path, capsys):
    """lr tiny and 2 steps: the model stays at chance (1/10); the run finishes but says so."""
    fit("digits/baseline.yaml", tmp_path, "--run_dir", str(tmp_path / "r"), "--trainer.max_steps", "2",
        "--model.lr", "1e-9")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["health/chance_acc"] == pytest.approx(0.1)
    assert metrics["test/acc"] < 0.19 and metrics["health/at_chance"] == 1.0
    assert "is at chance level" in capsys.readouterr().err


def test_chance_rule_and_collapse_warning():
    from interp_train.callbacks.health import TrainingHealth

    health = TrainingHealth(chance_margin=0.1)
    health.n_classes = 10
    assert health.at_chance(0.19) and not health.at_chance(0.191)  # 0.1 + 0.1 * 0.9

    class Trainer:
        sanity_checking, global_step = False, 0
        callback_metrics: dict = {}

    trainer = Trainer()
    for step, acc in ((100, 0.2), (200, 0.9), (300, 0.12)):
        trainer.global_step, trainer.callback_metrics = step, {"val/acc": torch.tensor(acc)}
        health.on_validation_end(trainer, None)
    assert len(health.warnings) == 1 and "collapsed to 0.120 at step 300" in health.warnings[0]
    assert "0.900 at step 200" in health.warnings[0]


def test_atomic_writes_respect_the_umask(tmp_path):
    """mkstemp makes private 0600 files; outputs must get 0666 minus the umask like any file."""
    import os

    from interp_train.io import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        (tmp_path / "plain.txt").write_text("x")  # the reference: an ordinary new file
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
