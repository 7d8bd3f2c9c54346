from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.data import DataError, from_uint8, load_dataset, make_shapes, resolve_data_root, to_uint8


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("VQDIFF_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("VQDIFF_DATA_ROOT")
    assert resolve_data_root(None) == Path("~/.cache/vqdiff/data").expanduser()


def test_uint8_round_trip():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(x)), x)
    f = from_uint8(x)
    assert f.min() >= -1 and f.max() <= 1


def test_shapes_are_deterministic_and_labelled():
    a, b = make_shapes(16, 32, seed=3), make_shapes(16, 32, seed=3)
    assert torch.equal(a.uint8, b.uint8) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.uint8, make_shapes(16, 32, seed=4).uint8)
    batch = a.batch(torch.arange(4))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert set(a.labels.tolist()) <= {0, 1, 2}
    train, test = load_dataset("shapes", "train", limit=8), load_dataset("shapes", "test", limit=8)
    assert not torch.equal(train.uint8, test.uint8) and test.split == "test"


def test_folder_dataset_resizes_and_crops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # not square: centre-cropped
        Image.fromarray(arr).save(tmp_path / ("a/b" if i % 2 else "a") / f"{i}.png")
    train = load_dataset("folder", "train", image_size=16, path=tmp_path)
    test = load_dataset("folder", "test", image_size=16, path=tmp_path)
    assert len(train) + len(test) == 40 and len(test) == 2
    batch = train.batch(torch.arange(3))
    assert batch["images"].shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", "train", path=tmp_path / "missing")


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", "train", root=tmp_path)
    message = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "VQDIFF_DATA_ROOT" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", "train")


@pytest.mark.skipif(
    not (resolve_data_root() / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason="MNIST not in $VQDIFF_DATA_ROOT",
)
def test_real_mnist_is_padded_to_32():
    test = load_dataset("mnist", "test")
    assert len(test) == 10_000 and test.uint8.shape == (10_000, 1, 32, 32)
    assert test.num_classes == 10 and test.labels[:4].tolist() == [7, 2, 1, 0]
    # 28x28 padded by 2 on every side with the black background
    assert test.uint8[:, :, :2].max() == 0 and test.uint8[:, :, :, -2:].max() == 0
    assert test.uint8[:, :, 2:-2, 2:-2].max() == 255
    small = load_dataset("mnist", "test", image_size=16, limit=5)
    assert small.uint8.shape == (5, 1, 16, 16)
