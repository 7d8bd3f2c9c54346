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
from vqdiff.trunk import Block, KVCache, Transformer, TrunkConfig, init_weights


@dataclass(frozen=True)
class ARConfig(TrunkConfig):
    """The next-token generator: the shared trunk fields (vqdiff.trunk.TrunkConfig), and how it draws
    the g^2 ids of a grouped position."""

    # with group > 1: layers of the depth transformer that draws a position's ids one after the other,
    # each given the ones before it (RQ-Transformer, Lee et al. 2022); 0 = all g^2 at once from g^2 heads
    depth_head: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth_head < 0 or (self.depth_head and self.group < 2):
            raise ValueError(f"depth_head draws the ids of a grouped position: it needs group >= 2 and >= 0 layers, got group {self.group}, depth_head {self.depth_head}")


class DepthHead(nn.Module):
    """The RQ-Transformer's depth transformer over the g^2 slots of one position.

    Slot s reads the trunk's state of its position plus its slot embedding plus the embedding of
    the id in slot s - 1, under causal attention over the slots: so p(slot s | position's context,
    slots < s), and a position's ids are drawn in slot order.
    """

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.slots = cfg.group**2
        self.slot_emb = nn.Parameter(torch.zeros(self.slots, cfg.dim))
        self.tok_emb = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, layer=i, adaptive=False) for i in range(cfg.depth_head))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)
        init_weights(self, cfg.depth_head)

    def forward(self, h: Tensor, ids: Tensor) -> Tensor:
        """h: float [b m d], the trunk's states of m positions; ids: long [b m j], j < slots, the first
        j ids of each -> logits float [b m j+1 k] for slots 0 ... j."""
        b, j = h.shape[0], ids.shape[2]
        x = h[:, :, None] + self.slot_emb[: j + 1]  # [b m j+1 d]
        x = torch.cat([x[:, :, :1], x[:, :, 1:] + self.tok_emb(ids)], dim=2)
        x = rearrange(x, "b m s d -> (b m) s d")
        for block in self.blocks:
            x = block(x, None, causal=True, cache=None)
        return rearrange(self.head(self.norm(x)), "(b m) s k -> b m s k", b=b)


class ARTransformer(nn.Module):
    kind = "ar"  # its name in vqdiff.registry and in config.json

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        depth = cfg.depth_head > 0
        self.trunk = Transformer(cfg, vocab_size=cfg.codebook_size, causal=True, time_conditioning=False, head=not depth)
        self.depth = DepthHead(cfg) if depth else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, ids: Tensor, labels: Tensor | None = None) -> Tensor:
        """Next-token logits: float [b n k], where logits[:, i] predicts ids[:, i] from ids[:, :i].

        ids: long [b h w] in [0, k). labels: long [b] in [0, num_classes] (num_classes = null), or None.
        """
        positions = self.trunk.to_positions(ids)
        if self.depth is None:
            logits = self.trunk(positions, labels)  # [b 1+n k] over [class] + ids ([b 1+n s k] with groups)
            return self.trunk.to_cells(logits[:, :-1])  # the last position would predict past the grid
        h = self.trunk.hidden(positions, labels)[:, :-1]  # [b n d]: the state that predicts each position
        return self.trunk.to_cells(self.depth(h, positions[..., :-1]))  # teacher forcing over the slots

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean next-token cross-entropy in nats. batch: {"ids": long [b h w], "labels": long [b] (optional)}.

        The logs are detached 0-dim tensors, read as floats when a log line is written: a `.item()`
        here would break a compiled loss (`compile = true`) into two graphs."""
        ids = batch["ids"]
        labels = train_labels(batch, self.cfg.num_classes, self.cfg.class_dropout)
        logits = self(ids, labels)  # [b n k]
        loss = F.cross_entropy(rearrange(logits.float(), "b n k -> b k n"), rearrange(ids, "b h w -> b (h w)"))
        return loss, {"bits_per_token": loss.detach() / math.log(2)}

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
        cfg * (cond - uncond) on a doubled batch; cfg_schedule moves the scale over the positions,
        `SampleOptions.guidance_at`); it takes one pass per token and ignores `steps`.
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
            out = self._next(feed(double(pending if cache is not None else ids)), labels, cache)  # x2 if guided
            nxt = self._draw(out, guided, options, generator, options.guidance_at(i / max(num - 1, 1)))  # [n slots]
            if forced is not None:
                nxt = torch.where(forced[:, i, None], known[:, i], nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            pending = nxt[:, None]
            if callback is not None:
                rest = torch.full((n, num - ids.shape[1], slots), k, dtype=torch.long, device=device)
                callback(i, self._grid(torch.cat([ids, rest], 1)))
        return self._grid(ids)

    def _next(self, new: Tensor, labels: Tensor | None, cache: KVCache | None) -> Tensor:
        """What the next position is drawn from: its logits [b k] ([b g^2 k] with groups), or with a
        depth head the trunk's state [b d]. `new`: the positions the cache has not seen (every
        position so far without a cache)."""
        if self.depth is not None:
            return self.trunk.hidden(new, labels, cache=cache)[:, -1]
        return self.next_logits(new, labels, cache) if cache is not None else self.trunk(new, labels)[:, -1]

    def _draw(self, out: Tensor, guided: bool, options: SampleOptions, generator: torch.Generator | None, scale: float) -> Tensor:
        """The ids long [n slots] of one position from `_next`'s output (a doubled batch when guided,
        mixed at guidance `scale`): all at once from the heads, or slot by slot through the depth head."""
        def draw(logits: Tensor) -> Tensor:  # [b ... k] -> [n ...]
            logits = cfg_mix(logits, scale) if guided else logits.float()
            nxt = sample_logits(logits.reshape(-1, logits.shape[-1]), temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, generator=generator)
            return nxt.view(logits.shape[:-1])

        if self.depth is None:
            return draw(out).view(-1, self.trunk.slots)  # the ids of one position drawn independently
        drawn = torch.zeros(out.shape[0], 1, 0, dtype=torch.long, device=out.device)  # [b 1 j], both halves alike
        for _ in range(self.trunk.slots):
            nxt = draw(self.depth(out[:, None], drawn)[:, 0, -1])  # [n]
            drawn = torch.cat([drawn, (torch.cat([nxt, nxt]) if guided else nxt)[:, None, None]], dim=2)
        return drawn[: nxt.shape[0], 0]

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
