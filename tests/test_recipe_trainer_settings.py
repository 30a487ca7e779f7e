"""Recipes as users run them: trainer settings must be valid for the real data sizes.

fast_dev_run (tests/test_recipes.py) bypasses checks such as val_check_interval against the
number of training batches, so a recipe could pass those tests and still fail at `fit` start.
"""

from pathlib import Path

import pytest

from interp_train.cli import InterpTrainCLI

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OFFLINE_TEXT = ["text/baseline.yaml", "text/grad_norm.yaml", "text/degeneracy.yaml"]


@pytest.mark.parametrize("config", OFFLINE_TEXT)
def test_text_recipe_starts_training_at_full_data_size(config, tmp_path):
    cli = InterpTrainCLI(args=["fit", "--config", str(RECIPES / config), "--trainer.max_steps", "2",
                               "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                               "--trainer.enable_model_summary", "false", "--test_after_fit", "false",
                               "--run_dir", str(tmp_path / "run")])
    assert cli.trainer.global_step == 2
    assert cli.trainer.num_training_batches > 0
    assert cli.trainer.val_check_interval <= 3000  # validation is scheduled within the run
