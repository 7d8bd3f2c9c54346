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


def _tokenizer_on_a_folder(tmp_path, monkeypatch):
    """(run, the --set values of the folder and the tiny tokenizer and AR) with the cifar10 tokenizer trained on `_folder`'s images."""
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "jpegs")
    run = tmp_path / "run"
    keys = ["data.dataset=folder", f"data.path={tmp_path / 'jpegs'}", *(s for s in TINY if s.startswith(("tokenizer.", "ar.")))]
    ok(invoke("train", "tokenizer", "cifar10", "--run-dir", run, *sets(keys)))
    return run, keys


def test_cifar10_recipe_on_a_jpeg_folder_trains_a_conditional_generator(tmp_path, monkeypatch):
    run, keys = _tokenizer_on_a_folder(tmp_path, monkeypatch)
    ok(invoke("train", "ar", "cifar10", "--run-dir", run, *sets(keys + ["ar.batch_size=8"])))
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["num_train"] == 12 and meta["num_test"] == 4 and meta["num_classes"] == 2
    config = json.loads((run / "ar" / "config.json").read_text())
    assert config["config"]["num_classes"] == 2  # the class folders became labels for conditioning


def test_flip_adds_the_mirrored_images_own_grids_to_the_train_tokens_only(tmp_path, monkeypatch):
    import torch

    from recipes.run import Run, tokens_current
    from vqdiff.data import load_tokens
    from vqdiff.pipeline import encode

    run, keys = _tokenizer_on_a_folder(tmp_path, monkeypatch)
    ok(invoke("encode", run))
    plain, plain_labels = load_tokens(run / "tokens" / "train.safetensors")
    ok(invoke("train", "ar", "cifar10", "--run-dir", run, *sets(keys + ["ar.batch_size=8", "data.flip=true"])))
    meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert meta["flip"] and meta["num_train"] == 24 and meta["num_test"] == 4  # re-encoded: the key names flip
    ids, labels = load_tokens(run / "tokens" / "train.safetensors")
    r = Run(run)
    images = r.load_split(r.read_recipe(), "train")
    mirrored = encode(r.load_tokenizer(refined=False), images.batch(torch.arange(12))["images"].flip(-1))
    assert torch.equal(ids[:12], plain) and torch.equal(ids[12:], mirrored)  # the mirror images' own grids
    assert torch.equal(labels, plain_labels.repeat(2)) and tokens_current(r)
    assert json.loads((run / "ar" / "tokens.json").read_text())["flip"] is True


def test_inception_weights_without_a_classification_layer_give_no_inception_score(tmp_path, monkeypatch):
    import pytest
    import torch

    from evaluation import EvaluationError, compute_metrics, get_extractor

    monkeypatch.delenv("VQDIFF_INCEPTION_WEIGHTS", raising=False)
    zero, real = tmp_path / "features-only.pth", tmp_path / "with-fc.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, zero)
    torch.save({"fc.weight": torch.full((1008, 2048), 0.01), "fc.bias": torch.zeros(1008)}, real)
    ex = get_extractor("inception", dataset="folder", inception_weights=zero, device="cpu")
    assert not ex.has_logits and ex.logits_layer is None
    assert "feature_layer_isc" not in ex.fidelity_kwargs() and "all zeros" in ex.info["isc_omitted"]
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(EvaluationError, match="no class logits"):  # refused before any Inception work
        compute_metrics(images, images, ex, isc=True)
    # colour data, labels or not: with the weights here, auto means inception
    monkeypatch.setenv("VQDIFF_INCEPTION_WEIGHTS", str(real))
    auto = get_extractor("auto", dataset="cifar10", device="cpu")
    assert auto.name == "inception" and auto.has_logits and auto.logits_layer == "logits_unbiased"
    assert "isc_omitted" not in auto.info


def test_report_states_the_reference_set_and_why_is_is_missing(tmp_path):
    from recipes.report import markdown

    result = {"generator": "ar", "temperature": 1.0, "steps": None, "forward_passes": 64, "fid": 30.0, "kid": 0.01,
              "precision": 0.6, "recall": 0.4, "isc": None, "images_per_second": 10.0, "samples": "samples/ar"}  # fmt: skip
    report = {
        "run": str(tmp_path), "recipe": "cifar10", "dataset": "folder", "extractor": "inception",
        "extractor_hash": "abc", "num_samples": 2000, "reference": "folder (/data/cifar10-jpeg) test split, first 2000 of 10000 images",
        "floor_fid": 5.0, "tokenizer": {"rfid": 9.0, "psnr": 22.0, "codebook_usage": 0.9}, "device": "cpu", "cfg": 1.0,
        "results": [result], "isc_omitted": "Inception Score omitted: fc is all zeros",
    }  # fmt: skip
    text = markdown(report, tmp_path / "report")
    assert "first 2000 of 10000 images" in text and "/data/cifar10-jpeg" in text
    assert "IS column empty: Inception Score omitted" in text
