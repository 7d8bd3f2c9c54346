"""`vqdiff bench`: the speed of every stage of a recipe, and how far it is from the hardware.

For each stage (the tokenizer, AR and diffusion training steps, AR and diffusion sampling with and
without classifier-free guidance, decoding, feature extraction) it reports the time, the FLOPs of
one call (`torch.utils.flop_counter`), the achieved FLOP/s and their share of this device's
measured matrix-product peak in the same precision. `compare=True` runs the training and sampling
stages twice, under `TODAY` (the kernels and precisions before the speed rules of
`vqdiff.precision`) and under the rules, and gives the ratio. `profile_stage` prints the top
operators of one stage. Models are built from a recipe's configs with random weights (speed does
not depend on the weights), so the bench needs no data and no trained run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from evaluation import Classifier, ClassifierConfig, extract_features, get_extractor, inception_available
from recipes.recipe import Recipe, check_generator
from recipes.run import software_versions, sync
from recipes.stages import generator_config, memory_estimate, random_batch
from vqdiff.memory import available_bytes
from vqdiff.options import DEFAULTS
from vqdiff.precision import model_autocast, sample_dtype, use_attention, use_sample_precision
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import make_optimizer

STAGES = ("tokenizer", "ar", "diffusion", "sample-ar", "sample-diffusion", "decode", "features")


@dataclass(frozen=True)
class SpeedPath:
    """The kernels and precisions a bench row ran with."""

    name: str
    attention: str  # vqdiff.precision.ATTENTION_PATHS
    precision: dict[str, str]  # per model kind, overriding the recipe's `precision` ({}: the recipe's);
    # "sample": the sampling loops' precision (vqdiff.precision.use_sample_precision; default the rule)
    compile: bool | None = None  # a training step's loss under torch.compile (None: the recipe's `compile`)


NEW = SpeedPath("new", attention="auto", precision={})
# before the speed rules: SDPA's own kernel everywhere, the tokenizer in fp32 on a CPU ("auto"),
# sampling in fp32, no torch.compile
TODAY = SpeedPath("today", attention="sdpa", precision={"tokenizer": "auto", "sample": "fp32"}, compile=False)


@contextlib.contextmanager
def on_path(path: SpeedPath) -> Iterator[None]:
    with use_attention(path.attention), use_sample_precision(path.precision.get("sample", "fast")):
        yield


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


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the peak the achieved FLOP/s is compared with."""
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


def _model(models: BenchModels, kind: str) -> torch.nn.Module:
    return models.tokenizer if kind == "tokenizer" else models.generators[kind]


# ------------------------------------------------------------------ the stages, one call each


def train_call(models: BenchModels, recipe: Recipe, kind: str, device: torch.device, path: SpeedPath) -> tuple[Callable[[], None], dict]:
    """One training step of `kind` (forward, backward, AdamW) as the training loop runs it, and its row's fields."""
    model = _model(models, kind)
    tc = recipe.train_config(kind)
    if kind in path.precision:
        tc = dataclasses.replace(tc, precision=path.precision[kind])
    amp = model_autocast(model, tc.precision, device)
    opt = make_optimizer(model, tc, device)
    batch = random_batch(kind, model, tc.batch_size, device)
    compiled = tc.compile if path.compile is None else path.compile
    # the training loop's own choice (vqdiff.train): the bound method compiled, the module left plain
    loss_fn = torch.compile(model.loss) if compiled else model.loss

    def step(loss_fn: Callable = loss_fn) -> None:
        model.train()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _ = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with on_path(path):
        est = memory_estimate(kind, model, tc, device)
    info = {"batch": tc.batch_size, "dtype": str(amp or torch.float32).removeprefix("torch."), "compiled": compiled,
            # FLOPs are counted on the eager step: the counter does not see inside compiled kernels
            "eager_call": (lambda: step(model.loss)) if compiled else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "memory_estimate_bytes": est.peak(), "memory_available_bytes": available_bytes()}  # fmt: skip
    return step, info


def sample_call(models: BenchModels, kind: str, b: int, cfg: float, steps: int, cache: bool = True) -> tuple[Callable[[], Any], dict]:
    model = models.generators[kind]
    gen = torch.Generator().manual_seed(0)  # on the CPU, as `vqdiff.pipeline` samples
    labels = 3 if cfg != 1.0 else None
    options = DEFAULTS.replace(steps=steps, cfg=cfg)
    if kind == "ar":
        call = lambda: model.sample(b, options, labels=labels, use_cache=cache, generator=gen)  # noqa: E731
        info = {"kv_cache": cache, "steps": None, "forward_passes": model.forward_passes(options)}
    else:
        call = lambda: model.sample(b, options, labels=labels, generator=gen)  # noqa: E731
        info = {"kv_cache": None, "steps": steps, "forward_passes": model.forward_passes(options)}
    return call, {"batch": b, "cfg": cfg, **info}


def decode_call(models: BenchModels, b: int, device: torch.device) -> tuple[Callable[[], Any], dict]:
    ids = torch.randint(0, models.tokenizer.cfg.codebook_size, (b, *models.tokenizer.grid), device=device)
    return lambda: models.tokenizer.decode(ids), {"batch": b, "dtype": "float32"}


