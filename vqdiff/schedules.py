"""Pure corruption schedules: gamma(t), the probability that a token is corrupted at time t.

t in [0, 1]: t = 0 is the data (gamma = 0), t = 1 is pure noise (gamma = 1), gamma increases.
The same function drives training (corrupt with prob gamma(t)) and sampling (how many tokens are
still noisy after each step): one function for both is the muse-maskgit lesson, since a schedule
copied into the sampler drifts from the one the model was trained on.

MaskGIT (Chang et al. 2022, Sec. 3.3) writes its schedules as a mask ratio of the decoding
progress r = 1 - t; these are the same curves in the noise-level convention: cosine
cos(pi r / 2) = sin(pi t / 2), linear 1 - r = t, square 1 - r^2, cubic 1 - r^3. The concave ones
(cosine, square, cubic) decode few tokens first and many at the end.

Each function takes a float or a float tensor and returns the same kind; `dgamma` is the
derivative d gamma / dt that the continuous-time ELBO weight gamma'(t) / gamma(t) needs (MDLM,
Sahoo et al. 2024, eq. 10), and `inverse` the time at which gamma reaches a given ratio, so that a
sampler can step a model along another schedule's ratios (`vqdiff.samplers.time_grid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

T = TypeVar("T", float, Tensor)


def _sin(x: T) -> T:
    return torch.sin(x) if isinstance(x, Tensor) else math.sin(x)


def _cos(x: T) -> T:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def _asin(x: T) -> T:
    return torch.asin(x) if isinstance(x, Tensor) else math.asin(x)


def cosine(t: T) -> T:
    """gamma(t) = sin(pi t / 2): MaskGIT's cosine mask ratio cos(pi r / 2) with r = 1 - t."""
    return _sin(t * (math.pi / 2))


def cosine_prime(t: T) -> T:
    return (math.pi / 2) * _cos(t * (math.pi / 2))


def cosine_inverse(g: T) -> T:
    return _asin(g) * (2 / math.pi)


def linear(t: T) -> T:
    """gamma(t) = t (MDLM's linear schedule, MaskGIT's linear mask ratio)."""
    return t * 1.0


def linear_prime(t: T) -> T:
    return t * 0.0 + 1.0


def linear_inverse(g: T) -> T:
    return g * 1.0


def square(t: T) -> T:
    """gamma(t) = 1 - (1 - t)^2: MaskGIT's square mask ratio 1 - r^2."""
    return 1 - (1 - t) ** 2


def square_prime(t: T) -> T:
    return 2 * (1 - t)


def square_inverse(g: T) -> T:
    return 1 - (1 - g) ** 0.5


def cubic(t: T) -> T:
    """gamma(t) = 1 - (1 - t)^3: MaskGIT's cubic mask ratio 1 - r^3."""
    return 1 - (1 - t) ** 3


def cubic_prime(t: T) -> T:
    return 3 * (1 - t) ** 2


def cubic_inverse(g: T) -> T:
    return 1 - (1 - g) ** (1 / 3)


@dataclass(frozen=True)
class Schedule:
    """A named schedule: `gamma(t)`, its derivative `dgamma(t)` and its inverse `inverse(gamma)`,
    float or tensor in, same out."""

    name: str
    gamma: Callable[[T], T]
    dgamma: Callable[[T], T]
    inverse: Callable[[T], T]

    def __call__(self, t: T) -> T:
        return self.gamma(t)


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule("cosine", cosine, cosine_prime, cosine_inverse),
        Schedule("linear", linear, linear_prime, linear_inverse),
        Schedule("square", square, square_prime, square_inverse),
        Schedule("cubic", cubic, cubic_prime, cubic_inverse),
    )
}


def get_schedule(name: str) -> Schedule:
    """The schedule called `name` (one of SCHEDULES); ValueError names the choices otherwise."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


# ---------------------------------------------------------------- learning rate


def warmup_cosine(step: int, *, steps: int, warmup: int, peak: float = 1.0, floor_ratio: float = 0.0) -> float:
    """The learning rate at `step`: linear warmup to `peak` over `warmup` steps, then a cosine down to
    peak * floor_ratio at `steps`. The training loop (peak = lr) and the classifier extractor
    (peak = 1, a LambdaLR factor) share it; the arithmetic order is the one both had, so their
    numbers did not change when they started sharing it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
