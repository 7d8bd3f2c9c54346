"""Edits of real images: inpainting, outpainting and class edits, for `vqdiff edit` and
`vqdiff evaluate --edits`.

A pixel mask `keep` (bool [H W], True = keep) says what stays; `vqdiff.pipeline.token_keep` turns
it into the token positions to regenerate (a token is regenerated iff its patch holds any edited
pixel). The masks here are built at the model's image size:
- `region_keep`: a rectangle x0,y0,x1,y1 in pixels, half-open ([x0, x1) x [y0, y1)), is edited;
- `mask_keep`: a PNG, white (> 127) = edit, black = keep, resized (nearest) to the image size;
- `outpaint_keep`: a side (left, right, top, bottom: `size` tokens of it, half the grid by
  default) or the border (`size` tokens all round, 2 by default) is edited.

`evaluate_edits` measures three tasks on the first N test images: `centre` (the centre quarter of
the token grid: the middle half of the rows and of the columns; diffusion only), `bottom` (the
bottom half of the rows; both generators) and `border` (a 2-token border; diffusion only): the ar
generator can only complete a raster-order suffix. Per (generator, task): the FID of the completions (the decoded output,
no paste-back) against the test images, the PSNR of the kept area against the input and against
the tokenizer's reconstruction, and the share of kept ids equal to the input's (1.0 by
construction). Written to RUN/report/edits.json and edits.md; each (generator, task) is cached
under RUN/report/edits/ by the inputs that produced it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from recipes.evaluate import Measuring, bars_of
from recipes.images import save_grid, save_pngs, save_trajectory_gif
from recipes.run import Run, StageError
from recipes.sampling import extra_options
from vqdiff.io import write_json
from vqdiff.data import from_uint8, load_image, save_tokens, to_uint8
from vqdiff.distributed import is_main
from vqdiff.options import READS, SampleOptions
from vqdiff.pipeline import SIDES, box_keep, decode, edit_images, encode, side_keep, token_keep
from vqdiff.tokenizer import psnr

OUTPAINT = (*SIDES, "border")  # --outpaint: a side, or all four


# ------------------------------------------------------------------ masks


def region_keep(region: str, size: int) -> torch.Tensor:
    """--region x0,y0,x1,y1 (pixels, half-open) -> keep bool [size size], False inside the region."""
    try:
        x0, y0, x1, y1 = (int(v) for v in region.split(","))
    except ValueError:
        raise StageError(f"--region must be x0,y0,x1,y1 in pixels, got {region!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise StageError(
            f"--region {region} is empty or outside the {size}x{size} image; give 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}"
        )
    return box_keep(size, x0, y0, x1, y1)


def mask_keep(path: Path, size: int) -> torch.Tensor:
    """--mask PNG (white = edit) -> keep bool [size size], resized nearest-neighbour."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = im.convert("L").resize((size, size), Image.NEAREST)
    except (OSError, ValueError) as e:
        raise StageError(f"cannot read the mask {path} ({e})") from None
    import numpy as np

    return torch.from_numpy(np.asarray(grey).copy()) <= 127


