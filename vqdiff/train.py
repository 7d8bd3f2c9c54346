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

Reads top to bottom: `TrainConfig` and the small pure helpers, then `train` (setup, loop, save),
then its phases in the order it calls them: `_start` (and `_resume`), `_loss_function`, `_loop`,
and what one pass of the loop does (`_stop_if_signalled`, `_step`, `_log_entry`). The precision
choice lives in `vqdiff.precision`, the step-level pieces (batches, signals, EMA) in `vqdiff.steps`.
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
from vqdiff.checkpoint import config_to_dict, load_train_state, save_model, save_train_state, unwrap
from vqdiff.errors import CheckpointError
from vqdiff.io import save_tensors
from vqdiff.precision import PRECISIONS, bf16_emulated, enable_tf32, model_autocast
from vqdiff.schedules import warmup_cosine
from vqdiff.steps import (
    BatchSource,
    LossModule,
    TrainingInterrupted,
    _DeferSignals,
    batch_indices,
    ema_update,
    global_logs,
    truncate_log,
)

HISTORY_DIR = "history"  # OUT/history/step-NNNNNNN.safetensors, written every `keep_every` steps



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
        # each is a count or a period: 0 steps would train no model, a period of 0 divides by zero
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


def step_seed(seed: int, step: int) -> int:
    return (seed * 7_919 + step * 104_729 + 1) % (2**63 - 1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio (`schedules.warmup_cosine`)."""
    return warmup_cosine(step, steps=cfg.steps, warmup=cfg.warmup_steps, peak=cfg.lr, floor_ratio=cfg.min_lr_ratio)


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
    run = _start(model, cfg, Path(out_dir), device)  # setup: device, optimiser, EMA, resume
    loss_fn = _loss_function(run)
    last_end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    logs = _loop(run, data, loss_fn, last_end, on_log)
    if run.step > run.saved:
        run.checkpoint(run.step)  # stop_after: keep what was done
    dist_.barrier()  # the other ranks go on to read what rank 0 wrote
    return TrainResult(model=run.final.eval(), step=run.step, resumed_from=run.resumed_from, logs=logs)


@dataclass
class _Run:
    """One call of `train`: the model, its optimiser and EMA, where it writes and how far it got."""

    model: nn.Module  # the plain module, on `device`
    cfg: TrainConfig
    out_dir: Path
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    opt: torch.optim.Optimizer
    ema: nn.Module | None
    distributed: bool
    main: bool  # rank 0: the one writer of checkpoints and logs
    world: int
    step: int = 0  # steps finished
    saved: int = 0  # the step of the last checkpoint
    resumed_from: int = 0
    seconds_before: float = 0.0  # training wall time of earlier calls (a resumed run adds to it)
    call_start: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    @property
    def final(self) -> nn.Module:
        """The weights to use: the EMA when enabled."""
        return self.ema if self.ema is not None else self.model

    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.call_start

    def keep(self, at: int) -> None:
        """A copy of the weights in use at step `at`, for learning curves (FID against training cost)."""
        if not self.main:
            return
        meta = {"step": str(at), "train_seconds": f"{self.train_seconds():.3f}"}
        save_tensors(self.out_dir / HISTORY_DIR / f"step-{at:07d}.safetensors", self.final.state_dict(), metadata=meta)

    def checkpoint(self, at: int) -> None:
        if not self.main:  # every rank holds the same weights: one writer
            self.saved = at
            return
        # weights and config first, then the resumable state: a crash in between re-runs a few steps
        extra = {"trained_steps": at, "train": config_to_dict(self.cfg), "train_seconds": round(self.train_seconds(), 3)}
        save_model(self.final, self.out_dir, extra=extra)
        save_train_state(
            self.out_dir,
            {
                "step": at,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "model_config": config_to_dict(self.model.cfg),
                "train_config": config_to_dict(self.cfg),
                "train_seconds": self.train_seconds(),
            },
        )
        self.saved = at


def _start(model: nn.Module, cfg: TrainConfig, out_dir: Path, device: str | torch.device | None) -> _Run:
    """Place the model, build the optimiser and the EMA, and resume from `out_dir` when it holds a state."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = dist_.local_device(device)
    enable_tf32(device)
    distributed, main, world = dist_.is_distributed(), dist_.is_main(), dist_.world_size()
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch: it must be >= the {world} ranks")
    model = unwrap(model).to(device)
    amp = model_autocast(model, cfg.precision, device)
    if bf16_emulated(cfg.precision, device) and main:
        warnings.warn(
            "precision = bf16 on a CPU without native bf16 matmuls trains 3-4x slower than fp32; "
            "precision = fast uses bf16 only where the hardware has it",
            stacklevel=3,  # the caller of `train`
        )
    opt = make_optimizer(model, cfg, device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    run = _Run(model, cfg, out_dir, device, amp, opt, ema, distributed, main, world)
    _resume(run)
    if main:
        truncate_log(run.log_path, run.step)
    run.saved = run.resumed_from = run.step
    run.call_start = time.perf_counter()
    return run


def _resume(run: _Run) -> None:
    """Load `train_state.pt` into the model, optimiser and EMA, if there is one; it must fit."""
    path = run.out_dir / "train_state.pt"
    state = load_train_state(run.out_dir)
    if state is None:
        return
    if state.get("model_config") != config_to_dict(run.model.cfg):
        raise CheckpointError(f"{path} was saved for another {run.model.kind} config; use another run dir or delete it")
    try:
        run.model.load_state_dict(state["model"], strict=True)
        run.opt.load_state_dict(state["optimizer"])
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"], strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit the model ({str(e)[:200]})") from None
    run.step = int(state["step"])
    run.seconds_before = float(state.get("train_seconds", 0.0))


def _loss_function(run: _Run) -> Callable:
    """`model.loss`, compiled when asked, and wrapped in DDP under torchrun."""
    # compile the loss (a bound method of the plain module): checkpoints keep plain keys
    model = run.model
    loss_fn = torch.compile(model.loss) if run.cfg.compile else model.loss
    if not run.distributed:
        return loss_fn
    # buffers (codebook statistics) are kept equal by the quantizer's own all-reduces, so DDP
    # need not broadcast them; a discriminator waits for disc_start, unused until then
    ddp = nn.parallel.DistributedDataParallel
    # (torch 2.14 renames broadcast_buffers to forward_sync_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return ddp(
        LossModule(model, loss_fn),
        device_ids=[run.device.index] if run.device.type == "cuda" else None,
        find_unused_parameters=getattr(model, "discriminator", None) is not None,
        **{no_sync: False},
    )


