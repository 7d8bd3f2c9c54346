"""The `vqdiff` command line: a thin Typer shell over `recipes.stages`.

Domain errors (a bad recipe, missing data, a corrupt checkpoint, a bad option) print one red
line and exit with code 1; tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from recipes import stages
from recipes.checks import check_device
from recipes.lock import run_lock
from recipes.progress import batch_logger, generator_stage, progress_bars, tokenizer_stage
from recipes.recipe import RecipeError, load_recipe  # noqa: F401  (RecipeError: for scripts)
from vqdiff.diffusion import DEFAULT_CHOICE_TEMPERATURE

app = typer.Typer(
    name="vqdiff",
    help="Train a VQ-VAE tokenizer, a next-token and a discrete diffusion generator, and compare them by FID.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from vqdiff import __version__

        print(f"vqdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train a VQ-VAE tokenizer, a next-token and a discrete diffusion generator, and compare them by FID."""


train_app = typer.Typer(help="Train one model of a recipe.", no_args_is_help=True)
app.add_typer(train_app, name="train")
from recipes.errors import USER_OS_ERRORS, Terminated, console, edge, fail, out, user_errors  # noqa: E402,F401  (re-exported)
progress_bar = functools.partial(progress_bars, console)


# ------------------------------------------------------------------ shared options

