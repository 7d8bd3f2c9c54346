"""The CLI's face: its two consoles, the error edge, and the progress of long stages.

- `edge()`: domain errors become one red line and exit code 1, SIGINT and SIGTERM the resume line;
  tracebacks are for bugs. Every command runs its body inside it.
- `progress_bars()`: one progress mechanism, rich's tasks. On a terminal they are drawn as bars; when
  stderr is not a terminal (nohup, CI, a cluster job) a heartbeat prints one plain line per active
  task at least every `interval` seconds (step, loss, items/s, ETA), so a long stage never looks
  hung. With `log_path` the same lines are also appended to that file, terminal or not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evaluation import EvaluationError
from recipes.lock import RunFolderError
from recipes.recipe import RecipeError
from recipes.run import StageError
from vqdiff.errors import CheckpointError
from vqdiff.compress import CompressError
from vqdiff.data import DataError
from vqdiff.options import OptionError
from vqdiff.train import TrainingDiverged, TrainingInterrupted

# rich wraps at 80 columns when not on a terminal (CI logs, pipes); reports read better wider
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)

USER_ERRORS = (
    RecipeError, StageError, CheckpointError, DataError, RunFolderError, TrainingDiverged, EvaluationError, OptionError,
    CompressError,
)  # fmt: skip
# errno values that mean a path cannot be written (read-only, no permission, full, a file in the way), not a bug
USER_OS_ERRORS = (
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
)  # fmt: skip


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `kill`) outside a training loop: handled like Ctrl-C."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Turn domain errors into one red line and exit code 1, and SIGINT/SIGTERM into the resume line."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    except USER_ERRORS as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        # a read-only or full disk met mid-stage: the environment, not a bug
        where = f" {e.filename}" if e.filename else ""
        fail(f"cannot write{where}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        kept = f"step {e.step} is kept in {e.out_dir}" if isinstance(e, TrainingInterrupted) else "the last checkpoint is kept"
        console.print(
            f"[yellow]interrupted[/yellow] ({signal.Signals(signum).name}): {escape(kept)}; run the same command to resume",
            soft_wrap=True,
        )
        raise typer.Exit(128 + signum) from None
    finally:
        if main:  # None: a handler set outside Python; the default is the nearest we can restore
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ------------------------------------------------------------------ progress


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plain_line(task: Task, elapsed: float) -> str:
    """The non-terminal progress line of one task:
    `[  12m05s] tokenizer 250/1500 (17%) loss 0.1234 psnr 20.10 | 812 img/s | eta 5m12s`."""
    done, total = int(task.completed), task.total
    where = f"{done}/{int(total)} ({100 * done / total:.0f}%)" if total else f"{done}"
    info = task.fields.get("info") or ""
    eta = "done" if task.finished else f"eta {_duration(task.time_remaining)}"
    return f"[{_duration(elapsed):>8}] {task.description} {where}{' ' + info if info else ''} | {eta}"


class Heartbeat:
    """Prints `plain_line` of every task that is still running, every `interval` seconds, to a
    non-terminal console and/or a log file; a task's last line is printed once when it ends."""

    def __init__(self, progress: Progress, console: Console | None, log_path: Path | None, interval: float) -> None:
        self.progress, self.console, self.log_path, self.interval = progress, console, log_path, interval
        self.t0 = time.monotonic()
        self.ended: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="vqdiff-progress")

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        if self.console is not None:
            for line in lines:
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write("".join(line + "\n" for line in lines))

    def beat(self) -> None:
        elapsed = time.monotonic() - self.t0
        lines = []
        for task in list(self.progress.tasks):
            if task.id in self.ended:
                continue
            if task.finished:
                self.ended.add(task.id)
            lines.append(plain_line(task, elapsed))
        if not lines:
            lines.append(f"[{_duration(elapsed):>8}] working")
        self._emit(lines)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if any(t.id not in self.ended for t in self.progress.tasks):
            self.beat()  # the last state of every task that had not printed its end


def progress_interval() -> float:
    """Seconds between plain progress lines: $VQDIFF_PROGRESS_INTERVAL, else 15 (well inside 30)."""
    return float(os.environ.get("VQDIFF_PROGRESS_INTERVAL", "15"))


@contextlib.contextmanager
def progress_bars(con: Console | None = None, log_path: Path | None = None) -> Iterator[Progress]:
    """rich progress tasks on `con` (the stderr console by default): bars on a terminal, plain
    heartbeat lines elsewhere (and in `log_path` when given)."""
    con = con or console
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    terminal = con.is_terminal
    # off a terminal rich would only draw the bars once, at the end: the heartbeat's lines replace them
    with Progress(*columns, console=con, disable=not terminal) as p:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        if terminal and log_path is None:
            yield p
            return
        with Heartbeat(p, None if terminal else con, log_path, progress_interval()):
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