def _loop(run: _Run, data: BatchSource, loss_fn: Callable, last_end: int, on_log: LogFn | None) -> list[dict[str, Any]]:
    """Steps until `last_end`, logging and checkpointing; signals stop it between two steps."""
    cfg = run.cfg
    logs: list[dict[str, Any]] = []
    window_t, window_items = time.perf_counter(), 0
    run.model.train()
    # a step changes the weights, the optimiser and buffers (codebook statistics) in turn: only a
    # state between two steps is consistent, so SIGINT and SIGTERM are acted on between steps, and a
    # crash (or a second signal) inside a step keeps the last checkpoint
    between_steps = True
    try:
        log_cm = open(run.log_path, "a") if run.main else contextlib.nullcontext()
        with log_cm as log_file, _DeferSignals() as signals:
            while run.step < last_end:
                _stop_if_signalled(run, signals)
                between_steps = False
                out = _step(run, data, loss_fn)
                run.step += 1
                between_steps = True
                window_items += out.items
                if run.step % cfg.log_every == 0 or run.step == last_end:
                    entry = _log_entry(run, out, window_t, window_items)
                    logs.append(entry)
                    if run.main:
                        log_file.write(json.dumps(entry) + "\n")
                        log_file.flush()
                        if on_log is not None:
                            on_log(run.step, entry)
                    window_t, window_items = time.perf_counter(), 0
                if cfg.keep_every and run.step % cfg.keep_every == 0:
                    run.keep(run.step)
                if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                    run.checkpoint(run.step)
            _stop_if_signalled(run, signals)  # a signal during the last step: the caller must still stop
    except TrainingDiverged:
        raise  # inside a step: the last checkpoint is what is kept, as its message says
    except BaseException:  # a second Ctrl-C, a crash: keep the last finished step
        if between_steps and run.saved < run.step:
            run.checkpoint(run.step)
        raise
    return logs


