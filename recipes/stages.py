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

from recipes.recipe import Recipe, load_recipe
from vqdiff.checkpoint import _atomic_write, load_model, load_tensors, read_config, read_json, write_json
from vqdiff.data import ImageSet, from_uint8, load_dataset, load_tokens, save_tokens, to_uint8
from vqdiff.distributed import barrier, is_main, local_device
from vqdiff.quantize import codebook_stats
from vqdiff.tokenizer import VQTokenizer, psnr
from vqdiff.train import TensorSource, is_trained, seeded, train

GENERATORS = ("ar", "diffusion")


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
        return local_device(self.device)  # under torchrun on CUDA: cuda:LOCAL_RANK


# ------------------------------------------------------------------ run folder


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def write_recipe(recipe: Recipe, run_dir: Path) -> None:
    if not is_main():  # under torchrun: rank 0 writes
        return
    # a unique temp name: two writers sharing `recipe.toml.tmp` made one of them fail (FileNotFoundError)
    text = recipe.to_toml()
    _atomic_write(run_dir / "recipe.toml", lambda tmp: Path(tmp).write_text(text))


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
        with seeded(tcfg.seed):
            model = VQTokenizer(cfg)
        result = train(model, train_set, tcfg, folder, device=ctx.torch_device, on_log=on_log)
        seconds = time.perf_counter() - t0
        if is_main():  # under torchrun the other ranks wait at the barrier
            model = result.model
            test_set = load_split(recipe, "test", ctx)
            metrics = evaluate_tokenizer(model, test_set, ctx.torch_device, on_eval)
            metrics.update(train_seconds_this_call=round(seconds, 1), steps=result.step, resumed_from=result.resumed_from)
            write_json(folder / "metrics.json", metrics)
            save_reconstructions(model, test_set, folder / "reconstructions.png", ctx.torch_device)
        barrier()
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
    _atomic_write(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))


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
    if is_main() and not tokens_current(ctx.run_dir):  # under torchrun: rank 0 encodes, the others wait
        encode_dataset(ctx, on_batch)
    barrier()
    return read_json(ctx.run_dir / "tokens" / "meta.json")


# ------------------------------------------------------------------ generators


def generator_class(kind: str) -> type:
    if kind == "ar":
        from vqdiff.ar import ARTransformer

        return ARTransformer
    if kind == "diffusion":
        from vqdiff.diffusion import DiffusionTransformer

        return DiffusionTransformer
    raise StageError(f"unknown generator {kind!r}; choose ar or diffusion")


def check_fits_tokenizer(kind: str, cfg: Any, tokens_meta: dict[str, Any], where: Path) -> None:
    """Refuse a generator whose codebook or grid is not the tokenizer's."""
    grid = tuple(tokens_meta["grid"])
    if cfg.codebook_size != tokens_meta["codebook_size"] or (cfg.grid_h, cfg.grid_w) != grid:
        raise StageError(
            f"the {kind} generator in {where} expects a {cfg.codebook_size}-code book and a "
            f"{cfg.grid_h}x{cfg.grid_w} grid, but the tokenizer has {tokens_meta['codebook_size']} codes "
            f"and a {grid[0]}x{grid[1]} grid; retrain the {kind} generator (delete {where}) or use another run dir"
        )


def tokenizer_meta(run_dir: Path) -> dict[str, Any]:
    """codebook_size and grid of the run's tokenizer, from its config alone."""
    folder = run_dir / "tokenizer"
    if not (folder / "config.json").exists():
        raise StageError(f"no tokenizer in {run_dir}; run `vqdiff train tokenizer` first")
    _, cfg = read_config(folder, "tokenizer")
    return {"codebook_size": cfg.codebook_size, "grid": list(cfg.grid)}


def generator_config(kind: str, recipe: Recipe, meta: dict[str, Any]) -> Any:
    section = recipe[kind]
    num_classes = meta.get("num_classes", 0) if section["conditional"] else 0
    return recipe.model_config(
        kind,
        codebook_size=meta["codebook_size"],
        grid_h=meta["grid"][0],
        grid_w=meta["grid"][1],
        num_classes=num_classes,
    )


