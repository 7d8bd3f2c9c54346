"""The step-level pieces of the training loop: which examples make the batch of a step (a pure
function of (seed, step)), signals deferred to the end of a step, the weight EMA, the loss as a
module for DDP, and the log's bookkeeping. `vqdiff.train` uses them."""

from __future__ import annotations

import json
import signal
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

import vqdiff.distributed as dist_


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


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Move `ema` toward `model` by 1 - decay; buffers that are not floats (counters) are copied."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(p, 1 - decay)
        else:
            e.copy_(p)


class LossModule(nn.Module):
    """`model.loss` as a forward, for DistributedDataParallel: DDP prepares its gradient all-reduce
    in forward, and a loop that called `model.loss` directly would skip it."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(batch)


def global_logs(logs: dict[str, float], weight: float, device: torch.device) -> dict[str, float]:
    """Every rank's logs, weighted by its share of the global batch: exact for means over the batch
    (the losses), an average of the ranks' values for the rest (e.g. PSNR)."""
    keys = sorted(logs)
    values = torch.tensor([float(logs[k]) * weight for k in keys], dtype=torch.float64, device=device)
    dist_.all_reduce_sum(values)
    return dict(zip(keys, values.tolist()))


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed log reads like an uninterrupted one."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    path.write_text("".join(k + "\n" for k in keep))
