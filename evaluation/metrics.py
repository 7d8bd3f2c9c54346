"""FID, KID, precision/recall and the Inception Score through `torch_fidelity.calculate_metrics`.

Images come in as uint8 `[n c h w]` (`vqdiff.data.to_uint8` converts float [-1, 1] images) and go to
torch-fidelity as a Dataset of uint8 `[c h w]` items. The real images' features are cached by
torch-fidelity itself (`cache_root` + `input2_cache_name`) under a name that holds the real set's
key, its size and a fingerprint of its pixels, the extractor and its weights hash:

    CACHE/fidelity/{real_key}-n{n}-{pixels hash}-{extractor}-{weights hash}-{fidelity name}-features-{layer}.pt
    CACHE/fidelity/...-stat-fid-{layer}.pt    (the FID mean and covariance)

so new weights or other images never meet stale statistics.

Under torchrun (an initialised process group of several ranks) every rank calls `compute_metrics`
with the same images: the feature extraction is shared out (whole batches, dealt round-robin, the
same batches one process would run), the features are gathered, and rank 0 computes the metrics
from them through torch-fidelity's own feature cache, then sends the numbers to every rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.utils import create_feature_extractor

from evaluation.common import EvaluationError, Progress, sha256_tensor
from evaluation.extractors import Extractor, inception_offline_message
import vqdiff.distributed as distributed
from vqdiff.data import resolve_cache_dir

KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to n for small sets
KID_SUBSETS = 100
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
ISC_SPLITS = 10


class UInt8Images(Dataset):
    """images: uint8 [n c h w] -> items uint8 [c h w], grey repeated to 3 channels when `channels` is 3.

    `on_batch(b)` is called for every batch the loader reads, so that a caller can follow
    torch-fidelity's progress (it reads in the main process: `save_cpu_ram=True` means no workers).
    """

    def __init__(
        self, images: torch.Tensor, channels: int | None = None, on_batch: Callable[[int], None] | None = None
    ):
        self.images = images.detach().cpu()  # the loader pins memory on CUDA machines: keep items on the CPU
        self.repeat = channels == 3 and images.shape[1] == 1
        self.on_batch = on_batch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]  # [c h w]
        return x.expand(3, -1, -1) if self.repeat else x

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        # the DataLoader's batched fetch; torch-fidelity's one-off `input[0]` check goes to __getitem__
        if self.on_batch is not None:
            self.on_batch(len(indices))
        return [self[i] for i in indices]


def check_images(images: Any, what: str, extractor: Extractor | None = None, min_n: int = 2) -> None:
    """One-line EvaluationError unless `images` is uint8 [n c h w] with n >= `min_n` that `extractor` can take."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise EvaluationError(f"{what} images must be uint8 [n c h w] (vqdiff.data.to_uint8 converts), not {desc}")
    if images.shape[1] not in (1, 3):
        raise EvaluationError(f"{what} images have {images.shape[1]} channels; 1 (grey) or 3 (RGB) expected")
    if len(images) < min_n:
        raise EvaluationError(f"{what} images: {len(images)} given, at least {min_n} needed")
    if extractor is not None and images.shape[1] != extractor.channels and not (
        extractor.channels == 3 and images.shape[1] == 1
    ):
        raise EvaluationError(
            f"{what} images have {images.shape[1]} channels "
            f"but the {extractor.name} extractor takes {extractor.channels}"
        )


def reference_cache_name(real: torch.Tensor, real_key: str, extractor: Extractor) -> str:
    """The torch-fidelity cache name of the real set's features and statistics."""
    key = re.sub(r"[^A-Za-z0-9_.=+-]", "_", real_key)  # a file name part, never a path
    return f"{key}-n{len(real)}-{sha256_tensor(real)}-{extractor.name}-{extractor.hash}"


def _feature_layers(extractor: Extractor, isc: bool) -> list[str]:
    layers = [extractor.feature_layer]
    if isc and extractor.logits_layer is not None:
        layers.append(extractor.logits_layer)
    return layers


def reference_cache_files(cache_root: Path, name: str, extractor: Extractor, isc: bool) -> list[Path]:
    """The feature files torch-fidelity writes for the real set (the FID statistics file aside)."""
    layers = _feature_layers(extractor, isc)
    return [cache_root / f"{name}-{extractor.fidelity_name}-features-{layer}.pt" for layer in layers]


def _fidelity_error(e: Exception, extractor: Extractor) -> EvaluationError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if extractor.name == "inception" and extractor.weights_path is None and isinstance(e, OSError):
        return EvaluationError(inception_offline_message())  # the download failed after all (URLError is an OSError)
    return EvaluationError(f"evaluation failed: {first}")


