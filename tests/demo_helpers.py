"""A run folder for the demo's tests, built in a second rather than trained."""

from pathlib import Path

import torch
from helpers import TINY


def build_tiny_run(path: Path) -> Path:
    """A run folder with an untrained tokenizer and generators of the tiny `shapes` recipe: the page
    needs models of the right shapes, not good ones (training them would take most of the budget)."""
    from recipes.recipe import load_recipe
    from recipes.run import Run
    from recipes.stages import generator_config
    from vqdiff.checkpoint import model_class, save_model

    recipe = load_recipe("shapes", TINY)
    Run(path).write_recipe(recipe)
    torch.manual_seed(0)
    tcfg = recipe.model_config("tokenizer", channels=3, image_size=recipe.data.image_size)
    tokenizer = model_class("tokenizer")(tcfg)
    save_model(tokenizer, path / "tokenizer")
    meta = {"codebook_size": tokenizer.codebook_size, "grid": list(tokenizer.grid), "num_classes": 3}
    for kind in ("ar", "diffusion"):
        save_model(model_class(kind)(generator_config(kind, recipe, meta)), path / kind)
    return path
