"""The README's Python examples run as written (they are what users copy first)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
    if "regularized_loss" in BLOCKS[index]:
        out = namespace["out"]
        assert set(out.logs()) >= {"task_loss", "loss", "finite_difference_gradient_norm/fd_grad_norm_sq",
                                   "activation_degeneracy/erank/1"}
        assert out.logs()["loss"] == pytest.approx(
            out.logs()["task_loss"] + sum(v for k, v in out.logs().items() if k.endswith("_weighted")), rel=1e-5)
    if "attach_regularizers" in BLOCKS[index]:
        assert namespace["model"].regularizers[0].step == 5


# ----------------------------------------------------------------------------- shell commands

SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
COMMANDS = [line.split("  #")[0].strip() for block in SHELL_BLOCKS for line in block.splitlines()
            if line.startswith(("interp-train ", "interp-eval "))]
# Appended to each command (LightningCLI and argparse: a later flag wins) so that the test takes
# seconds, not the recipes' full training; everything the README wrote stays as written.
SHORTER = {
    "interp-train fit": ["--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
                         "--trainer.enable_model_summary", "false"],
    "interp-train sweep": ["--launcher", "inprocess", "--", "--trainer.max_steps", "2",
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
    "interp-eval lib": ["--max-samples", "32", "--no-ablation", "--quiet"],
    "interp-eval compare": ["--max-samples", "32", "--quiet"],
}
NOT_RUN = ("--nproc",)  # the Distributed section's multi-process commands (tests/test_distributed.py)


def _tiny_ht_checkpoint(folder: Path) -> None:
    """The files the README's `gpt_style_state_dict.pt --config its_config.json` stands for: a
    1-layer HookedTransformer state dict for p = 113 (d_vocab 114)."""
    import json

    import torch

    from tests.test_checkpoints import random_ht_state_dict

    cfg = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=114, d_vocab_out=113, n_ctx=3,
               act_fn="relu", normalization_type=None)
    torch.save(random_ht_state_dict(cfg), folder / "gpt_style_state_dict.pt")
    (folder / "its_config.json").write_text(json.dumps(cfg))


def test_readme_lists_the_commands():
    assert any(c.startswith("interp-train fit") for c in COMMANDS)
    assert any(c.startswith("interp-eval lib checkpoints/") for c in COMMANDS)  # a run directory
    assert any(c.startswith("interp-eval compare") for c in COMMANDS)


@pytest.mark.slow  # trains 9 tiny runs and fits LIB on them: ~1-2 min
def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Every interp-train / interp-eval command of the README, in order, in a fresh folder holding
    only `recipes/` (as a clone does): each exits 0 and leaves what the README says it does."""
    import shlex

    import torch

    from evaluation.cli import main as eval_main
    from interp_train.cli import main as train_main

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    _tiny_ht_checkpoint(tmp_path)
    ran = []
    for command in COMMANDS:
        if any(flag in command for flag in NOT_RUN):
            continue
        words = shlex.split(command)
        extra = next(v for k, v in SHORTER.items() if command.startswith(k))
        if words[0] == "interp-train":
            train_main(words[1:] + extra)  # raises SystemExit on failure
        else:
            assert eval_main(words[1:] + extra) == 0, (command, capsys.readouterr().err)
        ran.append(command)
    assert len(ran) >= 6
    assert (tmp_path / "checkpoints/digits/grad_norm/seed0/metrics.json").is_file()
    assert (tmp_path / "checkpoints/modular_addition/cpu/seed0/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "reports/lib_cpu_seed0/lib.json").is_file()
    assert (tmp_path / "reports/lib_ht/lib.json").is_file()
    out = capsys.readouterr().out
    assert f"report: reports/digits/report.md" in out  # --quiet still says where the report is


def test_pyproject_builds_without_setuptools_deprecations():
    """`make demo` printed setuptools' "project.license as a TOML table is deprecated" notice."""
    import warnings

    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), README.parent / "pyproject.toml")
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "MIT" or dist.metadata.license == "MIT"
    assert setuptools  # (the build requires setuptools >= 77 for the SPDX string)