RecipeArg = Annotated[str, typer.Argument(help="A bundled recipe name (quickstart, mnist, cifar10, shapes) or a path to a .toml.")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="The run folder. [default: runs/<recipe name>]")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")
]
DataRootOpt = Annotated[
    Optional[str],
    typer.Option("--data-root", help="Where datasets live. [default: $VQDIFF_DATA_ROOT, else ~/.cache/vqdiff/data]"),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")]
SampleScheduleOpt = Annotated[
    Optional[str],
    typer.Option(
        "--sample-schedule",
        help="Diffusion: the schedule the steps follow, cosine | linear | square | cubic (how many tokens stay "
        "masked after each step). [default: the recipe's diffusion.sample_schedule, else the trained schedule]",
    ),
]
RunArg = Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")]



def _context(recipe_name: str, run_dir: Optional[Path], sets, data_root, device) -> tuple:
    recipe = load_recipe(recipe_name, sets or [])
    ctx = stages.Context(run_dir or stages.default_run_dir(recipe), data_root, check_device(device))
    join_torchrun(ctx.device)
    return recipe, ctx


def join_torchrun(device: Optional[str]) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group; ranks other than 0 print nothing.
    True when this process is one of several."""
    from vqdiff import distributed

    if not distributed.init_from_env(device):
        return False
    if not distributed.is_main():
        console.quiet = out.quiet = True  # rank 0 alone draws progress bars and prints results
    return True


def writer_lock(run_dir: Path, **kw):
    """The run folder's write lock, taken by rank 0 alone: the other ranks of a torchrun job are
    the same writer (they write nothing), and would otherwise find the folder locked."""
    from vqdiff import distributed

    return run_lock(run_dir, **kw) if distributed.is_main() else contextlib.nullcontext()


# ------------------------------------------------------------------ train


@train_app.command("tokenizer")
def train_tokenizer(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train the VQ-VAE tokenizer, then write tokenizer/metrics.json and reconstructions.png."""
    with edge():
        r, ctx = _context(recipe, run_dir, set_, data_root, device)
        with writer_lock(ctx.run_dir):
            stages.write_recipe(r, ctx.run_dir)
            with progress_bar() as p:
                metrics = tokenizer_stage(p, r, ctx)
        out.print(
            f"tokenizer: psnr {metrics['psnr']:.2f} dB, codebook usage {metrics['codebook_usage']:.3f}, "
            f"perplexity {metrics['perplexity']:.1f} -> {ctx.run_dir / 'tokenizer'}"
        )


@app.command("encode")
def encode(run: RunArg, data_root: DataRootOpt = None, device: DeviceOpt = None) -> None:
    """Encode the train and test splits into token grids in RUN/tokens/."""
    with edge():
        ctx = stages.Context(run, data_root, check_device(device))
        join_torchrun(ctx.device)
        from vqdiff.distributed import barrier, is_main

        with writer_lock(run, create=False), progress_bar() as p:
            # under torchrun rank 0 encodes (one writer); encoding is a small part of a run
            meta = stages.encode_dataset(ctx, batch_logger(p, "encode")) if is_main() else None
            barrier()
        if meta is None:
            return
        out.print(
            f"tokens: {meta['num_train']} train and {meta['num_test']} test grids of "
            f"{meta['grid'][0]}x{meta['grid'][1]} -> {run / 'tokens'}"
        )


def _train_generator(kind: str, recipe, run_dir, set_, data_root, device) -> None:
    with edge():
        r, ctx = _context(recipe, run_dir, set_, data_root, device)
        stages.tokenizer_meta(ctx.run_dir)  # fail before writing a recipe into a run without a tokenizer
        with writer_lock(ctx.run_dir):
            stages.write_recipe(r, ctx.run_dir)
            with progress_bar() as p:
                metrics = generator_stage(p, kind, r, ctx)
        what = "exact" if metrics["kind"] == "exact" else "ELBO bound"
        out.print(
            f"{kind}: {metrics['bits_per_token']:.3f} bits per token on the test split ({what}) -> {ctx.run_dir / kind}",
            soft_wrap=True,
        )


@train_app.command("ar")
def train_ar(
    recipe: RecipeArg, run_dir: RunDirOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None, device: DeviceOpt = None
) -> None:
    """Train the next-token generator on RUN/tokens (encoding the dataset first if needed)."""
    _train_generator("ar", recipe, run_dir, set_, data_root, device)


@train_app.command("diffusion")
def train_diffusion(
    recipe: RecipeArg, run_dir: RunDirOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None, device: DeviceOpt = None
) -> None:
    """Train the discrete diffusion generator on RUN/tokens (encoding the dataset first if needed)."""
    _train_generator("diffusion", recipe, run_dir, set_, data_root, device)


@app.command("sample")
def sample(
    run: RunArg,
    generator: Annotated[str, typer.Option("--generator", "-g", help="ar or diffusion.")] = "diffusion",
    num: Annotated[int, typer.Option("--num", "-n", help="How many images.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature, > 0.")] = 1.0,
    steps: Annotated[
        Optional[int], typer.Option("--steps", "-s", help="Diffusion forward passes, 1 to 1024 (AR ignores it).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives the same images.")] = 0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens (both generators).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling (both generators).")] = None,
    class_: Annotated[Optional[int], typer.Option("--class", help="Class to generate (conditional models).")] = None,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = none).")] = 1.0,
    prefix_rows: Annotated[int, typer.Option("--prefix-rows", help="AR: keep the first R token rows of test images.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder. [default: RUN/samples/GEN-tT-sS]")] = None,
    gif: Annotated[bool, typer.Option("--gif", help="Diffusion: write trajectory.gif, the grid after every step.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per sampling batch.")] = 64,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="AR: recompute every step without the KV cache.")] = False,
    choice_temperature: Annotated[
        float, typer.Option("--choice-temperature", help="Diffusion (mask): Gumbel noise on the confidences, MaskGIT's 4.5.")
    ] = DEFAULT_CHOICE_TEMPERATURE,
    sampler: Annotated[
        Optional[str],
        typer.Option("--sampler", help="Diffusion (mask): maskgit | ancestral | halton. [default: the recipe's diffusion.sampler]"),
    ] = None,
    eta: Annotated[
        Optional[float], typer.Option("--eta", help="Diffusion, ancestral sampler: ReMDM remasking in [0, 1]. [default: the recipe's]")
    ] = None,
    sample_schedule: SampleScheduleOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Sample images from a trained generator: PNGs, grid.png and (diffusion, --gif) trajectory.gif."""
    with edge():
        if generator == "ar" and steps is not None:
            console.print("note: the ar generator ignores --steps (it takes one forward pass per token)")
        sampler, eta, sample_schedule = stages.recipe_sampler(run, sampler, eta, sample_schedule)
        spec = stages.SampleSpec(
            generator=generator, num=num, temperature=temperature, steps=steps if steps is not None else 8, seed=seed,
            top_k=top_k, top_p=top_p, class_=class_, cfg=cfg, prefix_rows=prefix_rows, batch_size=batch_size,
            use_cache=not no_cache, choice_temperature=choice_temperature, sampler=sampler, eta=eta,
            sample_schedule=sample_schedule if generator == "diffusion" else None,
        )  # fmt: skip
        spec.validate()
        if gif and generator != "diffusion":
            console.print("note: --gif is for the diffusion generator; ignored")
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            fail(f"--out {out_dir} is a file; give a folder")
        ctx = stages.Context(run, None, check_device(device))
        join_torchrun(ctx.device)  # under torchrun: the batches are shared by the ranks
        # samples written into the run folder make this a writer; `--out elsewhere` only reads the run
        # (prefix rows come from RUN/tokens, which is written first when missing)
        writes_run = out_dir is None or _inside(out_dir, run) or (prefix_rows > 0 and not stages.tokens_current(run))
        lock = writer_lock(run, create=False) if writes_run else contextlib.nullcontext()
        with lock, progress_bar() as p:
            result = stages.generate(ctx, spec, out=out_dir, gif=gif and generator == "diffusion", on_batch=batch_logger(p, f"sample {generator}"))
        out.print(
            f"{num} images from {generator} at {result.images_per_second:.1f} images/s "
            f"({result.forward_passes} forward passes each) -> {result.folder}",
            soft_wrap=True,
        )


from recipes.commands import edit as edit_cmd  # noqa: E402

app.command("edit")(edit_cmd.edit)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _csv(value: Optional[str], cast, what: str):
    if value is None:
        return None
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        fail(f"{what}: expected a comma-separated list, got {value!r}")


def print_report(report: dict) -> None:
    from recipes.report import results_table

    out.print(results_table(report))
    if report.get("reference"):
        out.print(f"reference set: {report['reference']}", soft_wrap=True)
    if report.get("isc_omitted"):
        out.print(report["isc_omitted"], soft_wrap=True)
    out.print(f"report -> {Path(report['run']) / 'report' / 'report.md'}", soft_wrap=True)


def _evaluate(ctx: "stages.Context", opts: "stages.EvalOptions", checkpoints: bool = False) -> dict:
    with progress_bar() as p:
        if checkpoints:  # first, so that the report shows the learning curves
            stages.learning_curve(ctx, opts, bars=lambda d: batch_logger(p, d))
        report = stages.evaluate(ctx, opts, bars=lambda d: batch_logger(p, d))
    print_report(report)
    return report


ExtractorOpt = Annotated[
    Optional[str], typer.Option("--extractor", help="classifier | inception | auto. [default: the recipe's, auto]")
]
InceptionOpt = Annotated[
    Optional[str],
    typer.Option("--inception-weights", help="Local Inception weights for standard FID. [default: $VQDIFF_INCEPTION_WEIGHTS]"),
]


@app.command("evaluate")
def evaluate(
    run: RunArg,
    generators: Annotated[Optional[str], typer.Option("--generators", help="Comma list: ar,diffusion.")] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Samples per generator and setting.")] = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="Diffusion steps, comma list, e.g. 4,8,16.")] = None,
    temperatures: Annotated[Optional[str], typer.Option("--temperatures", help="Comma list, e.g. 0.8,1.0.")] = None,
    extractor: ExtractorOpt = None,
    inception_weights: InceptionOpt = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale for conditional generators.")] = None,
    sampler: Annotated[
        Optional[str],
        typer.Option("--sampler", help="Diffusion (mask) samplers, comma list: maskgit,ancestral,halton. [default: the recipe's]"),
    ] = None,
    eta: Annotated[Optional[float], typer.Option("--eta", help="ReMDM remasking for the ancestral sampler, in [0, 1].")] = None,
    sample_schedule: SampleScheduleOpt = None,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens, both generators (0 = off). [default: the recipe's]")
    ] = None,
    top_p: Annotated[
        Optional[float], typer.Option("--top-p", help="Nucleus sampling, both generators (1 = off). [default: the recipe's]")
    ] = None,
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints",
            help="Also measure the weights kept every keep_every steps: FID against training steps and time "
            "for both generators (report/curve.json, learning_curve.png).",
        ),
    ] = False,
    edits: Annotated[
        bool,
        typer.Option(
            "--edits",
            help="Measure edits instead of sampling: inpainting (centre, bottom) and outpainting (border) of the first "
            "--num test images; FID, PSNR of the kept area, kept-token exactness (report/edits.json, edits.md).",
        ),
    ] = False,
    data_root: DataRootOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Sample each generator and setting, compute FID/KID/precision/recall, write RUN/report/."""
    with edge():
        ctx = stages.Context(run, data_root, check_device(device))
        join_torchrun(ctx.device)  # under torchrun: sampling and feature extraction shared by the ranks
        recipe = stages.read_run_recipe(run)
        opts = stages.EvalOptions.from_recipe(
            recipe,
            generators=_csv(generators, str, "--generators"),
            num=num,
            steps=_csv(steps, int, "--steps"),
            temperatures=_csv(temperatures, float, "--temperatures"),
            extractor=extractor,
            inception_weights=inception_weights,
            cfg=cfg,
            samplers=_csv(sampler, str, "--sampler"),
            eta=eta,
            sample_schedule=sample_schedule,
            top_k=top_k,
            top_p=top_p,
        )
        with writer_lock(run, create=False):
            if edits:
                from recipes.edits import evaluate_edits, edits_markdown

                with progress_bar() as p:
                    report = evaluate_edits(ctx, opts, bars=lambda d: batch_logger(p, d))
                out.print(edits_markdown(report), soft_wrap=True)
                return
            _evaluate(ctx, opts, checkpoints)


