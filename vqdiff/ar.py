"""The next-token generator: a causal transformer over token grids in raster order.

The sequence is `[class or start token] + ids`; the trunk's output at sequence position i
predicts ids[i], so the loss is `cross_entropy(logits[:, :-1], ids)` over the n + 1 outputs (the
last output would predict a token past the grid). This off-by-one is the classic bug and
`tests/test_ar.py` pins it down.

Sampling decodes one token per forward pass with a KV cache, with temperature, top-k and top-p,
prefix completion (keep the first r rows of a real grid), and class conditioning with
classifier-free guidance (the class is dropped to the null class with prob `class_dropout` in
training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqdiff.options import DEFAULTS, SampleOptions
from vqdiff.precision import sampling_autocast
from vqdiff.sampling_ops import cfg_mix, check_partial_grid, guidance_labels, sample_labels, sample_logits, train_labels
from vqdiff.trunk import KVCache, Transformer, TrunkConfig


@dataclass(frozen=True)
class ARConfig(TrunkConfig):
    """The next-token generator: the shared trunk fields (vqdiff.trunk.TrunkConfig), nothing more."""


class ARTransformer(nn.Module):
    kind = "ar"  # its name in vqdiff.registry and in config.json

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = Transformer(cfg, vocab_size=cfg.codebook_size, causal=True, time_conditioning=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, ids: Tensor, labels: Tensor | None = None) -> Tensor:
        """Next-token logits: float [b n k], where logits[:, i] predicts ids[:, i] from ids[:, :i].

        ids: long [b h w] in [0, k). labels: long [b] in [0, num_classes] (num_classes = null), or None.
        """
        logits = self.trunk(self.trunk.to_positions(ids), labels)  # [b 1+n k] over [class] + ids ([b 1+n s k] with groups)
        return self.trunk.to_cells(logits[:, :-1])  # the last position would predict past the grid

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean next-token cross-entropy in nats. batch: {"ids": long [b h w], "labels": long [b] (optional)}."""
        ids = batch["ids"]
        labels = train_labels(batch, self.cfg.num_classes, self.cfg.class_dropout)
        logits = self(ids, labels)  # [b n k]
        loss = F.cross_entropy(rearrange(logits.float(), "b n k -> b k n"), rearrange(ids, "b h w -> b (h w)"))
        return loss, {"bits_per_token": loss.item() / math.log(2)}

    def forward_passes(self, options: SampleOptions = DEFAULTS) -> int:
        """Forward passes per sample: one per position (h * w, or h * w / g^2 with groups), whatever `options.steps` says."""
        return self.trunk.grid_h * self.trunk.grid_w

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
        prefix: Tensor | None = None,
        use_cache: bool = True,
        known: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Sample n grids: long [n h w] in [0, k). The call is the diffusion generator's, plus what only
        next-token sampling takes (prefix, use_cache).

        options: the fields this generator reads (vqdiff.options.READS["ar"]): temperature >= 0 (0 =
        greedy), top_k / top_p (filter before sampling), cfg (cfg != 1 with labels mixes uncond +
        cfg * (cond - uncond) on a doubled batch); it takes one pass per token and ignores `steps`.
        labels: long [n] or one int, in [0, num_classes); None samples with the null class.
        callback(step_index, ids long [n h w]) is called after every token, the cells not generated
        yet holding k (as a diffusion trajectory holds mask_id = k). prefix: long [n r w], its r rows
        are kept exactly and the rest is generated. use_cache=False recomputes the whole sequence at
        every step (slow; gives the same ids as the cached path for the same generator).
        known: long [n h w] and keep: bool [n h w], a partial grid as the diffusion generator takes
        it, limited to what a next-token model can do: the kept positions of each sample must be a
        prefix in raster order, of any length (`suffix_start`); a ValueError says so otherwise.
        """
        k = self.cfg.codebook_size
        trunk, device = self.trunk, self.device
        num, slots = trunk.grid_h * trunk.grid_w, trunk.slots  # positions, and ids per position

        def feed(x: Tensor) -> Tensor:  # [n i slots] -> what the trunk takes
            return x if slots > 1 else x[..., 0]

        labels = sample_labels(labels, n, self.cfg.num_classes, device)
        labels, guided = guidance_labels(labels, self.cfg.num_classes, options.cfg)
        ids, known, forced = self._given(n, prefix, known, keep)

        def double(x: Tensor) -> Tensor:  # the same tokens for the cond and uncond halves
            return torch.cat([x, x]) if guided else x

        cache = KVCache(trunk.seq_len) if use_cache else None
        pending = ids  # positions the cache has not seen yet (the whole prefix at first)
        for i in range(ids.shape[1], num):
            if cache is not None:
                logits = self.next_logits(feed(double(pending)), labels, cache).float()  # [n k] ([n slots k]; x2 if guided)
            else:
                logits = trunk(feed(double(ids)), labels)[:, -1].float()
            if guided:
                logits = cfg_mix(logits, options.cfg)
            logits = logits.reshape(-1, k)  # [(n slots) k]: the ids of one position are drawn independently
            nxt = sample_logits(logits, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, generator=generator)
            nxt = nxt.view(n, slots)
            if forced is not None:
                nxt = torch.where(forced[:, i, None], known[:, i], nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            pending = nxt[:, None]
            if callback is not None:
                rest = torch.full((n, num - ids.shape[1], slots), k, dtype=torch.long, device=device)
                callback(i, self._grid(torch.cat([ids, rest], 1)))
        return self._grid(ids)

    def _positions(self, grid: Tensor) -> Tensor:
        """long [n h' w] cells -> [n i slots] positions."""
        return self.trunk.to_positions(grid).reshape(grid.shape[0], -1, self.trunk.slots)

    def _given(self, n: int, prefix: Tensor | None, known: Tensor | None, keep: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """What `sample` starts from: (ids long [n i slots], the ids decoded so far: the prefix or the
        shortest kept prefix; known [n positions slots] or None; forced bool [n positions] or None, the
        positions past the shortest kept prefix that a longer one keeps)."""
        h, w, k, device = self.cfg.grid_h, self.cfg.grid_w, self.cfg.codebook_size, self.device
        ids = torch.zeros(n, 0, self.trunk.slots, dtype=torch.long, device=device)
        if prefix is not None:
            if prefix.dim() != 3 or prefix.shape[0] != n or prefix.shape[2] != w or prefix.shape[1] > h:
                raise ValueError(f"prefix must be long [{n} r {w}] with r <= {h}, got {list(prefix.shape)}")
            if prefix.numel() and (prefix.min() < 0 or prefix.max() >= k):
                raise ValueError(f"prefix ids must be in [0, {k})")
            if prefix.shape[1] % self.trunk.group:
                raise ValueError(f"this generator reads {self.trunk.group}x{self.trunk.group} groups: the prefix rows must be a multiple of {self.trunk.group}")
            ids = self._positions(prefix.to(device).long())
        if keep is None and known is None:
            return ids, None, None
        if prefix is not None:
            raise ValueError("give either prefix or known and keep, not both")
        starts = self.suffix_start(known, keep, n)  # [n]
        known = self._positions(known.to(device).long())
        forced = torch.arange(known.shape[1], device=device)[None] < starts.to(device)[:, None]
        return known[:, : int(starts.min())], known, forced

    def _grid(self, ids: Tensor) -> Tensor:
        """long [n positions slots] -> the id grid [n h w]."""
        cells = self.trunk.to_cells(ids if self.trunk.slots > 1 else ids[..., 0])
        return cells.reshape(ids.shape[0], self.cfg.grid_h, self.cfg.grid_w)

    def suffix_start(self, known: Tensor | None, keep: Tensor | None, n: int) -> Tensor:
        """Where each sample's regenerated suffix starts in raster order: long [n] in [0, h*w],
        the number of kept positions (cells; g x g groups with `group`). keep bool [n h w] must keep a raster-order prefix (the free
        cells form a suffix: the bottom rows, or the end of a row and all rows below); known long
        [n h w] holds the ids there. ValueError, one line, for any other region."""
        check_partial_grid(known, keep, n, self.cfg)
        flat = self.trunk.to_positions(keep.cpu())  # [n positions], or [n positions g^2] with groups
        if flat.dim() == 3:
            if not torch.equal(flat.all(-1), flat.any(-1)):
                raise ValueError(f"this ar generator reads {self.trunk.group}x{self.trunk.group} groups: keep whole groups")
            flat = flat.all(-1)
        starts = flat.sum(1)
        prefix = torch.arange(flat.shape[1])[None] < starts[:, None]
        if not torch.equal(flat, prefix):
            raise ValueError(
                "the ar generator can only regenerate a suffix in raster order (the bottom rows, or the end of a "
                "row and all rows below); use the diffusion generator (--generator diffusion) for this region"
            )
        return starts

    def next_logits(self, new: Tensor, labels: Tensor | None, cache: KVCache) -> Tensor:
        """Logits float [b k] of the next grid position ([b g^2 k] with groups), after feeding `new` through the KV cache.

        new: long [b m] in [0, k) ([b m g^2] with groups), the positions the cache has not seen yet (m = 0 on the first call,
        which feeds the class token alone). labels: long [b] in [0, num_classes], or None (null);
        used on the first call only. This one-token-at-a-time path is shared by `sample` and by
        the entropy coder (vqdiff.compress), whose encoder and decoder must compute the same floats.
        """
        return self.trunk(new, labels, cache=cache)[:, -1]

    @torch.no_grad()
    def bits_per_token(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict:
        """Exact negative log-likelihood in bits per token, averaged over the batch.

        batch: {"ids": long [b h w], "labels": long [b] (optional, used when the model is
        class-conditional: then it is -log2 p(ids | label))}. `generator` is unused (nothing random).
        """
        ids = batch["ids"].to(self.device)
        labels = batch.get("labels") if self.cfg.num_classes > 0 else None
        labels = labels.to(self.device).long() if labels is not None else None
        logits = self(ids, labels).float()
        nats = F.cross_entropy(rearrange(logits, "b n k -> b k n"), rearrange(ids, "b h w -> b (h w)"))
        return {
            "bits_per_token": nats.item() / math.log(2),
            "kind": "exact",
            "estimator": "next-token NLL, log2",
        }
