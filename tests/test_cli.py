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