def train_generator(kind: str, recipe: Recipe, ctx: Context, on_log=None, on_batch=None) -> dict[str, Any]:
    """Train (or resume) the `kind` generator on RUN/tokens, then measure bits per token on the test split."""
    folder = ctx.run_dir / kind
    generator_class(kind)
    tcfg = recipe.train_config(kind)
    tok = tokenizer_meta(ctx.run_dir)
    # refuse a mismatch the recipe states before spending time on encoding
    recipe.check_derived(kind, codebook_size=tok["codebook_size"], grid_h=tok["grid"][0], grid_w=tok["grid"][1])
    meta = ensure_tokens(ctx, on_batch)
    if (folder / "config.json").exists():
        _, old = read_config(folder, kind)
        check_fits_tokenizer(kind, old, meta, folder)
    check_same_tokens(kind, ctx.run_dir)
    cfg = generator_config(kind, recipe, meta)
    if is_trained(folder, tcfg.steps) and (folder / "metrics.json").exists():
        return read_json(folder / "metrics.json")
    folder.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_json(folder / "tokens.json", {"tokenizer_hash": meta["tokenizer_hash"]})
    ids, labels = load_tokens(ctx.run_dir / "tokens" / "train.safetensors")
    t0 = time.perf_counter()
    with seeded(tcfg.seed):
        model = generator_class(kind)(cfg)
    result = train(model, TensorSource(ids=ids, labels=labels), tcfg, folder, device=ctx.torch_device, on_log=on_log)
    seconds = time.perf_counter() - t0
    if is_main():  # under torchrun the other ranks wait at the barrier
        metrics = test_bits_per_token(result.model, ctx, recipe[kind]["eval_grids"])
        n_params = sum(p.numel() for p in result.model.parameters())
        metrics.update(train_seconds_this_call=round(seconds, 1), steps=result.step, parameters=n_params)
        write_json(folder / "metrics.json", metrics)
    barrier()
    return read_json(folder / "metrics.json")


@torch.no_grad()
def test_bits_per_token(model: Any, ctx: Context, max_grids: int, batch_size: int = 250) -> dict[str, Any]:
    ids, labels = load_tokens(ctx.run_dir / "tokens" / "test.safetensors")
    if max_grids:
        ids, labels = ids[:max_grids], labels[:max_grids]
    gen = torch.Generator(device=ctx.torch_device).manual_seed(0)
    total, info = 0.0, {}
    for start in range(0, len(ids), batch_size):
        batch = {"ids": ids[start : start + batch_size], "labels": labels[start : start + batch_size]}
        info = model.bits_per_token(batch, generator=gen)
        total += info["bits_per_token"] * len(batch["ids"])
    return {
        "bits_per_token": total / len(ids),
        "kind": info.get("kind"),  # exact (AR) or elbo (diffusion: an upper bound)
        "estimator": info.get("estimator"),
        "split": "test",
        "num_grids": len(ids),
        "conditional": model.cfg.num_classes > 0,
    }


def check_same_tokens(kind: str, run_dir: Path) -> None:
    """Refuse a generator trained on the tokens of another tokenizer (retrained since): its ids mean other codes."""
    path = run_dir / kind / "tokens.json"
    if not path.exists() or not (run_dir / "tokenizer" / "model.safetensors").exists():
        return
    trained_on = read_json(path).get("tokenizer_hash")
    weights = run_dir / "tokenizer" / "model.safetensors"
    if trained_on != file_hash(weights):
        load_tensors(weights)  # a truncated or corrupt tokenizer file also changes the hash: name it, not the generator
        raise StageError(
            f"the {kind} generator in {run_dir / kind} was trained on the tokens of another tokenizer "
            f"(retrained since); delete {run_dir / kind} to retrain it"
        )


def load_generator(run_dir: Path, kind: str, device: torch.device | str = "cpu") -> Any:
    generator_class(kind)
    folder = run_dir / kind
    if not (folder / "config.json").exists():
        raise StageError(f"no {kind} generator in {run_dir}; run `vqdiff train {kind}` first")
    model = load_model(folder, kind, device)
    check_fits_tokenizer(kind, model.cfg, tokenizer_meta(run_dir), folder)
    check_same_tokens(kind, run_dir)
    return model