def measure(what: str, calls: list[tuple[SpeedPath, Callable[[], Any], dict]], device: torch.device, min_seconds: float,
            items: int, max_reps: int = 50, rounds: int = 3) -> list[dict]:  # fmt: skip
    """One row per path: seconds per call (the fastest of `rounds` rounds, the paths taking turns, so
    that a load that comes and goes on the machine falls on all of them alike), FLOPs per call and their rate."""
    flops, best = [], [float("inf")] * len(calls)
    for path, call, info in calls:
        with on_path(path):
            flops.append(count_flops(info.pop("eager_call", None) or call))
    for _ in range(rounds if len(calls) > 1 else 1):
        for i, (path, call, _) in enumerate(calls):
            with on_path(path):
                best[i] = min(best[i], timeit(call, device, min_seconds, max_reps=max_reps))
    return [
        {"what": what, "path": path.name, **info, "seconds": s, "items_per_second": items / s,
         "flop_per_call": f, "achieved_flops": f / s}  # fmt: skip
        for (path, _, info), f, s in zip(calls, flops, best)
    ]


def bench_training(models: BenchModels, recipe: Recipe, device: torch.device, paths: list[SpeedPath], min_seconds=2.0) -> list[dict]:
    rows = []
    for kind in ("tokenizer", "ar", "diffusion"):
        calls = []
        for path in paths:
            step, info = train_call(models, recipe, kind, device, path)
            calls.append((path, step, {"stage": "train", **info}))
        rows += measure(kind, calls, device, min_seconds, calls[0][2]["batch"], max_reps=20)
        _model(models, kind).eval()
    return rows


def bench_sampling(models: BenchModels, device: torch.device, paths: list[SpeedPath], batch: int = 64, steps: int = 16,
                   cfgs=(1.0, 3.0), min_seconds=1.0) -> list[dict]:  # fmt: skip
    rows = []
    for kind in ("ar", "diffusion"):
        for cfg in cfgs:
            calls = [(path, *sample_call(models, kind, batch, cfg, steps)) for path in paths]
            calls = [(p, c, {"stage": "sample", **i, "dtype": _sample_dtype_name(p, device)}) for p, c, i in calls]
            rows += measure(f"sample-{kind}", calls, device, min_seconds, batch, max_reps=5)
    call, info = decode_call(models, batch, device)  # the decoder has no attention: one path
    rows += measure("decode", [(paths[-1], call, {"stage": "sample", **info})], device, min_seconds, batch)
    return rows


def _sample_dtype_name(path: SpeedPath, device: torch.device) -> str:
    with on_path(path):
        return str(sample_dtype(device) or torch.float32).removeprefix("torch.")


def bench_features(device: torch.device, channels: int, image_size: int, min_seconds=1.0) -> list[dict]:
    rows = []
    clf = Classifier(ClassifierConfig(channels=channels, num_classes=10, image_size=image_size)).to(device).eval()
    for b in (64, 256):
        x = torch.rand(b, channels, image_size, image_size, device=device)
        with torch.no_grad():
            info = {"stage": "features", "extractor": "classifier", "batch": b, "dtype": "float32"}
            rows += measure("features", [(NEW, lambda: clf(x), info)], device, min_seconds, b)
    imgs = torch.randint(0, 256, (64, 3, image_size, image_size), dtype=torch.uint8)
    if inception_available():
        ext = get_extractor("inception", dataset="cifar10", device=device)
        dtype = "bfloat16" if "bf16" in ext.mode else "float32"
        for b in sorted({16, 32, ext.batch_size}):
            call = lambda: extract_features(imgs[:b], ext, batch_size=b)  # noqa: E731
            info = {"stage": "features", "extractor": f"inception ({ext.mode})", "batch": b, "dtype": dtype}
            rows += measure("features", [(NEW, call, info)], device, min_seconds, b, max_reps=3)
    return rows


def run_bench(recipe: Recipe, device: torch.device, quick: bool = False, compare: bool = False, progress=None) -> dict[str, Any]:
    torch.manual_seed(0)
    channels = 3 if recipe["data"]["dataset"] != "mnist" else 1
    models = build_models(recipe, device, channels=channels)
    min_s = 0.2 if quick else 1.0
    paths = [TODAY, NEW] if compare else [NEW]

    def note(what: str) -> None:
        if progress is not None:
            progress(what)

    note("training")
    training = bench_training(models, recipe, device, paths, min_seconds=2 * min_s)
    note("sampling")
    sampling = bench_sampling(models, device, paths, batch=4 if quick else 64, steps=16, min_seconds=min_s)
    note("features")
    features = bench_features(device, channels, recipe["data"]["image_size"], min_seconds=min_s)
    rows = training + sampling + features
    note("matmul peak")
    peaks = {d: matmul_peak(getattr(torch, d), device, n=512 if quick else 2048) for d in sorted({r["dtype"] for r in rows})}
    for r in rows:
        r["matmul_peak_flops"] = peaks[r["dtype"]]
        r["fraction_of_peak"] = r["achieved_flops"] / peaks[r["dtype"]]
    return {
        "recipe": recipe.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "cpu_capabilities": cpu_capabilities(device),
        "torch": torch.__version__,  # kept for scripts that read it
        "software": software_versions(),
        "training": training,
        "sampling": sampling,
        "features": features,
        "speedups": speedups(rows) if compare else [],
        "matmul_peak_flops": peaks,
    }


