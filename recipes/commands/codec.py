"""`vqdiff compress`, `vqdiff decompress` and `vqdiff bench compress`: the run's tokenizer and AR prior
as an image codec (recipes.codec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from recipes.codec import SUFFIX, Codec, _check_files, find_codec, png_bytes, run_codec_bench
from recipes.console import console, edge, fail
from recipes.console import out as stdout  # `out` is the commands' output folder
from recipes.run import StageError
from vqdiff.io import write_bytes
from vqdiff.compress import CompressError, read_header
from vqdiff.data import load_image  # the folder dataset's loader: compress sees what training saw

RunArg = Annotated[Path, typer.Argument(help="A run folder with a tokenizer and an ar generator, e.g. runs/mnist.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (created if missing).")]


def compress(
    run: RunArg,
    images: Annotated[list[Path], typer.Argument(help="Image files (png, jpg, ...); resized and centre-cropped to the run's size.")],
    out: OutOpt,
    class_: Annotated[
        Optional[int], typer.Option("--class", help="Code under this class (conditional models). [default: the null class]")
    ] = None,
) -> None:
    """Compress images into .vqd files (one per image): tokenizer ids range-coded under the AR prior."""
    with edge():
        _check_files(images, "image")
        codec = Codec(run)
        codec.check_class(class_)
        cfg = codec.tokenizer.cfg
        pixels = torch.stack([load_image(p, cfg.image_size, cfg.channels) for p in images])  # uint8 [b c H W]
        ids = codec.encode_images(pixels)
        total = overhead = 0
        for path, grid in zip(images, ids):
            data = codec.compress(grid, class_).data
            write_bytes(out / f"{path.stem}{SUFFIX}", data)
            total += len(data)
            overhead += read_header(data).overhead
        tokens = len(images) * ids.shape[1] * ids.shape[2]
        stdout.print(
            f"{len(images)} images -> {out}: {total / len(images):.1f} bytes per image "
            f"({8 * (total - overhead) / tokens:.3f} bits per token + {overhead / len(images):.0f} bytes of header and checks)",
            soft_wrap=True,
        )


def decompress(
    files: Annotated[
        list[Path], typer.Argument(help=f"{SUFFIX} files made by `vqdiff compress` (a run folder first is taken as --run).")
    ],
    out: OutOpt,
    run: Annotated[
        Optional[Path],
        typer.Option("--run", help="The run that compressed them. [default: the folder under runs/ whose weights match]"),
    ] = None,
) -> None:
    """Decompress .vqd files into PNGs, with the run whose tokenizer and AR weights made them."""

    with edge():
        if run is None and files and files[0].is_dir():  # `decompress RUN FILES...` reads as well
            run, files = files[0], files[1:]
        if not files:
            raise StageError(f"no {SUFFIX} files given")
        _check_files(files, "file")
        codec = Codec(run) if run is not None else find_codec(files[0])
        for path in files:
            try:
                ids, _ = codec.decompress(path.read_bytes())
            except CompressError as e:
                raise CompressError(f"{path}: {e}") from None
            image = codec.decode_ids(ids[None])[0]
            write_bytes(out / f"{path.stem}.png", png_bytes(image))
        stdout.print(f"{len(files)} files -> {out}", soft_wrap=True)


def bench_compress(
    run: RunArg,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="JSON file. [default: runs/bench-compress-<run>.json]")] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Test images (0 = all). [default: 1000]")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="16 images (a smoke run, not a measurement).")] = False,
) -> None:
    """The run's codec against PNG, WebP and JPEG on the test split (the coder runs on the CPU in fp32)."""
    with edge():
        if num is not None and num < 0:
            fail(f"--num must be >= 0 (0 = the whole test split), got {num}")
        result = run_codec_bench(run, num, quick, progress=lambda what: console.print(f"bench: {what}..."))
        path = out_path or Path("runs") / f"bench-compress-{run.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        t = Table(
            title=f"vqdiff bench compress: {result['num_images']} test images of {run}, "
            f"{result['grid'][0]}x{result['grid'][1]} grids of {result['codebook_size']} codes",
            title_justify="left",
        )
        for col in ("codec", "setting", "bytes/image", "bits/token", "PSNR dB", "encode img/s", "decode img/s"):
            t.add_column(col, justify="left" if col in ("codec", "setting") else "right")
        for r in result["vqdiff"]:
            t.add_row(
                "vqdiff", r["conditioning"], f"{r['bytes_per_image']:.1f}", f"{r['bits_per_token']:.3f}",
                f"{result['tokenizer_psnr']:.2f}", f"{r['encode_images_per_second']:.1f}", f"{r['decode_images_per_second']:.1f}",
            )  # fmt: skip
        for name, r, setting in (
            ("PNG", result["png"], "optimize"),
            ("WebP", result["webp"], f"quality {result['webp']['quality']}"),
            ("JPEG", result["jpeg"], f"quality {result['jpeg']['quality']}"),
        ):
            psnr = "lossless" if r["psnr"] is None else f"{r['psnr']:.2f}"
            t.add_row(name, setting, f"{r['bytes_per_image']:.1f}", "", psnr,
                      f"{r['encode_images_per_second']:.1f}", f"{r['decode_images_per_second']:.1f}")  # fmt: skip
        stdout.print(t)
        for r in result["vqdiff"]:
            stdout.print(
                f"vqdiff, {r['conditioning']}: {r['bits_per_token']:.4f} real bits per token (payload; + {r['header_bytes']:.0f} "
                f"bytes of header and checks per file) vs the model's {r['model_bits_per_token']:.4f} on the same grids: "
                f"{100 * r['excess']:+.2f}% (ideal under the integer frequencies {r['ideal_bits_per_token']:.4f}, "
                f"coder termination {r['termination_bytes_per_image']:.2f} bytes per file); "
                f"round trip exact on {r['round_trip_exact']}/{result['num_images']}",
                soft_wrap=True,
            )
        stdout.print(f"bench -> {path}", soft_wrap=True)
