"""Images from a generator and a tokenizer: the call a notebook makes (no files, no CLI).

    from vqdiff.checkpoint import load_model
    from vqdiff.pipeline import sample_images
    tokenizer, model = load_model("runs/quickstart/tokenizer"), load_model("runs/quickstart/diffusion")
    ids, images = sample_images(model, tokenizer, 64, steps=8, seed=0)   # long [64 h w], float [64 c H W]

Both generators share one `sample(n, options, *, labels, generator, callback, ...)`, with one
`vqdiff.options.SampleOptions` that they read and never rebuild. `sample_images` takes such an
object (default `DEFAULTS`) and applies keyword overrides to it once (`options.replace(steps=8)`),
batches the calls, draws the class labels, splits per-sample inputs (an AR `prefix`, a partial
grid) by batch, and decodes. Like diffusers' pipelines it takes the models and the settings and
returns tensors; writing PNGs is the caller's business (`recipes/`).

A model is `model`; `generator` is always a `torch.Generator`, the source of the random draws.

Determinism (the rule, so that a sharded run can reproduce it): the noise of batch j (samples
[j * batch_size, (j + 1) * batch_size)) comes from a CPU `torch.Generator` seeded with
`batch_seed(seed, j)` alone, and the labels of all n samples from `torch.Generator().manual_seed(seed)`.
A CPU generator gives the same numbers whatever the model's device (the helpers in `vqdiff.sampling_ops`
draw on the generator's device and move), so the same (seed, batch_size) gives the same ids on a
CPU and a GPU up to kernel rounding, and a DDP rank that takes whole batches j gets the same
images as one process. Changing `batch_size` changes the images.

Under torchrun (a process group of several ranks) `sample_ids` deals the batches out round-robin
(rank r runs batches r, r + world, ...) and gathers the ids on every rank: the same seed gives the
same images whatever the number of ranks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from vqdiff.data import ImageSet
from vqdiff.distributed import gather_batches, my_batches
from vqdiff.options import DEFAULTS, SampleOptions
from vqdiff.quantize import codebook_stats
from vqdiff.tokenizer import psnr

Callback = Callable[[int, int, Tensor], None]  # (first sample of the batch, step, ids long [b h w])


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sampling batch `batch`: a pure function of (seed, batch), like `train.step_seed`."""
    return (seed * 1_000_003 + batch * 7_919 + 17) % (2**63 - 1)


def draw_labels(num_classes: int, n: int, seed: int) -> Tensor | None:
    """Random classes long [n] in [0, num_classes) from `seed`, or None for an unconditional model."""
    if num_classes == 0:
        return None
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    n: int,
    options: SampleOptions = DEFAULTS,
    *,
    labels: Tensor | int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    callback: Callback | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    random_classes: bool = True,
    prefix: Tensor | None = None,
    known: Tensor | None = None,
    keep: Tensor | None = None,
    use_cache: bool | None = None,
    **overrides: Any,
) -> Tensor:
    """n token grids: long [n h w] in [0, k), on the CPU. See `sample_images` for the arguments;
    random_classes=False samples with the null class where labels is None. The per-sample inputs
    ([n ...]: an AR prefix, a partial grid's known and keep) are split like the labels; they and
    use_cache go to `model.sample` only when given (a model that does not take one is a TypeError)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    options = options.replace(**overrides)  # the one place keyword overrides meet the options
    if labels is None and random_classes:
        labels = draw_labels(model.cfg.num_classes, n, seed)
    elif isinstance(labels, int):
        labels = torch.full((n,), labels, dtype=torch.long)
    given = {"prefix": prefix, "known": known, "keep": keep, "use_cache": use_cache}
    inputs = {k: v for k, v in given.items() if v is not None}
    out = []
    num_batches = -(-n // batch_size)
    for j in my_batches(num_batches):  # all of them in one process; this rank's share under torchrun
        start, stop = j * batch_size, min((j + 1) * batch_size, n)
        batch_inputs = {k: v[start:stop] if isinstance(v, Tensor) and len(v) == n else v for k, v in inputs.items()}
        report = (lambda i, x, start=start: callback(start, i, x)) if callback is not None else None
        ids = model.sample(
            stop - start,
            options,
            labels=labels[start:stop] if labels is not None else None,
            generator=torch.Generator().manual_seed(batch_seed(seed, j)),
            callback=report,
            **batch_inputs,
        )
        out.append(ids.cpu())
        if on_batch is not None:
            on_batch(stop, n)
    return torch.cat(gather_batches(out, num_batches))


@torch.no_grad()
def decode(tokenizer: nn.Module, ids: Tensor, batch_size: int = 256) -> Tensor:
    """ids long [n h w] in [0, k) -> images float [n c H W] in [-1, 1] on the CPU, in batches on the tokenizer's device."""
    device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.decode(ids[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(ids), batch_size)])


