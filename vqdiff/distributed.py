"""torch.distributed for one loop that runs the same with 1 or N processes (torchrun, DDP).

The rules that make N ranks compute what 1 process computes:

- The recipe's `batch_size` is the global batch. Every rank draws the same global batch of step s
  (a function of seed and s), and takes its contiguous slice `shard_range(b, rank, world)`.
- Randomness inside a loss (diffusion times and masks, class dropout) is drawn for the whole
  global batch on every rank, from the same re-seeded global RNG, and sliced: `batch_shard()` tells
  `vqdiff.sampling_ops.rand`/`randint` which rows are this rank's. Sample i then gets the same noise
  whatever the number of ranks.
- A loss is a mean over the rank's slice; the training loop weights it by slice / global batch,
  and a ratio over the whole batch (e.g. a mean over masked positions) takes its denominator from
  every rank (`batch_ratio`), so the sum over ranks is the 1-process loss.

Without an initialised process group every function here is the 1-process identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and progress bars."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group that torchrun describes (WORLD_SIZE > 1), once; True when distributed.

    NCCL for CUDA devices, gloo for the CPU. Each rank takes the GPU of its LOCAL_RANK.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a long timeout: rank 0 alone encodes datasets and evaluates while the others wait at a barrier
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return True


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build a model under a fixed seed (`with seeded(cfg.seed): model = Model(mcfg)`), leaving the
    caller's global RNG as it was: the same recipe gives the same initial weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, else CUDA when there is one, else the CPU."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def local_device(device: str | torch.device | None) -> torch.device:
    """The device of this rank: `default_device`, and under torchrun on CUDA, cuda:LOCAL_RANK."""
    dev = default_device(device or None)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of n items: sizes differ by at most one."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return r * n // w, (r + 1) * n // w


# ------------------------------------------------------------------ the batch shard of a training step


@dataclass(frozen=True)
class Shard:
    start: int
    stop: int
    total: int  # the global batch

    @property
    def size(self) -> int:
        return self.stop - self.start


_SHARD: Shard | None = None


@contextlib.contextmanager
def batch_shard(start: int, stop: int, total: int) -> Iterator[Shard]:
    """Within this block the loss sees rows [start, stop) of a global batch of `total`."""
    global _SHARD
    before, _SHARD = _SHARD, Shard(start, stop, total)
    try:
        yield _SHARD
    finally:
        _SHARD = before


def current_shard(b: int) -> Shard | None:
    """The active shard when its slice has `b` rows (a loss's batch), else None."""
    return _SHARD if _SHARD is not None and _SHARD.size == b and _SHARD.total != b else None


def batch_positions(b: int, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """(global row indices long [b], global batch size) of a loss's batch of b rows."""
    s = current_shard(b)
    if s is None:
        return torch.arange(b, device=device), b
    return torch.arange(s.start, s.stop, device=device), s.total


def batch_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den for a ratio over the whole global batch, in the loss units of this rank's slice.

    1 process: num / den. N ranks: num / (den summed over ranks) * total / slice, so that the
    training loop's weighting by slice / total makes the ranks' terms add up to the 1-process ratio.
    """
    s = _SHARD
    if s is None or s.total == s.size or not is_distributed():
        return num / den.clamp_min(1)
    den = den.detach().clone()
    dist.all_reduce(den)
    return num / den.clamp_min(1) * (s.total / s.size)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x [n_r ...] in rank order (the n_r may differ); x itself when alone."""
    if not is_distributed():
        return x
    w = world_size()
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes_), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


# ------------------------------------------------------------------ sharded sampling


def my_batches(num_batches: int) -> list[int]:
    """The batches j of this rank when work is dealt round-robin: j = rank, rank + world, ..."""
    return list(range(rank(), num_batches, world_size()))


def gather_batches(mine: list[Any], num_batches: int) -> list[Any]:
    """Every rank's results for its `my_batches` (in that order) -> the results of all batches in
    order j, on every rank. Results are pickled (`all_gather_object`): ids and images on the CPU."""
    if not is_distributed():
        return mine
    w = world_size()
    parts: list[Any] = [None] * w
    dist.all_gather_object(parts, mine)
    return [parts[j % w][j // w] for j in range(num_batches)]