def cpu_capabilities(device: torch.device) -> list[str]:
    """The CPU features the speed rules read (AMX, AVX512-BF16), as torch sees them."""
    if device.type != "cpu" or not hasattr(torch.cpu, "get_capabilities"):
        return []
    caps = torch.cpu.get_capabilities()
    return [k for k in ("amx_bf16", "avx512_bf16", "avx512_f") if caps.get(k)]


def speedups(rows: list[dict]) -> list[dict]:
    """New over today, for every row measured on both paths: the same stage, batch and guidance."""
    key = lambda r: (r["what"], r["batch"], r.get("cfg"), r.get("steps"))  # noqa: E731
    today = {key(r): r for r in rows if r["path"] == TODAY.name}
    out = []
    for r in rows:
        if r["path"] == NEW.name and key(r) in today:
            out.append({"what": r["what"], "batch": r["batch"], "cfg": r.get("cfg"), "today_seconds": today[key(r)]["seconds"],
                        "new_seconds": r["seconds"], "time_ratio": r["seconds"] / today[key(r)]["seconds"]})  # fmt: skip
    return out


# ------------------------------------------------------------------ the profile of one stage


def profile_stage(recipe: Recipe, device: torch.device, stage: str, path: SpeedPath = NEW, top: int = 15) -> str:
    """The `top` operators of one call of `stage` by self time on this device (torch.profiler)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    torch.manual_seed(0)
    channels = 3 if recipe["data"]["dataset"] != "mnist" else 1
    models = build_models(recipe, device, channels=channels)
    if stage in ("tokenizer", "ar", "diffusion"):
        call, _ = train_call(models, recipe, stage, device, path)
    elif stage.startswith("sample-"):
        call, _ = sample_call(models, stage.removeprefix("sample-"), 64, 3.0, 16)
    elif stage == "decode":
        call, _ = decode_call(models, 64, device)
    else:
        ext = get_extractor("inception", dataset="cifar10", device=device)
        imgs = torch.randint(0, 256, (ext.batch_size, 3, 32, 32), dtype=torch.uint8)
        call = lambda: extract_features(imgs, ext)  # noqa: E731
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with on_path(path):
        call()  # warm-up
        with torch.profiler.profile(activities=activities) as prof:
            call()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=top)


# ------------------------------------------------------------------ the table


def bench_table(result: dict[str, Any], name: str):
    """`run_bench`'s result as a rich table, for the terminal."""
    from rich.table import Table

    t = Table(title=f"vqdiff bench: {name} on {result['device']}", title_justify="left")
    for col in ("stage", "setting", "path", "batch", "items/s", "ms/call", "GFLOP/call", "TFLOPS", "% of peak", "detail"):
        t.add_column(col, justify="left" if col in ("stage", "setting", "path", "detail") else "right")
    for row in result["training"] + result["sampling"] + result["features"]:
        setting, detail = _setting(row), ""
        if row["stage"] == "train":
            detail = f"memory ~{row['memory_estimate_bytes'] / 2**30:.2f} GiB of {row['memory_available_bytes'] / 2**30:.1f} free"
        t.add_row(
            row["what"], setting, row["path"], str(row["batch"]), f"{row['items_per_second']:.1f}",
            f"{1000 * row['seconds']:.1f}", f"{row['flop_per_call'] / 1e9:.2f}", f"{row['achieved_flops'] / 1e12:.3f}",
            f"{100 * row['fraction_of_peak']:.1f}", detail,
        )  # fmt: skip
    for r in result["speedups"]:
        cfg = f", cfg {r['cfg']:g}" if r.get("cfg") is not None else ""
        t.add_row("new/today", f"{r['what']}{cfg}", "", str(r["batch"]), "", f"x{r['time_ratio']:.2f} time",
                  "", "", "", f"{1 / r['time_ratio']:.2f}x the speed")  # fmt: skip
    peaks = ", ".join(f"{k} {v / 1e12:.3f} TFLOPS" for k, v in result["matmul_peak_flops"].items())
    t.caption = f"matrix-product peak (2048^3): {peaks}; CPU features: {', '.join(result['cpu_capabilities']) or '-'}"
    return t


def _setting(row: dict) -> str:
    if row["stage"] == "train":
        return f"train ({row['parameters'] / 1e6:.2f}M, {row['dtype']}{', compiled' if row.get('compiled') else ''})"
    if row["stage"] == "features":
        return row["extractor"]
    if row["what"] == "decode":
        return "tokenizer"
    if row["what"] == "sample-ar":
        return f"KV cache, cfg {row['cfg']:g}" if row["kv_cache"] else f"no cache, cfg {row['cfg']:g}"
    return f"{row['steps']} steps, cfg {row['cfg']:g}"
