"""Every recipe trains on the machine's accelerator (``accelerator: auto``: a GPU when present, else the CPU)."""

from pathlib import Path

import pytest
import yaml

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_uses_accelerator_auto(recipe):
    trainer = (yaml.safe_load(recipe.read_text()) or {}).get("trainer") or {}
    assert trainer.get("accelerator", "auto") == "auto", f"{recipe}: accelerator {trainer.get('accelerator')!r}"
