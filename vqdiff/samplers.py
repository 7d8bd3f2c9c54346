"""The samplers of the diffusion generator, one function each: `sample` picks one in
`DiffusionTransformer._sampler` and calls it as

    run(model, n, grid, denoise, draw, generator, report, **its options) -> ids long [n N]

with `grid` the `Grid` of `time_grid`, `denoise(x long [n N], t) -> logits float [n N k]` (one
forward pass at the model's time t, guidance included), `draw(logits) -> ids` (temperature, top-k,
top-p, from `generator`) and `report(i, x)` after step i. Each takes exactly `grid.steps` forward
passes; time runs from t = 1 (noise) down to 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vqdiff.sampling_ops import filter_logits, gumbel, rand, randint, sample_logits
from vqdiff.schedules import Schedule


def halton_sequence(count: int, base: int) -> list[float]:
    """The first `count` terms of the van der Corput sequence in `base` (the Halton coordinates)."""
    out = []
    for i in range(1, count + 1):
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        out.append(r)
    return out


@functools.lru_cache(maxsize=16)
def halton_order(h: int, w: int) -> Tensor:
    """A permutation of the h*w flat grid positions: the cells hit by the 2-D Halton sequence
    (bases 2 and 3), in order of first visit. long [h*w]."""
    order: list[int] = []
    seen: set[int] = set()
    count = 0
    while len(order) < h * w:
        count = max(64, 2 * count)
        order, seen = [], set()
        for y, x in zip(halton_sequence(count, 2), halton_sequence(count, 3)):
            cell = min(int(y * h), h - 1) * w + min(int(x * w), w - 1)
            if cell not in seen:
                seen.add(cell)
                order.append(cell)
    return torch.tensor(order, dtype=torch.long)



# ---------------------------------------------------------------- where the steps sit


@dataclass(frozen=True)
class Grid:
    """Where a sampler's forward passes sit: step i goes from the model's time times[i] down to
    times[i + 1] (times[0] = 1, times[-1] = 0), and gammas[i] is the share of tokens still
    corrupted at times[i] (the trained schedule's gamma(times[i]))."""

    times: tuple[float, ...]
    gammas: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.times) - 1


