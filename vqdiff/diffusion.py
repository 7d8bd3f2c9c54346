"""Discrete diffusion over token grids: the corruption processes, the loss and the samplers.

One bidirectional transformer predicts the clean ids x0 from corrupted ids x_t and the time t.
Time runs from t = 0 (data) to t = 1 (noise); gamma = schedules.get_schedule(cfg.schedule) is the
corruption probability, the same function in training and sampling. Each corruption is written
as a marginal q(x_t | x0) = keep * onehot(x0) + uniform / k * ones + mask * onehot(mask_id):

| corruption | keep | uniform (spread over the k ids) | mask |
| --- | --- | --- | --- |
| `mask` (absorbing: MaskGIT, MDLM) | 1 - gamma | 0 | gamma |
| `uniform` (D3PM-uniform) | 1 - gamma | gamma | 0 |
| `mask-and-replace` (VQ-Diffusion) | (1 - gamma)(1 - rho gamma) | (1 - gamma) rho gamma | gamma |

with rho = `replace_fraction`: of the tokens not masked at time t, a share rho * gamma(t) holds a
random id. Every t -> t' > t step is then a valid Markov transition (the kept share
keep / (1 - mask) never grows), everything is masked at t = 1 for the mask kinds, and uniform
noise is exactly uniform at t = 1. `posterior` uses these marginals for q(x_s | x_t, x0).

Training draws t ~ U(0, 1) (stratified over the batch), corrupts, and takes the cross-entropy on
the masked positions (`mask`) or on all positions (`uniform`, `mask-and-replace`: the model has to
find which visible ids are wrong). With `elbo_weighting` the loss is a bound in nats per token:
MDLM's continuous-time weight gamma'(t) / gamma(t) for `mask`, the D3PM discrete-time KL term
(times T = `elbo_steps`) otherwise.

Samplers (`vqdiff.samplers`, chosen in `_sampler`) take exactly `steps` forward passes (a CFG
pass over a doubled batch counts as one): `mask` reveals tokens by MaskGIT's confidence, MDLM's
ancestral rule or a Halton order, `uniform` uses the x0-posterior refinement described at
`samplers.uniform`, `mask-and-replace` the VQ-Diffusion posterior.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import vqdiff.samplers as samplers
from vqdiff.distributed import batch_positions, batch_ratio
from vqdiff.options import DEFAULTS, SampleOptions
from vqdiff.precision import sampling_autocast
from vqdiff.sampling_ops import cfg_mix, check_partial_grid, guidance_labels, rand, randint, sample_labels, sample_logits, train_labels
from vqdiff.schedules import Schedule, get_schedule
from vqdiff.trunk import Transformer, TrunkConfig

CORRUPTIONS = ("mask", "uniform", "mask-and-replace")


@dataclass(frozen=True)
class DiffusionConfig(TrunkConfig):
    """The shared trunk fields (vqdiff.trunk.TrunkConfig; mask_id = codebook_size) plus the corruption."""

    corruption: str = "mask"  # mask | uniform | mask-and-replace
    schedule: str = "cosine"  # a name in vqdiff.schedules.SCHEDULES
    elbo_weighting: bool = False  # train on the ELBO (nats per token) instead of the plain cross-entropy
    replace_fraction: float = 0.1  # mask-and-replace: rho, random ids among visible tokens = rho * gamma(t)
    time_conditioning: bool = True  # adaLN on t; optional for mask only (the mask count tells t)
    elbo_steps: int = 100  # T of the discrete-time bound for uniform and mask-and-replace
    label_smoothing: float = 0.0  # of the plain cross-entropy's targets (MaskGIT trains with 0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {self.corruption!r}")
        get_schedule(self.schedule)  # raises ValueError naming the choices
        if not 0.0 < self.replace_fraction <= 1.0:
            raise ValueError(f"replace_fraction must be in (0, 1], got {self.replace_fraction}")
        if not self.time_conditioning and self.corruption != "mask":
            raise ValueError(f"corruption {self.corruption!r} needs time_conditioning = true: the model cannot count random ids")
        if self.elbo_steps < 1:
            raise ValueError(f"elbo_steps must be >= 1, got {self.elbo_steps}")
        if not 0.0 <= self.label_smoothing < 1.0 or (self.label_smoothing and self.elbo_weighting):
            raise ValueError(f"label_smoothing must be in [0, 1) and smooths the plain cross-entropy only (elbo_weighting = false), got {self.label_smoothing}")


def _per_sample(x: Tensor) -> Tensor:
    """[b] -> [b 1 1], to broadcast a per-sample scalar over [b n k]."""
    return rearrange(x, "b -> b 1 1")


class DiffusionTransformer(nn.Module):
    kind = "diffusion"  # its name in vqdiff.registry and in config.json

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = get_schedule(cfg.schedule)
        self.mask_id = cfg.codebook_size
        self.uses_mask = cfg.corruption != "uniform"
        vocab = cfg.codebook_size + 1 if self.uses_mask else cfg.codebook_size  # + the mask row
        self.trunk = Transformer(cfg, vocab_size=vocab, causal=False, time_conditioning=cfg.time_conditioning)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ the forward process

    def marginals(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(keep, uniform, mask) probabilities of q(x_t | x0) at t (float tensor, any shape); they sum to 1."""
        g = self.schedule(t)
        zero = torch.zeros_like(g)
        if self.cfg.corruption == "mask":
            return 1 - g, zero, g
        if self.cfg.corruption == "uniform":
            return 1 - g, g, zero
        rho = self.cfg.replace_fraction
        return (1 - g) * (1 - rho * g), (1 - g) * rho * g, g

    def corrupt(self, ids: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x0): ids long [b h w] in [0, k), t float [b] in [0, 1] ->
        long [b h w] in [0, k] (mask_id = k) for the mask kinds, in [0, k) for uniform."""
        _, uniform, mask = (_per_sample(p) for p in self.marginals(t.float()))
        r = rand(ids.shape, device=ids.device, generator=generator)
        out = ids
        if self.cfg.corruption != "mask":
            noise = randint(self.cfg.codebook_size, ids.shape, device=ids.device, generator=generator)
            out = torch.where(r < mask + uniform, noise, out)  # mask <= r < mask + uniform: a random id
        if self.uses_mask:
            out = torch.where(r < mask, torch.full_like(ids, self.mask_id), out)
        return out

    def posterior(self, x_t: Tensor, p0: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p0(x0) for s < t, in float64 (D3PM eq. 4, the
        x0-parametrisation; VQ-Diffusion eq. 11).

        x_t: long [b n] in [0, v); p0: float [b n k], a distribution over x0 (one-hot for the true
        posterior); t, s: float [b] in [0, 1]. Returns probs float64 [b n v], v = k + 1 with the
        mask column last for the mask kinds, v = k for uniform.

        Bayes: q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), so the sum over x0 is
        q(x_t | x_s) * sum_x0 q(x_s | x0) w(x0) with w = p0 / q(x_t | x0); an x0 that cannot
        produce x_t (q = 0) gets w = 0.
        """
        k = self.cfg.codebook_size
        # float64 throughout: 1 - gamma near t = 1 and u / k at small t lose digits in float32
        a_t, u_t, m_t = (_per_sample(p) for p in self.marginals(t.double()))
        a_s, u_s, m_s = (_per_sample(p) for p in self.marginals(s.double()))
        # one step s -> t for a token still visible at s: masked g, kept al, uniform be (incl. itself)
        g = (m_t - m_s) / (1 - m_s).clamp_min(1e-300)
        al = a_t / a_s.clamp_min(1e-300)
        be = (1 - g - al).clamp_min(0)
        is_mask = (x_t == self.mask_id)[..., None]  # [b n 1]; never true for uniform
        visible = (~is_mask).double()
        onehot = F.one_hot(x_t.clamp(max=k - 1), k).double() * visible  # [b n k]
        q_t0 = a_t * onehot + u_t / k * visible + m_t * is_mask  # q(x_t | x0) for every x0: [b n k]
        w = torch.where(q_t0 > 0, p0.double() / q_t0.clamp_min(1e-300), 0.0)
        w_sum = w.sum(-1, keepdim=True)  # [b n 1]
        q_t_s = al * onehot + be / k * visible + g * is_mask  # q(x_t | x_s) for every visible x_s
        probs = q_t_s * (a_s * w + u_s / k * w_sum)  # x_s in [0, k): [b n k]
        if self.uses_mask:
            probs = torch.cat([probs, is_mask * m_s * w_sum], dim=-1)  # x_s = mask only if x_t is
        return probs / probs.sum(-1, keepdim=True)

    # ------------------------------------------------------------ model

    def forward(self, ids: Tensor, labels: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """Logits over the clean ids: float [b n k].

        ids: long [b h w] in [0, v), corrupted (mask_id = k for the mask kinds).
        labels: long [b] in [0, num_classes] (num_classes = null), or None.
        t: float [b] in [0, 1], the noise level; needed with time conditioning, ignored without.
        """
        return self._logits(ids, labels, t)

    def _logits(self, ids: Tensor, labels: Tensor | None, t: Tensor | None) -> Tensor:
        """ids long [b h w] or [b n] (cells in raster order) -> logits float [b n k] over the cells
        (with groups the trunk sees g x g groups, and each id gets its own slot's logits)."""
        grid = ids.reshape(ids.shape[0], self.cfg.grid_h, self.cfg.grid_w)
        t = t if self.cfg.time_conditioning else None
        out = self.trunk(self.trunk.to_positions(grid), labels, t=t)[:, 1:]  # drop the class position
        return self.trunk.to_cells(out)

    def _stratified_t(self, b: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """t float [b] in (0, 1): one draw per stratum [i/b, (i+1)/b), lower variance than iid."""
        u = rand((b,), device=device, generator=generator)
        # strata of the global batch under torchrun: row i gets the same t for any number of ranks
        rows, total = batch_positions(b, device) if generator is None else (torch.arange(b, device=device), b)
        return ((rows + u) / total).clamp(1e-6, 1.0)

    def _discrete_kl(self, x_t: Tensor, x0: Tensor, logits: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """KL(q(x_s | x_t, x0) || p(x_s | x_t)) per position: float64 [b n] (nats). At s = 0 it is
        -log p0(x0), the reconstruction term."""
        q = self.posterior(x_t, F.one_hot(x0, self.cfg.codebook_size), t, s)
        p = self.posterior(x_t, logits.double().softmax(-1), t, s)
        # where q = 0 (e.g. the mask column of a visible x_t) p is 0 too: clamp so 0 * log 0 has a 0 gradient
        return (torch.xlogy(q, q) - q * p.clamp_min(1e-300).log()).sum(-1)

    def _discrete_steps(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """u float [b] in [0, 1) -> (t, s) = (i / T, (i - 1) / T) with i = floor(u T) + 1 in [1, T]."""
        steps = self.cfg.elbo_steps
        i = (u * steps).floor().clamp(0, steps - 1) + 1
        return i / steps, (i - 1) / steps

    def elbo(self, ids: Tensor, labels: Tensor | None, u: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One draw of the negative ELBO per grid, in nats per token: (float [b], x_t long [b h w]).

        ids: long [b h w] in [0, k); u: float [b] in [0, 1), where the time is drawn (stratified by
        the caller). The corruption's randomness comes from `generator` (None: the global RNG).
        - `mask`: MDLM's continuous-time bound (Sahoo et al. 2024, eq. 10; Shi et al. 2024),
          gamma'(t) / gamma(t) * sum_masked -log p(x0 | x_t) / n at t = u.
        - `uniform`, `mask-and-replace`: the discrete-time D3PM bound with T = cfg.elbo_steps
          (Austin et al. 2021, eq. 1), T * KL(q(x_s | x_t, x0) || p(x_s | x_t)) / n at the step
          t = i/T, s = (i-1)/T that u falls in; the i = 1 term is -log p(x0 | x_{1/T}) and the prior
          term is zero (q(x_1 | x0) is the prior exactly).
        Both are comparable with the AR model's exact bits per token (the same data, / n).
        """
        cfg = self.cfg
        n = cfg.grid_h * cfg.grid_w
        flat = rearrange(ids, "b h w -> b (h w)")
        if cfg.corruption == "mask":
            t = u.clamp(1e-6, 1.0)
            x_t = self.corrupt(ids, t, generator)
            logits = self(x_t, labels, t).float()
            ce = F.cross_entropy(rearrange(logits, "b n k -> b k n"), flat, reduction="none")  # [b n]
            masked = rearrange(x_t, "b h w -> b (h w)") == self.mask_id
            weight = self.schedule.dgamma(t) / self.schedule(t)  # [b]
            return weight * (ce * masked).sum(1) / n, x_t
        t, s = self._discrete_steps(u)
        x_t = self.corrupt(ids, t, generator)
        logits = self(x_t, labels, t).float()
        kl = self._discrete_kl(rearrange(x_t, "b h w -> b (h w)"), flat, logits, t, s)
        return cfg.elbo_steps * kl.sum(1) / n, x_t

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss in nats. batch: {"ids": long [b h w] in [0, k), "labels": long [b] (optional)}.

        Uses the global RNG (the training loop re-seeds it every step). The logs are detached 0-dim
        tensors (no `.item()`, which would break a compiled loss into two graphs).
        """
        cfg = self.cfg
        ids = batch["ids"]
        labels = train_labels(batch, cfg.num_classes, cfg.class_dropout)
        u = self._stratified_t(ids.shape[0], ids.device)
        if cfg.elbo_weighting:
            nats, x_t = self.elbo(ids, labels, u)
            loss = nats.mean().float()
            logs = {"elbo_bits_per_token": loss.detach() / math.log(2)}
            if cfg.corruption == "mask":
                logs["masked_fraction"] = (x_t == self.mask_id).float().mean()
            return loss, logs
        t = u
        x_t = self.corrupt(ids, t)
        logits = self(x_t, labels, t).float()  # [b n k]
        ce = F.cross_entropy(rearrange(logits, "b n k -> b k n"), rearrange(ids, "b h w -> b (h w)"), reduction="none", label_smoothing=cfg.label_smoothing)
        if cfg.corruption != "mask":
            loss = ce.mean()  # all positions: a visible id may be a random one
            return loss, {"ce": loss.detach()}
        # loss only on masked positions: elsewhere the target is the input (MaskGIT Sec. 3.2)
        masked = (rearrange(x_t, "b h w -> b (h w)") == self.mask_id).float()
        # the mean over the global batch's masked positions (their count summed over ranks under torchrun)
        loss = batch_ratio((ce * masked).sum(), masked.sum())
        return loss, {"masked_fraction": masked.mean(), "ce_masked": loss.detach()}

    @torch.no_grad()
    def bits_per_token(self, batch: dict[str, Tensor], generator: torch.Generator | None = None, *, samples: int = 8) -> dict:
        """An upper bound (negative ELBO, see `elbo`) on -log2 p(ids) per token, averaged over the batch,
        with `samples` stratified draws of the time per grid.

        batch: {"ids": long [b h w] in [0, k), "labels": long [b] (optional, used when the model
        is class-conditional)}. All randomness (t and the corruption) comes from `generator`.
        """
        cfg = self.cfg
        device = self.device
        ids = batch["ids"].to(device)
        labels = batch.get("labels") if cfg.num_classes > 0 else None
        labels = labels.to(device).long() if labels is not None else None
        total = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)  # nats per token, summed over samples
        for j in range(samples):
            u = (j + rand((ids.shape[0],), device=device, generator=generator)) / samples  # stratum j of [0, 1)
            total += self.elbo(ids, labels, u, generator)[0].double()
        nats = (total / samples).mean().item()
        if cfg.corruption == "mask":
            estimator = f"MDLM continuous-time ELBO, {samples} stratified t per grid"
        else:
            estimator = f"D3PM discrete-time ELBO, T={cfg.elbo_steps}, {samples} stratified steps per grid"
        return {"bits_per_token": nats / math.log(2), "kind": "elbo", "estimator": estimator}

    # ------------------------------------------------------------ sampling

    def forward_passes(self, options: SampleOptions = DEFAULTS) -> int:
        """Forward passes per sample: exactly `options.steps`."""
        return options.steps

    def _denoise(self, x: Tensor, labels: Tensor | None, guided: bool, cfg: float, t: float) -> Tensor:
        """One forward pass in a sampler: x long [n N] at noise level t -> logits float [n N k];
        cfg is the guidance scale (used when `guided`)."""
        tt = torch.full((x.shape[0],), t, device=x.device)
        if guided:  # [cond; uncond] on a doubled batch, one pass
            x, tt = torch.cat([x, x]), torch.cat([tt, tt])
        logits = self._logits(x, labels, tt).float()
        return cfg_mix(logits, cfg) if guided else logits

    @torch.no_grad()
    @sampling_autocast
    def sample(
        self,
        n: int,
        options: SampleOptions = DEFAULTS,
        *,
        labels: Tensor | int | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
        known: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Sample n grids in exactly `options.steps` forward passes: long [n h w] in [0, k).

        options: every field (vqdiff.options.READS["diffusion"]): temperature >= 0 (0 = argmax),
        top_k / top_p, cfg (cfg != 1 with labels mixes uncond + cfg * (cond - uncond); cfg_schedule
        moves the scale over the steps, `SampleOptions.guidance_at` at 1 - t), and the
        sampler's choice and settings (`sampler`, `choice_temperature`, `eta`, `sample_schedule`: see
        `_sampler`). The object is read as it is, checked when it was built. labels: long [n] or one
        int, in [0, num_classes); None samples with the null class. callback(step_index, ids long
        [n h w]) is called after every step (still-masked positions hold mask_id = k), e.g. to record
        the trajectory.

        known: long [n h w] in [0, k) and keep: bool [n h w], a partial grid (inpainting,
        outpainting, class edits): the kept positions keep their known ids, exactly, for every
        sampler and corruption, and only the others are sampled (see `vqdiff.samplers`). An
        all-False keep gives the ids of no partial grid, for the same generator.
        """
        run, sampling = self._sampler(options)
        grid = samplers.time_grid(self.schedule, options.steps, sampling)
        h = self.cfg.grid_h
        labels = sample_labels(labels, n, self.cfg.num_classes, self.device)
        labels, guided = guidance_labels(labels, self.cfg.num_classes, options.cfg)

        def denoise(x: Tensor, t: float) -> Tensor:  # the guidance scale at the step's progress 1 - t
            return self._denoise(x, labels, guided, options.guidance_at(1.0 - t), t)

        def draw(logits: Tensor, where: Tensor | None = None) -> Tensor:
            return sample_logits(logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, generator=generator, where=where)

        def report(i: int, x: Tensor) -> None:
            if callback is not None:
                callback(i, rearrange(x, "n (h w) -> n h w", h=h).clone())

        x = run(n, grid, denoise, draw, generator, report, **self._partial(n, known, keep))
        return rearrange(x, "n (h w) -> n h w", h=h)

    def _partial(self, n: int, known: Tensor | None, keep: Tensor | None) -> dict[str, Tensor]:
        """known and keep checked and flattened for a sampler ({} without a partial grid)."""
        if known is None and keep is None:
            return {}
        check_partial_grid(known, keep, n, self.cfg)
        known, keep = known.to(self.device).long(), keep.to(self.device)
        flat = lambda x: rearrange(x, "n h w -> n (h w)")  # noqa: E731
        # the free positions' known ids are never read; 0 there keeps them in range
        return {"known": flat(known.masked_fill(~keep, 0)), "keep": flat(keep)}

    def _sampler(self, options: SampleOptions) -> tuple[Callable[..., Tensor], Schedule | None]:
        """The dispatch: (run(n, grid, denoise, draw, generator, report) -> ids long [n N], the
        sampling schedule). A new sampler goes in vqdiff.samplers' tables.

        `sample_schedule` names the schedule the steps follow (vqdiff.schedules; None: the trained one,
        cfg.schedule): how many tokens are still masked after each step. With another one than the
        trained, the model is asked at the time where its own schedule has that mask ratio
        (`samplers.time_grid`).

        top_k / top_p filter the x0 distribution before sampling. `sampler` chooses which masked
        tokens the `mask` corruption reveals at each step (samplers.MASK_SAMPLERS; the other
        corruptions have one sampler each and ignore it):
        - `maskgit`: the most confident ones, with Gumbel noise of scale `choice_temperature`
          on the confidences; implicitly low-temperature, greedier with more steps;
        - `ancestral`: each masked token with prob (gamma(t) - gamma(s)) / gamma(t) (MDLM), an
          unbiased sampler of the model; `eta` > 0 remasks decoded tokens (ReMDM-cap);
        - `halton`: the tokens next in a Halton low-discrepancy order over the grid, rolled
          randomly per sample, as many per step as the schedule says (Halton-MaskGIT).
        """
        corruption = self.cfg.corruption
        run = samplers.MASK_SAMPLERS[options.sampler] if corruption == "mask" else samplers.CORRUPTION_SAMPLERS[corruption]
        sampling = get_schedule(options.sample_schedule) if options.sample_schedule else None
        return functools.partial(run, self, options=options), sampling
