"""Every shipped recipe loads and names a registered method with valid options."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmprune.api import resolve_method
from llmprune.recipe import load_recipe

# recipes/best links to the package's presets (method sections, not whole recipes: tests/test_presets.py)
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / "recipes").glob("**/*.yaml") if p.parent.name != "best")


@pytest.mark.parametrize("path", RECIPES, ids=[p.parent.name + "/" + p.name for p in RECIPES])
def test_recipe_is_valid(path: Path) -> None:
    assert path.read_text().startswith("# llmprune prune --recipe")
    recipe = load_recipe(path)
    method, pattern = resolve_method(recipe)
    assert method.name == recipe.method.name and 0 < pattern.sparsity < 1
