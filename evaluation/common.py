"""What every evaluation module shares: the error type, the cache folder and file hashes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

# one hash of a file and one default device for the whole project (the library's)

CACHE_ENV = "VQDIFF_CACHE"
HASH_CHARS = 12  # short hex: 48 bits, plenty to tell weights apart

Progress = Callable[[int, int], None]  # progress(done, total); the CLI draws the bar


class EvaluationError(Exception):
    """A problem the user can fix (missing weights, wrong inputs); the message is one line."""


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$VQDIFF_CACHE`, else `~/.cache/vqdiff`."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vqdiff").expanduser()


def sha256_json(obj: Any, chars: int = 10) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def sha256_tensor(x: torch.Tensor, chars: int = 8) -> str:
    """A fingerprint of a tensor's shape, dtype and contents (a 10000-image uint8 set takes ~50 ms)."""
    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()[:chars]
