"""The one loop that trains a small image classifier: the perceptual loss's network
(`vqdiff.perceptual`) and the evaluation's feature extractor (`evaluation.classifier`) both go through it.

The caller owns everything random and everything the two differ in: the model, the optimiser, the
learning rate of each step and the batch of each step (drawn from the caller's own generator), so
that each keeps the exact sequence of draws and floats it was measured with.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (images float [b c h w], labels long [b]), on the model's device


def fit_classifier(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    lr_at: Callable[[int], float],
    steps: int,
    progress: Callable[[int, int], None] | None = None,
    label_smoothing: float = 0.0,
    amp: torch.dtype | None = None,
) -> None:
    """`steps` steps of cross-entropy on the logits of `model` (in train mode): step s sets every
    parameter group's learning rate to lr_at(s), takes batch(s), and steps `opt`.
    progress(done, steps) after every step. `amp`: the forward pass alone under autocast to that
    dtype (the backward pass and the optimiser step stay outside it, as torch.amp asks)."""
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        images, labels = batch(step)
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, steps)
