"""Every shipped recipe parses, and names only bundled models and data."""

from pathlib import Path

import pytest

from compressor.recipe import load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.model.startswith("bundled:") and recipe.output.startswith("out/")
    assert recipe.calibration.dataset == "bundled:wikileads"