def time_grid(trained: Schedule, steps: int, sampling: Schedule | None = None) -> Grid:
    """The steps of a sampler for a model trained on `trained`: evenly spaced in time on the trained
    schedule (t_i = 1 - i / steps) when `sampling` is None or the same schedule, as the samplers
    always stepped. With another `sampling` schedule the share still masked after step i follows
    it, gamma_i = sampling(1 - i / steps), and the model is asked at the time its own schedule
    reaches that share, t_i = trained.inverse(gamma_i): so a model trained on the linear schedule
    (uniform mask ratios, the better ELBO) can decode on MaskGIT's cosine (few tokens first)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = [1 - i / steps for i in range(steps + 1)]
    if sampling is None or sampling.name == trained.name:
        return Grid(tuple(u), tuple(float(trained(x)) for x in u))
    gammas = [float(sampling(x)) for x in u]
    gammas[0], gammas[-1] = 1.0, 0.0  # exact ends: everything corrupted at the start, nothing at the end
    times = [float(trained.inverse(g)) for g in gammas]
    times[0], times[-1] = 1.0, 0.0
    return Grid(tuple(times), tuple(gammas))


# ---------------------------------------------------------------- samplers


def all_masked(model, n: int) -> Tensor:
    """ids long [n N], all mask_id: where the mask corruptions start."""
    return torch.full((n, model.cfg.grid_h * model.cfg.grid_w), model.mask_id, dtype=torch.long, device=model.device)


def maskgit(
    model, n: int, grid: Grid, denoise, draw, generator, report, *, temperature: float, choice_temperature: float
) -> Tensor:
    """MaskGIT (Chang et al. 2022, Sec. 3.2): start all-mask; at step i sample x0 with the
    temperature at the masked positions, then re-mask the floor(gammas[i+1] * N) least confident
    of them (gamma(1 - (i+1)/steps) on the trained schedule). Confidence is log p of the sampled
    id plus Gumbel noise annealed by temperature * (1 - progress); decoded ids are never re-masked."""
    num = model.cfg.grid_h * model.cfg.grid_w
    steps = grid.steps
    x = all_masked(model, n)
    for i in range(steps):
        logits = denoise(x, grid.times[i])  # [n N k]
        masked = x == model.mask_id
        x0 = draw(logits)  # [n N]
        confidence = logits.double().log_softmax(-1).gather(-1, x0[..., None])[..., 0]
        noise_scale = choice_temperature * temperature * (1 - (i + 1) / steps)
        if noise_scale > 0:
            confidence = confidence + noise_scale * gumbel(confidence.shape, device=x.device, generator=generator)
        confidence = confidence.masked_fill(~masked, float("inf"))
        # on the schedule, but decode at least one id per step while any is masked
        target = 0 if i == steps - 1 else math.floor(grid.gammas[i + 1] * num)
        keep_masked = (masked.sum(1) - 1).clamp(min=0).clamp(max=target)  # [n]
        rank = confidence.argsort(-1).argsort(-1)  # 0 = least confident
        x = torch.where(masked, x0, x)
        x = x.masked_fill(rank < keep_masked[:, None], model.mask_id)
        report(i, x)
    return x


def ancestral(
    model, n: int, grid: Grid, denoise, draw, generator, report, *, eta: float = 0.0) -> Tensor:
    """MDLM ancestral sampling (Sahoo et al. 2024, eq. 7): from t to s < t each masked token
    is revealed with prob (gamma(t) - gamma(s)) / gamma(t), its id drawn from p(x0 | x_t) at
    the temperature; revealed ids never change. It samples the model's own distribution (no
    confidence ordering), so more steps cannot make it greedier.

    eta > 0 is ReMDM-cap (Wang et al. 2025, eq. 9): with alpha = 1 - gamma, a decoded token is
    remasked with prob sigma = min(eta, (1 - alpha_s) / alpha_t) and a masked token revealed
    with prob (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t); eta = 0 is MDLM exactly. The cap
    keeps both probabilities in [0, 1], and sigma = 0 at the last step (s = 0) leaves no mask."""
    x = all_masked(model, n)
    for i in range(grid.steps):
        t, s = grid.times[i], grid.times[i + 1]
        alpha_t, alpha_s = 1 - grid.gammas[i], 1 - grid.gammas[i + 1]
        logits = denoise(x, t)
        masked = x == model.mask_id
        sigma = min(eta, (1 - alpha_s) / alpha_t) if eta > 0 and alpha_t > 0 else 0.0
        reveal_p = 1.0 if s == 0 else (alpha_s - (1 - sigma) * alpha_t) / max(1 - alpha_t, 1e-12)
        u = rand(x.shape, device=x.device, generator=generator)
        x0 = draw(logits)
        reveal = masked & (u < reveal_p)
        if sigma > 0:  # drawn only with remasking, so eta = 0 consumes the same noise as MDLM
            remask = ~masked & (rand(x.shape, device=x.device, generator=generator) < sigma)
            x = x.masked_fill(remask, model.mask_id)
        x = torch.where(reveal, x0, x)
        report(i, x)
    return x


def halton(
    model, n: int, grid: Grid, denoise, draw, generator, report) -> Tensor:
    """Halton-MaskGIT (Besnier et al., ICLR 2025): reveal positions in a Halton
    low-discrepancy order over the h x w grid, so that each step's tokens are spread out and
    far from each other (neighbours sampled in the same step are the ones that clash). The
    order is rolled on the torus by a random (dy, dx) per sample; the number revealed per step
    follows the schedule, ids drawn from p(x0 | x_t) at the temperature."""
    h, w = model.cfg.grid_h, model.cfg.grid_w
    num = h * w
    order = halton_order(h, w).to(model.device)  # [N] flat positions, a permutation
    dy = randint(h, (n,), device=model.device, generator=generator)
    dx = randint(w, (n,), device=model.device, generator=generator)
    rows, cols = (order // w)[None] + dy[:, None], (order % w)[None] + dx[:, None]
    order = (rows % h) * w + cols % w  # [n N]: still a permutation of the grid per sample
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num, device=model.device).expand(n, num))
    x = all_masked(model, n)
    steps = grid.steps
    for i in range(steps):
        logits = denoise(x, grid.times[i])
        revealed = num - math.floor(grid.gammas[i + 1] * num) if i < steps - 1 else num
        reveal = (rank < revealed) & (x == model.mask_id)
        x = torch.where(reveal, draw(logits), x)
        report(i, x)
    return x


def uniform(
    model, n: int, grid: Grid, denoise, draw, generator, report) -> Tensor:
    """Refinement from uniform noise: at step i (t = 1 - i/steps -> s = 1 - (i+1)/steps) sample
    x0 with the temperature; where x0 differs from the current id, move to x0 with the D3PM
    posterior odds q(x_s = x0 | x_t, x0) : q(x_s = x_t | x_t, x0), else keep the current id
    (the posterior's jumps to a third, random id are left out: re-corruption keeps the current
    ids). A cold x0 agrees with the current ids, so a lower temperature changes fewer ids;
    at s = 0 the odds are 1 and every id becomes x0."""
    k = model.cfg.codebook_size
    num = model.cfg.grid_h * model.cfg.grid_w
    x = randint(k, (n, num), device=model.device, generator=generator)
    for i in range(grid.steps):
        t, s = grid.times[i], grid.times[i + 1]
        logits = denoise(x, t)
        x0 = draw(logits)  # [n N]
        tt, ss = torch.full((n,), t, device=x.device), torch.full((n,), s, device=x.device)
        post = model.posterior(x, F.one_hot(x0, k), tt, ss)  # [n N k]
        to_x0 = post.gather(-1, x0[..., None])[..., 0]
        stay = post.gather(-1, x[..., None])[..., 0]
        move = to_x0 / (to_x0 + stay)
        u = rand(x.shape, device=x.device, generator=generator)
        x = torch.where((x0 != x) & (u < move), x0, x)
        report(i, x)
    return x


def mask_and_replace(
    model, n: int, grid: Grid, denoise, draw, generator, report, *, temperature: float, top_k=None, top_p=None
) -> Tensor:
    """VQ-Diffusion (Gu et al. 2022, eq. 11): start all-mask; at each step sample
    x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t), p tempered by the temperature; s = 0 at the last
    step leaves no mask."""
    k = model.cfg.codebook_size
    num = model.cfg.grid_h * model.cfg.grid_w
    x = torch.full((n, num), model.mask_id, dtype=torch.long, device=model.device)
    for i in range(grid.steps):
        t, s = grid.times[i], grid.times[i + 1]
        logits = denoise(x, t)
        if temperature == 0:
            p0 = F.one_hot(logits.argmax(-1), k).double()
        else:
            p0 = filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)
        tt, ss = torch.full((n,), t, device=x.device), torch.full((n,), s, device=x.device)
        probs = model.posterior(x, p0, tt, ss)  # [n N k+1]
        x = sample_logits(probs.log(), generator=generator)
        report(i, x)
    return x