def _images(data: Tensor | ImageSet, start: int, stop: int) -> Tensor:
    """images float [b c H W] in [-1, 1] of items [start, stop) of a tensor or an ImageSet (decoded lazily)."""
    if isinstance(data, Tensor):
        return data[start:stop]
    return data.batch(torch.arange(start, stop))["images"]


@torch.no_grad()
def encode(tokenizer: nn.Module, images: Tensor | ImageSet, batch_size: int = 256, on_batch=None, flip: bool = False) -> Tensor:
    """images float [n c H W] in [-1, 1] (or an ImageSet) -> ids long [n h w] on the CPU, in batches
    on the tokenizer's device; flip: of the images mirrored left-right. on_batch(done, n) after every batch."""
    device = next(tokenizer.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        x = _images(images, start, stop)
        out.append(tokenizer.encode((x.flip(-1) if flip else x).to(device)).cpu())
        if on_batch is not None:
            on_batch(stop, len(images))
    return torch.cat(out)


@torch.no_grad()
def measure_tokenizer(tokenizer: nn.Module, data: Tensor | ImageSet, batch_size: int = 256, on_batch=None) -> dict[str, Any]:
    """decode(encode(images)) against the images: PSNR (dB, [0,1] scale), MSE ([-1,1] scale), and
    the codebook usage and perplexity of the ids."""
    k = tokenizer.codebook_size
    counts = torch.zeros(k)
    sq_err, pixels, psnrs = 0.0, 0, []
    for start in range(0, len(data), batch_size):
        x = _images(data, start, min(start + batch_size, len(data))).float()
        ids = encode(tokenizer, x, batch_size)
        err = (decode(tokenizer, ids, batch_size) - x).pow(2)
        sq_err += err.sum().item()
        pixels += err.numel()
        psnrs.extend(psnr(e) for e in err.flatten(1).mean(1).tolist())
        counts.add_(torch.bincount(ids.flatten(), minlength=k).float())
        if on_batch is not None:
            on_batch(min(start + batch_size, len(data)), len(data))
    mse = sq_err / max(pixels, 1)
    usage, perplexity = codebook_stats(counts)
    return {
        "psnr": psnr(mse),  # of the mean squared error over the set
        "psnr_mean_per_image": sum(psnrs) / max(len(psnrs), 1),
        "mse": mse,
        "codebook_usage": usage,
        "perplexity": perplexity,
        "codebook_size": k,
        "grid": list(tokenizer.grid),
        "num_images": len(data),
    }


@torch.no_grad()
def decode_partial(tokenizer: nn.Module, ids: Tensor) -> Tensor:
    """Decode a grid in the making: ids long [n h w] in [0, k], where k (mask_id: not decided yet)
    is shown grey (0). -> images float [n c H W] in [-1, 1] on the CPU."""
    k, (h, _) = tokenizer.codebook_size, tokenizer.grid
    undecided = ids >= k
    images = decode(tokenizer, ids.clamp_max(k - 1))
    f = images.shape[-2] // h  # pixels per token
    pixels = undecided.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None]  # [n 1 H W]
    return torch.where(pixels, torch.zeros_like(images), images)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    tokenizer: nn.Module,
    n: int,
    options: SampleOptions = DEFAULTS,
    *,
    labels: Tensor | int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    callback: Callback | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    prefix: Tensor | None = None,
    use_cache: bool | None = None,
    **overrides: Any,
) -> tuple[Tensor, Tensor]:
    """Sample n images: (ids long [n h w] in [0, k), images float [n c H W] in [-1, 1]), both on the CPU.

    - model: an `ARTransformer` or a `DiffusionTransformer`; tokenizer: anything with
      `encode`/`decode` (a `VQTokenizer`, a `DiffusersTokenizer`). Both on the device to use.
    - options: a `vqdiff.options.SampleOptions` (temperature, steps, top_k, top_p, cfg, the diffusion
      sampler's choice and settings); `overrides`, its field names as keywords (steps=8,
      temperature=0.9, cfg=3.0), replace those fields once (`options.replace`). The ar generator
      reads temperature, top_k, top_p and cfg, and takes one pass per token whatever `steps` is.
    - labels: long [n] or one int in [0, num_classes); None draws random classes from `seed` for a
      class-conditional model. cfg != 1 applies classifier-free guidance.
    - callback(start, step, ids) after every step of every batch (`start` is the batch's first
      sample): record a trajectory with it. on_batch(done, n) after every batch: a progress bar.
    - AR only: prefix (long [n r w], rows kept exactly), use_cache (False recomputes every step).
    """
    ids = sample_ids(
        model, n, options, labels=labels, seed=seed, batch_size=batch_size, callback=callback,
        on_batch=on_batch, prefix=prefix, use_cache=use_cache, **overrides,
    )  # fmt: skip
    # decoded in decode's own batches, not the sampling ones: the same ids give the same pixels to the
    # last bit whoever decodes them (batched convolutions round differently for other batch sizes)
    return ids, decode(tokenizer, ids)


