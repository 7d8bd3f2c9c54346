"""A small CNN trained on the dataset's own train split: the feature extractor that needs no download.

Two recipes (`CLASSIFIERS`, named by a run's `evaluate.classifier`): `cnn3`, three conv blocks on one
fp32 thread (MNIST, the quickstart), and `airbench`, airbench94's layout at a CPU's width with
augmentation and label smoothing, in bf16 on every thread where AMX multiplies it (CIFAR-10: 86.84%
on the test split against cnn3's 71.9%, docs/results.md).

Its penultimate layer (`feature_dim`, 128 by default) gives the features for FID, KID and
precision/recall, and its logits give the Inception Score. It is trained with a fixed recipe from a
fixed seed, so its weights (and their hash) are a function of the data and the recipe on a given
device and torch build. On MNIST, FID on Inception features of 28x28 digits upsampled to 299 says
little; a classifier of the data itself is the usual substitute (e.g. the MNIST "FID" of the
discrete diffusion papers).

Cache layout, one folder per (dataset, image size, number of training images, recipe):

    CACHE/classifier/{dataset}-{size}px-n{n}-{config hash}/
        model.safetensors   weights, with the config as JSON metadata (so the file hash covers it)
        info.json           config, weights hash, test accuracy, training time (written last)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.common import EvaluationError, Progress, sha256_json
from vqdiff.errors import CheckpointError
from vqdiff.io import file_digest, load_tensors, read_json, save_tensors, write_json
from vqdiff.data import ImageSet, from_uint8
from vqdiff.classify import fit_classifier
from vqdiff.distributed import seeded
from vqdiff.precision import autocast_dtype
from vqdiff.schedules import warmup_cosine

ARCH = "cnn3-bn-v1"  # part of the cache key: change it when `Classifier` changes
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "info.json"


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is built and trained. Every field is part of the cache key.

    The default trains ~2 epochs of MNIST (2000 x 64 images); see the evaluation report for its time.
    """

    width: int = 16  # conv widths: width, 2 width, 4 width (airbench: width, 4 width, 4 width)
    feature_dim: int = 128  # the penultimate layer: the features FID is computed on (airbench: 4 width)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    arch: str = "cnn3"  # cnn3 | airbench (see ARCHS)
    label_smoothing: float = 0.0
    augment: bool = False  # random flips and translations of up to 2 pixels (reflected)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise EvaluationError(f"unknown classifier {self.arch!r}; choose from {', '.join(ARCHS)}")


ARCHS = {
    "cnn3": "three conv-BN-ReLU-pool blocks, a ReLU feature layer and a linear head",
    "airbench": "airbench94's layout (Jordan 2024) at a CPU's width: a conv stem, then three blocks of conv-pool-BN-GELU-"
    "conv-BN-GELU at widths w, 4w, 4w, global max pooling (the features) and a linear head",
}
# the recipes a run names by `evaluate.classifier`; `classifier_steps` replaces the steps
CLASSIFIERS: dict[str, "ClassifierRecipe"] = {}


