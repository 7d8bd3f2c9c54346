"""`vqdiff sample`: images from a trained generator, with the sampling options the user picks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from recipes.commands.common import (
    CfgOpt, CfgScheduleOpt, DeviceOpt, GifOpt, RunArg, SampleScheduleOpt, SamplerOpt, SeedOpt, StepsOpt, TemperatureOpt, open_run, progress_log,
    writer_lock,
)  # fmt: skip
from recipes.console import batch_logger, console, edge, fail, out, progress_bars
from recipes.recipe import resolve_options
from recipes.run import Run, tokens_current
from recipes.sampling import SampleSpec, generate


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def sample(
    run: RunArg,
    generator: Annotated[str, typer.Option("--generator", "-g", help="ar or diffusion.")] = "diffusion",
    num: Annotated[int, typer.Option("--num", "-n", help="How many images.")] = 64,
    temperature: TemperatureOpt = None,
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens (both generators).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling (both generators).")] = None,
    class_: Annotated[Optional[int], typer.Option("--class", help="Class to generate (conditional models).")] = None,
    cfg: CfgOpt = None,
    cfg_schedule: CfgScheduleOpt = None,
    prefix_rows: Annotated[int, typer.Option("--prefix-rows", help="AR: keep the first R token rows of test images.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder. [default: RUN/samples/GEN-tT-sS]")] = None,
    gif: GifOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per sampling batch.")] = 64,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="AR: recompute every step without the KV cache.")] = False,
    choice_temperature: Annotated[
        Optional[float], typer.Option("--choice-temperature", help="Diffusion (mask): Gumbel noise on the confidences. [default: MaskGIT's scale, vqdiff.options]")
    ] = None,
    sampler: SamplerOpt = None,
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
        options = resolve_options(
            Run(run).read_recipe(missing_ok=True), generator, temperature=temperature, steps=steps, top_k=top_k,
            top_p=top_p, cfg=cfg, cfg_schedule=cfg_schedule, sampler=sampler, eta=eta, sample_schedule=sample_schedule, choice_temperature=choice_temperature,
        )  # fmt: skip
        spec = SampleSpec(
            generator=generator, options=options, num=num, seed=seed, class_=class_, prefix_rows=prefix_rows,
            batch_size=batch_size, use_cache=not no_cache,
        )  # fmt: skip
        spec.validate()
        if gif and generator != "diffusion":
            console.print("note: --gif is for the diffusion generator; ignored")
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            fail(f"--out {out_dir} is a file; give a folder")
        r = open_run(run, None, device)  # under torchrun: the batches are shared by the ranks
        # samples written into the run folder make this a writer; `--out elsewhere` only reads the run
        # (prefix rows come from RUN/tokens, which is written first when missing)
        writes_run = out_dir is None or _inside(out_dir, run) or (prefix_rows > 0 and not tokens_current(r))
        lock = writer_lock(run, create=False) if writes_run else contextlib.nullcontext()
        with lock, progress_bars(log_path=progress_log(r) if writes_run else None) as p:
            result = generate(r, spec, out=out_dir, gif=gif and generator == "diffusion", on_batch=batch_logger(p, f"sample {generator}"))
        out.print(
            f"{num} images from {generator} at {result.images_per_second:.1f} images/s "
            f"({result.forward_passes} forward passes each) -> {result.folder}",
            soft_wrap=True,
        )
