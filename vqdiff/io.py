"""Files on the ground floor: atomic writes, JSON, safetensors tensors and file digests.

It imports no model, so the data loaders (`vqdiff.data`), the metrics (`evaluation/`) and the
checkpoints (`vqdiff.checkpoint`, which saves and loads models through it) all stand on it
without pulling in the model registry.

Every write goes to a unique temp file beside its target and is `os.replace`d onto it: a kill
leaves the old file or the new one, never half of one. A missing or corrupt file is a
`CheckpointError` whose one line names the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqdiff.errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp) on a unique temp file beside `path`, then `os.replace` it onto `path`: a kill
    leaves the old file or the new one, never half of one. Every file vqdiff writes goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the mode open() would: 0666 less the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(Path(path), w)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file atomically (e.g. a compressed .vqd file or a PNG)."""

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(Path(path), w)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); delete it to retrain") from None


def file_digest(path: str | Path, chars: int = 12) -> str:
    """sha256 of a file, short hex (12 chars = 48 bits, plenty to tell weights apart)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:chars]
