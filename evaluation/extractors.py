"""The feature extractors, registered with torch-fidelity: `classifier` (trained here) and `inception`.

- `inception`: torch-fidelity's `inception-v3-compat` (the standard FID network). Its weights come
  from `inception_weights`, else `$VQDIFF_INCEPTION_WEIGHTS`, else torch-fidelity's download
  (kept in the torch hub cache). Offline with none of these, `get_extractor` raises one line.
  `inception_mode` picks how it computes: `fp32` is torch-fidelity's own module; `channels-last`,
  `bf16` (autocast) and `bf16-channels-last` are the same weights registered as
  `inception-v3-compat-{mode}` (their features never share a cache file with fp32's). The default
  (`default_inception_mode`) on a CPU is the fastest mode measured within 0.5 FID of fp32
  (docs/results.md): bf16 channels-last where the CPU has AMX-BF16, else channels-last.
- `classifier`: the dataset's own small CNN (`evaluation.classifier`), registered under a name that
  carries its weights hash, `vqdiff-classifier-{hash}`.

Every `Extractor` names itself and its weights hash; results and cached statistics carry both.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from evaluation.classifier import Classifier, ClassifierConfig, ClassifierRecipe, load_or_train
from evaluation.common import EvaluationError, Progress
from vqdiff.data import DataError, ImageSet, load_dataset, resolve_cache_dir
from vqdiff.distributed import default_device
from vqdiff.io import file_digest
from vqdiff.precision import amx_bf16

INCEPTION_ENV = "VQDIFF_INCEPTION_WEIGHTS"
INCEPTION_FIDELITY_NAME = "inception-v3-compat"
INCEPTION_DEFAULT_HASH = "torch-fidelity-default"
KINDS = ("auto", "classifier", "inception")
INCEPTION_MODES = ("auto", "fp32", "channels-last", "bf16", "bf16-channels-last")
DATASETS_WITHOUT_LABELS = ("folder",)

# CPU batch sizes measured on 2 cores (see the evaluation report): Inception at 299x299 is fastest
# with small batches there; on a GPU larger batches win.
BATCH_SIZE = {
    ("inception", "cpu"): 16,
    ("inception", "cuda"): 128,
    ("classifier", "cpu"): 64,
    ("classifier", "cuda"): 1024,
}


@dataclass
class Extractor:
    """A feature extractor as torch-fidelity knows it, plus what a result must record about it."""

    name: str  # "classifier" | "inception"
    hash: str  # sha256 of the weights file, short hex; inception without a file: "torch-fidelity-default"
    fidelity_name: str  # the name registered with torch-fidelity
    has_logits: bool  # class logits available, so the Inception Score can be computed
    channels: int  # image channels it takes; grey images are repeated to 3 for inception
    feature_dim: int
    feature_layer: str  # torch-fidelity feature name used for FID / KID / PR
    logits_layer: str | None  # torch-fidelity feature name used for IS
    weights_path: str | None  # inception: the file for torch-fidelity (None: its download); classifier: its cache file
    device: str  # "cuda" or "cpu"
    batch_size: int
    info: dict[str, Any] = field(default_factory=dict)  # classifier: test_accuracy, train_seconds, cached, ...
    mode: str = "fp32"  # inception: how it computes (INCEPTION_MODES); the classifier always runs fp32

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def key(self) -> list[str]:
        """What a cached result must match: name and weights hash, and the mode unless fp32 (fp32 is
        the plain computation, and its key stays the bare [name, hash] that cached results carry)."""
        return [self.name, self.hash] + ([self.mode] if self.mode != "fp32" else [])

    def fidelity_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that make `torch_fidelity.calculate_metrics` use this extractor."""
        kwargs: dict[str, Any] = {
            "feature_extractor": self.fidelity_name,
            "feature_layer_fid": self.feature_layer,
            "feature_layer_kid": self.feature_layer,
            "feature_layer_prc": self.feature_layer,
            "cuda": self.cuda,
            "batch_size": self.batch_size,
        }
        if self.logits_layer is not None:
            kwargs["feature_layer_isc"] = self.logits_layer
        if self.name == "inception" and self.weights_path is not None:
            kwargs["feature_extractor_weights_path"] = self.weights_path
        return kwargs


