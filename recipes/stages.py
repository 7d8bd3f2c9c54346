"""The stages of a run, as plain functions over a run folder. The CLI is a thin shell over these.

RUN/
  recipe.toml                      the resolved recipe
  tokenizer/ ar/ diffusion/        config.json, model.safetensors, train_state.pt, log.jsonl, metrics.json
  tokens/                          train.safetensors, test.safetensors, meta.json
  samples/GENERATOR-tTEMP-sSTEPS/  PNGs, grid.png, trajectory.gif (diffusion)
  report/                          report.md, report.json, plots
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from recipes.recipe import Recipe, RecipeError, load_recipe
from vqdiff.checkpoint import CheckpointError, load_model, read_json, write_json
from vqdiff.data import ImageSet, load_dataset, load_tokens, save_tokens, to_uint8
from vqdiff.quantize import codebook_stats
from vqdiff.tokenizer import VQTokenizer, psnr
from vqdiff.train import TensorSource, is_trained, train

GENERATORS = ("ar", "diffusion")
Progress = Callable[..., Any]  # on_log-style callbacks supplied by the CLI


class StageError(Exception):
    """A stage that cannot run as asked; the message is one line."""


@dataclass
class Context:
    """What every stage needs: the run folder, where the data lives, where to compute."""

    run_dir: Path
    data_root: str | None = None
    device: str | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------ run folder


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def write_recipe(recipe: Recipe, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(recipe.to_toml())
    tmp.replace(path)


def read_run_recipe(run_dir: Path) -> Recipe:
    path = run_dir / "recipe.toml"
    if not path.exists():
        raise StageError(f"{run_dir} is not a run folder (no recipe.toml); train a tokenizer into it first")
    return load_recipe(str(path))


def load_split(recipe: Recipe, split: str, ctx: Context) -> ImageSet:
    d = recipe["data"]
    return load_dataset(
        d["dataset"],
        split,
        image_size=d["image_size"],
        root=ctx.data_root,
        path=d["path"] or None,
        limit=d["limit_train"] if split == "train" else d["limit_test"],
        seed=d["seed"],
    )


def file_hash(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# ------------------------------------------------------------------ tokenizer


def load_tokenizer(run_dir: Path, device: torch.device | str = "cpu") -> VQTokenizer:
    folder = run_dir / "tokenizer"
    if not (folder / "config.json").exists():
        raise StageError(f"no tokenizer in {run_dir}; run `vqdiff train tokenizer` first")
    return load_model(folder, "tokenizer", device)


@torch.no_grad()
def map_batches(fn: Callable[[dict], Any], data: ImageSet, batch_size: int, on_batch=None) -> list[Any]:
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        out.append(fn(data.batch(idx)))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(data)), len(data))
    return out


def train_tokenizer(recipe: Recipe, ctx: Context, on_log=None, on_eval=None) -> dict[str, Any]:
    """Train (or resume) the tokenizer, then measure it on the test split. Returns metrics.json."""
    folder = ctx.run_dir / "tokenizer"
    tcfg = recipe.train_config("tokenizer")
    train_set = load_split(recipe, "train", ctx)
    cfg = recipe.model_config("tokenizer", channels=train_set.channels, image_size=train_set.image_size)
    if not (is_trained(folder, tcfg.steps) and (folder / "metrics.json").exists()):
        t0 = time.perf_counter()
        result = train(VQTokenizer(cfg), train_set, tcfg, folder, device=ctx.torch_device, on_log=on_log)
        seconds = time.perf_counter() - t0
        model = result.model
        test_set = load_split(recipe, "test", ctx)
        metrics = evaluate_tokenizer(model, test_set, ctx.torch_device, on_eval)
        metrics.update(train_seconds_this_call=round(seconds, 1), steps=result.step, resumed_from=result.resumed_from)
        write_json(folder / "metrics.json", metrics)
        save_reconstructions(model, test_set, folder / "reconstructions.png", ctx.torch_device)
    return read_json(folder / "metrics.json")


@torch.no_grad()
def evaluate_tokenizer(model: VQTokenizer, test_set: ImageSet, device: torch.device, on_batch=None) -> dict[str, Any]:
    """PSNR (dB, [0,1] scale), MSE ([-1,1] scale), codebook usage and perplexity on `test_set`."""
    model.eval().to(device)
    counts = torch.zeros(model.cfg.codebook_size)
    sq_err, pixels = 0.0, 0
    psnrs = []

    def step(batch: dict) -> None:
        nonlocal sq_err, pixels
        x = batch["images"].to(device)
        ids = model.encode(x)
        rec = model.decode(ids)
        err = (rec.float() - x.float()).pow(2)
        sq_err += err.sum().item()
        pixels += err.numel()
        psnrs.extend(psnr(e) for e in err.flatten(1).mean(1).tolist())
        counts.add_(torch.bincount(ids.flatten().cpu(), minlength=model.cfg.codebook_size).float())

    map_batches(step, test_set, 256, on_batch)
    mse = sq_err / max(pixels, 1)
    usage, perplexity = codebook_stats(counts)
    return {
        "psnr": psnr(mse),  # of the mean squared error over the split
        "psnr_mean_per_image": sum(psnrs) / max(len(psnrs), 1),
        "mse": mse,
        "codebook_usage": usage,
        "perplexity": perplexity,
        "codebook_size": model.cfg.codebook_size,
        "grid": list(model.grid),
        "num_images": len(test_set),
        "split": "test",
    }


def save_reconstructions(model: VQTokenizer, test_set: ImageSet, path: Path, device: torch.device, n: int = 16) -> None:
    """Originals (top row) above their reconstructions (bottom row)."""
    x = test_set.batch(torch.arange(min(n, len(test_set))))["images"].to(device)
    rec = model.decode(model.encode(x))
    save_grid(torch.cat([x, rec]).cpu(), path, nrow=len(x))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """images float [b c h w] in [-1,1] -> one PNG grid."""
    from torchvision.utils import make_grid
    from PIL import Image

    grid = make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=128)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    tmp.replace(path)


# ------------------------------------------------------------------ tokens


def tokens_current(run_dir: Path) -> bool:
    meta_path = run_dir / "tokens" / "meta.json"
    weights = run_dir / "tokenizer" / "model.safetensors"
    if not meta_path.exists() or not weights.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("tokenizer_hash") == file_hash(weights) and all(
        (run_dir / "tokens" / f"{s}.safetensors").exists() for s in ("train", "test")
    )


def encode_dataset(ctx: Context, on_batch=None) -> dict[str, Any]:
    """Write the token grids of the train and test splits, with labels, to RUN/tokens/."""
    recipe = read_run_recipe(ctx.run_dir)
    device = ctx.torch_device
    model = load_tokenizer(ctx.run_dir, device)
    out = ctx.run_dir / "tokens"
    meta: dict[str, Any] = {
        "tokenizer_hash": file_hash(ctx.run_dir / "tokenizer" / "model.safetensors"),
        "codebook_size": model.cfg.codebook_size,
        "grid": list(model.grid),
        "dataset": recipe["data"]["dataset"],
    }
    for split in ("train", "test"):
        data = load_split(recipe, split, ctx)
        ids = map_batches(lambda b: model.encode(b["images"].to(device)).cpu(), data, 512, on_batch)
        ids = torch.cat(ids)
        save_tokens(out / f"{split}.safetensors", ids, data.labels, model.cfg.codebook_size)
        meta[f"num_{split}"] = len(ids)
        meta["num_classes"] = data.num_classes
    write_json(out / "meta.json", meta)  # last: its presence means the tokens are complete
    return meta


def ensure_tokens(ctx: Context, on_batch=None) -> dict[str, Any]:
    if not tokens_current(ctx.run_dir):
        encode_dataset(ctx, on_batch)
    return read_json(ctx.run_dir / "tokens" / "meta.json")