@app.command("run")
def run_all(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOpt = None,
    extractor: ExtractorOpt = None,
    inception_weights: InceptionOpt = None,
) -> None:
    """Every stage in order: tokenizer, encode, ar, diffusion, evaluate. Finished stages are skipped,
    an interrupted one resumes."""
    import time

    with edge(), contextlib.ExitStack() as held:
        t0 = time.perf_counter()
        r, ctx = _context(recipe, run_dir, set_, data_root, device)
        opts = stages.EvalOptions.from_recipe(r, extractor=extractor, inception_weights=inception_weights)
        held.enter_context(writer_lock(ctx.run_dir))  # every stage of the run, as one writer
        stages.write_recipe(r, ctx.run_dir)
        timings = {}
        with progress_bar() as p:
            t = time.perf_counter()
            m = tokenizer_stage(p, r, ctx)
            timings["tokenizer"] = time.perf_counter() - t
            p.console.print(f"tokenizer: psnr {m['psnr']:.2f} dB, codebook usage {m['codebook_usage']:.3f}")
            t = time.perf_counter()
            stages.ensure_tokens(ctx, batch_logger(p, "encode"))
            timings["encode"] = time.perf_counter() - t
            for kind in stages.GENERATORS:
                t = time.perf_counter()
                m = generator_stage(p, kind, r, ctx)
                timings[kind] = time.perf_counter() - t
                p.console.print(f"{kind}: {m['bits_per_token']:.3f} bits per token ({m['kind']})")
        t = time.perf_counter()  # under torchrun every rank evaluates its share (sampling, features)
        _evaluate(ctx, opts, checkpoints=any(r[g]["keep_every"] > 0 for g in opts.generators))
        timings["evaluate"] = time.perf_counter() - t
        total = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        out.print(f"run {r.name} finished in {total / 60:.1f} min ({parts})", soft_wrap=True)


