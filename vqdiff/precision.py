"""Which number format training computes in: `TrainConfig.precision` and the hardware.

auto: bf16 autocast on CUDA, fp32 on CPU | fast: bf16 wherever the device has native bf16 matmuls
(CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32 | fp32 | bf16 (always).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fast", "fp32", "bf16")


def _cpu_has(flags: tuple[str, ...], probes: tuple[str, ...]) -> bool:
    """Whether this CPU has any of `flags` (torch.cpu.get_capabilities(), public from torch 2.9), or,
    on an older torch, whether any of the private `probes` of torch.cpu says so."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        found = caps()
        return any(found.get(k, False) for k in flags)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware. A CPU without AMX-BF16 or AVX512-BF16
    (or Arm's BF16 extension) emulates them: bf16 autocast there trains 3-4x slower than fp32
    (measured on a 2-core AVX-512 CPU without them, docs/experiments.md)."""
    if device.type == "cuda":
        try:  # newer torch counts emulated bf16 (pre-Ampere) unless told not to
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
    return _cpu_has(flags, ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def amx_bf16(device: torch.device) -> bool:
    """Whether `device` is a CPU with AMX-BF16 tiles. There oneDNN runs bf16 convolutions faster than
    fp32 ones (Inception: 2.4x channels-last fp32, docs/results.md); AVX512-BF16 alone speeds up
    matrix products but not those convolutions (bf16 Inception measured no faster there)."""
    return device.type == "cpu" and _cpu_has(("amx_bf16",), ("_is_amx_tile_supported",))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if (
        precision == "bf16"
        or (precision == "auto" and device.type == "cuda")
        or (precision == "fast" and native_bf16(device))
    ):
        return torch.bfloat16
    return None


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA: about 8x the fp32 matmul rate on Ampere and later, with
    a 10-bit mantissa that training does not notice (bf16 autocast covers most matmuls anyway)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def bf16_emulated(precision: str, device: torch.device) -> bool:
    """Whether `precision` asks for bf16 on a CPU that only emulates it: 3-4x slower than fp32."""
    return precision == "bf16" and device.type == "cpu" and not native_bf16(device)
