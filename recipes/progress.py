"""Progress bars of the CLI: callbacks that the stages call (on_log, on_batch), drawn with rich, and the
training stages run with them."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from recipes import stages


@contextlib.contextmanager
def progress_bars(console: Console) -> Iterator[Progress]:
    """rich progress bars on `console`; the training and batch loggers below add their tasks to it."""
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


# the training stages with their bars (`stages.X` looked up at call time, so tests can stand in for a stage)
def tokenizer_stage(p: Progress, r, run) -> dict:
    return stages.train_tokenizer(
        r, run, on_log=train_logger(p, "tokenizer", r["tokenizer"]["steps"], "img"), on_eval=batch_logger(p, "test split")
    )


def generator_stage(p: Progress, kind: str, r, run) -> dict:
    return stages.train_generator(
        kind, r, run, on_log=train_logger(p, kind, r[kind]["steps"], "grids"), on_batch=batch_logger(p, "encode")
    )
