"""The vector quantizer: nearest code by expanded distance, straight-through gradient.

The codes move by the codebook loss ||sg[z] - e||^2 (or by EMA statistics), and the encoder is
held near its codes by beta * ||z - sg[e]||^2 (van den Oord et al. 2017, eq. 3). The
straight-through estimator only carries the decoder's gradient past the argmin.

Distances and EMA statistics are computed in float32 even under autocast: in bf16 the expanded
distance ||z||^2 - 2 z.e + ||e||^2 cancels catastrophically and the argmin becomes noise.
Under torch.distributed the EMA statistics, k-means and dead-code restarts are all-reduced or
broadcast, so every rank keeps the same codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import FSQ

from vqdiff.distributed import all_gather_rows


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.broadcast(t, 0)
    return t


def squared_distances(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """||z||^2 - 2 z.e + ||e||^2 for z float [n d], codes float [k d] -> float [n k]."""
    return z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.t() + codes.pow(2).sum(1)[None]


def codebook_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(usage, perplexity) from code counts long/float [k]: usage = fraction of codes used."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).item()
    return (counts > 0).float().mean().item(), perplexity


def kmeans(x: torch.Tensor, k: int, iters: int, cosine: bool = False, reduce: bool = True) -> torch.Tensor:
    """Lloyd's k-means on x float [n d] -> centroids float [k d]; sums all-reduced under DDP
    unless `reduce` is False (x already holds every rank's points).

    Starts from k random points (with replacement when n < k), drawn from the global RNG on
    rank 0 and broadcast. Empty clusters keep their previous centroid.
    """
    idx = torch.randint(0, len(x), (k,), device=x.device) if len(x) < k else torch.randperm(len(x), device=x.device)[:k]
    centroids = _broadcast(x[idx].clone())
    for _ in range(iters):
        ids = (x @ centroids.t()).argmax(1) if cosine else squared_distances(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).to(x.dtype)
        if reduce:
            _all_reduce(sums), _all_reduce(counts)
        new = sums / counts.clamp_min(1)[:, None]
        if cosine:
            new = F.normalize(new, dim=1)
        centroids = torch.where(counts[:, None] > 0, new, centroids)
    return centroids


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # float [b d h w], straight-through: forward = codes, backward = identity to z
    ids: torch.Tensor  # long [b h w] in [0, k)
    loss: torch.Tensor  # scalar: codebook + beta * commitment (EMA: beta * commitment only)
    logs: dict[str, float]


class VectorQuantizer(nn.Module):
    """z float [b d h w] -> nearest of k codes of dimension d.

    Options: `ema` codebook updates (decay, Laplace-smoothed counts), `kmeans_init` on the
    first training batch, `restart_dead` codes whose running usage falls under
    `dead_threshold` (replaced by recent encoder outputs), `cosine` (l2-normalised codes).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead: bool = False,
        dead_threshold: float = 1.0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.k, self.dim = codebook_size, dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.restart_dead, self.dead_threshold, self.cosine = restart_dead, dead_threshold, cosine
        codes = torch.randn(codebook_size, dim)
        codes = F.normalize(codes, dim=1) if cosine else codes * dim**-0.5
        if ema:
            self.register_buffer("codebook", codes)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("code_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        # running mean of how many vectors each code gets per step: drives dead-code restarts
        self.register_buffer("usage", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    # ------------------------------------------------------------------ lookups

    def codes(self) -> torch.Tensor:
        """float [k d]: the codebook as used for lookups (normalised when cosine)."""
        c = self.codebook.float()
        return F.normalize(c, dim=1) if self.cosine else c

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """z_flat float [n d] -> ids long [n]."""
        codes = self.codes()
        if self.cosine:
            return (F.normalize(z_flat, dim=1) @ codes.t()).argmax(1)
        return squared_distances(z_flat, codes).argmin(1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long [b h w] -> z_q float [b d h w]."""
        return rearrange(self.codes()[ids], "b h w d -> b d h w")

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z float [b d h w] -> QuantizerOutput. Updates codebook statistics in training mode."""
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            z_flat = rearrange(z, "b d h w -> (b h w) d")
            if self.cosine:
                z_flat = F.normalize(z_flat, dim=1)
                z = rearrange(z_flat, "(b h w) d -> b d h w", b=b, h=h, w=w)
            if self.training and not bool(self.initted):
                self._kmeans_init(z_flat.detach())
            ids_flat = self.nearest(z_flat.detach())
            counts = torch.bincount(ids_flat, minlength=self.k).float()
            if self.training:
                _all_reduce(counts)
                self._update(z_flat.detach(), ids_flat, counts)
            z_q = rearrange(self.codes()[ids_flat], "(b h w) d -> b d h w", b=b, h=h, w=w)
            commitment = F.mse_loss(z, z_q.detach())
            if self.ema:
                loss = self.beta * commitment
            else:
                loss = F.mse_loss(z_q, z.detach()) + self.beta * commitment
            z_q = z + (z_q - z).detach()  # straight-through
        usage, perplexity = codebook_stats(counts)
        logs = {"commitment": commitment.item(), "perplexity": perplexity, "usage": usage}
        return QuantizerOutput(z_q, rearrange(ids_flat, "(b h w) -> b h w", b=b, h=h, w=w), loss, logs)

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        # every rank's vectors, in rank order: under torchrun each rank holds a contiguous slice of
        # the global batch, so this is the 1-process batch and k-means gives the 1-process codebook
        z_all = all_gather_rows(z_flat)
        centroids = kmeans(z_all, self.k, self.kmeans_iters, cosine=self.cosine, reduce=not _dist())
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.cluster_size.fill_(1.0)
            self.code_sum.copy_(centroids)
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook step and dead-code restart; `counts` already all-reduced."""
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = torch.zeros(self.k, self.dim, device=z_flat.device).index_add_(0, ids, z_flat)
            _all_reduce(sums)
            self.ema_step(counts, sums)
        if self.restart_dead:
            self._restart(z_flat, counts.sum() / self.k)

    @torch.no_grad()
    def ema_step(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """N <- d N + (1-d) n ; m <- d m + (1-d) sum z ; e = m / N~ with Laplace-smoothed N~.

        (van den Oord et al. 2017, appendix A.1; smoothing as in Sonnet's VectorQuantizerEMA.)
        """
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.k * self.eps) * n
        codes = self.code_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(codes, dim=1) if self.cosine else codes)

    @torch.no_grad()
    def _restart(self, z_flat: torch.Tensor, mean_count: torch.Tensor) -> None:
        """Codes whose running usage fell under `dead_threshold` jump to random encoder outputs."""
        dead = self.usage < self.dead_threshold  # identical on every rank: usage is all-reduced
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        z_all = all_gather_rows(z_flat)  # as in k-means: the global batch, the same picks as 1 process
        pick = torch.randint(0, len(z_all), (num_dead,), device=z_flat.device)
        new = _broadcast(z_all[pick].clone())
        self.codebook.data[dead] = new
        # a revived code starts at the average usage, which gives it about
        # log(mean / threshold) / (1 - decay) steps to win vectors before it can die again
        self.usage[dead] = mean_count
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.code_sum[dead] = new


class FiniteScalarQuantizer(nn.Module):
    """FSQ (Mentzer et al. 2023) from vector-quantize-pytorch behind this module's interface: z [b d h w]
    is projected to len(levels) channels, each bounded and rounded to its number of levels, and
    projected back. The codebook is implicit (prod(levels) codes), has no loss and cannot collapse."""

    def __init__(self, levels: tuple[int, ...] | list[int], dim: int) -> None:
        super().__init__()
        self.fsq = FSQ(levels=list(levels), dim=dim)
        self.k, self.dim = self.fsq.codebook_size, dim

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """z_flat float [n d] -> ids long [n]."""
        return self.fsq(z_flat.float()[None])[1][0].long()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long [b h w] -> z_q float [b d h w]."""
        return self.fsq.indices_to_codes(ids)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(z.device.type, enabled=False):
            z_q, ids = self.fsq(z.float())
        ids = ids.long()
        counts = torch.bincount(ids.flatten(), minlength=self.k).float()
        if self.training:
            _all_reduce(counts)
        usage, perplexity = codebook_stats(counts)
        return QuantizerOutput(z_q, ids, z.new_zeros((), dtype=torch.float32), {"perplexity": perplexity, "usage": usage})
