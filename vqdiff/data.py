"""Datasets by name, as float images `[b c h w]` in [-1, 1], and the token-grid dataset.

Names: `mnist`, `fashion-mnist`, `cifar10` (torchvision), `folder` (any folder of images, searched
recursively) and `shapes` (procedural coloured shapes from a seed: no files, for tests and smoke runs).

The data root is `--data-root`, else `$VQDIFF_DATA_ROOT`, else `~/.cache/vqdiff/data`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vqdiff.checkpoint import load_tensors, save_tensors

DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder", "shapes")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SHAPES_CLASSES = ("circle", "square", "triangle")


class DataError(Exception):
    """Missing or unreadable data; the message is one line naming the folder and the remedy."""


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    if data_root:
        return Path(data_root).expanduser()
    env = os.environ.get("VQDIFF_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vqdiff/data").expanduser()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [b c h w] in [-1, 1] -> uint8 [b c h w] in [0, 255] (the one rounding used everywhere)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [b c h w] -> float [b c h w] in [-1, 1]."""
    return images.float() / 127.5 - 1


@dataclass
class ImageSet:
    """A split of a dataset. `batch(indices)` gives {"images": float [b c h w] in [-1,1], "labels": long [b]}.

    In-memory sets keep `uint8` images `[n c h w]`; `folder` sets keep file paths and load lazily.
    """

    name: str
    split: str
    image_size: int
    channels: int
    num_classes: int
    labels: torch.Tensor  # long [n]
    uint8: torch.Tensor | None = None  # uint8 [n c h w], or None for lazily loaded files
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def images_uint8(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [b c h w] for the given indices."""
        if self.uint8 is not None:
            return self.uint8[indices]
        return torch.stack([_load_file(self.files[i], self.image_size, self.channels) for i in indices.tolist()])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"images": from_uint8(self.images_uint8(indices)), "labels": self.labels[indices]}


def load_dataset(
    name: str,
    split: str = "train",
    *,
    image_size: int = 32,
    root: str | Path | None = None,
    path: str | Path | None = None,
    limit: int = 0,
    seed: int = 0,
    download: bool = True,
) -> ImageSet:
    """Load a split (`train` or `test`) of dataset `name` at `image_size`.

    `path` is the image folder for `folder`; `limit` > 0 keeps the first `limit` images
    (a fixed subset, for quick runs); `seed` only affects `shapes`.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choose train or test")
    if name == "shapes":
        n = limit or (4096 if split == "train" else 1024)
        ds = make_shapes(n, image_size, seed=seed + (0 if split == "train" else 1_000_003))
        return ds if split == "train" else _with_split(ds, "test")
    if name == "folder":
        ds = _load_folder(path, split, image_size)
    else:
        ds = _load_torchvision(name, split, image_size, resolve_data_root(root), download)
    if limit and limit < len(ds):
        ds.labels = ds.labels[:limit]
        if ds.uint8 is not None:
            ds.uint8 = ds.uint8[:limit]
        if ds.files is not None:
            ds.files = ds.files[:limit]
    return ds


def _with_split(ds: ImageSet, split: str) -> ImageSet:
    ds.split = split
    return ds


# ------------------------------------------------------------------ torchvision


_TV = {
    "mnist": ("MNIST", "MNIST/raw", 1, 10),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", 1, 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 3, 10),
}


def _load_torchvision(name: str, split: str, image_size: int, root: Path, download: bool) -> ImageSet:
    import torchvision

    cls_name, folder, channels, num_classes = _TV[name]
    cls = getattr(torchvision.datasets, cls_name)
    train = split == "train"

    def open_(dl: bool):
        return cls(root=str(root), train=train, download=dl)

    try:
        ds = open_(False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"{name} not found in {root / folder}; put the torchvision files there, "
                "or pass --data-root / set VQDIFF_DATA_ROOT to a folder that has them"
            ) from None
        try:
            ds = open_(True)
        except Exception as e:  # offline: URLError, socket errors, RuntimeError from torchvision
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise DataError(
                f"{name} not found in {root / folder} and the download failed ({reason}); "
                "put the torchvision files there, or pass --data-root / set VQDIFF_DATA_ROOT"
            ) from None
    data = torch.as_tensor(ds.data)
    if data.dim() == 3:  # MNIST: [n h w]
        data = data.unsqueeze(1)
    else:  # CIFAR: [n h w c]
        data = data.permute(0, 3, 1, 2)
    data = data.contiguous()
    if data.shape[-1] == 28:
        # MNIST is 28x28; pad to 32 so that 2 and 4 downsamplings divide it (background is 0)
        data = F.pad(data, (2, 2, 2, 2))
    data = _resize_uint8(data, image_size)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return ImageSet(name, split, image_size, channels, num_classes, labels, uint8=data)


def _resize_uint8(data: torch.Tensor, size: int) -> torch.Tensor:
    if data.shape[-1] == size and data.shape[-2] == size:
        return data
    out = F.interpolate(data.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------ folder


def _load_folder(path: str | Path | None, split: str, image_size: int) -> ImageSet:
    if not path:
        raise DataError("dataset 'folder' needs data.path, the folder of images")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise DataError(f"image folder {root} holds {len(files)} images; put image files (png, jpg, ...) there")
    # a fixed 95/5 split by a hash-free rule: every 20th file is held out
    files = [f for i, f in enumerate(files) if (i % 20 == 19) == (split == "test")]
    from PIL import Image

    with Image.open(files[0]) as im:
        channels = 1 if im.mode in ("L", "1", "I;16", "I") else 3
    return ImageSet("folder", split, image_size, channels, 0, torch.zeros(len(files), dtype=torch.long), files=files)


def _load_file(path: Path, size: int, channels: int) -> torch.Tensor:
    """uint8 [c size size]: resize the short side to `size`, centre-crop."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


# ------------------------------------------------------------------ shapes


def make_shapes(n: int, image_size: int = 32, *, seed: int = 0) -> ImageSet:
    """`n` coloured circles, squares and triangles on black; label = shape. Pure in (n, size, seed)."""
    g = torch.Generator().manual_seed(seed)
    s = image_size
    labels = torch.randint(0, len(SHAPES_CLASSES), (n,), generator=g)
    r = (0.18 + 0.17 * torch.rand(n, generator=g)) * s  # half-size in pixels
    cx = r + (s - 2 * r) * torch.rand(n, generator=g)
    cy = r + (s - 2 * r) * torch.rand(n, generator=g)
    colour = 0.3 + 0.7 * torch.rand(n, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    dx = xx[None] - cx[:, None, None]  # [n h w]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= rr * 0.85) & (dy.abs() <= rr * 0.85)
    # upward triangle: apex at top, base at bottom, width grows with depth
    depth = (dy + rr) / (2 * rr)
    triangle = (depth >= 0) & (depth <= 1) & (dx.abs() <= depth * rr)
    masks = torch.stack([circle, square, triangle], 1)  # [n 3 h w]
    mask = masks[torch.arange(n), labels]  # [n h w]
    images = mask[:, None].float() * colour[:, :, None, None]  # [n c h w] in [0,1]
    data = (images * 255).round().to(torch.uint8)
    return ImageSet("shapes", "train", image_size, 3, len(SHAPES_CLASSES), labels, uint8=data)


# ------------------------------------------------------------------ token grids


def save_tokens(path: str | Path, ids: torch.Tensor, labels: torch.Tensor, codebook_size: int) -> None:
    """Write `ids: long [n h w]` and `labels: long [n]` to a safetensors file (atomic)."""
    dtype = torch.int16 if codebook_size <= 32767 else torch.int32
    save_tensors(path, {"ids": ids.to(dtype), "labels": labels.long()}, metadata={"codebook_size": str(codebook_size)})


def load_tokens(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids long [n h w], labels long [n]) from `save_tokens`' file."""
    t = load_tensors(path)
    return t["ids"].long(), t["labels"].long()