# ------------------------------------------------------------------ classifier as a torch-fidelity extractor


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a trained `Classifier`: uint8 [b c h w] -> (features [b d], logits [b k]).

    One subclass per weights hash is registered (see `register_classifier`); it carries the config and
    the exact weights that were hashed, so the registered name always means the same numbers.
    """

    cfg: ClassifierConfig
    state: dict[str, torch.Tensor]

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):
        super().__init__(name, features_list)
        self.net = Classifier(self.cfg)
        self.net.load_state_dict(self.state, strict=True)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images [b c h w], got {x.dtype} {tuple(x.shape)}")
        images = x.float() / 127.5 - 1  # vqdiff.data.from_uint8
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):  # other sizes are resampled to the size it was trained at
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        features, logits = self.net.features_and_logits(images)
        out = {"features": features.float(), "logits": logits.float()}
        return tuple(out[k] for k in self.features_list)


def register_classifier(cfg: ClassifierConfig, state: dict[str, torch.Tensor], digest: str) -> str:
    """Register the classifier with these weights under `vqdiff-classifier-{digest}`; returns that name."""
    name = f"vqdiff-classifier-{digest}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:  # same hash, same weights: registering once is enough
        cls = type(f"ClassifierFeatureExtractor_{digest}", (ClassifierFeatureExtractor,), {"cfg": cfg, "state": state})
        register_feature_extractor(name, cls)
    return name


# ------------------------------------------------------------------ inception modes


class FastInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception (same weights, same resize) with channels-last convolutions and/or
    bf16 autocast; features come out float32, as the plain extractor's do. One subclass per mode is registered."""

    mode: str

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):
        super().__init__(name, features_list, **kwargs)
        if self.mode.endswith("channels-last"):
            # weights in NHWC: oneDNN then runs every convolution NHWC, without reorders between layers
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.mode.startswith("bf16")):
            return super().forward(x)


def register_inception(mode: str) -> str:
    """The torch-fidelity name of Inception in `mode` (fp32: torch-fidelity's own), registered once."""
    if mode == "fp32":
        return INCEPTION_FIDELITY_NAME
    name = f"{INCEPTION_FIDELITY_NAME}-{mode}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        cls = type(f"FastInceptionV3_{mode.replace('-', '_')}", (FastInceptionV3,), {"mode": mode})
        register_feature_extractor(name, cls)
    return name


# docs/scripts/inception_modes.py (docs/results.md, Inception): channels-last runs 1.45-1.56x fp32 with features
# within 2e-5 of fp32's (FID equal to 3 decimals); bf16 autocast moves FID by +0.10 to +0.11. With
# AMX-BF16, bf16 channels-last runs 3.4x fp32 (2.4x channels-last); with AVX512-BF16 alone it is no
# faster than channels-last (1.50x against 1.56x), so there the exact mode stays the default.
CPU_DEFAULT_MODE = "channels-last"
AMX_DEFAULT_MODE = "bf16-channels-last"


def default_inception_mode(device: torch.device) -> str:
    """The mode `auto` means on `device`: on a CPU the fastest mode measured within 0.5 FID of fp32
    (bf16 channels-last with AMX-BF16, else channels-last); fp32 elsewhere (a GPU was not measured)."""
    if device.type != "cpu":
        return "fp32"
    return AMX_DEFAULT_MODE if amx_bf16(device) else CPU_DEFAULT_MODE


# ------------------------------------------------------------------ inception weights


def inception_hub_file() -> Path:
    """Where torch-fidelity's download of the Inception weights lands (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def inception_offline_message() -> str:
    return (
        f"Inception weights not found (not in {inception_hub_file()}) and they cannot be downloaded here; "
        f"pass --inception-weights PATH or set {INCEPTION_ENV} to the file "
        f"({os.path.basename(URL_INCEPTION_V3)}), or use the classifier extractor"
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds.

    The lookup runs in a daemon thread, because a resolver that hangs ignores socket timeouts.
    """
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


ISC_OMITTED_ZERO_FC = (
    "Inception Score omitted: the Inception weights' classification layer (fc) is all zeros, a features-only "
    "file, so every image gets the same uniform logits and IS would be 1.0 whatever the images"
)


