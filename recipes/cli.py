"""The `vqdiff` command line: the Typer app, with one module per command group in recipes.commands.

Domain errors (a bad recipe, missing data, a corrupt checkpoint, a bad option) print one red
line and exit with code 1; tracebacks are for bugs (recipes.console).
"""

from __future__ import annotations

from typing import Annotated

import typer

from recipes.commands import bench, codec, demo, edit, evaluate, sample, train
from vqdiff import __version__

app = typer.Typer(
    name="vqdiff",
    help="Train a VQ-VAE tokenizer, a next-token and a discrete diffusion generator, and compare them by FID.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # help texts are plain: rich markup would eat every "[default: ...]" and the extra in ".[demo]"
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"vqdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train a VQ-VAE tokenizer, a next-token and a discrete diffusion generator, and compare them by FID."""


app.add_typer(train.train_app, name="train")
app.command("encode")(train.encode)
app.command("sample")(sample.sample)
app.command("edit")(edit.edit)
app.command("demo")(demo.demo)
app.command("evaluate")(evaluate.evaluate)
app.command("run")(train.run_all)
app.add_typer(bench.bench_app, name="bench")
app.command("compress")(codec.compress)
app.command("decompress")(codec.decompress)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