def outpaint_keep(side: str, size: int, grid: int, tokens: int | None) -> torch.Tensor:
    """--outpaint SIDE with --outpaint-size tokens (None: 2 for the border, half the grid for a side)."""
    if side not in OUTPAINT:
        raise StageError(f"--outpaint must be one of {', '.join(OUTPAINT)}, got {side!r}")
    tokens = tokens if tokens is not None else (2 if side == "border" else grid // 2)
    limit = (grid - 1) // 2 if side == "border" else grid - 1
    if not 1 <= tokens <= limit:
        raise StageError(f"--outpaint-size for {side} must be in [1, {limit}] tokens on a {grid}x{grid} grid, got {tokens}")
    return side_keep(size, SIDES if side == "border" else (side,), tokens * (size // grid))


def check_keep(keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The kept tokens bool [h w] of a pixel mask [H W]; StageError when nothing or everything is kept."""
    tokens = token_keep(keep[None], grid)[0]
    if tokens.all():
        raise StageError("the region edits no pixel: nothing to regenerate")
    if not tokens.any():
        raise StageError("the region touches every token: nothing is kept (use `vqdiff sample` to generate whole images)")
    return tokens


def load_images(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    """Image files -> float [n c size size] in [-1, 1]: short side resized to size, centre-cropped."""
    for p in paths:
        if not Path(p).is_file():
            raise StageError(f"no image file {p}")
    return from_uint8(torch.stack([load_image(Path(p), size, channels) for p in paths]))


# ------------------------------------------------------------------ files


def save_before_after(before: torch.Tensor, after: torch.Tensor, path: Path, min_width: int = 768) -> None:
    """Inputs in the top row, outputs below, upscaled nearest-neighbour to about min_width pixels."""
    n = len(before)
    scale = max(1, math.ceil(min_width / ((before.shape[-1] + 2) * n + 2)))
    scale = min(scale, max(1, 512 // before.shape[-1]))  # at most a 512-pixel tile per image
    save_grid(torch.cat([before, after]), path, nrow=n, upscale=scale)


def write_edit(
    folder: Path, inputs: torch.Tensor, ids: torch.Tensor, outputs: torch.Tensor, record: dict[str, Any], codebook_size: int,
    tokenizer=None, frames: list[torch.Tensor] | None = None, labels: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """The files of one edit: PNGs, before_after.png, ids.safetensors, trajectory.gif and edit.json (last)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edit.json").unlink(missing_ok=True)
    (folder / "trajectory.gif").unlink(missing_ok=True)
    save_pngs(outputs, folder)
    save_before_after(inputs, outputs, folder / "before_after.png")
    save_tokens(folder / "ids.safetensors", ids, labels if labels is not None else torch.zeros(len(ids)), codebook_size)
    if frames:
        save_trajectory_gif(tokenizer, frames, folder / "trajectory.gif")
    write_json(folder / "edit.json", record)


def run_edit(model, tokenizer, images, keep, options: SampleOptions, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """edit_images, with the library's ValueError for a region the generator cannot edit as a StageError."""
    try:
        return edit_images(model, tokenizer, images, keep, options, **kw)
    except ValueError as e:
        raise StageError(str(e)) from None


# ------------------------------------------------------------------ measured: vqdiff evaluate --edits

TASKS = ("centre", "bottom", "border")


def task_tokens(task: str, grid: tuple[int, int]) -> torch.Tensor:
    """keep bool [h w] of a task: the tokens that stay."""
    h, w = grid
    keep = torch.ones(h, w, dtype=torch.bool)
    if task == "centre":
        keep[h // 4 : h // 4 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = False
    elif task == "bottom":
        keep[h // 2 :] = False
    elif task == "border":
        keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
    else:
        raise StageError(f"unknown edit task {task!r}; choose from {', '.join(TASKS)}")
    return keep


def task_applies(task: str, generator: str, grid: tuple[int, int]) -> bool:
    if task == "bottom":
        return True  # a raster-order suffix: both generators
    # the others are no raster suffix: diffusion only; a 2-token border needs a grid of more than 4
    return generator == "diffusion" and (task != "border" or min(grid) > 4)


def measure_edit(m, model, tokenizer, task: str, generator: str, options: SampleOptions, seed: int, labels) -> dict[str, Any]:
    """One (generator, task) on the first n test images of `m` (recipes.evaluate.Measuring)."""
    images = from_uint8(m.first_test())
    n, grid = len(images), tokenizer.grid
    tokens = task_tokens(task, grid)
    f = images.shape[-1] // grid[1]
    keep = tokens.repeat_interleave(f, 0).repeat_interleave(f, 1)[None].expand(n, -1, -1)  # pixels of the kept tokens
    known = encode(tokenizer, images)
    recon = decode(tokenizer, known)
    t0 = time.perf_counter()
    ids, out = run_edit(model, tokenizer, images, keep, options, labels=labels, seed=seed)
    seconds = time.perf_counter() - t0
    kept = tokens[None].expand(n, -1, -1)
    pixels = keep[:, None].expand_as(images)

    def kept_psnr(reference: torch.Tensor) -> float:
        return psnr((out - reference).pow(2)[pixels].mean().item())

    metrics = m.metrics(to_uint8(out), f"edits {generator} {task}")
    return {
        "generator": generator,
        "task": task,
        "edited_tokens": int((~tokens).sum()),
        "tokens": tokens.numel(),
        "fid": metrics["fid"],
        "psnr_kept_vs_input": kept_psnr(images),
        "psnr_kept_vs_reconstruction": kept_psnr(recon),
        "kept_token_exactness": (ids[kept] == known[kept]).double().mean().item(),
        "seconds": seconds,
        "num": n,
    }


def evaluate_edits(run: Run, opts, bars=None) -> dict[str, Any]:
    """The edit tasks for every generator of `opts` (recipes.evaluate.EvalOptions): one diffusion
    setting (the first sampler and temperature, the most steps of --steps), the ar generator at
    the first temperature. Writes RUN/report/edits.json and edits.md; returns the report."""
    bar = bars_of(bars)
    recipe = run.read_recipe()
    models = {g: run.load_generator(g) for g in opts.generators}  # fail now, not after the extractor
    tokenizer = run.load_tokenizer()
    m = Measuring.of(run, opts, recipe, bar)
    n = m.n
    rows = []
    for g, model in models.items():
        o = opts.setting_options(recipe, g, temperature=opts.setting_temperatures[0], steps=max(opts.steps), sampler=opts.samplers[0])
        # what edits.json and the caches record of the setting ("cfg_scale" is their key for o.cfg)
        settings: dict[str, Any] = {"temperature": o.temperature, "seed": opts.seed, "cfg_scale": o.cfg, **extra_options(o, g)}
        if "steps" in READS[g]:
            settings["steps"] = o.steps
        labels = m.test_set.labels[:n] if model.cfg.num_classes > 0 else None  # complete under the true class
        for task in TASKS:
            if not task_applies(task, g, tokenizer.grid):
                continue
            key = {
                "generator": run.weights_hash(g), "tokenizer": run.decoding_hash, "settings": settings, "task": task,
                "extractor": m.extractor.key, "real": m.reference, "conditional": labels is not None,
            }  # fmt: skip
            row = run.cached(
                run.report_dir / "edits" / f"{g}-{task}.json", key, lambda: measure_edit(m, model, tokenizer, task, g, o, opts.seed, labels)
            )
            rows.append({**row, "settings": settings})
    report = {
        "run": str(run.run_dir), "num": n, "reference": m.reference_text(recipe),
        "extractor": m.extractor.name, "extractor_hash": m.extractor.hash, "results": rows,
    }  # fmt: skip
    if is_main():
        write_json(run.report_dir / "edits.json", report)
        (run.report_dir / "edits.md").write_text(edits_markdown(report))
    return report


def edits_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Edits: inpainting and outpainting",
        "",
        f"Edits of the first {report['num']} test images. FID of the completions (decoded, no paste-back) against the "
        f"reference set: {report['reference']}, in the features of {report['extractor']} (hash `{report['extractor_hash']}`); "
        "PSNR (dB) of the kept area against the input and against the tokenizer's reconstruction; "
        "kept-token exactness is the share of kept ids equal to the input's (1.0 by construction).",
        "",
        "| generator | task | edited tokens | FID | PSNR kept vs input | PSNR kept vs reconstruction | kept-token exactness |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['generator']} | {r['task']} | {r['edited_tokens']}/{r['tokens']} | {r['fid']:.2f} | "
            f"{r['psnr_kept_vs_input']:.2f} | {r['psnr_kept_vs_reconstruction']:.2f} | {r['kept_token_exactness']:.3f} |"
        )
    return "\n".join(lines) + "\n"