CLASSIFIERS.update(
    cnn3=ClassifierRecipe(),
    # CIFAR-10: 86.84% on the test split after 2500 steps x 256 (12.8 epochs; AdamW, label smoothing, flips and
    # translations) in 561 s on CPU-AMX, bf16 (docs/results.md)
    airbench=ClassifierRecipe(arch="airbench", width=32, steps=2500, batch_size=256, lr=3e-3, weight_decay=5e-2, label_smoothing=0.2, augment=True),
)


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int
    num_classes: int
    image_size: int
    recipe: ClassifierRecipe = ClassifierRecipe()

    def to_dict(self) -> dict[str, Any]:
        return {"arch": ARCH, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        d = dict(d)
        d.pop("arch", None)
        return cls(**{**d, "recipe": ClassifierRecipe(**d.get("recipe", {}))})


class Classifier(nn.Module):
    """Three conv blocks (conv, BN, ReLU, 2x pool), a `feature_dim` ReLU layer, then the class logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if cfg.image_size < 8:
            raise EvaluationError(f"the classifier extractor needs images of at least 8x8, not {cfg.image_size}")
        self.cfg = cfg
        w, c = cfg.recipe.width, cfg.channels
        if cfg.recipe.arch == "airbench":
            self._airbench(cfg, w, c)
            return

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *block(c, w), *block(w, 2 * w), *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )  # [b c h w] -> [b (4w 4 4)]
        self.head = nn.Sequential(nn.Linear(4 * w * 16, cfg.recipe.feature_dim), nn.ReLU())
        self.out = nn.Linear(cfg.recipe.feature_dim, cfg.num_classes)

    def _airbench(self, cfg: ClassifierConfig, w: int, c: int) -> None:
        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        def block(cin: int, cout: int) -> list[nn.Module]:  # conv, pool, BN, GELU, conv, BN, GELU
            first = conv(cin, cout)
            return [first[0], nn.MaxPool2d(2), *first[1:], *conv(cout, cout)]

        stem = max(8, 3 * w // 4)
        self.body = nn.Sequential(
            *conv(c, stem), *block(stem, w), *block(w, 4 * w), *block(4 * w, 4 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten()
        )  # [b c h w] -> [b 4w]
        self.head = nn.Identity()
        self.out = nn.Linear(4 * w, cfg.num_classes, bias=False)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: float [b c h w] in [-1, 1] -> (features float [b d], logits float [b num_classes])."""
        features = self.head(self.body(images))
        return features, self.out(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


# ------------------------------------------------------------------ training


def _lr_factor(step: int, steps: int) -> float:
    # short linear warmup, then cosine to zero: the training loop's schedule with its own warmup
    return warmup_cosine(step, steps=steps, warmup=max(1, min(100, steps // 10)))


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Train on one CPU thread, for two measured reasons.

    - The weights depend on the thread count (reductions are split differently): with one thread
      the hash does not change with the machine's core count or the caller's `set_num_threads`.
    - This net is small; on 2 cores shared with other work, 2 threads ran 4-8x slower than one
      (threads wait on each other at every op), and unshared they gain less than 2x.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    train_set: ImageSet,
    cfg: ClassifierConfig,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> Classifier:
    """Train from `cfg.recipe.seed`: the same seed, data and device give the same weights.

    The global RNG is left untouched (the init runs under `fork_rng`), and the batches come from
    their own generator, so whatever ran before cannot change the result. On the CPU it runs on one
    thread (see `_one_cpu_thread`).
    """
    device = torch.device(device)
    if cfg.recipe.arch == "cnn3":
        with _one_cpu_thread(device):
            return _train(train_set, cfg, device, progress, amp=None)
    # a net 10x larger: every thread, and bf16 where the hardware multiplies it natively (vqdiff.precision)
    return _train(train_set, cfg, device, progress, amp=autocast_dtype("fast", device, convolutional=True))


def _train(train_set: ImageSet, cfg: ClassifierConfig, device: torch.device, progress: Progress | None, amp: torch.dtype | None) -> Classifier:
    r = cfg.recipe
    with seeded(r.seed):
        model = Classifier(cfg)
    model.to(device).train()
    g = torch.Generator().manual_seed(r.seed)
    data = train_set.uint8.to(device) if train_set.uint8 is not None else None
    labels = train_set.labels.to(device)
    n = len(train_set)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # epochs of permutations: every image once per epoch
        perm, pos = torch.randperm(n, generator=g), 0
        while True:
            if pos + r.batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos : pos + r.batch_size]
            pos += r.batch_size
            images = from_uint8(data[idx.to(device)]) if data is not None else from_uint8(train_set.images_uint8(idx)).to(device)
            yield (_augment(images, g) if r.augment else images), labels[idx.to(device)]

    stream = batches()
    # cudnn picks non-deterministic kernels unless told otherwise; the hash must not depend on luck
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        fit_classifier(model, opt, lambda step: next(stream), lambda step: r.lr * _lr_factor(step, r.steps), r.steps, progress, r.label_smoothing, amp)
    return model.eval()


def _augment(images: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each image flipped with probability 1/2 and translated by up to `pad` pixels (reflected borders)."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=g) < 0.5
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # [b 1 h 1]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # [b 1 1 w]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


@torch.no_grad()
def accuracy(
    model: Classifier, image_set: ImageSet, *, device: str | torch.device = "cpu", batch_size: int = 1000
) -> float:
    """Top-1 accuracy of `model` on `image_set`, in [0, 1]."""
    model.eval()
    correct = 0
    for i in range(0, len(image_set), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(image_set)))
        batch = image_set.batch(idx)
        logits = model(batch["images"].to(device))
        correct += (logits.argmax(1).cpu() == batch["labels"]).sum().item()
    return correct / max(1, len(image_set))


# ------------------------------------------------------------------ cache


@dataclass
class TrainedClassifier:
    folder: Path
    cfg: ClassifierConfig
    state: dict[str, torch.Tensor]  # the weights exactly as hashed, on the CPU
    hash: str  # sha256 of model.safetensors, short hex
    info: dict[str, Any]  # test_accuracy, train_seconds, ... (see INFO_FILE)
    trained: bool  # False when it came from the cache


def cache_folder(cache_dir: Path, dataset: str, cfg: ClassifierConfig, num_train: int) -> Path:
    key = f"{dataset}-{cfg.image_size}px-n{num_train}-{sha256_json(cfg.to_dict())}"
    return cache_dir / "classifier" / key


def _load_cached(folder: Path, cfg: ClassifierConfig) -> TrainedClassifier | None:
    """The cached classifier, or None when it is missing, incomplete, corrupt or for another config."""
    weights, info_path = folder / WEIGHTS_FILE, folder / INFO_FILE
    if not (weights.exists() and info_path.exists()):
        return None
    try:
        info = read_json(info_path)
        state = load_tensors(weights)
    except CheckpointError:
        return None
    digest = file_digest(weights)
    if not isinstance(info, dict) or info.get("hash") != digest or info.get("config") != cfg.to_dict():
        return None  # the weights are not the ones this recipe trained: retrain
    return TrainedClassifier(folder, cfg, state, digest, info, trained=False)


def load_or_train(
    train_set: ImageSet,
    test_set: ImageSet | Callable[[], ImageSet | None] | None,
    cfg: ClassifierConfig,
    *,
    cache_dir: Path,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> TrainedClassifier:
    """The classifier for (`train_set`, `cfg`) from the cache, training and caching it when missing.

    `test_set` (or a function that loads it, called only when training) gives the test accuracy.
    """
    folder = cache_folder(cache_dir, train_set.name, cfg, len(train_set))
    cached = _load_cached(folder, cfg)
    if cached is not None:
        return cached
    if train_set.num_classes < 2:
        raise EvaluationError(
            f"dataset {train_set.name!r} has no class labels to train the classifier extractor; "
            "use the inception extractor"
        )
    t0 = time.perf_counter()
    model = train_classifier(train_set, cfg, device=device, progress=progress)
    train_seconds = time.perf_counter() - t0
    if callable(test_set):
        test_set = test_set()
    test_accuracy = accuracy(model, test_set, device=device) if test_set is not None and len(test_set) else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the config travels inside the weights file, so that its hash names the architecture too
    meta = {"config": json.dumps(cfg.to_dict(), sort_keys=True)}
    # weights first, info last: an info.json always has its weights next to it
    save_tensors(folder / WEIGHTS_FILE, state, metadata=meta)
    digest = file_digest(folder / WEIGHTS_FILE)
    info = {
        "hash": digest,
        "config": cfg.to_dict(),
        "dataset": train_set.name,
        "train_images": len(train_set),
        "test_images": len(test_set) if test_set is not None else 0,
        "test_accuracy": test_accuracy,
        "train_seconds": round(train_seconds, 2),
        "device": str(torch.device(device)),
        "torch": torch.__version__,
    }
    write_json(folder / INFO_FILE, info)
    return TrainedClassifier(folder, cfg, state, digest, info, trained=True)
