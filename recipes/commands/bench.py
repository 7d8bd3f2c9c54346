"""`vqdiff bench [RECIPE]`: speeds of the recipe's models; `vqdiff bench compress RUN`: the run's codec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from recipes.bench import STAGES, bench_table, profile_stage, run_bench
from recipes.checks import check_device
from recipes.commands.codec import bench_compress
from recipes.commands.common import DeviceOpt, SetOpt
from recipes.console import console, edge, out
from recipes.recipe import load_recipe
from vqdiff.distributed import default_device
from vqdiff.io import write_json


class BenchGroup(TyperGroup):
    """`bench` is a group whose default sub-command is `recipe`: `vqdiff bench mnist --quick` reads as
    `vqdiff bench recipe mnist --quick`, and `vqdiff bench compress RUN` is the codec's sub-command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["recipe", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=BenchGroup,
    help="Speeds: `vqdiff bench [RECIPE]` for the recipe's models, `vqdiff bench compress RUN` for a run's codec.",
)


@bench_app.command("recipe")
def bench_recipe(
    recipe: Annotated[str, typer.Argument(help="Recipe whose model sizes are measured.")] = "quickstart",
    set_: SetOpt = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="JSON file. [default: runs/bench-<recipe>.json]")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Short timings (a smoke run, not a measurement).")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also run training and sampling on the kernels and precisions before the speed rules, and give the ratios.")] = False,
    profile: Annotated[Optional[str], typer.Option("--profile", metavar="STAGE", help=f"Print the top operators of one stage instead: {', '.join(STAGES)}.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Every stage's speed, FLOPs and share of the matmul peak: training steps, sampling (CFG 1 and 3), decoding, features."""
    with edge():
        r = load_recipe(recipe, set_ or [])
        dev = default_device(check_device(device))
        if profile is not None:
            if profile not in STAGES:
                raise typer.BadParameter(f"--profile must be one of {', '.join(STAGES)}, got {profile!r}")
            out.print(profile_stage(r, dev, profile), soft_wrap=True)
            return
        result = run_bench(r, dev, quick=quick, compare=compare, progress=lambda what: console.print(f"bench: {what}..."))
        path = out_path or Path("runs") / f"bench-{r.name}.json"
        write_json(path, result)
        out.print(bench_table(result, r.name))
        out.print(f"bench -> {path}", soft_wrap=True)


bench_app.command("compress")(bench_compress)
