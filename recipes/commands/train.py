"""`vqdiff train tokenizer|ar|diffusion`, `vqdiff encode` and `vqdiff run`: the training stages
(recipes.stages) with their progress, and the whole recipe in order."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import typer
from rich.progress import Progress

from recipes import stages
from recipes.commands.common import (
    DataRootOpt, DeviceOpt, ExtractorOpt, InceptionOpt, RecipeArg, RunArg, RunDirOpt, SetOpt, open_run, progress_log,
    recipe_run, writer_lock,
)  # fmt: skip
from recipes.commands.evaluate import evaluate_and_print
from recipes.console import batch_logger, edge, fail, out, progress_bars, train_logger
from recipes.evaluate import EvalOptions
from recipes.recipe import GENERATORS, Recipe
from recipes.run import Run, encode_dataset, ensure_tokens
from vqdiff.distributed import barrier, is_main

train_app = typer.Typer(help="Train one model of a recipe.", no_args_is_help=True)


# the training stages with their bars (`stages.X` looked up at call time, so tests can stand in for a stage)
def tokenizer_stage(p: Progress, r: Recipe, run: Run) -> dict[str, Any]:
    return stages.train_tokenizer(
        r, run, on_log=train_logger(p, "tokenizer", r["tokenizer"]["steps"], "img"), on_eval=batch_logger(p, "test split")
    )


def decoder_stage(p: Progress, r: Recipe, run: Run) -> dict[str, Any] | None:
    return stages.refine_decoder(
        r, run, on_log=train_logger(p, "decoder", r["decoder"]["steps"], "img"), on_eval=batch_logger(p, "test split")
    )


def generator_stage(p: Progress, kind: str, r: Recipe, run: Run) -> dict[str, Any]:
    return stages.train_generator(
        kind, r, run, on_log=train_logger(p, kind, r[kind]["steps"], "grids"), on_batch=batch_logger(p, "encode")
    )


@train_app.command("tokenizer")
def train_tokenizer(
    recipe: RecipeArg, run_dir: RunDirOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None, device: DeviceOpt = None
) -> None:
    """Train the VQ-VAE tokenizer, then write tokenizer/metrics.json and reconstructions.png."""
    with edge():
        r, run = recipe_run(recipe, run_dir, set_, data_root, device)
        with writer_lock(run.run_dir):
            run.write_recipe(r)
            with progress_bars(log_path=progress_log(run)) as p:
                metrics = tokenizer_stage(p, r, run)
        out.print(
            f"tokenizer: psnr {metrics['psnr']:.2f} dB, codebook usage {metrics['codebook_usage']:.3f}, "
            f"perplexity {metrics['perplexity']:.1f} -> {run.model_dir('tokenizer')}"
        )


@train_app.command("decoder")
def train_decoder(
    recipe: RecipeArg, run_dir: RunDirOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None, device: DeviceOpt = None
) -> None:
    """Refine the tokenizer's decoder (frozen encoder and codebook: the ids and RUN/tokens stay valid) with
    the recipe's [decoder] losses, then write decoder/metrics.json and reconstructions.png."""
    with edge():
        r, run = recipe_run(recipe, run_dir, set_, data_root, device)
        if r["decoder"]["steps"] <= 0:
            fail(f"recipe {r.name} has no decoder refinement (decoder.steps = 0); give --set decoder.steps=N")
        run.tokenizer_meta()  # fail before writing a recipe into a run without a tokenizer
        with writer_lock(run.run_dir):
            run.write_recipe(r)
            with progress_bars(log_path=progress_log(run)) as p:
                metrics = decoder_stage(p, r, run)
        out.print(f"decoder: psnr {metrics['psnr']:.2f} dB (refined for {metrics['steps']} steps) -> {run.model_dir('decoder')}")


