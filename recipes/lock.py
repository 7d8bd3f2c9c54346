"""One writer per run folder: an advisory `fcntl.flock` on `RUN/.lock`.

Without it two trainings on one folder would both exit 0, with every step twice in `log.jsonl` and
a `recipe.toml` from one run beside the weights of the other. Every command that writes into a run
folder holds this lock for its whole duration; readers (e.g. `sample --out elsewhere`) do not take it.
The lock dies with its process (the kernel drops a flock when the file is closed), so a kill -9
never leaves a stale lock behind; the pid written into the file is only there to name the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class RunFolderError(Exception):
    """A run folder that cannot be used (locked by another process, not a folder, not writable); one line."""


def _describe(e: OSError) -> str:
    return e.strerror or type(e).__name__


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir`, or say in one line why it cannot be a run folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; give --run-dir a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # a parent that is a file (ENOTDIR/EEXIST), a read-only disk, no permission
        raise RunFolderError(f"cannot create run folder {run_dir}: {_describe(e)}") from None


@contextlib.contextmanager
def run_lock(run_dir: Path, *, create: bool = True) -> Iterator[None]:
    """Hold the write lock of `run_dir` for the body; a second writer gets one line naming the holder.

    With `create=False` a folder that does not exist is left alone (the command will say that it is
    not a run folder); nothing is locked then, since nothing is written.
    """
    run_dir = Path(run_dir)
    if create:
        prepare_run_dir(run_dir)
    elif not run_dir.is_dir():
        if run_dir.exists():
            raise RunFolderError(f"{run_dir} is a file, not a run folder")
        yield
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(f"run folder {run_dir} is not writable ({_describe(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock run folder {run_dir} ({_describe(e)})") from None
            holder = _read_pid(fd)
            who = f"process {holder}" if holder else "another process"
            raise RunFolderError(
                f"run folder {run_dir} is in use by {who}; wait for it to finish or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale_temp_files(run_dir)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting it would race with a waiting writer)


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files a killed writer left (`.NAME.XXXX.tmp`, `recipe.toml.tmp`).

    Only called under the lock: no other writer of this folder can be midway through a write.
    """
    removed = []
    for p in run_dir.rglob("*.tmp"):
        if p.is_file() and (p.name.startswith(".") or p.name == "recipe.toml.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass  # e.g. already gone; a leftover temp file harms nothing
    return removed
