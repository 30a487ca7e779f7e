"""Bad input to the command lines: one paragraph on stderr naming the problem, exit code 2, no
traceback (``--debug`` / ``INTERP_DEBUG=1`` keep it). Each case runs the real entry point as a
subprocess in the slow suite; the quick suite runs the same cases through ``main()`` in-process
(the same code path minus the interpreter start, ~5 s of CPU per case on this machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_checkpoints import random_ht_state_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
P = 5
HT_CFG = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=12, d_vocab=P + 1, d_vocab_out=P, n_ctx=3,
              act_fn="relu", normalization_type=None)


def _recipe_variant(tmp: Path, name: str, old: str, new: str) -> str:
    text = (RECIPES / "digits" / "grad_norm.yaml").read_text()
    assert old in text
    path = tmp / f"{name}.yaml"
    path.write_text(text.replace(old, new))
    return str(path)


WEIGHT = "init_args: {value: 0.1, warmup_steps: 200}"
SCHEDULE = """      weight:
        class_path: interp_train.schedules.LinearWarmup
        init_args: {value: 0.1, warmup_steps: 200}"""


def _train_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case: (interp-train arguments, phrases the message must contain)}."""
    fit = lambda config, *more: ["fit", "--config", config, "--run_dir", str(tmp / "run"), "--trainer.max_steps",
                                 "3", *QUIET, *more]
    return {
        "negative weight": (fit(_recipe_variant(tmp, "negw", SCHEDULE, "      weight: -0.5")),
                            ["weight must be a finite number >= 0, got -0.5"]),
        "negative schedule value": (fit(_recipe_variant(tmp, "negs", WEIGHT, "init_args: {value: -0.1, warmup_steps: 2}")),
                                    ["got -0.1"]),
        "unknown class_path": (fit(_recipe_variant(tmp, "cp", "smoothness.GradientNorm", "smoothness.GradNorm")),
                               ["unknown class_path 'interp_train.regularizers.smoothness.GradNorm'",
                                "available regularizers", "smoothness.GradientNorm", "manifold.OffManifoldNoisePenalty"]),
        "misspelled field": (fit(_recipe_variant(tmp, "field", "at: input", "att: input")),
                             ["GradientNorm does not accept 'att'", "it accepts: weight, at, target"]),
        "missing config file": (fit(str(tmp / "nope.yaml")), ["nope.yaml", "does not exist"]),
        "unknown command-line field": (fit(str(RECIPES / "digits/baseline.yaml"), "--model.learning_rate", "0.1"),
                                       ["unrecognized arguments: --model.learning_rate 0.1"]),
        "diverging loss": (fit(_recipe_variant(tmp, "huge", WEIGHT, "init_args: {value: 1.0e30, warmup_steps: 1}")),
                           ["exceeded the bound max_loss", "largest weighted regularizer term"]),
    }


@pytest.fixture
def eval_inputs(tmp_path):
    """A tiny HookedTransformer checkpoint (p = 5), a data file whose inputs and targets do not pair
    up, and a 2-step recipe run whose config.yaml was edited so that it no longer fits the weights."""
    torch.save(random_ht_state_dict(HT_CFG), tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(HT_CFG))
    torch.save({"inputs": torch.randint(0, P, (20, 3)), "targets": torch.randint(0, P, (7,))}, tmp_path / "bad.pt")
    from interp_train.cli import InterpTrainCLI

    run = tmp_path / "digits_run"
    InterpTrainCLI(args=["fit", "--config", str(RECIPES / "digits/baseline.yaml"), "--run_dir", str(run),
                         "--trainer.max_steps", "2", "--test_after_fit", "false", *QUIET])
    config = (run / "config.yaml").read_text()
    assert "- 128\n" in config
    (run / "config.yaml").write_text(config.replace("- 128\n", "- 64\n", 1))
    return tmp_path


def _eval_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    ht = [str(tmp / "model.pt"), "--config", str(tmp / "config.json")]
    return {
        "config does not fit the weights": (["lib", str(tmp / "digits_run"), "--out", str(tmp / "o1")],
                                            ["do not fit the model", "size mismatch"]),
        "inputs and targets differ in number": (["lib", *ht, "--data", str(tmp / "bad.pt"), "--out", str(tmp / "o2")],
                                                ["20 inputs but 7 targets"]),
        "data for another p": (["lib", *ht, "--data", "modular-addition:p=13", "--out", str(tmp / "o3")],
                               ["token ids up to 13", "6 tokens", "the model's p is 5"]),
        "bad choice": (["lib", *ht, "--integration", "simpson", "--out", str(tmp / "o4")],
                       ["invalid choice: 'simpson'"]),
        "not a run directory": (["lib", str(tmp / "empty"), "--out", str(tmp / "o5")],
                                ["not an interp-train run directory"]),
    }


def _check_message(err: str, phrases: list[str], in_process: bool = False) -> None:
    """One ``<prog>: error: ...`` paragraph holding ``phrases`` (and the --debug hint), no traceback.
    In-process, Lightning's log handler (bound to an earlier test's captured stderr) may add a
    "--- Logging error ---" report and "INFO:" lines that a real process does not print."""
    if not (in_process and "--- Logging error ---" in err):
        assert "Traceback" not in err, err
    message = [l for l in err.splitlines() if l.startswith(("interp-train: error:", "interp-eval: error:"))]
    assert len(message) == 1, err
    if not in_process:
        noise = ("Seed set", "GPU available", "TPU available", "(run again with --debug")
        assert [l for l in err.splitlines() if l.strip() and not l.startswith(noise)] == message, err
    for phrase in phrases:
        assert phrase in message[0], (phrase, err)


