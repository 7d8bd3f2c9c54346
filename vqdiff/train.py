"""One training loop for the tokenizer and both generators.

A model plugs in by owning `cfg` (a frozen dataclass), `kind` (its name in `vqdiff.registry`) and
`loss(batch) -> (loss, logs)`. The loop owns the optimiser (AdamW), warmup + cosine LR,
gradient clipping, autocast, an optional EMA of the weights, atomic checkpoints and resume.

Determinism: the batch of step s is a function of (seed, s) alone (epoch permutations), and the
global RNG is re-seeded from (seed, s) before every step, so a run that is killed and resumed
from its last checkpoint computes the same losses as one that never stopped.

Under torchrun (DistributedDataParallel) `batch_size` is the global batch: every rank takes its
contiguous slice of the same global batch, draws the loss's noise for the global batch
(`vqdiff.distributed`), and weights its loss by slice / batch, so that DDP's gradient average is
the 1-process gradient. The losses, the learning-rate schedule and the checkpoints do not depend
on the number of ranks, and a run can resume with another number. Rank 0 alone writes
checkpoints and logs; every rank reads `train_state.pt` to resume.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import vqdiff.distributed as dist_
from vqdiff.checkpoint import (
    CheckpointError,
    config_to_dict,
    load_train_state,
    save_model,
    save_tensors,
    save_train_state,
    unwrap,
)
from vqdiff.schedules import warmup_cosine
from vqdiff.steps import BatchSource, TrainingInterrupted, _DeferSignals, batch_indices

HISTORY_DIR = "history"  # OUT/history/step-NNNNNNN.safetensors, written every `keep_every` steps


PRECISIONS = ("auto", "fast", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.0  # decay of the weight EMA; 0 disables
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    # auto: bf16 autocast on CUDA, fp32 on CPU | fast: bf16 wherever the device has native bf16
    # matmuls (CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32 | fp32 | bf16 (always)
    precision: str = "auto"
    compile: bool = False
    keep_every: int = 0  # > 0: keep the weights every N steps in OUT/history/ (learning curves); 0 = off

    def __post_init__(self) -> None:
        # steps = 0 used to exit 0 without a model; checkpoint_every or log_every = 0 divided by zero
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.keep_every < 0:
            raise ValueError(f"keep_every must be >= 0, got {self.keep_every}")


TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


class TrainingDiverged(FloatingPointError):
    """A non-finite loss stopped training; the message is one line that says which step was kept."""


@contextlib.contextmanager
def seeded(seed: int):
    """Build a model under a fixed seed (`with seeded(cfg.seed): model = Model(mcfg)`), leaving the
    caller's global RNG as it was: the same recipe gives the same initial weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def step_seed(seed: int, step: int) -> int:
    return (seed * 7_919 + step * 104_729 + 1) % (2**63 - 1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio (`schedules.warmup_cosine`)."""
    return warmup_cosine(step, steps=cfg.steps, warmup=cfg.warmup_steps, peak=cfg.lr, floor_ratio=cfg.min_lr_ratio)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware. A CPU without AMX-BF16 or AVX512-BF16
    (or Arm's BF16 extension) emulates them: bf16 autocast there trains 3-4x slower than fp32
    (measured on a 2-core AVX-512 CPU without them, docs/benchmarks.md)."""
    if device.type == "cuda":
        try:  # newer torch counts emulated bf16 (pre-Ampere) unless told not to
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    caps = getattr(torch.cpu, "get_capabilities", None)  # public from torch 2.9
    if caps is not None:
        found = caps()
        return any(found.get(k, False) for k in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
    return any(  # older torch: the private probes it has
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )


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


class _LossModule(nn.Module):
    """`model.loss` as a forward, for DistributedDataParallel: DDP prepares its gradient all-reduce
    in forward, and a loop that called `model.loss` directly would skip it."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(batch)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # decay matrices and convolutions only; never norms, biases or embeddings' padding (nanoGPT)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(p, 1 - decay)
        else:
            e.copy_(p)


@dataclass
class TrainResult:
    model: nn.Module  # the weights to use: the EMA when enabled
    step: int
    resumed_from: int
    logs: list[dict[str, Any]]


LogFn = Callable[[int, dict[str, float]], None]


def train(
    model: nn.Module,
    data: BatchSource,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    on_log: LogFn | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` on `data` for `cfg.steps` steps, checkpointing into `out_dir`.

    Running it again with the same arguments resumes from `out_dir/train_state.pt`.
    `on_log(step, logs)` is called every `log_every` steps (the CLI draws its progress bar there).
    `stop_after` ends the call early after that many steps in total (used to test resume).
    Returns the trained model (the EMA copy when `cfg.ema > 0`) in eval mode.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = dist_.local_device(device)
    enable_tf32(device)
    distributed, main, world = dist_.is_distributed(), dist_.is_main(), dist_.world_size()
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch: it must be >= the {world} ranks")
    model = unwrap(model).to(device)
    amp = autocast_dtype(cfg.precision, device)
    if cfg.precision == "bf16" and device.type == "cpu" and not native_bf16(device) and main:
        warnings.warn(
            "precision = bf16 on a CPU without native bf16 matmuls trains 3-4x slower than fp32; "
            "precision = fast uses bf16 only where the hardware has it",
            stacklevel=2,
        )
    opt = make_optimizer(model, cfg, device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    step = 0
    seconds_before = 0.0  # training wall time of earlier calls (a resumed run adds to it)
    log_path = out_dir / "log.jsonl"

    state = load_train_state(out_dir)
    if state is not None:
        if state.get("model_config") != config_to_dict(model.cfg):
            raise CheckpointError(
                f"{out_dir / 'train_state.pt'} was saved for another {model.kind} config; "
                "use another run dir or delete it"
            )
        try:
            model.load_state_dict(state["model"], strict=True)
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"], strict=True)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{out_dir / 'train_state.pt'} does not fit the model ({str(e)[:200]})") from None
        step = int(state["step"])
        seconds_before = float(state.get("train_seconds", 0.0))
    resumed_from = step
    if main:
        _truncate_log(log_path, step)

    saved = step
    call_start = time.perf_counter()

    def train_seconds() -> float:
        return seconds_before + time.perf_counter() - call_start

    def keep(at: int) -> None:
        """A copy of the weights in use at step `at`, for learning curves (FID against training cost)."""
        if not main:
            return
        final = ema if ema is not None else model
        meta = {"step": str(at), "train_seconds": f"{train_seconds():.3f}"}
        save_tensors(out_dir / HISTORY_DIR / f"step-{at:07d}.safetensors", final.state_dict(), metadata=meta)

    def checkpoint(at: int) -> None:
        nonlocal saved
        if not main:  # every rank holds the same weights: one writer
            saved = at
            return
        final = ema if ema is not None else model
        # weights and config first, then the resumable state: a crash in between re-runs a few steps
        extra = {"trained_steps": at, "train": config_to_dict(cfg), "train_seconds": round(train_seconds(), 3)}
        save_model(final, out_dir, extra=extra)
        save_train_state(
            out_dir,
            {
                "step": at,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "model_config": config_to_dict(model.cfg),
                "train_config": config_to_dict(cfg),
                "train_seconds": train_seconds(),
            },
        )
        saved = at

    # compile the loss (a bound method of the plain module): checkpoints keep plain keys
    loss_fn = torch.compile(model.loss) if cfg.compile else model.loss
    if distributed:
        # buffers (codebook statistics) are kept equal by the quantizer's own all-reduces, so DDP
        # need not broadcast them; a discriminator waits for disc_start, unused until then
        ddp = nn.parallel.DistributedDataParallel
        # (torch 2.14 renames broadcast_buffers to forward_sync_buffers)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
        wrapped = ddp(
            _LossModule(model, loss_fn),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "discriminator", None) is not None,
            **{no_sync: False},
        )
        loss_fn = wrapped

    def stop_signal(signals: _DeferSignals) -> int | None:
        """The signal that stops training, agreed by every rank (one may get it a step before another)."""
        if not distributed:
            return signals.signum
        flag = torch.tensor([signals.signum or 0], dtype=torch.long, device=device)
        dist_.all_reduce_sum(flag)  # signal numbers from several ranks: any non-zero means stop
        return (signals.signum or signal.SIGTERM) if int(flag) else None
    logs: list[dict[str, Any]] = []
    last_end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    window_t, window_items = time.perf_counter(), 0
    model.train()
    # a step changes the weights, the optimiser and buffers (codebook statistics) in turn: only a
    # state between two steps is consistent, so SIGINT and SIGTERM are acted on between steps, and a
    # crash (or a second signal) inside a step keeps the last checkpoint
    between_steps = True
    try:
        log_cm = open(log_path, "a") if main else contextlib.nullcontext()
        with log_cm as log_file, _DeferSignals() as signals:
            while step < last_end:
                if (signum := stop_signal(signals)) is not None:
                    if saved < step:
                        checkpoint(step)
                    raise TrainingInterrupted(signum, step, out_dir)
                between_steps = False
                torch.manual_seed(step_seed(cfg.seed, step))
                indices = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
                lo, hi = dist_.shard_range(len(indices))  # this rank's slice of the global batch
                batch = data.batch(indices[lo:hi])
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                with dist_.batch_shard(lo, hi, len(indices)), torch.autocast(
                    device.type, dtype=amp or torch.float32, enabled=amp is not None
                ):
                    loss, step_logs = loss_fn(batch)
                if distributed:
                    # a mean over the slice, weighted by its share of the global batch: summed over
                    # ranks it is the 1-process loss, and DDP's average of the gradients of
                    # loss * weight * world is the 1-process gradient
                    weight = (hi - lo) / len(indices)
                    local = loss
                    loss = dist_.all_reduce_sum(loss.detach().float() * weight)
                if not torch.isfinite(loss):
                    # the forward may have moved codebook buffers already: keep the last checkpoint, and say which
                    kept = f"step {saved} is kept in {out_dir}" if saved > 0 else f"no step was kept in {out_dir}"
                    raise TrainingDiverged(
                        f"training stopped: the loss is {loss.item()} at step {step + 1}; {kept}; "
                        "lower lr or raise warmup_steps"
                    )
                opt.zero_grad(set_to_none=True)
                (local * (weight * world) if distributed else loss).backward()
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item() if cfg.grad_clip > 0 else 0.0
                )
                opt.step()
                if ema is not None:
                    _ema_update(ema, model, cfg.ema)
                step += 1
                between_steps = True
                window_items += len(indices)
                if step % cfg.log_every == 0 or step == last_end:
                    if distributed:
                        step_logs = _global_logs(step_logs, weight, device)
                    dt = time.perf_counter() - window_t
                    entry = {
                        "step": step,
                        "loss": float(loss.item()),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "items_per_s": window_items / max(dt, 1e-9),
                        **{k: float(v) for k, v in step_logs.items()},
                    }
                    logs.append(entry)
                    if main:
                        log_file.write(json.dumps(entry) + "\n")
                        log_file.flush()
                        if on_log is not None:
                            on_log(step, entry)
                    window_t, window_items = time.perf_counter(), 0
                if cfg.keep_every and step % cfg.keep_every == 0:
                    keep(step)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint(step)
            if (signum := stop_signal(signals)) is not None:  # a signal during the last step: the caller must still stop
                if saved < step:
                    checkpoint(step)
                raise TrainingInterrupted(signum, step, out_dir)
    except TrainingDiverged:
        raise  # inside a step: the last checkpoint is what is kept, as its message says
    except BaseException:  # a second Ctrl-C, a crash: keep the last finished step
        if between_steps and saved < step:
            checkpoint(step)
        raise
    if step > saved:
        checkpoint(step)  # stop_after: keep what was done
    dist_.barrier()  # the other ranks go on to read what rank 0 wrote
    final = ema if ema is not None else model
    return TrainResult(model=final.eval(), step=step, resumed_from=resumed_from, logs=logs)


def _global_logs(logs: dict[str, float], weight: float, device: torch.device) -> dict[str, float]:
    """Every rank's logs, weighted by its share of the global batch: exact for means over the batch
    (the losses), an average of the ranks' values for the rest (e.g. PSNR)."""
    keys = sorted(logs)
    values = torch.tensor([float(logs[k]) * weight for k in keys], dtype=torch.float64, device=device)
    dist_.all_reduce_sum(values)
    return dict(zip(keys, values.tolist()))


def _truncate_log(path: Path, step: int) -> None:
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


def is_trained(out_dir: str | Path, steps: int) -> bool:
    """True when `out_dir` holds a finished run of `steps` steps."""
    state_path = Path(out_dir) / "config.json"
    if not state_path.exists() or not (Path(out_dir) / "model.safetensors").exists():
        return False
    try:
        return int(json.loads(state_path.read_text()).get("trained_steps", -1)) >= steps
    except (json.JSONDecodeError, ValueError, TypeError):
        return False
