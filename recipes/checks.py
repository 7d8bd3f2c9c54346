"""Checks of command-line values that no stage owns: the device."""

from __future__ import annotations

import torch

from recipes.recipe import RecipeError


def check_device(device: str | None) -> str | None:
    """`--device` as given, or one line saying why it cannot be used here (before any work)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise RecipeError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RecipeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return device
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RecipeError(f"--device {device}: MPS is not available here; use --device cpu")
        return device
    raise RecipeError(f"--device {device}: vqdiff runs on cpu, cuda or mps")

