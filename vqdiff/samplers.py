"""The samplers of the diffusion generator, one function each: `sample` picks one in
`DiffusionTransformer._sampler` and calls it as

    run(model, n, grid, denoise, draw, generator, report, options=options) -> ids long [n N]

with `grid` the `Grid` of `time_grid`, `denoise(x long [n N], t) -> logits float [n N k]` (one
forward pass at the model's time t, guidance included), `draw(logits, where=None) -> ids` (temperature, top-k,
top-p, from `generator`; `where`, bool [n N], draws only the ids a step uses, bit-identical to a full draw's), `report(i, x)` after step i, and `options` the caller's SampleOptions,
unchanged (a sampler reads its own fields: `eta`, `choice_temperature`, ...). Each takes exactly
`grid.steps` forward passes; time runs from t = 1 (noise) down to 0.

A partial grid (inpainting, outpainting, class edits): every sampler also takes `known` (long
[n N], ids in [0, k)) and `keep` (bool [n N]). Kept positions hold their known ids from the start
and are never changed (never remasked, clamped after every step); only the other, free positions
are sampled, and the mask samplers spread the schedule's reveals over the free positions alone,
so that all of them are filled by the last step. The random draws do not depend on `keep`: they
have the shapes and the order of an unconstrained call, so that keep=None and an all-False keep
give the same ids for the same generator, bit for bit (tests/test_edit.py): a partial grid
changes what is kept, never which random numbers are drawn.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vqdiff.options import SampleOptions
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


def clamp_kept(x: Tensor, known: Tensor | None, keep: Tensor | None) -> Tensor:
    """x with the kept positions set to their known ids (x itself without a partial grid)."""
    return x if keep is None else torch.where(keep, known, x)


def free_count(keep: Tensor) -> Tensor:
    """The number of positions to fill per sample: float64 [n], so that floor(gamma * free) rounds
    exactly as the Python float gamma * N of an unconstrained grid."""
    return (~keep).sum(1).double()


def maskgit(
    model, n: int, grid: Grid, denoise, draw, generator, report, options: SampleOptions, *,
    known: Tensor | None = None, keep: Tensor | None = None,
) -> Tensor:
    """MaskGIT (Chang et al. 2022, Sec. 3.2): start all-mask; at step i sample x0 with the
    temperature at the masked positions, then re-mask the floor(gammas[i+1] * N) least confident
    of them (gamma(1 - (i+1)/steps) on the trained schedule). Confidence is log p of the sampled
    id plus Gumbel noise annealed by temperature * (1 - progress); decoded ids are never re-masked.
    With a partial grid N is the number of free positions of each sample (kept ones are never masked)."""
    num = model.cfg.grid_h * model.cfg.grid_w if keep is None else free_count(keep)  # int, or float64 [n]
    steps = grid.steps
    x = clamp_kept(all_masked(model, n), known, keep)
    for i in range(steps):
        logits = denoise(x, grid.times[i])  # [n N k]
        masked = x == model.mask_id
        x0 = draw(logits, masked)  # [n N], drawn at the masked positions
        confidence = torch.full(masked.shape, float("inf"), dtype=torch.float64, device=x.device)  # decoded: never re-masked
        confidence[masked] = logits[masked].double().log_softmax(-1).gather(-1, x0[masked][:, None])[:, 0]
        noise_scale = options.choice_temperature * options.temperature * (1 - (i + 1) / steps)
        if noise_scale > 0:
            confidence = confidence + noise_scale * gumbel(confidence.shape, device=x.device, generator=generator)
        # on the schedule, but decode at least one id per step while any is masked
        if keep is None:
            target = 0 if i == steps - 1 else math.floor(grid.gammas[i + 1] * num)
            keep_masked = (masked.sum(1) - 1).clamp(min=0).clamp(max=target)  # [n]
        else:  # per sample: its own number of free positions
            target = torch.zeros_like(num) if i == steps - 1 else (grid.gammas[i + 1] * num).floor()
            keep_masked = torch.minimum((masked.sum(1) - 1).clamp(min=0), target.long())  # [n]
        rank = confidence.argsort(-1).argsort(-1)  # 0 = least confident
        x = torch.where(masked, x0, x)
        x = x.masked_fill(rank < keep_masked[:, None], model.mask_id)
        report(i, x)
    return x


def ancestral(
    model, n: int, grid: Grid, denoise, draw, generator, report, options: SampleOptions, *,
    known: Tensor | None = None, keep: Tensor | None = None,
) -> Tensor:
    """MDLM ancestral sampling (Sahoo et al. 2024, eq. 7): from t to s < t each masked token
    is revealed with prob (gamma(t) - gamma(s)) / gamma(t), its id drawn from p(x0 | x_t) at
    the temperature; revealed ids never change. It samples the model's own distribution (no
    confidence ordering), so more steps cannot make it greedier.

    eta > 0 is ReMDM-cap (Wang et al. 2025, eq. 9): with alpha = 1 - gamma, a decoded token is
    remasked with prob sigma = min(eta, (1 - alpha_s) / alpha_t) and a masked token revealed
    with prob (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t); eta = 0 is MDLM exactly. The cap
    keeps both probabilities in [0, 1], and sigma = 0 at the last step (s = 0) leaves no mask.
    Kept positions of a partial grid are never remasked."""
    eta = options.eta
    x = clamp_kept(all_masked(model, n), known, keep)
    for i in range(grid.steps):
        t, s = grid.times[i], grid.times[i + 1]
        alpha_t, alpha_s = 1 - grid.gammas[i], 1 - grid.gammas[i + 1]
        logits = denoise(x, t)
        masked = x == model.mask_id
        sigma = min(eta, (1 - alpha_s) / alpha_t) if eta > 0 and alpha_t > 0 else 0.0
        reveal_p = 1.0 if s == 0 else (alpha_s - (1 - sigma) * alpha_t) / max(1 - alpha_t, 1e-12)
        u = rand(x.shape, device=x.device, generator=generator)
        reveal = masked & (u < reveal_p)
        x0 = draw(logits, reveal)
        if sigma > 0:  # drawn only with remasking, so eta = 0 consumes the same noise as MDLM
            remask = ~masked & (rand(x.shape, device=x.device, generator=generator) < sigma)
            if keep is not None:
                remask &= ~keep
            x = x.masked_fill(remask, model.mask_id)
        x = torch.where(reveal, x0, x)
        report(i, x)
    return x


def halton(
    model, n: int, grid: Grid, denoise, draw, generator, report, options: SampleOptions, *,
    known: Tensor | None = None, keep: Tensor | None = None,
) -> Tensor:
    """Halton-MaskGIT (Besnier et al., ICLR 2025): reveal positions in a Halton
    low-discrepancy order over the h x w grid, so that each step's tokens are spread out and
    far from each other (neighbours sampled in the same step are the ones that clash). The
    order is rolled on the torus by a random (dy, dx) per sample; the number revealed per step
    follows the schedule, ids drawn from p(x0 | x_t) at the temperature. With a partial grid the
    free positions are taken in the same order, the kept ones skipped, and the schedule counts
    the free positions alone."""
    h, w = model.cfg.grid_h, model.cfg.grid_w
    num = h * w
    order = halton_order(h, w).to(model.device)  # [N] flat positions, a permutation
    dy = randint(h, (n,), device=model.device, generator=generator)
    dx = randint(w, (n,), device=model.device, generator=generator)
    rows, cols = (order // w)[None] + dy[:, None], (order % w)[None] + dx[:, None]
    order = (rows % h) * w + cols % w  # [n N]: still a permutation of the grid per sample
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num, device=model.device).expand(n, num))
    x = clamp_kept(all_masked(model, n), known, keep)
    if keep is not None:  # rank among the free positions: kept ones take no place in the order
        free = ~keep.gather(1, order)  # [n N] in Halton order
        rank = torch.empty_like(order).scatter_(1, order, free.long().cumsum(1) - 1).masked_fill(keep, num)
        num = free_count(keep)  # float64 [n]
    steps = grid.steps
    for i in range(steps):
        logits = denoise(x, grid.times[i])
        if keep is None:
            revealed = num - math.floor(grid.gammas[i + 1] * num) if i < steps - 1 else num
        else:
            revealed = (num - (grid.gammas[i + 1] * num).floor() if i < steps - 1 else num)[:, None]  # [n 1]
        reveal = (rank < revealed) & (x == model.mask_id)
        x = torch.where(reveal, draw(logits, reveal), x)
        report(i, x)
    return x


def uniform(
    model, n: int, grid: Grid, denoise, draw, generator, report, options: SampleOptions, *,
    known: Tensor | None = None, keep: Tensor | None = None,
) -> Tensor:
    """Refinement from uniform noise: at step i (t = 1 - i/steps -> s = 1 - (i+1)/steps) sample
    x0 with the temperature; where x0 differs from the current id, move to x0 with the D3PM
    posterior odds q(x_s = x0 | x_t, x0) : q(x_s = x_t | x_t, x0), else keep the current id
    (the posterior's jumps to a third, random id are left out: re-corruption keeps the current
    ids). A cold x0 agrees with the current ids, so a lower temperature changes fewer ids;
    at s = 0 the odds are 1 and every id becomes x0. Kept positions of a partial grid are set to
    their ids at the start and after every step."""
    k = model.cfg.codebook_size
    num = model.cfg.grid_h * model.cfg.grid_w
    x = clamp_kept(randint(k, (n, num), device=model.device, generator=generator), known, keep)
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
        x = clamp_kept(torch.where((x0 != x) & (u < move), x0, x), known, keep)
        report(i, x)
    return x


def mask_and_replace(
    model, n: int, grid: Grid, denoise, draw, generator, report, options: SampleOptions, *,
    known: Tensor | None = None, keep: Tensor | None = None,
) -> Tensor:
    """VQ-Diffusion (Gu et al. 2022, eq. 11): start all-mask; at each step sample
    x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t), p tempered by the temperature; s = 0 at the last
    step leaves no mask. Kept positions of a partial grid are set to their ids at the start and
    after every step (their posterior is taken as if masked: a visible id at t = 1 has none)."""
    k = model.cfg.codebook_size
    num = model.cfg.grid_h * model.cfg.grid_w
    x = clamp_kept(torch.full((n, num), model.mask_id, dtype=torch.long, device=model.device), known, keep)
    for i in range(grid.steps):
        t, s = grid.times[i], grid.times[i + 1]
        logits = denoise(x, t)
        if options.temperature == 0:
            p0 = F.one_hot(logits.argmax(-1), k).double()
        else:
            p0 = filter_logits(logits.double() / options.temperature, options.top_k, options.top_p).softmax(-1)
        tt, ss = torch.full((n,), t, device=x.device), torch.full((n,), s, device=x.device)
        x_t = x if keep is None else x.masked_fill(keep, model.mask_id)
        probs = model.posterior(x_t, p0, tt, ss)  # [n N k+1]
        x = clamp_kept(sample_logits(probs.log(), generator=generator), known, keep)
        report(i, x)
    return x


# the samplers of the mask corruption, by the name SampleOptions.sampler gives (the functions' own names)
MASK_SAMPLERS = {f.__name__: f for f in (maskgit, ancestral, halton)}
# the one sampler of each other corruption
CORRUPTION_SAMPLERS = {"uniform": uniform, "mask-and-replace": mask_and_replace}
