"""A training step's peak memory, estimated before training, so that a stage that cannot fit stops
with one line instead of being killed by the kernel's OOM killer mid-run.

The estimate measures, not guesses: one forward of the model's own loss at batches 1 and 2 under
the step's autocast and attention path, counting the bytes autograd saves for the backward
(`torch.autograd.graph.saved_tensors_hooks`, each storage once). Saved activations grow linearly
in the batch, so two points give the line. To that it adds the weights, their gradients and
AdamW's two moments (16 bytes a parameter in fp32), and `TRANSIENT` times the saved activations for
what the backward holds at once on top of them (the gradients of the activations in flight and the
allocator's slack), calibrated against the peak RSS of real steps (`tests/test_memory.py` checks it).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# peak of a step = state + (1 + TRANSIENT) x saved activations. Measured (the rise of VmHWM over one
# step on the CPU, the cifar10 and cifar10-large models at batch 8-256): the step's peak less the
# new state was 0.70-1.23x the saved bytes, so 0.25 on top covers the largest seen
TRANSIENT = 0.25
STATE_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step at `batch`: the optimiser state and the activations."""

    batch: int
    state_bytes: int
    activation_bytes_per_item: float
    activation_bytes_fixed: float

    def activations(self, batch: int) -> float:
        return self.activation_bytes_fixed + self.activation_bytes_per_item * batch

    def peak(self, batch: int | None = None) -> float:
        """Estimated peak bytes of a step at `batch` (default: the estimate's own)."""
        b = self.batch if batch is None else batch
        return self.state_bytes + (1 + TRANSIENT) * self.activations(b)

    def largest_batch(self, available: float) -> int:
        """The largest batch whose estimated peak fits in `available` bytes (0 if none does)."""
        room = (available - self.state_bytes) / (1 + TRANSIENT) - self.activation_bytes_fixed
        return max(int(room // max(self.activation_bytes_per_item, 1.0)), 0)


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes that autograd saves for the backward while `fn()` runs (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a view of nothing)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def estimate_step_memory(
    model: nn.Module,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    batch: int,
    *,
    amp: torch.dtype | None,
    device: torch.device,
) -> MemoryEstimate:
    """The peak-memory estimate of one training step of `model.loss` at `batch`.

    make_batch(b) -> a batch of b items as the loss takes it. `model` is left as it was: the loss
    forwards run on a copy (a first forward may initialise a codebook by k-means), in train mode,
    under a forked RNG.
    """
    probe = copy.deepcopy(model).to(device).train()
    points = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b in (1, 2):
            data = {k: v.to(device) for k, v in make_batch(b).items()}
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                points.append(saved_bytes(lambda: probe.loss(data)[0]))
    del probe
    per_item = max(points[1] - points[0], 0)
    fixed = max(points[0] - per_item, 0)
    state = STATE_BYTES_PER_PARAM * sum(p.numel() for p in model.parameters() if p.requires_grad)
    state += 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    state += sum(b.numel() * b.element_size() for b in model.buffers())
    return MemoryEstimate(batch, state, float(per_item), float(fixed))


def available_bytes() -> float:
    """Memory this process may still take: MemAvailable of /proc/meminfo, else all physical memory."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gib(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
