"""What several commands share: their option types, the run folder they open, torchrun and the lock."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from recipes.checks import check_device
from recipes.console import console, out
from recipes.lock import run_lock
from recipes.recipe import Recipe, load_recipe
from recipes.run import Run, default_run_dir
from vqdiff import distributed

RecipeArg = Annotated[str, typer.Argument(help="A bundled recipe name (quickstart, mnist, cifar10, cifar10-large, shapes) or a path to a .toml.")]
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
        "masked after each step). [default: the recipe's, else the trained schedule]",
    ),
]
TemperatureOpt = Annotated[
    Optional[float], typer.Option("--temperature", "-t", help="Sampling temperature, >= 0 (0 = argmax). [default: 1]")
]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", "-s", help="Diffusion forward passes, 1 to 1024 (AR ignores it). [default: 8]")]
SeedOpt = Annotated[int, typer.Option("--seed", help="The same seed gives the same images.")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale (1 = none). [default: 1]")]
CfgScheduleOpt = Annotated[
    Optional[str],
    typer.Option(
        "--cfg-schedule",
        help="How the guidance scale moves: constant, or linear (from 1 at the first token or step to --cfg at "
        "the last). [default: the recipe's, else constant]",
    ),
]
SamplerOpt = Annotated[
    Optional[str],
    typer.Option("--sampler", help="Diffusion (mask): maskgit | ancestral | halton. [default: the recipe's diffusion.sampler]"),
]
GifOpt = Annotated[bool, typer.Option("--gif", help="Diffusion: write trajectory.gif, the grid after every step.")]
RunArg = Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")]
ExtractorOpt = Annotated[
    Optional[str], typer.Option("--extractor", help="classifier | inception | auto. [default: the recipe's, auto]")
]
InceptionOpt = Annotated[
    Optional[str],
    typer.Option("--inception-weights", help="Local Inception weights for standard FID. [default: $VQDIFF_INCEPTION_WEIGHTS]"),
]
PROGRESS_LOG = "progress.log"  # RUN/progress.log: the plain progress lines of every command that writes the run


def open_run(run_dir: Path, data_root: Optional[str], device: Optional[str]) -> Run:
    """The run folder, on the checked device; under torchrun, this process joins the group."""
    run = Run(run_dir, data_root, check_device(device))
    join_torchrun(run.device)
    return run


def recipe_run(recipe_name: str, run_dir: Optional[Path], sets, data_root, device) -> tuple[Recipe, Run]:
    recipe = load_recipe(recipe_name, sets or [])
    return recipe, open_run(run_dir or default_run_dir(recipe), data_root, device)


def join_torchrun(device: Optional[str]) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group; ranks other than 0 print nothing.
    True when this process is one of several."""
    if not distributed.init_from_env(device):
        return False
    if not distributed.is_main():
        console.quiet = out.quiet = True  # rank 0 alone draws progress bars and prints results
    return True


def writer_lock(run_dir: Path, **kw):
    """The run folder's write lock, taken by rank 0 alone: the other ranks of a torchrun job are
    the same writer (they write nothing), and would otherwise find the folder locked."""
    return run_lock(run_dir, **kw) if distributed.is_main() else contextlib.nullcontext()


def progress_log(run: Run) -> Path | None:
    """RUN/progress.log for rank 0 (None on the other ranks: one writer)."""
    return run.run_dir / PROGRESS_LOG if distributed.is_main() else None
