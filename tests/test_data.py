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


def _jpeg_folder(root, layout, size=(12, 10)):
    """Write small JPEGs: layout maps 'split/class' (or 'class') to a count; returns {path: pixels}."""
    rng = np.random.default_rng(0)
    written = {}
    for sub, count in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            path = root / sub / f"{i:04d}.jpg"
            Image.fromarray(arr).save(path, quality=90)
            written[path] = arr
    return written


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders
def test_folder_follows_imagefolder_classes_and_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    _jpeg_folder(root, {"train/cat": 3, "train/dog": 4, "test/cat": 2, "test/dog": 1}, size=(8, 8))
    train = load_dataset("folder", "train", image_size=8, path=root)
    test = load_dataset("folder", "test", image_size=8, path=root)
    assert len(train) == 7 and len(test) == 3  # the split folders, not the 95/5 rule
    assert train.num_classes == test.num_classes == 2 and train.channels == 3
    # classes sorted by name (cat = 0, dog = 1), interleaved so that the first images cover both
    assert train.labels.tolist() == [0, 1, 0, 1, 0, 1, 1]
    assert [f.parent.name for f in train.files] == ["cat", "dog", "cat", "dog", "cat", "dog", "dog"]
    assert test.labels.tolist() == [0, 1, 0]
    # the pixels are torchvision's decoding of each file (8x8: no resize)
    from torchvision.io import decode_image

    for i, f in enumerate(train.files):
        assert torch.equal(train.uint8[i], decode_image(str(f)))
    # a test class the train split lacks would get a label the model never saw
    (root / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "bird" / "0.jpg")
    with pytest.raises(DataError, match="bird"):
        load_dataset("folder", "test", image_size=8, path=root)


def test_folder_without_splits_keeps_the_95_5_rule_and_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    _jpeg_folder(tmp_path / "data", {"a": 20, "b": 20})
    train = load_dataset("folder", "train", image_size=8, path=tmp_path / "data")
    test = load_dataset("folder", "test", image_size=8, path=tmp_path / "data")
    assert len(train) == 38 and len(test) == 2 and not set(train.files) & set(test.files)
    assert sorted(test.labels.tolist()) == [0, 1]  # files 19 (a/0019) and 39 (b/0019) of the sorted list
    assert all(f.name == "0019.jpg" for f in test.files)
    assert train.batch(torch.arange(2))["images"].shape == (2, 3, 8, 8)  # 12x10 -> short side 8, centre crop
    # images straight in the folder: unlabelled
    flat = tmp_path / "flat"
    _jpeg_folder(flat, {".": 4})
    ds = load_dataset("folder", "train", image_size=8, path=flat)
    assert ds.num_classes == 0 and ds.labels.tolist() == [0, 0, 0, 0]  # 4 files: none is a 20th


def test_folder_decodes_once_into_a_cache_keyed_by_the_files(tmp_path, monkeypatch):
    import vqdiff.data as data

    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    _jpeg_folder(root, {"train/x": 3, "train/y": 3, "test/x": 1, "test/y": 1})
    first = load_dataset("folder", "train", image_size=8, path=root)
    assert len(list((tmp_path / "cache" / "folders").glob("*.safetensors"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file although the cache holds it")

    monkeypatch.setattr(data, "load_image", no_decoding)
    again = load_dataset("folder", "train", image_size=8, path=root)
    assert torch.equal(first.uint8, again.uint8) and torch.equal(first.labels, again.labels)
    # another image in the folder: another file list, so the cache is not reused
    monkeypatch.undo()
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "train" / "y" / "9999.jpg")
    grown = load_dataset("folder", "train", image_size=8, path=root)
    assert len(grown) == 7 and torch.equal(grown.uint8[:6], first.uint8[:6])  # y/9999 sorts last
    assert len(list((tmp_path / "cache" / "folders").glob("*.safetensors"))) == 2
