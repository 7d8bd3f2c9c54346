"""The step-level pieces of the training loop: which examples make the batch of a step (a pure
function of (seed, step)), and signals deferred to the end of a step. `vqdiff.train` uses them."""

from __future__ import annotations

import signal
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training between two steps; `step` is the step kept in `out_dir`."""

    def __init__(self, signum: int, step: int, out_dir: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: step {step} is kept in {out_dir}")
        self.signum, self.step, self.out_dir = signum, step, out_dir


class _DeferSignals:
    """SIGINT and SIGTERM set a flag that the loop reads between steps, so that the state saved is
    that of the last finished step (a step changes weights, optimiser and codebook buffers in turn,
    and only the state between two steps is consistent). A second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_DeferSignals":
        # handlers can only be set from the main thread; elsewhere the signals keep their behaviour
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: stop now and keep the last checkpoint
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            # None: a handler set outside Python; the default is the nearest we can restore
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class BatchSource(Protocol):
    """Anything with a length and a way to gather a batch dict from indices."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TensorSource:
    """In-memory tensors sharing the first dimension, e.g. {"ids": [n h w], "labels": [n]}."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors differ in length: {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.tensors.items()}


@lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: consecutive slices of per-epoch permutations (pure in its inputs)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        take = min(batch_size - len(out), n - offset)
        out.extend(_epoch_perm(n, seed, epoch)[offset : offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)