# ---------------------------------------------------------------- editing: inpainting, outpainting, class edits


SIDES = ("left", "right", "top", "bottom")


def box_keep(size: int, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """A pixel mask bool [size size] (True = keep) that regenerates the box [x0, x1) x [y0, y1), in pixels."""
    keep = torch.ones(size, size, dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    return keep


def side_keep(size: int, sides: tuple[str, ...], width: int) -> Tensor:
    """A pixel mask bool [size size] (True = keep) that regenerates a strip `width` pixels wide along
    each of `sides` (SIDES): outpainting."""
    keep = torch.ones(size, size, dtype=torch.bool)
    strips = {"left": (slice(None), slice(0, width)), "right": (slice(None), slice(size - width, None)),
              "top": (slice(0, width), slice(None)), "bottom": (slice(size - width, None), slice(None))}  # fmt: skip
    for side in sides:
        keep[strips[side]] = False
    return keep


def token_keep(keep_pixels: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """The token positions to keep for a pixel mask: keep_pixels bool [n H W] (True = keep) ->
    bool [n h w]. A token is kept iff every pixel of its patch is kept, i.e. regenerated iff its
    patch holds any edited pixel, so the regenerated tokens always cover the edited region.
    H and W must be multiples of h and w."""
    h, w = grid_hw
    if keep_pixels.dim() != 3 or keep_pixels.dtype != torch.bool:
        raise ValueError(f"keep must be bool [n H W], got {keep_pixels.dtype} {list(keep_pixels.shape)}")
    n, height, width = keep_pixels.shape
    if height % h or width % w:
        raise ValueError(f"an image of {height}x{width} pixels does not split into a {h}x{w} token grid")
    return keep_pixels.reshape(n, h, height // h, w, width // w).all(dim=4).all(dim=2)


@torch.no_grad()
def edit_images(
    model: nn.Module,
    tokenizer: nn.Module,
    images: Tensor,
    keep: Tensor,
    options: SampleOptions = DEFAULTS,
    *,
    labels: Tensor | int | None = None,
    seed: int = 0,
    paste_back: bool = False,
    callback: Callback | None = None,
    batch_size: int = 64,
    **overrides: Any,
) -> tuple[Tensor, Tensor]:
    """Regenerate part of each image and keep the rest: inpainting, outpainting, class edits.

    - images float [n c H W] in [-1, 1]; keep bool [n H W], the pixels to keep (True).
    - The images are encoded; the tokens whose patch holds any edited pixel (`token_keep`) are
      sampled again by the model, the others keep the encoded ids exactly; then all are decoded.
      The decoder sees every token (the kept pixels come out as the tokenizer reconstructs them,
      nudged by the new tokens near them); paste_back=True copies the kept pixels of `images` over
      the output.
    - labels: long [n] or one int, the class to generate under (a class edit with another one);
      None samples with the null class (no class), unlike `sample_images`, which draws random ones.
    - options and overrides (steps, temperature, cfg, sampler, eta, top_k, ...) as in
      `sample_images`. The ar generator can only regenerate a raster-order suffix of the token
      grid; any other region is a ValueError.
    - The noise of batch j comes from `batch_seed(seed, j)`, as in `sample_ids`: the same seed gives
      the same images. callback(start, step, ids) after every step, as in `sample_images`.

    Returns (ids long [n h w], images float [n c H W] in [-1, 1]), both on the CPU.
    """
    if images.dim() != 4 or keep.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"keep must be bool [n H W] for images [n c H W], got {list(keep.shape)} for {list(images.shape)}")
    n = len(images)
    known = encode(tokenizer, images, batch_size)  # [n h w]
    kept = token_keep(keep.cpu(), tuple(known.shape[1:]))
    ids = sample_ids(
        model, n, options, labels=labels, seed=seed, batch_size=batch_size, callback=callback, random_classes=False,
        known=known, keep=kept, **overrides,
    )  # fmt: skip
    edited = decode(tokenizer, ids)
    if paste_back:
        edited = torch.where(keep.cpu()[:, None], images.cpu().float(), edited)
    return ids, edited