# ------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SampleSpec:
    generator: str
    num: int = 64
    temperature: float = 1.0
    steps: int = 8  # diffusion forward passes; AR ignores it
    seed: int = 0
    top_k: int | None = None
    top_p: float | None = None
    class_: int | None = None  # None: random classes for a conditional model
    cfg: float = 1.0
    prefix_rows: int = 0
    batch_size: int = 64
    use_cache: bool = True
    choice_temperature: float = 4.5  # diffusion, mask corruption: Gumbel noise on the confidences (MaskGIT)
    sampler: str = "maskgit"  # diffusion, mask corruption: maskgit | ancestral | halton
    eta: float = 0.0  # diffusion, ancestral sampler: ReMDM remasking

    def validate(self) -> None:
        if self.generator not in GENERATORS:
            raise StageError(f"unknown generator {self.generator!r}; choose ar or diffusion")
        check_sampling_values(self)
        if not self.temperature > 0:
            raise StageError(f"temperature must be > 0, got {self.temperature}")
        if self.steps < 1:
            raise StageError(f"steps must be >= 1, got {self.steps}")
        if self.num < 1:
            raise StageError(f"num must be >= 1, got {self.num}")
        if self.batch_size < 1:
            raise StageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise StageError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise StageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.cfg > 0:
            raise StageError(f"cfg must be > 0 (1 = no guidance), got {self.cfg}")
        if self.choice_temperature < 0:
            raise StageError(f"choice temperature must be >= 0, got {self.choice_temperature}")
        if self.prefix_rows < 0:
            raise StageError(f"prefix rows must be >= 0, got {self.prefix_rows}")
        if self.generator == "diffusion" and self.prefix_rows:
            raise StageError("--prefix-rows is for the ar generator")
        from vqdiff.diffusion import MASK_SAMPLERS

        if self.sampler not in MASK_SAMPLERS:
            raise StageError(f"unknown sampler {self.sampler!r}; choose from {', '.join(MASK_SAMPLERS)}")
        if not 0 <= self.eta <= 1:
            raise StageError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta and self.sampler != "ancestral":
            raise StageError("--eta (remasking) is for the ancestral sampler")

    def folder_name(self, forward_passes: int) -> str:
        name = f"{self.generator}-t{self.temperature:g}-s{forward_passes}"
        extras = []
        if self.top_k is not None:
            extras.append(f"k{self.top_k}")
        if self.top_p is not None:
            extras.append(f"p{self.top_p:g}")
        if self.class_ is not None:
            extras.append(f"c{self.class_}")
        if self.cfg != 1.0:
            extras.append(f"g{self.cfg:g}")
        if self.prefix_rows:
            extras.append(f"r{self.prefix_rows}")
        if not self.use_cache:
            extras.append("nocache")
        if self.generator == "diffusion" and self.sampler != "maskgit":
            extras.append(self.sampler)  # maskgit keeps the names of the folders written before samplers
        if self.generator == "diffusion" and self.eta:
            extras.append(f"eta{self.eta:g}")
        if self.generator == "diffusion" and self.sampler == "maskgit" and self.choice_temperature != 4.5:
            extras.append(f"ct{self.choice_temperature:g}")
        return "-".join([name, *extras])


# one forward pass per step: the cost is linear in steps (--steps 100000 on 2 images ran for minutes)
MAX_SAMPLE_STEPS = 1024


def check_sampling_values(spec: "SampleSpec") -> None:
    """Refuse inf and nan (they passed the > 0 checks and gave degenerate images with exit code 0),
    and steps beyond MAX_SAMPLE_STEPS."""
    for name in ("temperature", "cfg", "choice_temperature", "top_p"):
        v = getattr(spec, name)
        if v is not None and not math.isfinite(v):
            raise StageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if spec.steps > MAX_SAMPLE_STEPS:
        raise StageError(f"steps must be <= {MAX_SAMPLE_STEPS} (one forward pass each), got {spec.steps}")


@dataclass
class Samples:
    ids: torch.Tensor  # long [n h w]
    images: torch.Tensor  # float [n c H W] in [-1, 1]
    seconds: float  # generation + decoding
    forward_passes: int  # per image
    folder: Path
    key: dict[str, Any]  # the inputs that produced them (spec, weights hashes), as in sample.json

    @property
    def images_per_second(self) -> float:
        return len(self.ids) / max(self.seconds, 1e-9)