class _ImageCount:
    """`on_batch(b)` for the loaders: counts the images through the extractor for `progress(done, total)`."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, b: int) -> None:
        self.done += b
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)


def compute_metrics(
    fake: torch.Tensor,
    real: torch.Tensor,
    extractor: Extractor,
    *,
    real_key: str | None = None,
    cache_dir: str | Path | None = None,
    kid: bool = True,
    prc: bool = True,
    isc: bool | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """FID (always), KID, precision/recall and IS of `fake` against `real`, with `extractor`.

    fake, real: uint8 [n c h w] in [0, 255], n >= 2 (grey or RGB; grey is repeated for inception).
    `real_key` (e.g. "mnist-test-2000") turns on the cache of the real features under
    `cache_dir`/fidelity; None computes them afresh. `isc` defaults to "when the extractor has logits";
    IS is computed on `fake` only. `progress(done, total)` counts images through the extractor.

    Returns {"fid", "kid", "kid_std", "precision", "recall", "isc", "isc_std", "extractor",
    "extractor_hash", "num_fake", "num_real", "kid_subset_size", "prc_neighborhood", "isc_splits",
    "real_cached"}; the keys of metrics not asked for are absent. Small sets work: the KID subset
    size, the PR neighbourhood and the IS splits are lowered to fit n.
    """
    check_images(fake, "fake", extractor)
    check_images(real, "real", extractor)
    isc = extractor.has_logits if isc is None else isc
    if isc and not extractor.has_logits:
        raise EvaluationError(f"the {extractor.name} extractor has no class logits, so no Inception Score")
    n_fake, n_real = len(fake), len(real)

    cache_root = resolve_cache_dir(cache_dir) / "fidelity"
    real_name = reference_cache_name(real, real_key, extractor) if real_key else None
    real_cached = real_name is not None and all(
        p.exists() for p in reference_cache_files(cache_root, real_name, extractor, isc)
    )

    total = n_fake + (0 if real_cached else n_real)
    on_batch = _ImageCount(total, progress)
    sizes = _small_set_sizes(n_fake, n_real)
    bs = batch_size or extractor.batch_size
    if distributed.is_distributed():
        # every rank extracts a share of the features; rank 0 turns them into the numbers
        layers = _feature_layers(extractor, isc)
        fake_features = sharded_features(fake, extractor, layers, bs, on_batch)
        real_features = None if real_cached else sharded_features(real, extractor, layers, bs, on_batch)
    kwargs = extractor.fidelity_kwargs()
    kwargs.update(
        input1=UInt8Images(fake, extractor.channels, on_batch),
        input2=UInt8Images(real, extractor.channels, on_batch),
        fid=True,
        kid=kid,
        prc=prc,
        isc=isc,
        batch_size=bs,
        **sizes,
        cache=real_name is not None,
        cache_root=str(cache_root),
        input2_cache_name=real_name,
        save_cpu_ram=True,  # no loader worker processes (the images are in memory); PR by parts
        verbose=False,
    )
    if real_name is not None:
        cache_root.mkdir(parents=True, exist_ok=True)
    if distributed.is_distributed():
        m = _metrics_from_features(kwargs, extractor, cache_root, fake_features, real_features, real_name)
    else:
        try:
            m = torch_fidelity.calculate_metrics(**kwargs)
        except (ValueError, OSError) as e:  # torch-fidelity's checks raise ValueError; downloads raise OSError
            raise _fidelity_error(e, extractor) from None
    if progress is not None:
        progress(total, total)
    return _summary(m, extractor, sizes, kid=kid, prc=prc, isc=isc, num_fake=n_fake, num_real=n_real, real_cached=real_cached)


def _small_set_sizes(n_fake: int, n_real: int) -> dict[str, int]:
    """torch-fidelity's KID subset size and subsets, PR neighbourhood and IS splits, lowered to fit small sets."""
    n_min = min(n_fake, n_real)
    kid_subset_size = min(KID_SUBSET_SIZE, n_min)
    # subsets drawn without replacement from sets no larger than the subset are all the same set
    kid_subsets = 1 if n_fake == n_real == kid_subset_size else KID_SUBSETS
    return {
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
        "prc_neighborhood": min(PRC_NEIGHBORHOOD, n_min - 1),
        "isc_splits": max(1, min(ISC_SPLITS, n_fake // 100)),
    }


def _summary(
    m: dict[str, Any], extractor: Extractor, sizes: dict[str, int], *, kid: bool, prc: bool, isc: bool, **counts: Any
) -> dict[str, Any]:
    """`compute_metrics`' answer from torch-fidelity's: the metrics asked for, then what they were computed with."""
    out: dict[str, Any] = {"fid": m[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        out["kid"] = m[torch_fidelity.KEY_METRIC_KID_MEAN]
        out["kid_std"] = m[torch_fidelity.KEY_METRIC_KID_STD]
    if prc:
        out["precision"] = m[torch_fidelity.KEY_METRIC_PRECISION]
        out["recall"] = m[torch_fidelity.KEY_METRIC_RECALL]
    if isc:
        out["isc"] = m[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = m[torch_fidelity.KEY_METRIC_ISC_STD]
    out.update(extractor=extractor.name, extractor_hash=extractor.hash, **counts)  # num_fake, num_real, real_cached
    if kid:
        out["kid_subset_size"] = sizes["kid_subset_size"]
    if prc:
        out["prc_neighborhood"] = sizes["prc_neighborhood"]
    if isc:
        out["isc_splits"] = sizes["isc_splits"]
    return out


@torch.no_grad()
def sharded_features(
    images: torch.Tensor, extractor: Extractor, layers: list[str], batch_size: int, on_batch=None
) -> dict[str, torch.Tensor]:
    """images uint8 [n c h w] -> {layer: features [n ...]} on the CPU, on every rank; each rank runs
    its batches j = rank, rank + world, ... (the batches torch-fidelity itself would run: the same
    inputs, so the same features as one process)."""
    kwargs: dict[str, Any] = {"verbose": False}
    if extractor.name == "inception" and extractor.weights_path is not None:
        kwargs["feature_extractor_weights_path"] = extractor.weights_path
    try:
        module = create_feature_extractor(extractor.fidelity_name, layers, cuda=extractor.cuda, **kwargs)
    except (ValueError, OSError) as e:
        raise _fidelity_error(e, extractor) from None
    bs = min(batch_size, len(images))
    num_batches = -(-len(images) // bs)
    device = "cuda" if extractor.cuda else "cpu"
    mine = []
    with torch.no_grad():
        for j in distributed.my_batches(num_batches):
            batch = images[j * bs : (j + 1) * bs].to(device)
            if extractor.channels == 3 and batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            out = module.convert_features_tuple_to_dict(module(batch))
            mine.append({k: v.cpu() for k, v in out.items()})
            if on_batch is not None:
                on_batch(len(batch))
    parts = distributed.gather_batches(mine, num_batches)
    return {layer: torch.cat([p[layer] for p in parts]) for layer in layers}


def _metrics_from_features(
    kwargs: dict[str, Any],
    extractor: Extractor,
    cache_root: Path,
    fake_features: dict[str, torch.Tensor],
    real_features: dict[str, torch.Tensor] | None,
    real_name: str | None,
) -> dict[str, Any]:
    """torch-fidelity's metrics from gathered features: rank 0 writes them where torch-fidelity's
    cache looks (so it extracts nothing), computes, and sends the numbers to every rank."""
    result: list[Any] = [None]
    if distributed.is_main():
        cache_root.mkdir(parents=True, exist_ok=True)
        tag = f"vqdiff-sharded-{os.getpid()}"  # per run: removed below
        names = {"input1_cache_name": f"{tag}-fake", "input2_cache_name": real_name or f"{tag}-real"}
        written = []
        for which, features in (("input1_cache_name", fake_features), ("input2_cache_name", real_features)):
            for layer, f in (features or {}).items():
                path = cache_root / f"{names[which]}-{extractor.fidelity_name}-features-{layer}.pt"
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                torch.save(f, tmp)
                os.replace(tmp, path)
                if which == "input1_cache_name" or real_name is None:
                    written.append(path)
        kwargs = {**kwargs, **names, "cache": True, "cache_root": str(cache_root)}
        try:
            result[0] = torch_fidelity.calculate_metrics(**kwargs)
        except (ValueError, OSError) as e:
            result[0] = _fidelity_error(e, extractor)
        finally:
            for p in list(written) + list(cache_root.glob(f"{tag}-*")):
                p.unlink(missing_ok=True)
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


@torch.no_grad()
def extract_features(
    images: torch.Tensor,
    extractor: Extractor,
    *,
    layer: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """images: uint8 [n c h w] -> features float [n d] on the CPU (`layer` defaults to the FID layer).

    The same torch-fidelity module `compute_metrics` uses, without the metrics: for benchmarks
    (feature extraction images/s) and for custom statistics.
    """
    check_images(images, "input", extractor, min_n=1)
    layer = layer or extractor.feature_layer
    kwargs: dict[str, Any] = {"verbose": False}
    if extractor.name == "inception" and extractor.weights_path is not None:
        kwargs["feature_extractor_weights_path"] = extractor.weights_path
    try:
        module = create_feature_extractor(extractor.fidelity_name, [layer], cuda=extractor.cuda, **kwargs)
    except (ValueError, OSError) as e:
        raise _fidelity_error(e, extractor) from None
    bs = batch_size or extractor.batch_size
    device = "cuda" if extractor.cuda else "cpu"
    out = []
    n = len(images)
    for i in range(0, n, bs):
        batch = images[i : i + bs].to(device)
        if extractor.channels == 3 and batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        out.append(module(batch)[0].float().cpu())
        if progress is not None:
            progress(min(i + bs, n), n)
    return torch.cat(out)


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, extractor: Extractor, *, progress: Progress | None = None
) -> float:
    """The share of `images` (uint8 [n c h w]) whose argmax class under `extractor`'s logits is
    `labels` (long [n]), in [0, 1]: for conditional samples, how often the dataset's classifier sees
    the class they were conditioned on; for real images, the classifier's own accuracy."""
    if extractor.name != "classifier":
        raise EvaluationError(f"class accuracy needs the dataset's classifier extractor, not {extractor.name}")
    check_images(images, "input", extractor, min_n=1)
    if labels.dim() != 1 or len(labels) != len(images):
        raise EvaluationError(f"class accuracy needs one label per image: {len(images)} images, labels {tuple(labels.shape)}")
    logits = extract_features(images, extractor, layer=extractor.logits_layer, progress=progress)
    return (logits.argmax(1) == labels.cpu()).double().mean().item()