@app.command("bench")
def bench(
    recipe: Annotated[str, typer.Argument(help="Recipe whose model sizes are measured.")] = "quickstart",
    set_: SetOpt = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="JSON file. [default: runs/bench-<recipe>.json]")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Short timings (a smoke run, not a measurement).")] = False,
    device: DeviceOpt = None,
    run: Annotated[Optional[Path], typer.Argument(help="With RECIPE = compress: the run whose codec is measured.")] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="compress: test images (0 = all). [default: 1000]")] = None,
) -> None:
    """Sampling images/s (batch 1 and 64), training tokens/s and FLOP/s against a matmul peak, feature images/s.
    `vqdiff bench compress RUN`: the run's codec against PNG, WebP and JPEG on the test split."""
    if recipe == "compress":  # the coder runs on the CPU in fp32 by design, so --device does not apply
        return codec.bench(run, out_path, num, quick)
    if run is not None or num is not None:
        fail("a run folder and --num are for `vqdiff bench compress RUN`")

    from recipes.bench import bench_table, run_bench
    from vqdiff.checkpoint import default_device, write_json

    with edge():
        r = load_recipe(recipe, set_ or [])
        dev = default_device(check_device(device))
        result = run_bench(r, dev, quick=quick, progress=lambda what: console.print(f"bench: {what}..."))
        path = out_path or Path("runs") / f"bench-{r.name}.json"
        write_json(path, result)
        out.print(bench_table(result, r.name))
        out.print(f"bench -> {path}", soft_wrap=True)


from recipes import codec  # noqa: E402  (compress, decompress: registered here, defined there)

codec.register(app)
from recipes.commands import demo as demo_cmd  # noqa: E402

app.command("demo")(demo_cmd.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
