"""The `vqdiff` command line: a thin Typer shell over `recipes.stages`.

Domain errors (a bad recipe, missing data, a corrupt checkpoint, a bad option) print one red
line and exit with code 1; tracebacks are for bugs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from recipes import stages
from recipes.recipe import RecipeError, load_recipe

app = typer.Typer(
    name="vqdiff",
    help="Train a VQ-VAE tokenizer, a next-token and a discrete diffusion generator, and compare them by FID.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train one model of a recipe.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True)
out = Console()


# ------------------------------------------------------------------ shared options

RecipeArg = Annotated[str, typer.Argument(help="A bundled recipe name (quickstart, mnist, shapes) or a path to a .toml.")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="The run folder. [default: runs/<recipe name>]")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")
]
DataRootOpt = Annotated[
    Optional[str],
    typer.Option("--data-root", help="Where datasets live. [default: $VQDIFF_DATA_ROOT, else ~/.cache/vqdiff/data]"),
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]")]
RunArg = Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")]


def user_errors() -> tuple[type[BaseException], ...]:
    from vqdiff.checkpoint import CheckpointError
    from vqdiff.data import DataError

    errors: list[type[BaseException]] = [RecipeError, stages.StageError, CheckpointError, DataError]
    try:
        from evaluation import EvaluationError

        errors.append(EvaluationError)
    except ImportError:
        pass
    return tuple(errors)


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Turn domain errors into one red line and exit code 1."""
    try:
        yield
    except user_errors() as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: the last checkpoint is kept; run the same command to resume")
        raise typer.Exit(130) from None


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as p:
        yield p


def train_logger(p: Progress, description: str, total: int, unit: str):
    """An on_log callback that draws a bar; the task appears with the first log (not before errors)."""
    task = None

    def on_log(step: int, logs: dict) -> None:
        nonlocal task
        if task is None:
            task = p.add_task(description, total=total, info="")
        extra = f" psnr {logs['psnr']:.2f}" if "psnr" in logs else ""
        extra += f" usage {logs['usage']:.2f}" if "usage" in logs else ""
        p.update(task, completed=step, info=f"loss {logs['loss']:.4f}{extra} | {logs['items_per_s']:.0f} {unit}/s")

    return on_log


def batch_logger(p: Progress, description: str):
    """An on_batch(done, total) callback that draws a bar from its first call on."""
    task = None

    def on_batch(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = p.add_task(description, total=total, info="")
        p.update(task, completed=done, total=total)

    return on_batch


def _context(recipe_name: str, run_dir: Optional[Path], sets, data_root, device) -> tuple:
    recipe = load_recipe(recipe_name, sets or [])
    ctx = stages.Context(run_dir or stages.default_run_dir(recipe), data_root, device)
    return recipe, ctx


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
        stages.write_recipe(r, ctx.run_dir)
        with progress_bar() as p:
            metrics = stages.train_tokenizer(
                r,
                ctx,
                on_log=train_logger(p, "tokenizer", r["tokenizer"]["steps"], "img"),
                on_eval=batch_logger(p, "test split"),
            )
        out.print(
            f"tokenizer: psnr {metrics['psnr']:.2f} dB, codebook usage {metrics['codebook_usage']:.3f}, "
            f"perplexity {metrics['perplexity']:.1f} -> {ctx.run_dir / 'tokenizer'}"
        )


@app.command("encode")
def encode(run: RunArg, data_root: DataRootOpt = None, device: DeviceOpt = None) -> None:
    """Encode the train and test splits into token grids in RUN/tokens/."""
    with edge():
        ctx = stages.Context(run, data_root, device)
        with progress_bar() as p:
            meta = stages.encode_dataset(ctx, batch_logger(p, "encode"))
        out.print(
            f"tokens: {meta['num_train']} train and {meta['num_test']} test grids of "
            f"{meta['grid'][0]}x{meta['grid'][1]} -> {run / 'tokens'}"
        )


def _train_generator(kind: str, recipe, run_dir, set_, data_root, device) -> None:
    with edge():
        r, ctx = _context(recipe, run_dir, set_, data_root, device)
        if not (ctx.run_dir / "tokenizer" / "config.json").exists():
            fail(f"no tokenizer in {ctx.run_dir}; run `vqdiff train tokenizer {recipe}` first")
        stages.write_recipe(r, ctx.run_dir)
        with progress_bar() as p:
            metrics = stages.train_generator(
                kind, r, ctx, on_log=train_logger(p, kind, r[kind]["steps"], "grids"), on_batch=batch_logger(p, "encode")
            )
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
    steps: Annotated[Optional[int], typer.Option("--steps", "-s", help="Diffusion forward passes (AR ignores it).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed gives the same images.")] = 0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="AR: keep the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="AR: nucleus sampling.")] = None,
    class_: Annotated[Optional[int], typer.Option("--class", help="Class to generate (conditional models).")] = None,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale (1 = none).")] = 1.0,
    prefix_rows: Annotated[int, typer.Option("--prefix-rows", help="AR: keep the first R token rows of test images.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder. [default: RUN/samples/GEN-tT-sS]")] = None,
    gif: Annotated[bool, typer.Option("--gif", help="Diffusion: write trajectory.gif, the grid after every step.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per sampling batch.")] = 64,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="AR: recompute every step without the KV cache.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Sample images from a trained generator: PNGs, grid.png and (diffusion, --gif) trajectory.gif."""
    with edge():
        if generator == "ar" and steps is not None:
            console.print("note: the ar generator ignores --steps (it takes one forward pass per token)")
        spec = stages.SampleSpec(
            generator=generator, num=num, temperature=temperature, steps=steps if steps is not None else 8, seed=seed,
            top_k=top_k, top_p=top_p, class_=class_, cfg=cfg, prefix_rows=prefix_rows, batch_size=batch_size,
            use_cache=not no_cache,
        )  # fmt: skip
        spec.validate()
        if gif and generator != "diffusion":
            console.print("note: --gif is for the diffusion generator; ignored")
        ctx = stages.Context(run, None, device)
        with progress_bar() as p:
            result = stages.generate(ctx, spec, out=out_dir, gif=gif, on_batch=batch_logger(p, f"sample {generator}"))
        out.print(
            f"{num} images from {generator} at {result.images_per_second:.1f} images/s "
            f"({result.forward_passes} forward passes each) -> {result.folder}",
            soft_wrap=True,
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
