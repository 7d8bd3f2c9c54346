"""The sampling helpers both generators share: random draws, logits, class labels.

Reads top to bottom: random helpers (every one takes a `torch.Generator`), logits helpers
(temperature, top-k, top-p, classifier-free guidance), then labels for class conditioning.

Class conditioning: the trunk's class table has `num_classes + 1` rows and the last one is the
null class (classifier-free guidance, Ho & Salimans 2022). An unconditional model
(`num_classes = 0`) has just that row, which then plays the start token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vqdiff.distributed import current_shard

# ---------------------------------------------------------------- randomness


def _noise_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    # noise is drawn where the generator lives, then moved: a CPU generator drives a CUDA model
    # and still gives the same numbers for the same seed
    return generator.device if generator is not None else torch.device(device)


def _global_rows(shape: tuple[int, ...], generator: torch.Generator | None) -> tuple[tuple[int, ...], slice]:
    # In a training step under torchrun (generator None: the re-seeded global RNG), noise whose
    # first dimension is the rank's slice of the batch is drawn for the whole global batch and
    # sliced, so row i gets the same noise whatever the number of ranks (vqdiff.distributed).
    shard = current_shard(shape[0]) if generator is None and shape else None
    if shard is None:
        return shape, slice(None)
    return (shard.total, *shape[1:]), slice(shard.start, shard.stop)


def rand(shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [0, 1), float32, drawn on the generator's device and moved to `device`."""
    full, rows = _global_rows(tuple(shape), generator)
    return torch.rand(full, generator=generator, device=_noise_device(generator, device))[rows].to(device)


def randint(high: int, shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """Uniform ids: long `shape` in [0, high), drawn on the generator's device and moved to `device`."""
    full, rows = _global_rows(tuple(shape), generator)
    return torch.randint(high, full, generator=generator, device=_noise_device(generator, device))[rows].to(device)


def gumbel(
    shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None,
    where: Tensor | None = None,
) -> Tensor:
    """Standard Gumbel noise, float64: argmax(logits + gumbel) is a sample of softmax(logits).

    where: bool over the leading dims of `shape`: the noise of those rows only, [m shape[-1]]; the
    whole `shape` is still drawn (the generator moves as without `where`), so the rows are
    bit-identical to the same rows of a full call and only the logs are spared.

    float64 on purpose: float32 uniforms are multiples of 2^-24, which caps the Gumbel tail at
    -log(-log(1 - 2^-24)) ~ 16.6 and truncates rare ids, so float32 Gumbel-max samples at an
    effective temperature below the one asked for (a known bug in the MaskGIT re-implementations).
    """
    u = torch.rand(tuple(shape), generator=generator, device=_noise_device(generator, device), dtype=torch.float64)
    u = u.to(device)
    if where is not None:
        u = u[where]
    u = u.clamp_min_(torch.finfo(torch.float64).tiny)
    return u.log_().neg_().log_().neg_()


# ---------------------------------------------------------------- logits


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf.

    logits: float [... k]. top_k >= 1 keeps the k largest; top_p in (0, 1] keeps the smallest set
    whose probability reaches top_p (Holtzman et al. 2020). The most likely id always survives.
    The values are checked once, where they enter (vqdiff.options.SampleOptions), not per step here.
    """
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids strictly more likely than it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    where: Tensor | None = None,
) -> Tensor:
    """One id per row of `logits: float [... k]` -> `long [...]` in [0, k).

    Gumbel-max on `logits / temperature` after top-k / top-p filtering; temperature 0 is argmax.
    The values are checked once, where they enter (vqdiff.options.SampleOptions).

    where: bool [...], the rows a sampler will use (e.g. the ids it reveals this step): only they
    are filtered and drawn, from the same random numbers as a full call, so their ids are
    bit-identical to a full call's; the other rows are 0 (at temperature 0 every row is its argmax). A diffusion step that reveals 1/16 of
    a 16x16 grid's ids spends most of its time in the float64 Gumbel logs otherwise.
    """
    if temperature == 0:
        return logits.float().argmax(-1)
    rows = logits if where is None else logits[where]
    rows = filter_logits(rows.double() / temperature, top_k, top_p)  # float64: see `gumbel`
    ids = (rows + gumbel(logits.shape, device=logits.device, generator=generator, where=where)).argmax(-1)
    if where is None:
        return ids
    return torch.zeros(where.shape, dtype=torch.long, device=logits.device).masked_scatter_(where, ids)


def cfg_mix(logits: Tensor, cfg: float) -> Tensor:
    """Classifier-free guidance on a doubled batch: `[cond; uncond]` [2b ...] -> [b ...].

    uncond + cfg * (cond - uncond): cfg = 1 is the conditional model, cfg = 0 the unconditional one.
    """
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg * (cond - uncond)


# ---------------------------------------------------------------- class labels


def null_class(num_classes: int) -> int:
    """Index of the null class (the last row of the class table): used for CFG and unconditional models."""
    return num_classes


def sample_labels(labels: Tensor | int | None, n: int, num_classes: int, device: torch.device) -> Tensor | None:
    """Labels for a sampling call: long [n] in [0, num_classes), or None for the null class.

    Accepts None, one int for every sample, or a tensor of shape [n].
    """
    if labels is None:
        return None
    if num_classes == 0:
        raise ValueError("labels were given but the model is unconditional (num_classes = 0)")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def train_labels(batch: dict[str, Tensor], num_classes: int, class_dropout: float) -> Tensor | None:
    """Labels for a training step: long [b], with each one replaced by the null class with prob
    `class_dropout` (uses the global RNG, re-seeded per step by the training loop).

    None for an unconditional model or a batch without "labels" (the dataset's labels are ignored
    when num_classes = 0).
    """
    if num_classes == 0 or "labels" not in batch:
        return None
    labels = batch["labels"].long()
    if class_dropout > 0:
        drop = rand(labels.shape, device=labels.device) < class_dropout
        labels = labels.masked_fill(drop, null_class(num_classes))
    return labels


def guidance_labels(labels: Tensor | None, num_classes: int, cfg: float) -> tuple[Tensor | None, bool]:
    """(labels for the trunk, guided): doubles the labels to `[labels; null]` when guidance is on
    (cfg, the guidance scale, != 1)."""
    guided = labels is not None and cfg != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_class(num_classes))])
    return labels, guided


# ---------------------------------------------------------------- partial grids (inpainting, outpainting)


def check_partial_grid(known: Tensor | None, keep: Tensor | None, n: int, cfg: Any) -> None:
    """Refuse a partial grid both generators would misread: known long [n h w] and keep bool
    [n h w], both given, with the kept ids in [0, codebook_size). ValueError, one line."""
    shape = (n, cfg.grid_h, cfg.grid_w)
    if known is None or keep is None:
        raise ValueError("a partial grid needs both known (ids) and keep (where they are kept)")
    if tuple(known.shape) != shape or tuple(keep.shape) != shape:
        raise ValueError(f"known and keep must be [{n} {cfg.grid_h} {cfg.grid_w}], got {list(known.shape)} and {list(keep.shape)}")
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask, got {keep.dtype}")
    kept = known[keep.to(known.device)]
    if kept.numel() and (kept.min() < 0 or kept.max() >= cfg.codebook_size):
        raise ValueError(f"known ids must be in [0, {cfg.codebook_size}) where kept")
