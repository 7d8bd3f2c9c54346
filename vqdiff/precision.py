"""The speed rules, in one place: which number format a model computes in (`TrainConfig.precision`
and the hardware) and which attention kernel each device and sequence length gets.

Precision: auto: bf16 autocast on CUDA, fp32 on CPU | fast: bf16 wherever it is measured to pay
(transformers: native bf16 matmuls, i.e. CUDA with bf16 or CPUs with AMX or AVX512-BF16;
convolutional models: CUDA with bf16 or CPUs with AMX-BF16), else fp32 | fp32 | bf16 (always).

Sampling: `sampling_autocast` runs both generators' sampling loops under the "fast" rule for
transformers (bf16 where the device multiplies bf16 natively), overridden by `use_sample_precision`.

Attention: `attention_path` (the rule, from the measurements in its docstring), overridden by
`use_attention(path)` or `$VQDIFF_ATTENTION`; "sdpa" is SDPA's own backend choice.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

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


def autocast_dtype(precision: str, device: torch.device, *, convolutional: bool = False) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    `convolutional`: the model's time is in convolutions (the tokenizer). Under "fast" a CPU runs
    those in bf16 only with AMX-BF16 tiles: there the cifar10 tokenizer's step took 188 ms in bf16
    against 389 ms in fp32; with AVX512-BF16 alone oneDNN's bf16 convolutions were measured no faster
    than fp32 (Inception, docs/results.md), and without either bf16 is emulated, several times slower.
    """
    if precision == "fast":
        if device.type == "cpu" and convolutional:
            return torch.bfloat16 if amx_bf16(device) else None
        return torch.bfloat16 if native_bf16(device) else None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def model_autocast(model: torch.nn.Module, precision: str, device: torch.device) -> torch.dtype | None:
    """`autocast_dtype` for `model`: a model whose class says `convolutional = True` (the tokenizer)
    takes the convolutions' rule."""
    return autocast_dtype(precision, device, convolutional=getattr(model, "convolutional", False))


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA: about 8x the fp32 matmul rate on Ampere and later, with
    a 10-bit mantissa that training does not notice (bf16 autocast covers most matmuls anyway)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def bf16_emulated(precision: str, device: torch.device) -> bool:
    """Whether `precision` asks for bf16 on a CPU that only emulates it: 3-4x slower than fp32."""
    return precision == "bf16" and device.type == "cpu" and not native_bf16(device)


# ---------------------------------------------------------------- sampling

_sample_forced: list[str] = []  # the innermost `use_sample_precision` override, if any


@contextlib.contextmanager
def _override(stack: list[str], value: str, choices: tuple[str, ...], what: str) -> Iterator[None]:
    """Push `value` (one of `choices`) on an override `stack` for the block; the innermost wins."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def use_sample_precision(precision: str) -> contextlib.AbstractContextManager[None]:
    """Sample in `precision` (one of PRECISIONS) inside the block instead of the rule's "fast"."""
    return _override(_sample_forced, precision, PRECISIONS, "precision")


def sample_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a sampling loop on `device` (None: fp32). The rule: "fast", the
    transformers' training rule, unless `use_sample_precision` says otherwise. Measured on CPU-AMX
    at the cifar10 recipe's size, batch 64, CFG 3: bf16 (with SDPA's flash kernel) sampled 1.49x
    the images/s of fp32 for diffusion and 1.10x for AR (docs/experiments.md). The logits leave the
    trunk in fp32, so the samplers' softmax, Gumbel noise and top-k/top-p stay in fp32."""
    return autocast_dtype(_sample_forced[-1] if _sample_forced else "fast", device)


def sampling_autocast(method: Callable) -> Callable:
    """Decorator for a generator's `sample(self, ...)`: runs it under `sample_dtype(self.device)`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        dtype = sample_dtype(self.device)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return method(self, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- attention kernels

ATTENTION_PATHS = ("auto", "sdpa", "math")
_forced: list[str] = []  # the innermost `use_attention` override, if any

# Up to this many keys a CPU training in bf16 takes SDPA's math path. Measured: on CPU-AMX at 65
# tokens the flash kernel's backward took 55% of an AR training step, and the math path made the
# step 1.57x (AR) and 1.60x (diffusion) faster; at 257 tokens flash won (3.6 s a step against 5.4 s).
# Without a backward (sampling) the flash kernel wins in bf16 at 65 keys too: on CPU-AMX, CFG 3,
# batch 64, diffusion sampled 45.2 images/s with it against 34.3 with math, AR 227.7 against 152.1.
# In fp32 (CPU-noBF16, docs/experiments.md) SDPA's choice was the fastest or within 3% at 65 tokens and
# 1.36-1.47x faster than math at 257, so fp32 keeps it at every length.
CPU_BF16_MATH_KEYS = 128


def _env_attention() -> str:
    path = os.environ.get("VQDIFF_ATTENTION", "auto")
    if path not in ATTENTION_PATHS:
        raise ValueError(f"VQDIFF_ATTENTION must be one of {', '.join(ATTENTION_PATHS)}, got {path!r}")
    return path


def use_attention(path: str) -> contextlib.AbstractContextManager[None]:
    """Force one attention path inside the block ("auto": the rule of `attention_path`)."""
    return _override(_forced, path, ATTENTION_PATHS, "attention")


def attention_path(device: torch.device, dtype: torch.dtype, keys: int) -> str:
    """The attention kernel for queries of `dtype` over `keys` key positions: "sdpa" (SDPA's own
    choice: flash attention on CPU and CUDA) or "math" (SDPA's math backend). A backward follows
    when autograd records the call (`torch.is_grad_enabled()`).

    The rule: the math path on a CPU in bf16 up to `CPU_BF16_MATH_KEYS` keys when a backward
    follows, SDPA's choice everywhere else. Why: SDPA's CPU flash kernel splits the keys into
    blocks and its backward recomputes the attention block by block; at the generators' short
    sequences in bf16 that bookkeeping dominates a training step, while the math path keeps the
    [m keys] probabilities. Without a backward the flash kernel is the faster one. CUDA's
    flash and memory-efficient kernels are the fast ones there. `use_attention` or
    `$VQDIFF_ATTENTION` ("sdpa" restores SDPA's choice everywhere) override the rule.
    """
    forced = _forced[-1] if _forced else _env_attention()
    if forced != "auto":
        return forced
    if torch.is_grad_enabled() and device.type == "cpu" and dtype == torch.bfloat16 and keys <= CPU_BF16_MATH_KEYS:
        return "math"
    return "sdpa"