def generate(
    ctx: Context,
    spec: SampleSpec,
    *,
    out: Path | None = None,
    gif: bool = False,
    on_batch=None,
    snapshot: Path | None = None,
) -> Samples:
    """Sample `spec.num` images into RUN/samples/GENERATOR-tTEMP-sSTEPS/ (or `out`).

    Writes the PNGs, grid.png, ids.safetensors and sample.json; with `gif` (diffusion), trajectory.gif.
    A folder whose sample.json records the same inputs (spec, generator and tokenizer weights) is
    reused instead of sampled again.
    """
    spec.validate()
    device = ctx.torch_device
    model = load_generator(ctx.run_dir, spec.generator, device)
    weights = ctx.run_dir / spec.generator / "model.safetensors"
    if snapshot is not None:  # kept weights of an earlier step (learning curves)
        from vqdiff.checkpoint import load_tensors

        model.load_state_dict(load_tensors(snapshot), strict=True)
        weights = snapshot
    tokenizer = load_tokenizer(ctx.run_dir, device)
    cfg = model.cfg
    h = cfg.grid_h
    if spec.class_ is not None:
        if cfg.num_classes == 0:
            raise StageError(f"the {spec.generator} generator is unconditional; --class needs conditional = true")
        if not 0 <= spec.class_ < cfg.num_classes:
            raise StageError(f"--class must be in [0, {cfg.num_classes}), got {spec.class_}")
    if spec.prefix_rows >= h:
        raise StageError(f"--prefix-rows must be < the grid height {h}, got {spec.prefix_rows}")
    passes = model.forward_passes(spec.steps)
    folder = out or ctx.run_dir / "samples" / spec.folder_name(passes)
    key = {
        "spec": {k: v for k, v in spec.__dict__.items()},
        "generator_hash": file_hash(weights),
        "tokenizer_hash": file_hash(ctx.run_dir / "tokenizer" / "model.safetensors"),
        "gif": gif,
    }
    if (folder / "sample.json").exists() and (folder / "ids.safetensors").exists():
        try:
            old = json.loads((folder / "sample.json").read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("key") == key:
            ids, _ = load_tokens(folder / "ids.safetensors")
            images = decode_all(tokenizer, ids, device)
            return Samples(ids, images, old["seconds"], old["forward_passes"], folder, key)

    gen = torch.Generator(device=device).manual_seed(spec.seed)
    prefix_all = None
    if spec.prefix_rows:
        ensure_tokens(ctx)
        test_ids, _ = load_tokens(ctx.run_dir / "tokens" / "test.safetensors")
        if len(test_ids) < spec.num:
            raise StageError(f"--prefix-rows takes prefixes from {len(test_ids)} test grids; ask for at most that many")
        prefix_all = test_ids[: spec.num, : spec.prefix_rows]
    if spec.class_ is not None:
        labels_all = torch.full((spec.num,), spec.class_, dtype=torch.long)
    elif cfg.num_classes > 0:
        labels_all = torch.randint(0, cfg.num_classes, (spec.num,), generator=torch.Generator().manual_seed(spec.seed))
    else:
        labels_all = None

    frames: list[torch.Tensor] = []
    trajectory_n = min(spec.num, 16)
    all_ids, all_images = [], []
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, spec.num, spec.batch_size):
        n = min(spec.batch_size, spec.num - start)
        labels = labels_all[start : start + n].to(device) if labels_all is not None else None
        if spec.generator == "ar":
            prefix = prefix_all[start : start + n].to(device) if prefix_all is not None else None
            ids = model.sample(
                n,
                temperature=spec.temperature,
                top_k=spec.top_k,
                top_p=spec.top_p,
                labels=labels,
                cfg_scale=spec.cfg,
                prefix=prefix,
                use_cache=spec.use_cache,
                generator=gen,
            )
        else:
            record = gif and start == 0
            callback = (lambda i, x: frames.append(x[:trajectory_n].cpu().clone())) if record else None
            ids = model.sample(
                n, steps=spec.steps, temperature=spec.temperature, labels=labels, cfg_scale=spec.cfg, generator=gen,
                callback=callback, choice_temperature=spec.choice_temperature, sampler=spec.sampler, eta=spec.eta,
                top_k=spec.top_k, top_p=spec.top_p,
            )  # fmt: skip
        all_images.append(tokenizer.decode(ids).float().cpu())
        all_ids.append(ids.cpu())
        if on_batch is not None:
            on_batch(start + n, spec.num)
    sync(device)
    seconds = time.perf_counter() - t0
    ids = torch.cat(all_ids)
    images = torch.cat(all_images)

    folder.mkdir(parents=True, exist_ok=True)
    save_pngs(images, folder)
    save_grid(images[:64], folder / "grid.png", nrow=8)
    if frames:
        save_trajectory_gif(tokenizer, frames, folder / "trajectory.gif", device)
    save_tokens(folder / "ids.safetensors", ids, labels_all if labels_all is not None else torch.zeros(len(ids)), cfg.codebook_size)
    record = {
        "key": key,
        "seconds": seconds,
        "images_per_second": len(ids) / max(seconds, 1e-9),
        "forward_passes": passes,
        "device": str(device),
    }
    write_json(folder / "sample.json", record)
    return Samples(ids, images, seconds, passes, folder, key)


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_all(tokenizer: VQTokenizer, ids: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([tokenizer.decode(ids[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(ids), batch_size)])


def save_pngs(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{i:06d}.png")


@torch.no_grad()
def save_trajectory_gif(tokenizer: VQTokenizer, frames: list[torch.Tensor], path: Path, device) -> None:
    """Decode the ids after every step into a grid; positions still masked are shown grey."""
    from PIL import Image
    from torchvision.utils import make_grid

    f = tokenizer.cfg.downsample
    pictures = []
    for ids in frames:
        masked = ids >= tokenizer.cfg.codebook_size  # mask_id = k
        images = tokenizer.decode(ids.clamp_max(tokenizer.cfg.codebook_size - 1).to(device)).float().cpu()
        pixel_mask = masked.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None]  # [n 1 H W]
        images = torch.where(pixel_mask, torch.zeros_like(images), images)
        grid = make_grid(to_uint8(images), nrow=4, padding=2, pad_value=128)
        picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
        picture = picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST)
        # an adaptive palette without dithering: the web palette would dither the grey into a checkerboard
        pictures.append(picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=256, dither=Image.Dither.NONE))
    durations = [250] * (len(pictures) - 1) + [1500]  # hold the last frame
    _atomic_write(path, lambda tmp: pictures[0].save(
        tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0
    ))  # fmt: skip


