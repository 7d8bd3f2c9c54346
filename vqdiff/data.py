"""Datasets by name, as float images `[b c h w]` in [-1, 1], and the token-grid dataset.

Names: `mnist`, `fashion-mnist`, `cifar10` (torchvision), `folder` (a folder of images in torchvision's
ImageFolder layout, `<class>/*.jpg`, decoded once into a uint8 cache) and `shapes` (procedural coloured
shapes from a seed: no files, for tests and smoke runs).

The data root is `--data-root`, else `$VQDIFF_DATA_ROOT`, else `~/.cache/vqdiff/data`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vqdiff.io import load_tensors, save_tensors

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


CACHE_ENV = "VQDIFF_CACHE"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where vqdiff caches what it computed once (decoded image folders, the evaluation's classifier
    and reference features): `cache_dir`, else `$VQDIFF_CACHE`, else `~/.cache/vqdiff`."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vqdiff").expanduser()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [b c h w] in [-1, 1] -> uint8 [b c h w] in [0, 255] (the one rounding used everywhere)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [b c h w] -> float [b c h w] in [-1, 1]."""
    return images.float() / 127.5 - 1


@dataclass
class ImageSet:
    """A split of a dataset. `batch(indices)` gives {"images": float [b c h w] in [-1,1], "labels": long [b]}.

    Every set keeps its `uint8` images `[n c h w]` in memory (`folder` sets decode their files once,
    into a cache, and keep the paths in `files`); `uint8 = None` with `files` loads lazily.
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
        return torch.stack([load_image(self.files[i], self.image_size, self.channels) for i in indices.tolist()])

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
        ds = _load_folder(path, split, image_size, limit)
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

FOLDER_CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def folder_files(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """(files, class indices, class names) of one split of an image folder, in a fixed order.

    torchvision's ImageFolder convention: `root/<class>/**/*.jpg` gives the labels (classes sorted
    by name). When `root/train` and `root/test` both exist they are the splits, and the test
    split takes the train split's class indices. Otherwise every 20th file (in sorted order) is
    held out for test: a fixed 95/5 rule. A folder without class subfolders (images at its top
    level) is unlabelled: all labels 0, no classes. The classes come interleaved (see below).
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    extensions = tuple(IMAGE_SUFFIXES)
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / "train" if presplit else root
    top_level_images = any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in base.iterdir())
    has_classes = not top_level_images and any(p.is_dir() for p in base.iterdir())
    if has_classes:
        classes, class_to_idx = find_classes(str(base))
        where = root / split if presplit else root
        try:
            samples = make_dataset(str(where), class_to_idx, extensions=extensions, allow_empty=True)
        except FileNotFoundError as e:  # a folder of the other split that the train split lacks, ...
            raise DataError(f"image folder {where}: {str(e).splitlines()[0]}") from None
        if presplit:
            extra = sorted({p.name for p in where.iterdir() if p.is_dir()} - set(classes))
            if extra:
                raise DataError(f"{where} has class folders that {base} lacks ({', '.join(extra[:3])}); the splits must share classes")
        files, labels = [Path(f) for f, _ in samples], [c for _, c in samples]
    else:
        classes = []
        where = root / split if presplit else root
        files = sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        labels = [0] * len(files)
    if not presplit:
        keep = [i for i in range(len(files)) if (i % 20 == 19) == (split == "test")]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    # interleave the classes (the i-th image of every class, then the (i+1)-th, ...): ImageFolder's
    # order is class by class, and the first N images (`limit`, the FID reference set) must cover
    # every class, not only the first one or two
    seen: dict[int, int] = {}
    rank = []
    for c in labels:
        rank.append(seen.get(c, 0))
        seen[c] = rank[-1] + 1
    order = sorted(range(len(files)), key=lambda i: (rank[i], labels[i]))
    return [files[i] for i in order], [labels[i] for i in order], classes


def _load_folder(path: str | Path | None, split: str, image_size: int, limit: int = 0) -> ImageSet:
    if not path:
        raise DataError("dataset 'folder' needs data.path, the folder of images")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    files, labels, classes = folder_files(root, split)
    if len(files) < 1 or (len(files) < 2 and split == "train"):
        raise DataError(
            f"image folder {root} holds {len(files)} {split} images; put image files (png, jpg, ...) there, "
            "one subfolder per class"
        )
    if limit and limit < len(files):  # before decoding: a quick run decodes only what it uses
        files, labels = files[:limit], labels[:limit]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        channels = 1 if _decode(files[0]).shape[0] in (1, 2) else 3  # grey (+ alpha) stays grey
    uint8 = _decoded_cache(root, files, image_size, channels)
    num_classes = len(classes) if len(classes) >= 2 else 0  # one class is no label
    return ImageSet(
        "folder", split, image_size, channels, num_classes, torch.tensor(labels, dtype=torch.long), uint8=uint8, files=files
    )


def _decoded_cache(root: Path, files: list[Path], size: int, channels: int) -> torch.Tensor:
    """uint8 [n c size size]: every file decoded once, then read back from a safetensors cache.

    The cache file is named by a hash of the file list (relative paths), their sizes and
    modification times, the image size and the channels: another folder, an added, removed or
    rewritten image, or another size gives another file, so a stale cache is never read.
    """
    import hashlib

    h = hashlib.sha256(f"v{FOLDER_CACHE_VERSION} {size} {channels}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    path = resolve_cache_dir() / "folders" / f"{root.name}-{len(files)}-{size}px-{h.hexdigest()[:16]}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)["images"]
        except Exception:  # a cache cut short by a kill: decode again (save_tensors is atomic, so rare)
            pass
    images = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec, which is not a dependency
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        for i, f in enumerate(files):
            images[i] = load_image(f, size, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"images": images}, metadata={"root": str(root), "num": str(len(files))})
    return images


def _decode(path: Path, channels: int | None = None) -> torch.Tensor:
    """uint8 [c h w] of one file by torchvision's decoder (PIL for the formats it lacks: bmp, tiff)."""
    from torchvision.io import ImageReadMode, decode_image

    mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}[channels]
    try:
        return decode_image(str(path), mode=mode)
    except RuntimeError:
        pass
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            if channels is None:
                channels = 1 if im.mode in ("L", "1", "I;16", "I", "LA") else 3
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """uint8 [c size size]: resize the short side to `size` (bicubic, antialiased), centre-crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = _decode(path, channels)
    h, w = image.shape[-2:]
    if min(h, w) != size:
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(image, [size, size])
    return image


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


