"""The edge of the CLI: domain errors become one red line and exit code 1, SIGINT and SIGTERM the
resume line; tracebacks are for bugs. Every command runs its body inside `edge()`."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from recipes import stages
from recipes.lock import RunFolderError
from recipes.recipe import RecipeError

# rich wraps at 80 columns when not on a terminal (CI logs, pipes); reports read better wider
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)


def user_errors() -> tuple[type[BaseException], ...]:
    from vqdiff.checkpoint import CheckpointError
    from vqdiff.data import DataError

    from vqdiff.train import TrainingDiverged

    errors: list[type[BaseException]] = [
        RecipeError, stages.StageError, CheckpointError, DataError, RunFolderError, TrainingDiverged,
    ]  # fmt: skip
    try:
        from evaluation import EvaluationError

        errors.append(EvaluationError)
    except ImportError:
        pass
    return tuple(errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `kill`) outside a training loop: handled like Ctrl-C."""

    signum = signal.SIGTERM


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Turn domain errors into one red line and exit code 1, and SIGINT/SIGTERM into the resume line."""
    from vqdiff.train import TrainingInterrupted

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    except user_errors() as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        # a read-only or full disk met mid-stage: the environment, not a bug
        where = f" {e.filename}" if e.filename else ""
        fail(f"cannot write{where}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if isinstance(e, TrainingInterrupted):
            kept = f"step {e.step} is kept in {e.out_dir}"
        else:
            kept = "the last checkpoint is kept"
        console.print(
            f"[yellow]interrupted[/yellow] ({name}): {escape(kept)}; run the same command to resume", soft_wrap=True
        )
        raise typer.Exit(128 + signum) from None
    finally:
        if main:  # None: a handler set outside Python; the default is the nearest we can restore
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# errno values that mean a path cannot be written (read-only, no permission, full, a file in the way), not a bug
USER_OS_ERRORS = (
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
)  # fmt: skip


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)