# ------------------------------------------------------------------ evaluation


@dataclass
class EvalOptions:
    generators: tuple[str, ...] = GENERATORS
    num: int = 1000
    steps: tuple[int, ...] = (4, 8, 16)
    temperatures: tuple[float, ...] = (1.0,)
    cfg: float = 1.0
    extractor: str = "auto"
    inception_weights: str | None = None
    batch_size: int = 100
    seed: int = 0
    gif_steps: int = 16
    classifier_steps: int = 0  # 0: the classifier extractor's default recipe
    samplers: tuple[str, ...] = ("maskgit",)  # diffusion samplers, one line each in the report
    curve_steps: int = 16  # diffusion steps of the learning curves
    eta: float = 0.0  # ReMDM remasking for the ancestral sampler

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides: Any) -> "EvalOptions":
        e = recipe["evaluate"]
        opts = cls(
            generators=tuple(e["generators"]),
            num=e["num"],
            steps=tuple(e["steps"]),
            temperatures=tuple(float(t) for t in e["temperatures"]),
            cfg=float(e["cfg"]),
            extractor=e["extractor"],
            batch_size=e["batch_size"],
            seed=e["seed"],
            gif_steps=e["gif_steps"],
            classifier_steps=e["classifier_steps"],
            samplers=tuple(e["samplers"]) or (recipe["diffusion"]["sampler"],),
            curve_steps=e["curve_steps"],
            eta=float(recipe["diffusion"]["eta"]),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        opts.validate()
        return opts

    def validate(self) -> None:
        for g in self.generators:
            if g not in GENERATORS:
                raise StageError(f"unknown generator {g!r}; choose from ar, diffusion")
        if not self.generators:
            raise StageError("no generators to evaluate")
        if self.num < 2:
            raise StageError(f"--num must be >= 2, got {self.num}")
        if self.curve_steps < 1:
            raise StageError(f"evaluate.curve_steps must be >= 1, got {self.curve_steps}")
        if any(s < 1 for s in self.steps) or not self.steps:
            raise StageError(f"--steps must be >= 1, got {list(self.steps)}")
        if any(s > MAX_SAMPLE_STEPS for s in self.steps):
            raise StageError(f"--steps must be <= {MAX_SAMPLE_STEPS} (one forward pass each), got {list(self.steps)}")
        if any(not (t > 0 and math.isfinite(t)) for t in self.temperatures) or not self.temperatures:
            raise StageError(f"--temperatures must be > 0 and finite, got {list(self.temperatures)}")
        if not (self.cfg > 0 and math.isfinite(self.cfg)):
            raise StageError(f"--cfg must be > 0 and finite (1 = no guidance), got {self.cfg}")
        from vqdiff.diffusion import MASK_SAMPLERS

        if not self.samplers or any(s not in MASK_SAMPLERS for s in self.samplers):
            raise StageError(f"--sampler must be from {', '.join(MASK_SAMPLERS)}, got {list(self.samplers)}")
        if self.extractor not in ("auto", "classifier", "inception"):
            raise StageError(f"unknown extractor {self.extractor!r}; choose auto, classifier or inception")


def _cached_json(path: Path, key: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data.get("value") if data.get("key") == key else None


def _measuring(ctx: Context, opts: "EvalOptions", recipe: Recipe, bar):
    """What every FID needs: (train set, test set, extractor, real uint8 images, their cache key,
    metrics_for(images_uint8, what) -> metrics dict)."""
    from evaluation import ClassifierRecipe, compute_metrics, get_extractor

    dataset = recipe["data"]["dataset"]
    train_set = load_split(recipe, "train", ctx)
    test_set = load_split(recipe, "test", ctx)
    extractor = get_extractor(
        opts.extractor,
        dataset=dataset,
        image_size=recipe["data"]["image_size"],
        data_root=ctx.data_root,
        train_set=train_set,
        test_set=test_set,
        inception_weights=opts.inception_weights,
        device=ctx.device,
        recipe=ClassifierRecipe(steps=opts.classifier_steps) if opts.classifier_steps else None,
        progress=bar("feature extractor"),
    )
    n = min(opts.num, len(test_set))
    real = test_set.images_uint8(torch.arange(n))
    real_key = f"{dataset}-test-{recipe['data']['image_size']}"

    def metrics_for(images_uint8: torch.Tensor, what: str) -> dict[str, Any]:
        return compute_metrics(images_uint8, real, extractor, real_key=real_key, progress=bar(what))

    return train_set, test_set, extractor, real, real_key, metrics_for


def _sample_metrics(samples: "Samples", extractor, real_key: str, n: int, metrics_for, label: str) -> dict[str, Any]:
    """FID etc. of `samples`, cached in their folder's metrics.json under the inputs that made them."""
    key = {"sample": samples.key, "extractor": [extractor.name, extractor.hash], "real": [real_key, n]}
    m = _cached_json(samples.folder / "metrics.json", key)
    if m is None:
        m = metrics_for(to_uint8(samples.images), f"metrics {label}")
        write_json(samples.folder / "metrics.json", {"key": key, "value": m})
    return m


def evaluate(ctx: Context, opts: EvalOptions, bars=None) -> dict[str, Any]:
    """Sample every (generator, temperature, steps), measure FID/KID/PR against the test split, write the report.

    `bars(description)` returns an on_batch(done, total) progress callback (from the CLI), or None.
    Re-runs reuse samples and metrics whose inputs have not changed.
    """
    def bar(description: str):
        return bars(description) if bars is not None else None

    recipe = read_run_recipe(ctx.run_dir)
    dataset = recipe["data"]["dataset"]
    for g in opts.generators:
        load_generator(ctx.run_dir, g)  # fail now, not after the extractor is trained
    train_set, test_set, extractor, real, real_key, metrics_for = _measuring(ctx, opts, recipe, bar)
    n = len(real)
    reference_name = f"{dataset} ({recipe['data']['path']})" if recipe["data"]["path"] else dataset

    report_dir = ctx.run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    tok_hash = file_hash(ctx.run_dir / "tokenizer" / "model.safetensors")
    context_key = {"tokenizer": tok_hash, "extractor": [extractor.name, extractor.hash], "n": n, "real": real_key}
    context = _cached_json(report_dir / "context.json", context_key)
    if context is None:
        tokenizer = load_tokenizer(ctx.run_dir, ctx.torch_device)
        recon = to_uint8(decode_all(tokenizer, torch.cat(
            [tokenizer.encode(from_uint8(real[i : i + 256]).to(ctx.torch_device)).cpu() for i in range(0, n, 256)]
        ), ctx.torch_device))  # fmt: skip
        g = torch.Generator().manual_seed(opts.seed)
        train_idx = torch.randperm(len(train_set), generator=g)[:n]
        context = {
            "rfid": metrics_for(recon, "rFID")["fid"],
            "floor_fid": metrics_for(train_set.images_uint8(train_idx), "floor")["fid"],
        }
        write_json(report_dir / "context.json", {"key": context_key, "value": context})

    results: list[dict[str, Any]] = []
    diffusion_kind = None
    if "diffusion" in opts.generators:
        diffusion_kind = read_config(ctx.run_dir / "diffusion", "diffusion")[1].corruption
    for g in opts.generators:
        # one sampler per setting, except the mask corruption, which compares its samplers
        samplers = opts.samplers if g == "diffusion" and diffusion_kind == "mask" else (None,)
        for sampler, temperature, steps in (
            (sm, tp, st) for sm in samplers for tp in opts.temperatures for st in (opts.steps if g == "diffusion" else (None,))
        ):
            spec = SampleSpec(
                generator=g, num=n, temperature=temperature, steps=steps or 1, seed=opts.seed, cfg=opts.cfg,
                batch_size=opts.batch_size, sampler=sampler or "maskgit",
                eta=opts.eta if sampler == "ancestral" else 0.0,
            )  # fmt: skip
            label = f"{g}" + (f" {sampler}" if sampler else "") + f" t={temperature:g}" + (f" s={steps}" if steps else "")
            samples = generate(ctx, spec, on_batch=bar(f"sample {label}"))
            m = _sample_metrics(samples, extractor, real_key, n, metrics_for, label)
            results.append(
                {
                    "generator": g,
                    "sampler": sampler,
                    "temperature": temperature,
                    "steps": steps,
                    "fid": m["fid"],
                    "kid": m.get("kid"),
                    "kid_std": m.get("kid_std"),
                    "precision": m.get("precision"),
                    "recall": m.get("recall"),
                    "isc": m.get("isc"),
                    "images_per_second": samples.images_per_second,
                    "forward_passes": samples.forward_passes,
                    "samples": str(samples.folder.relative_to(ctx.run_dir)),
                }
            )
    gif = None
    if "diffusion" in opts.generators:
        spec = SampleSpec(
            generator="diffusion", num=16, temperature=opts.temperatures[0], steps=opts.gif_steps, seed=opts.seed, cfg=opts.cfg,
            sampler=opts.samplers[0] if diffusion_kind == "mask" else "maskgit",
        )  # fmt: skip
        gif_samples = generate(ctx, spec, out=ctx.run_dir / "samples" / f"trajectory-s{opts.gif_steps}", gif=True)
        gif = str((gif_samples.folder / "trajectory.gif").relative_to(ctx.run_dir))
    tok_metrics = read_json(ctx.run_dir / "tokenizer" / "metrics.json") if (ctx.run_dir / "tokenizer" / "metrics.json").exists() else {}
    bits = {}
    for g in opts.generators:
        p = ctx.run_dir / g / "metrics.json"
        if p.exists():
            mj = read_json(p)
            bits[g] = {"bits_per_token": mj.get("bits_per_token"), "kind": mj.get("kind")}
    report = {
        "run": str(ctx.run_dir),
        "recipe": recipe.name,
        "dataset": dataset,
        "extractor": extractor.name,
        "extractor_hash": extractor.hash,
        "extractor_info": extractor.info,
        "num_samples": n,
        "reference": f"{reference_name} test split, first {n} of {len(test_set)} images",
        # FID depends on the reference set and its size as much as on the samples: state both
        "reference_set": {
            "dataset": dataset,
            "path": recipe["data"]["path"] or None,
            "split": "test",
            "size": n,
            "split_size": len(test_set),
        },
        "isc_omitted": extractor.info.get("isc_omitted"),
        "floor_fid": context["floor_fid"],
        "tokenizer": {
            "rfid": context["rfid"],
            "psnr": tok_metrics.get("psnr"),
            "codebook_usage": tok_metrics.get("codebook_usage"),
        },
        "bits_per_token": bits,
        "cfg": opts.cfg,
        "device": str(ctx.torch_device),
        "results": results,
        "trajectory_gif": gif,
    }
    if (report_dir / "curve.json").exists():
        report["learning_curve"] = read_json(report_dir / "curve.json")
    from recipes.report import write_report

    write_report(report, report_dir)
    return report


# ------------------------------------------------------------------ learning curves


def snapshots(run_dir: Path, kind: str) -> list[tuple[int, float, Path]]:
    """(step, training seconds, path) of the weights kept every `keep_every` steps, by step."""
    from safetensors import safe_open

    from vqdiff.train import HISTORY_DIR

    out = []
    for path in sorted((run_dir / kind / HISTORY_DIR).glob("step-*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            out.append((int(meta["step"]), float(meta["train_seconds"]), path))
        except Exception:  # a snapshot cut by a kill: skip it, the next run writes it again
            continue
    return sorted(out)


def learning_curve(ctx: Context, opts: EvalOptions, bars=None) -> dict[str, Any]:
    """FID and recall of every kept snapshot of each generator, on the same axes: training step and
    training wall time. AR samples at the first temperature; diffusion at the first temperature,
    `curve_steps` steps and the first sampler. Writes RUN/report/curve.json and
    learning_curve.png; re-runs reuse samples and metrics."""

    def bar(description: str):
        return bars(description) if bars is not None else None

    recipe = read_run_recipe(ctx.run_dir)
    found = {g: snapshots(ctx.run_dir, g) for g in opts.generators}
    if not any(found.values()):
        raise StageError(
            f"no kept weights in {ctx.run_dir}/{{{','.join(opts.generators)}}}/history; train with "
            "keep_every > 0, e.g. --set ar.keep_every=100 --set diffusion.keep_every=100"
        )
    _, _, extractor, real, real_key, metrics_for = _measuring(ctx, opts, recipe, bar)
    n = len(real)
    temperature, steps, sampler = opts.temperatures[0], opts.curve_steps, opts.samplers[0]
    points = []
    for g, snaps in found.items():
        for step, seconds, path in snaps:
            spec = SampleSpec(
                generator=g, num=n, temperature=temperature, steps=steps if g == "diffusion" else 1, seed=opts.seed,
                cfg=opts.cfg, batch_size=opts.batch_size, sampler=sampler if g == "diffusion" else "maskgit",
            )  # fmt: skip
            label = f"{g} step {step}"
            folder = ctx.run_dir / "samples" / "curve" / f"{spec.folder_name(spec.steps if g == 'diffusion' else 0)}-step{step}"
            samples = generate(ctx, spec, out=folder, on_batch=bar(f"sample {label}"), snapshot=path)
            m = _sample_metrics(samples, extractor, real_key, n, metrics_for, label)
            points.append(
                {"generator": g, "step": step, "train_seconds": seconds, "fid": m["fid"], "recall": m.get("recall"),
                 "precision": m.get("precision"), "setting": spec.folder_name(samples.forward_passes)}
            )  # fmt: skip
    curve = {
        "extractor": extractor.name, "extractor_hash": extractor.hash, "num_samples": n,
        "temperature": temperature, "diffusion_steps": steps, "diffusion_sampler": sampler, "points": points,
    }  # fmt: skip
    report_dir = ctx.run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    from recipes.report import plot_curve

    curve["plot"] = plot_curve(curve, report_dir, dataset=recipe["data"]["dataset"])
    write_json(report_dir / "curve.json", curve)
    return curve