def _check_inception_file(path: Path, source: str) -> bool:
    """Refuse a file that is not torch-fidelity's Inception state dict; returns whether its
    classification layer is real (False for a features-only file whose fc is all zeros)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise EvaluationError(f"Inception weights {path} (from {source}) cannot be read ({type(e).__name__})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise EvaluationError(
            f"{path} (from {source}) is not torch-fidelity's Inception state dict "
            f"({os.path.basename(URL_INCEPTION_V3)})"
        )
    # FID, KID and precision/recall use the 2048-d pool features, which do not depend on fc
    return bool(fc.abs().sum() > 0)


def resolve_inception_weights(inception_weights: str | Path | None = None) -> tuple[str | None, str]:
    """(weights path for torch-fidelity or None for its own download, hash) or an EvaluationError.

    (`inception_has_logits` says whether the file's classification layer is real.)

    The order: `inception_weights`, `$VQDIFF_INCEPTION_WEIGHTS`, the torch hub cache, the download
    (checked with a 3 s connection probe, so that offline fails here in one line and not later in
    torch-fidelity with a URL error).
    """
    source = "--inception-weights"
    path = inception_weights
    if not path and os.environ.get(INCEPTION_ENV):
        path, source = os.environ[INCEPTION_ENV], f"${INCEPTION_ENV}"
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise EvaluationError(f"Inception weights file {p} (from {source}) does not exist")
        _check_inception_file(p, source)
        return str(p), file_digest(p)
    if inception_hub_file().is_file() or _reachable(URL_INCEPTION_V3):
        return None, INCEPTION_DEFAULT_HASH
    raise EvaluationError(inception_offline_message())


def inception_has_logits(weights_path: str | Path | None) -> bool:
    """Whether the Inception weights have a real classification layer (torch-fidelity's download has)."""
    return True if weights_path is None else _check_inception_file(Path(weights_path), str(weights_path))


def inception_available(inception_weights: str | Path | None = None) -> bool:
    """Whether Inception weights are on this machine (given, in the env var, or in the hub cache)."""
    return bool(inception_weights or os.environ.get(INCEPTION_ENV) or inception_hub_file().is_file())


# ------------------------------------------------------------------ get_extractor


def has_labels(dataset: str, train_set: ImageSet | None = None) -> bool:
    """Whether the classifier extractor can be trained: the dataset (or `train_set`) has 2+ classes."""
    if train_set is not None:
        return train_set.num_classes >= 2
    return dataset not in DATASETS_WITHOUT_LABELS


def get_extractor(
    kind: str = "auto",
    *,
    dataset: str,
    image_size: int = 32,
    data_root: str | Path | None = None,
    train_set: ImageSet | None = None,
    test_set: ImageSet | None = None,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    recipe: ClassifierRecipe | None = None,
    progress: Progress | None = None,
    inception_mode: str = "auto",
) -> Extractor:
    """The feature extractor `kind` ("auto", "classifier" or "inception") for `dataset`, ready to use.

    `auto` picks inception when its weights are on this machine, else the classifier when the
    dataset has labels, else inception through the download (or the one-line offline error).

    The classifier is trained on `train_set` (default: the dataset's train split at `image_size`
    from `data_root`) with `recipe`, and cached under `cache_dir` (default `$VQDIFF_CACHE`, else
    `~/.cache/vqdiff`); its test accuracy on `test_set` (default: the test split) is in `.info`.
    `progress(done, total)` follows the training steps. `inception_mode` (INCEPTION_MODES; auto:
    `default_inception_mode`) is how Inception computes.
    """
    if kind not in KINDS:
        raise EvaluationError(f"unknown feature extractor {kind!r}; choose one of {', '.join(KINDS)}")
    if inception_mode not in INCEPTION_MODES:
        raise EvaluationError(f"unknown inception mode {inception_mode!r}; choose one of {', '.join(INCEPTION_MODES)}")
    dev = default_device(device)
    if kind == "auto":
        if inception_available(inception_weights):
            kind = "inception"
        elif has_labels(dataset, train_set):
            kind = "classifier"
        else:
            kind = "inception"
    if kind == "inception":
        mode = default_inception_mode(dev) if inception_mode == "auto" else inception_mode
        return _inception_extractor(inception_weights, dev, mode)
    return _classifier_extractor(
        dataset, image_size, data_root, train_set, test_set, resolve_cache_dir(cache_dir), dev, recipe, progress
    )


def _inception_extractor(inception_weights: str | Path | None, device: torch.device, mode: str) -> Extractor:
    path, digest = resolve_inception_weights(inception_weights)
    has_logits = inception_has_logits(path)
    return Extractor(
        name="inception",
        hash=digest,
        fidelity_name=register_inception(mode),
        has_logits=has_logits,
        channels=3,
        feature_dim=2048,
        feature_layer="2048",
        logits_layer="logits_unbiased" if has_logits else None,  # torch-fidelity's choice for IS
        weights_path=path,
        device=device.type,
        batch_size=BATCH_SIZE[("inception", "cuda" if device.type == "cuda" else "cpu")],
        info={} if has_logits else {"isc_omitted": ISC_OMITTED_ZERO_FC},
        mode=mode,
    )


def _classifier_extractor(
    dataset: str,
    image_size: int,
    data_root: str | Path | None,
    train_set: ImageSet | None,
    test_set: ImageSet | None,
    cache_dir: Path,
    device: torch.device,
    recipe: ClassifierRecipe | None,
    progress: Progress | None,
) -> Extractor:
    if not has_labels(dataset, train_set):
        raise EvaluationError(
            f"dataset {dataset!r} has no class labels to train the classifier extractor; use the inception extractor"
        )
    try:
        if train_set is None:
            train_set = load_dataset(dataset, "train", image_size=image_size, root=data_root)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    train = train_set

    def load_test_set() -> ImageSet | None:
        # called only when the classifier is trained, for its test accuracy
        try:
            return load_dataset(train.name, "test", image_size=train.image_size, root=data_root)
        except DataError:
            return None

    cfg = ClassifierConfig(
        channels=train_set.channels,
        num_classes=train_set.num_classes,
        image_size=train_set.image_size,
        recipe=recipe or ClassifierRecipe(),
    )
    trained = load_or_train(
        train_set,
        test_set if test_set is not None else load_test_set,
        cfg,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    fidelity_name = register_classifier(cfg, trained.state, trained.hash)
    return Extractor(
        name="classifier",
        hash=trained.hash,
        fidelity_name=fidelity_name,
        has_logits=True,
        channels=cfg.channels,
        feature_dim=cfg.recipe.feature_dim,
        feature_layer="features",
        logits_layer="logits",
        weights_path=str(trained.folder / "model.safetensors"),
        device=device.type,
        batch_size=BATCH_SIZE[("classifier", "cuda" if device.type == "cuda" else "cpu")],
        info={**trained.info, "cached": not trained.trained},
    )
