"""Colour images from a folder, through the `cifar10` recipe: labels, splits and the tokens."""

import json

import numpy as np
from PIL import Image

from helpers import TINY, invoke, ok, sets

from recipes.recipe import load_recipe


def _folder(root, per_class=6):
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", 2)):
        for c, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = (np.array(colour) * rng.uniform(0.5, 1.0, (32, 32, 1))).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg")


def test_cifar10_recipe_is_the_seed_posts_tokenizer():
    r = load_recipe("cifar10")
    assert r["data"]["dataset"] == "cifar10" and r["data"]["image_size"] == 32
    assert r["tokenizer"]["codebook_size"] == 512 and r["tokenizer"]["beta"] == 0.25
    assert r["evaluate"]["num"] >= 2000 and r["evaluate"]["extractor"] == "auto"


def test_cifar10_recipe_on_a_jpeg_folder_trains_a_conditional_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "jpegs")
    run = tmp_path / "run"
    folder = ["data.dataset=folder", f"data.path={tmp_path / 'jpegs'}"]
    tiny = [s for s in TINY if s.startswith(("tokenizer.", "ar."))]
    ok(invoke("train", "tokenizer", "cifar10", "--run-dir", run, *sets(folder + tiny)))
    ok(invoke("train", "ar", "cifar10", "--run-dir", run, *sets(folder + tiny + ["ar.batch_size=8"])))
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["num_train"] == 12 and meta["num_test"] == 4 and meta["num_classes"] == 2
    config = json.loads((run / "ar" / "config.json").read_text())
    assert config["config"]["num_classes"] == 2  # the class folders became labels for conditioning
