"""`vqdiff bench`: sampling and training throughput, achieved FLOP/s against a measured matmul peak,
and feature-extraction speed. Models are built from a recipe's configs with random weights
(speed does not depend on the weights), so the bench needs no data and no trained run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from evaluation import Classifier, ClassifierConfig, extract_features, get_extractor, inception_available
from recipes.recipe import Recipe
from recipes.run import check_generator, software_versions, sync
from recipes.stages import generator_config
from vqdiff.precision import autocast_dtype
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import make_optimizer


def timeit(fn: Callable[[], Any], device: torch.device, min_seconds: float = 1.0, max_reps: int = 50) -> float:
    """Seconds per call: one warm-up call, then repeats until `min_seconds` have passed."""
    fn()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or reps >= max_reps:
            return elapsed / reps


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the peak the achieved training FLOP/s is compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, min_seconds=1.0)
    return 2 * n**3 / seconds


@dataclass
class BenchModels:
    tokenizer: VQTokenizer
    generators: dict[str, Any]


def build_models(recipe: Recipe, device: torch.device, channels: int = 1, num_classes: int = 10) -> BenchModels:
    tcfg: TokenizerConfig = recipe.model_config("tokenizer", channels=channels, image_size=recipe["data"]["image_size"])
    tokenizer = VQTokenizer(tcfg).to(device).eval()
    meta = {"codebook_size": tcfg.codebook_size, "grid": list(tcfg.grid), "num_classes": num_classes}
    gens = {k: check_generator(k)(generator_config(k, recipe, meta)).to(device).eval() for k in ("ar", "diffusion")}
    return BenchModels(tokenizer, gens)


def bench_sampling(models: BenchModels, device: torch.device, batches=(1, 64), steps=(4, 8, 16), min_seconds=1.0):
    rows = []
    gen = torch.Generator().manual_seed(0)  # on the CPU, as `vqdiff.pipeline` samples
    ar = models.generators["ar"]
    diff = models.generators["diffusion"]
    for b in batches:
        for cached in (True, False):
            s = timeit(lambda: ar.sample(b, use_cache=cached, generator=gen), device, min_seconds)
            rows.append({"what": "sample", "generator": "ar", "kv_cache": cached, "steps": None, "batch": b,
                         "forward_passes": ar.forward_passes(), "images_per_second": b / s})  # fmt: skip
        for st in steps:
            s = timeit(lambda: diff.sample(b, steps=st, generator=gen), device, min_seconds)
            rows.append({"what": "sample", "generator": "diffusion", "kv_cache": None, "steps": st, "batch": b,
                         "forward_passes": st, "images_per_second": b / s})  # fmt: skip
        ids = torch.randint(0, models.tokenizer.cfg.codebook_size, (b, *models.tokenizer.grid), device=device)
        s = timeit(lambda: models.tokenizer.decode(ids), device, min_seconds)
        rows.append({"what": "decode", "generator": "tokenizer", "batch": b, "images_per_second": b / s})
    return rows


def bench_training(models: BenchModels, recipe: Recipe, device: torch.device, min_seconds=2.0) -> list[dict]:
    rows = []
    for kind, model in [("tokenizer", models.tokenizer), *models.generators.items()]:
        tc = recipe.train_config(kind)
        amp = autocast_dtype(tc.precision, device)
        model = model.train()
        opt = make_optimizer(model, tc, device)
        b = tc.batch_size
        if kind == "tokenizer":
            c, s = model.cfg.channels, model.cfg.image_size
            batch = {"images": torch.rand(b, c, s, s, device=device) * 2 - 1}
            tokens = b * s * s  # pixels
        else:
            cfg = model.cfg
            batch = {
                "ids": torch.randint(0, cfg.codebook_size, (b, cfg.grid_h, cfg.grid_w), device=device),
                "labels": torch.randint(0, max(cfg.num_classes, 1), (b,), device=device),
            }
            tokens = b * cfg.grid_h * cfg.grid_w

        def step() -> None:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        seconds = timeit(step, device, min_seconds, max_reps=20)
        dtype = amp or torch.float32
        rows.append(
            {
                "what": "train",
                "model": kind,
                "batch": b,
                "dtype": str(dtype).replace("torch.", ""),
                "parameters": sum(p.numel() for p in model.parameters()),
                "steps_per_second": 1 / seconds,
                "items_per_second": b / seconds,
                "tokens_per_second": tokens / seconds,
                "flop_per_step": flops,
                "achieved_flops": flops / seconds,
            }
        )
        model.eval()
    return rows


def bench_features(device: torch.device, channels: int, image_size: int, min_seconds=1.0) -> list[dict]:
    rows = []
    clf = Classifier(ClassifierConfig(channels=channels, num_classes=10, image_size=image_size)).to(device).eval()
    for b in (16, 64, 256):
        x = torch.rand(b, channels, image_size, image_size, device=device)
        with torch.no_grad():
            s = timeit(lambda: clf(x), device, min_seconds)
        rows.append({"what": "features", "extractor": "classifier", "batch": b, "images_per_second": b / s})
    imgs = torch.randint(0, 256, (64, 3, image_size, image_size), dtype=torch.uint8)
    if inception_available():
        ext = get_extractor("inception", dataset="mnist", device=device)
        extract_features(imgs[:ext.batch_size], ext)  # warm-up
        t0 = time.perf_counter()
        extract_features(imgs, ext)
        rows.append({"what": "features", "extractor": "inception", "batch": ext.batch_size,
                     "images_per_second": 64 / (time.perf_counter() - t0)})  # fmt: skip
    else:
        # no weights here: time torchvision's Inception-v3 with random weights at 299x299, the same
        # network shape torch-fidelity runs (speed does not depend on the weight values)
        import torch.nn.functional as F
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).to(device).eval()
        for b in (16, 64):
            x = imgs[:b].to(device)

            def run() -> None:
                with torch.no_grad():
                    net(F.interpolate(x.float() / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False))

            s = timeit(run, device, min_seconds, max_reps=5)
            rows.append({"what": "features", "extractor": "inception-v3 (random weights, speed proxy)", "batch": b,
                         "images_per_second": b / s})  # fmt: skip
    return rows


def run_bench(recipe: Recipe, device: torch.device, quick: bool = False, progress=None) -> dict[str, Any]:
    torch.manual_seed(0)
    models = build_models(recipe, device)
    min_s = 0.2 if quick else 1.0

    def note(what: str) -> None:
        if progress is not None:
            progress(what)

    note("sampling")
    sampling = bench_sampling(models, device, batches=(1, 64) if not quick else (1, 4), min_seconds=min_s)
    note("training")
    training = bench_training(models, recipe, device, min_seconds=2 * min_s)
    dtypes = sorted({r["dtype"] for r in training})
    note("matmul peak")
    peaks = {d: matmul_peak(getattr(torch, d), device, n=512 if quick else 2048) for d in dtypes}
    for r in training:
        r["matmul_peak_flops"] = peaks[r["dtype"]]
        r["fraction_of_peak"] = r["achieved_flops"] / peaks[r["dtype"]]
    note("features")
    features = bench_features(device, 1, recipe["data"]["image_size"], min_seconds=min_s)
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,  # kept for scripts that read it
        "software": software_versions(),
        "sampling": sampling,
        "training": training,
        "features": features,
        "matmul_peak_flops": peaks,
    }


def bench_table(result: dict[str, Any], name: str):
    """`run_bench`'s result as a rich table, for the terminal."""
    from rich.table import Table

    t = Table(title=f"vqdiff bench: {name} on {result['device']}", title_justify="left")
    for col in ("what", "setting", "batch", "images/s", "detail"):
        t.add_column(col, justify="left" if col in ("what", "setting", "detail") else "right")
    for row in result["sampling"]:
        if row["what"] == "decode":
            t.add_row("decode", "tokenizer", str(row["batch"]), f"{row['images_per_second']:.1f}", "")
            continue
        if row["generator"] == "ar":
            setting = "ar, KV cache" if row["kv_cache"] else "ar, no cache"
        else:
            setting = f"diffusion, {row['steps']} steps"
        t.add_row("sample", setting, str(row["batch"]), f"{row['images_per_second']:.1f}",
                  f"{row['forward_passes']} passes")  # fmt: skip
    for row in result["training"]:
        unit = "pixels" if row["model"] == "tokenizer" else "tokens"
        t.add_row(
            "train", f"{row['model']} ({row['parameters'] / 1e6:.2f}M, {row['dtype']})", str(row["batch"]),
            f"{row['items_per_second']:.1f}",
            f"{row['tokens_per_second']:.3g} {unit}/s, {row['achieved_flops'] / 1e9:.1f} GFLOP/s = "
            f"{100 * row['fraction_of_peak']:.0f}% of matmul peak {row['matmul_peak_flops'] / 1e9:.0f}",
        )  # fmt: skip
    for row in result["features"]:
        t.add_row("features", row["extractor"], str(row["batch"]), f"{row['images_per_second']:.1f}", "")
    return t
