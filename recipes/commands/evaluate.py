"""`vqdiff evaluate`: sample every setting, measure FID/KID/precision/recall, write RUN/report/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from recipes.commands.common import (
    CfgScheduleOpt, DataRootOpt, DeviceOpt, ExtractorOpt, InceptionOpt, RunArg, SampleScheduleOpt, open_run, progress_log, writer_lock,
)  # fmt: skip
from recipes.console import batch_logger, edge, fail, out, progress_bars
from recipes.curves import decoder_curve, learning_curve
from recipes.edits import edits_markdown, evaluate_edits
from recipes.evaluate import EvalOptions, evaluate as evaluate_run
from recipes.report import results_table
from recipes.run import Run

ReferenceNumOpt = Annotated[
    Optional[int],
    typer.Option("--reference-num", help="Test images FID is measured against: the first N; 0 = the whole test split. [default: the recipe's, else --num]"),
]
InceptionModeOpt = Annotated[
    Optional[str],
    typer.Option("--inception-mode", help="How Inception computes: auto | fp32 | channels-last | bf16 | bf16-channels-last. [default: the recipe's, auto]"),
]
BothSpacesOpt = Annotated[
    Optional[bool],
    typer.Option("--both-spaces/--one-space", help="Also FID in the other feature space where both can run. [default: the recipe's, both]"),
]


def csv(value: Optional[str], cast, what: str):
    if value is None:
        return None
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        fail(f"{what}: expected a comma-separated list, got {value!r}")


def print_report(report: dict[str, Any]) -> None:
    out.print(results_table(report))
    if report.get("reference"):
        out.print(f"reference set: {report['reference']}", soft_wrap=True)
    if report.get("reference_note"):
        out.print(report["reference_note"] + ".", soft_wrap=True)
    if report.get("isc_omitted"):
        out.print(report["isc_omitted"], soft_wrap=True)
    out.print(f"report -> {Path(report['run']) / 'report' / 'report.md'}", soft_wrap=True)


def evaluate_and_print(run: Run, opts: EvalOptions, checkpoints: bool = False) -> dict[str, Any]:
    with progress_bars(log_path=progress_log(run)) as p:
        if checkpoints:  # first, so that the report shows the learning curves
            learning_curve(run, opts, bars=lambda d: batch_logger(p, d))
        decoder_curve(run, opts, bars=lambda d: batch_logger(p, d))  # with decoder.keep_every > 0
        report = evaluate_run(run, opts, bars=lambda d: batch_logger(p, d))
    print_report(report)
    return report


def evaluate(
    run: RunArg,
    generators: Annotated[Optional[str], typer.Option("--generators", help="Comma list: ar,diffusion.")] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Samples per generator and setting.")] = None,
    reference_num: ReferenceNumOpt = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="Diffusion steps, comma list, e.g. 4,8,16.")] = None,
    temperatures: Annotated[Optional[str], typer.Option("--temperatures", help="Comma list, e.g. 0.8,1.0 (0 = argmax).")] = None,
    extractor: ExtractorOpt = None,
    inception_weights: InceptionOpt = None,
    inception_mode: InceptionModeOpt = None,
    both_spaces: BothSpacesOpt = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Guidance scale for conditional generators, all of them. [default: each generator's own, [ar] and [diffusion] cfg]")] = None,
    sampler: Annotated[
        Optional[str],
        typer.Option("--sampler", help="Diffusion (mask) samplers, comma list: maskgit,ancestral,halton. [default: the recipe's]"),
    ] = None,
    eta: Annotated[Optional[float], typer.Option("--eta", help="ReMDM remasking for the ancestral sampler, in [0, 1].")] = None,
    choice_temperature: Annotated[
        Optional[float],
        typer.Option("--choice-temperature", help="Gumbel noise on the maskgit sampler's confidences. [default: the recipe's, 4.5]"),
    ] = None,
    sample_schedule: SampleScheduleOpt = None,
    cfg_schedule: CfgScheduleOpt = None,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens, both generators. [default: the recipe's, off]")
    ] = None,
    top_p: Annotated[
        Optional[float], typer.Option("--top-p", help="Nucleus sampling, both generators. [default: the recipe's, off]")
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
        r = open_run(run, data_root, device)  # under torchrun: sampling and feature extraction shared by the ranks
        opts = EvalOptions.from_recipe(
            r.read_recipe(),
            generators=csv(generators, str, "--generators"),
            num=num,
            reference_num=reference_num,
            steps=csv(steps, int, "--steps"),
            temperatures=csv(temperatures, float, "--temperatures"),
            extractor=extractor,
            inception_weights=inception_weights,
            inception_mode=inception_mode,
            both_spaces=both_spaces,
            cfg=cfg,
            samplers=csv(sampler, str, "--sampler"),
            eta=eta,
            choice_temperature=choice_temperature,
            sample_schedule=sample_schedule,
            cfg_schedule=cfg_schedule,
            top_k=top_k,
            top_p=top_p,
        )
        with writer_lock(run, create=False):
            if edits:
                with progress_bars(log_path=progress_log(r)) as p:
                    report = evaluate_edits(r, opts, bars=lambda d: batch_logger(p, d))
                out.print(edits_markdown(report), soft_wrap=True)
                return
            evaluate_and_print(r, opts, checkpoints)