def encode(run: RunArg, data_root: DataRootOpt = None, device: DeviceOpt = None) -> None:
    """Encode the train and test splits into token grids in RUN/tokens/."""
    with edge():
        r = open_run(run, data_root, device)
        with writer_lock(run, create=False), progress_bars(log_path=progress_log(r)) as p:
            # under torchrun rank 0 encodes (one writer); encoding is a small part of a run
            meta = encode_dataset(r, batch_logger(p, "encode")) if is_main() else None
            barrier()
        if meta is None:
            return
        out.print(
            f"tokens: {meta['num_train']} train{' (half of them mirrored)' if meta.get('flip') else ''} and {meta['num_test']} test grids of "
            f"{meta['grid'][0]}x{meta['grid'][1]} -> {run / 'tokens'}"
        )


def _train_generator(kind: str, recipe: str, run_dir, set_, data_root, device) -> None:
    with edge():
        r, run = recipe_run(recipe, run_dir, set_, data_root, device)
        stages.check_generator_memory(kind, r, run)  # a step that cannot fit: one line, before anything else
        run.tokenizer_meta()  # fail before writing a recipe into a run without a tokenizer
        with writer_lock(run.run_dir):
            run.write_recipe(r)
            with progress_bars(log_path=progress_log(run)) as p:
                metrics = generator_stage(p, kind, r, run)
        what = "exact" if metrics["kind"] == "exact" else "ELBO bound"
        out.print(
            f"{kind}: {metrics['bits_per_token']:.3f} bits per token on the test split ({what}) -> {run.model_dir(kind)}",
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


def _train_all(r: Recipe, run: Run, timings: dict[str, float]) -> None:
    """The training stages of `vqdiff run`, timed."""
    with progress_bars(log_path=progress_log(run)) as p:
        t = time.perf_counter()
        m = tokenizer_stage(p, r, run)
        timings["tokenizer"] = time.perf_counter() - t
        p.console.print(f"tokenizer: psnr {m['psnr']:.2f} dB, codebook usage {m['codebook_usage']:.3f}")
        t = time.perf_counter()
        ensure_tokens(run, batch_logger(p, "encode"))
        timings["encode"] = time.perf_counter() - t
        if r["decoder"]["steps"] > 0:
            t = time.perf_counter()
            m = decoder_stage(p, r, run)
            timings["decoder"] = time.perf_counter() - t
            p.console.print(f"decoder: psnr {m['psnr']:.2f} dB after refinement")
        for kind in GENERATORS:
            t = time.perf_counter()
            m = generator_stage(p, kind, r, run)
            timings[kind] = time.perf_counter() - t
            p.console.print(f"{kind}: {m['bits_per_token']:.3f} bits per token ({m['kind']})")


def run_all(
    recipe: RecipeArg,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOpt = None,
    extractor: ExtractorOpt = None,
    inception_weights: InceptionOpt = None,
) -> None:
    """Every stage in order: tokenizer, encode, decoder (when the recipe refines it), ar, diffusion, evaluate. Finished stages are skipped,
    an interrupted one resumes."""
    with edge(), contextlib.ExitStack() as held:
        t0 = time.perf_counter()
        r, run = recipe_run(recipe, run_dir, set_, data_root, device)
        opts = EvalOptions.from_recipe(r, extractor=extractor, inception_weights=inception_weights)
        for kind in GENERATORS:  # a generator that cannot fit stops the run now, not after the tokenizer
            stages.check_generator_memory(kind, r, run)
        held.enter_context(writer_lock(run.run_dir))  # every stage of the run, as one writer
        run.write_recipe(r)
        timings: dict[str, float] = {}
        _train_all(r, run, timings)
        t = time.perf_counter()  # under torchrun every rank evaluates its share (sampling, features)
        evaluate_and_print(run, opts, checkpoints=any(r[g]["keep_every"] > 0 for g in opts.generators))
        timings["evaluate"] = time.perf_counter() - t
        total = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        out.print(f"run {r.name} finished in {total / 60:.1f} min ({parts})", soft_wrap=True)