TRAIN_CASES = ["negative weight", "negative schedule value", "unknown class_path", "misspelled field",
               "missing config file", "unknown command-line field", "diverging loss"]
EVAL_CASES = ["config does not fit the weights", "inputs and targets differ in number", "data for another p",
              "bad choice", "not a run directory"]


def _train_case_names():
    return TRAIN_CASES


def _eval_case_names():
    return EVAL_CASES


@pytest.mark.parametrize("case", _train_case_names())
def test_interp_train_bad_input_in_process(case, tmp_path, capsys):
    from interp_train.cli import main

    cases = _train_cases(tmp_path)
    assert sorted(cases) == sorted(TRAIN_CASES)
    args, phrases = cases[case]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    _check_message(capsys.readouterr().err, phrases, in_process=True)


@pytest.mark.parametrize("case", _eval_case_names())
def test_interp_eval_bad_input_in_process(case, eval_inputs, capsys):
    from evaluation.cli import main

    cases = _eval_cases(eval_inputs)
    assert sorted(cases) == sorted(EVAL_CASES)
    args, phrases = cases[case]
    assert main(args) == 2
    _check_message(capsys.readouterr().err, phrases, in_process=True)
    assert not list(eval_inputs.glob("o*")) and not list(eval_inputs.glob(".o*"))  # nothing written


def _run(module: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("INTERP_DEBUG", None)
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=kw.pop("cwd", ROOT), timeout=600, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("case", _train_case_names())
def test_interp_train_bad_input_subprocess(case, tmp_path):
    cases = _train_cases(tmp_path)
    assert sorted(cases) == sorted(TRAIN_CASES)
    args, phrases = cases[case]
    result = _run("interp_train.cli", args)
    assert result.returncode == 2, result.stderr
    _check_message(result.stderr, phrases)


@pytest.mark.slow
@pytest.mark.parametrize("case", _eval_case_names())
def test_interp_eval_bad_input_subprocess(case, eval_inputs):
    cases = _eval_cases(eval_inputs)
    assert sorted(cases) == sorted(EVAL_CASES)
    args, phrases = cases[case]
    result = _run("evaluation.cli", args)
    assert result.returncode == 2, result.stderr
    _check_message(result.stderr, phrases)


def test_debug_flag_and_environment_keep_the_traceback(tmp_path):
    """The real entry point: without --debug one paragraph, with it (or INTERP_DEBUG=1) the traceback."""
    args = ["lib", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]
    plain = _run("evaluation.cli", args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "does not exist" in plain.stderr
    debug = _run("evaluation.cli", [*args, "--debug"])
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "FileNotFoundError" in debug.stderr
    env = _run("evaluation.cli", args, env={"INTERP_DEBUG": "1"})
    assert "Traceback (most recent call last)" in env.stderr


def test_non_finite_loss_stops_with_one_paragraph(capsys):
    """The callback's reason for a NaN loss, and a NaN regularizer term through the CLI's reporter."""
    from interp_train import NonFiniteRegularizerError
    from interp_train.callbacks.health import TrainingDiverged, TrainingHealth
    from evaluation.errors import run_command

    class Trainer:
        global_step, callback_metrics = 7, {"reg/task_loss": torch.tensor(2.3),
                                            "reg/noise_penalty/noise_sq_weighted": torch.tensor(float("nan"))}

    with pytest.raises(TrainingDiverged, match=r"step 7: the loss became non-finite \(loss = nan, task loss = 2.3\)"):
        TrainingHealth().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("nan"))}, None, 0)
    TrainingHealth().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1e5)}, None, 0)  # below the bound

    def nan_term(argv):
        raise NonFiniteRegularizerError("regularizer 'noise_penalty' produced a non-finite term 'noise_sq' = nan "
                                        "at step 3")

    assert run_command("interp-train", nan_term, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("interp-train: error: regularizer 'noise_penalty' produced a non-finite term")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_diverged_run_keeps_its_history_and_says_why(tmp_path):
    from interp_train.cli import main

    config = _recipe_variant(tmp_path, "late", WEIGHT, "init_args: {value: 1.0e30, warmup_steps: 1000000}")
    # the warm-up keeps the weight harmless for the first steps: w(step) = 1e30 * step / 1e6
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--run_dir", str(tmp_path / "r"), "--trainer.max_steps", "500",
              "--trainer.log_every_n_steps", "1", *QUIET])
    failure = json.loads((tmp_path / "r" / "failure.json").read_text())
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert failure["global_step"] >= 1 and len(rows) - 1 >= failure["global_step"] - 1  # history up to the stop
    assert "max_loss" in failure["error"]


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_paragraph(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "interp_train.cli", "fit", "--config",
                             str(RECIPES / "digits/baseline.yaml"), "--run_dir", str(tmp_path / "r"),
                             "--trainer.max_steps", "100000", "--trainer.max_epochs", "100000", *QUIET], stderr=subprocess.PIPE, text=True, env=env,
                            # a terminal's default Ctrl-C: a shell's background job (``cmd &``, e.g. CI started
                            # that way) ignores SIGINT, the child inherits that and Python then never raises
                            # KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Ctrl-C once training is logging steadily (two rows of metrics.csv), not during start-up; the
    # graceful shutdown gets 300 s because CI may run on a loaded 2-core machine
    metrics, deadline = tmp_path / "r" / "metrics.csv", time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "--ckpt_path" in err
