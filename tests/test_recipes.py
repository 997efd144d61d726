"""Every full-size preset equals its official recipe table (src/omniseg/official_recipes/), and
docs/recipes.md is that table rendered."""

from pathlib import Path

import pytest

from omniseg.recipes import (REQUIRED_KEYS, Recipe, RecipeRow, check_recipe, full_size_presets, load_recipe,
                             recipe_names, render_markdown, same_value)

ROOT = Path(__file__).resolve().parents[1]


def test_every_full_size_preset_has_a_recipe_and_only_those():
    assert sorted(full_size_presets()) == recipe_names()


@pytest.mark.parametrize("preset", full_size_presets())
def test_preset_matches_its_official_recipe(preset):
    recipe = load_recipe(preset)
    assert recipe.headline and recipe.official
    assert check_recipe(recipe) == []


def test_check_recipe_catches_drift_missing_reasons_and_missing_rows():
    preset = full_size_presets()[0]
    good = load_recipe(preset)
    lr = next(r for r in good.rows if r.key == "train.lr")
    drifted = Recipe(preset, good.headline, good.official,
                     [r if r is not lr else RecipeRow(r.key, r.value * 3, r.official, r.source, r.why) for r in good.rows])
    assert any("train.lr: the preset has" in p for p in check_recipe(drifted))
    unexplained = Recipe(preset, good.headline, good.official,
                         [r if r is not lr else RecipeRow(r.key, r.value, r.value * 2, r.source) for r in good.rows])
    assert any("train.lr" in p and "without a why" in p for p in check_recipe(unexplained))
    short = Recipe(preset, good.headline, good.official, [r for r in good.rows if r.key != "data.crop_size"])
    assert "data.crop_size: no row (every recipe states it)" in check_recipe(short)
    unknown = Recipe(preset, good.headline, good.official, good.rows + [RecipeRow("train.no_such", 1, 1, "x")])
    assert "train.no_such: not a setting of the preset" in check_recipe(unknown)


def test_same_value_units():
    assert same_value(1e-4, 0.0001) and same_value(512, 512.0) and same_value([512, 1024], [512, 1024.0])
    assert not same_value(True, 1) and not same_value([512], [512, 512]) and not same_value("sgd", "adamw")
    assert not same_value(0.01, 0.02)


def test_required_keys_are_settings():
    from omniseg.config import load_config
    from omniseg.recipes import resolved_value

    cfg = load_config(full_size_presets()[0])
    for key in REQUIRED_KEYS:
        resolved_value(cfg, key)


def test_docs_recipes_is_the_rendered_table():
    doc = ROOT / "docs" / "recipes.md"
    assert doc.read_text() == render_markdown(), "regenerate: python -m omniseg.recipes > docs/recipes.md"


def test_cli_prints_a_recipe_and_refuses_cpu_presets():
    from typer.testing import CliRunner

    from omniseg.cli import app

    out = CliRunner().invoke(app, ["recipe", "pspnet_r50"])
    assert out.exit_code == 0, out.output
    assert "mmsegmentation" in out.output and "data.cat_max_ratio" in out.output
    refused = CliRunner().invoke(app, ["recipe", "pspnet_demo"])
    assert refused.exit_code != 0 and "CPU-size preset" in refused.output