def _stop_if_signalled(run: _Run, signals: _DeferSignals) -> None:
    """After SIGINT or SIGTERM (on any rank: they agree), checkpoint the last step and raise TrainingInterrupted."""
    if not run.distributed:
        signum = signals.signum
    else:  # one rank may get the signal a step before another
        flag = torch.tensor([signals.signum or 0], dtype=torch.long, device=run.device)
        dist_.all_reduce_sum(flag)  # signal numbers from several ranks: any non-zero means stop
        signum = (signals.signum or signal.SIGTERM) if int(flag) else None
    if signum is None:
        return
    if run.saved < run.step:
        run.checkpoint(run.step)
    raise TrainingInterrupted(signum, run.step, run.out_dir)


@dataclass
class _StepOut:
    loss: torch.Tensor  # the global batch's loss
    logs: dict[str, Any]  # the model's own logs (floats or 0-dim tensors), this rank's slice
    lr: float
    grad_norm: float
    weight: float  # this rank's share of the global batch
    items: int  # examples in the global batch


def _step(run: _Run, data: BatchSource, loss_fn: Callable) -> _StepOut:
    """One optimiser step on the batch of step `run.step`, under the global RNG seeded from (seed, step)."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(step_seed(cfg.seed, run.step))
    indices = batch_indices(len(data), cfg.batch_size, run.step, cfg.seed)
    lo, hi = dist_.shard_range(len(indices))  # this rank's slice of the global batch
    batch = data.batch(indices[lo:hi])
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    lr = lr_at(run.step, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    with dist_.batch_shard(lo, hi, len(indices)), torch.autocast(
        device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None
    ):
        loss, step_logs = loss_fn(batch)
    weight, local = (hi - lo) / len(indices), loss
    if run.distributed:
        # a mean over the slice, weighted by its share of the global batch: summed over ranks it
        # is the 1-process loss, and DDP's average of the gradients of loss * weight * world is
        # the 1-process gradient
        loss = dist_.all_reduce_sum(loss.detach().float() * weight)
    if not torch.isfinite(loss):
        # the forward may have moved codebook buffers already: keep the last checkpoint, and say which
        kept = f"step {run.saved} is kept in {run.out_dir}" if run.saved > 0 else f"no step was kept in {run.out_dir}"
        raise TrainingDiverged(
            f"training stopped: the loss is {loss.item()} at step {run.step + 1}; {kept}; lower lr or raise warmup_steps"
        )
    run.opt.zero_grad(set_to_none=True)
    (local * (weight * run.world) if run.distributed else loss).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip).item() if cfg.grad_clip > 0 else 0.0
    run.opt.step()
    if run.ema is not None:
        ema_update(run.ema, run.model, cfg.ema)
    return _StepOut(loss, step_logs, lr, grad_norm, weight, len(indices))


def _log_entry(run: _Run, out: _StepOut, window_t: float, window_items: int) -> dict[str, Any]:
    """The log line of the step just done; `items_per_s` over the steps since the last line."""
    step_logs = global_logs(out.logs, out.weight, run.device) if run.distributed else out.logs
    dt = time.perf_counter() - window_t
    return {
        "step": run.step,
        "loss": float(out.loss.item()),
        "lr": out.lr,
        "grad_norm": out.grad_norm,
        "items_per_s": window_items / max(dt, 1e-9),
        **{k: float(v) for k, v in step_logs.items()},
    }


def is_trained(out_dir: str | Path, steps: int) -> bool:
    """True when `out_dir` holds a finished run of `steps` steps."""
    state_path = Path(out_dir) / "config.json"
    if not state_path.exists() or not (Path(out_dir) / "model.safetensors").exists():
        return False
    try:
        return int(json.loads(state_path.read_text()).get("trained_steps", -1)) >= steps
    except (json.JSONDecodeError, ValueError, TypeError):
        return False
