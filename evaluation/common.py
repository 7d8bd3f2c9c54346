"""What every evaluation module shares: the error type, the progress callback and content hashes.

The cache folder is the library's (`vqdiff.data.resolve_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import torch

Progress = Callable[[int, int], None]  # progress(done, total); the CLI draws the bar


class EvaluationError(Exception):
    """A problem the user can fix (missing weights, wrong inputs); the message is one line."""


def sha256_json(obj: Any, chars: int = 10) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def sha256_tensor(x: torch.Tensor, chars: int = 8) -> str:
    """A fingerprint of a tensor's shape, dtype and contents (a 10000-image uint8 set takes ~50 ms)."""
    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}{x.dtype}".encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()[:chars]
