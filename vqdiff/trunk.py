"""The transformer trunk shared by both generators.

Reads top to bottom: the shared config fields and their check, the building blocks (attention
with a KV cache, MLP, pre-norm block, time embedding), then `Transformer`.

The sequence the trunk sees is `[class token] + ids` in raster order:
- position 0 holds the class embedding; the table has `num_classes + 1` rows and the last one is
  the null class (classifier-free guidance, Ho & Salimans 2022). An unconditional model
  (`num_classes = 0`) has just that row, which then plays the start token.
- position j + 1 holds grid cell j (raster order), with a learned row + column embedding, so the
  trunk knows the h x w grid and not only the flat index.

Letters: `b` batch, `h w` token grid, `n = (h w)`, `m` tokens in one call, `d` width,
`e` head width, `k` codebook size, `v` input vocabulary (k, or k + 1 with the mask row), `t` time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vqdiff.precision import attention_path
from vqdiff.sampling_ops import null_class

# ---------------------------------------------------------------- config checks


@dataclass(frozen=True)
class TrunkConfig:
    """The fields both generators share; `ARConfig` and `DiffusionConfig` extend it."""

    codebook_size: int  # k: ids are in [0, k)
    grid_h: int
    grid_w: int
    num_classes: int = 0  # 0 = unconditional
    class_dropout: float = 0.1  # prob. of the null class in training, for classifier-free guidance
    dim: int = 256
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # multi-token positions: the trunk reads the h x w id grid as an (h/g) x (w/g) grid of g x g groups,
    # each position the sum of its g^2 ids' embeddings (one table per slot), and predicts the g^2 ids of
    # a position with g^2 heads at once (1 = one id per position)
    group: int = 1

    def __post_init__(self) -> None:
        check_trunk_config(self)


def check_trunk_config(cfg: Any) -> None:
    """Validate the fields both generator configs share; raises ValueError with one sentence."""
    if cfg.codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {cfg.codebook_size}")
    if cfg.grid_h < 1 or cfg.grid_w < 1:
        raise ValueError(f"grid_h and grid_w must be >= 1, got {cfg.grid_h}x{cfg.grid_w}")
    if cfg.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {cfg.num_classes}")
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise ValueError(f"class_dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.dim < 1 or cfg.depth < 1 or cfg.heads < 1:
        raise ValueError(f"dim, depth and heads must be >= 1, got {cfg.dim}, {cfg.depth}, {cfg.heads}")
    if cfg.dim % cfg.heads != 0:
        raise ValueError(f"dim ({cfg.dim}) must be divisible by heads ({cfg.heads})")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.group < 1 or cfg.grid_h % cfg.group or cfg.grid_w % cfg.group:
        raise ValueError(f"group must be >= 1 and divide the {cfg.grid_h}x{cfg.grid_w} grid, got {cfg.group}")


# ---------------------------------------------------------------- building blocks


class KVCache:
    """Keys and values of the positions seen so far, one pair per block, for incremental decoding.

    Buffers are allocated on the first write (batch, dtype and device come from the keys) with room
    for `max_len` positions; `length` is how many positions are filled.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [b heads m e] after the cached positions; return all of them [b heads length+m e]."""
        m = k.shape[2]
        end = self.length + m
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if layer not in self.keys:
            b, heads, _, e = k.shape
            self.keys[layer] = k.new_empty(b, heads, self.max_len, e)
            self.values[layer] = v.new_empty(b, heads, self.max_len, e)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, layer: int) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.layer = layer  # which slot of the KV cache is ours
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, causal: bool, cache: KVCache | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b m (three heads e) -> three b heads m e", three=3, heads=self.heads)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)  # [b heads past+m e]
        m = q.shape[2]
        mask, is_causal = None, False
        if causal and m > 1:
            if past == 0:
                is_causal = True
            else:
                # SDPA's is_causal aligns the mask top-left, wrong when queries start after `past` keys
                mask = torch.ones(m, past + m, dtype=torch.bool, device=x.device).tril(past)
        # a single new query after the cache may see every cached key: no mask needed
        dropout = self.dropout if self.training else 0.0
        math_path = attention_path(x.device, q.dtype, k.shape[2]) == "math"
        with sdpa_kernel([SDPBackend.MATH]) if math_path else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        return self.proj(rearrange(out, "b heads m e -> b m (heads e)"))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [b m d], shift/scale [b d] (DiT, Peebles & Xie 2023)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block; with `adaptive`, the time embedding modulates the norms and
    gates the branches (adaLN, DiT). The modulation starts at zero, so an adaptive block starts as
    the plain block: DiT's adaLN-Zero (gate = 0, identity blocks) learned far slower in our tiny
    overfit tests, so the gates here are 1 + gate."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, layer: int, adaptive: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaptive)
        self.attn = Attention(dim, heads, dropout, layer)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaptive)
        self.mlp = MLP(dim, mlp_ratio)
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Linear(dim, 6 * dim) if adaptive else None

    def forward(self, x: Tensor, c: Tensor | None, *, causal: bool, cache: KVCache | None) -> Tensor:
        if self.ada is None:
            x = x + self.drop(self.attn(self.norm1(x), causal=causal, cache=cache))
            return x + self.drop(self.mlp(self.norm2(x)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)  # 6 x [b d]
        x = x + (1 + gate1[:, None]) * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1), causal=causal, cache=cache))
        return x + (1 + gate2[:, None]) * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class TimeEmbedding(nn.Module):
    """t float [b] in [0, 1] -> [b d]: sinusoidal features of 1000 t, then an MLP (DDPM / DiT)."""

    def __init__(self, dim: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]  # [b half]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


def init_weights(model: nn.Module, depth: int) -> None:
    """GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 depth); adaLN starts at zero."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, std=std)
    for module in model.modules():
        if getattr(module, "ada", None) is not None:
            nn.init.zeros_(module.ada.weight)  # no modulation at first: the plain block
            nn.init.zeros_(module.ada.bias)


# ---------------------------------------------------------------- the trunk


class Transformer(nn.Module):
    """Embeddings, blocks and head over the sequence `[class token] + ids` (raster order).

    `cfg` is any config with the shared fields (codebook_size, grid_h, grid_w, num_classes, dim,
    depth, heads, mlp_ratio, dropout; and optionally group). `vocab_size` is the number of input ids (k, or k + 1 when
    mask_id = k is used); the head predicts `codebook_size` logits. `causal` picks next-token
    attention; `time_conditioning` adds adaLN modulation by a time embedding. `head=False` leaves the
    logits to the caller (the AR generator's depth head reads `hidden`).
    """

    def __init__(self, cfg: Any, *, vocab_size: int, causal: bool, time_conditioning: bool, head: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.group = getattr(cfg, "group", 1)  # optional in a config: 1, one id per position
        self.slots = self.group**2
        self.grid_h, self.grid_w = cfg.grid_h // self.group, cfg.grid_w // self.group  # positions
        self.num_classes = cfg.num_classes
        dim = cfg.dim
        # with groups, each slot of a position has its own table (row s * vocab_size + id), and a position's
        # input is the sum of its ids' rows (as MusicGen sums its codebooks'): one shared table plus a slot
        # embedding would sum to the same input for every arrangement of the same ids in the g x g cells
        self.tok_emb = nn.Embedding(self.slots * vocab_size, dim)
        self.register_buffer("slot_offset", torch.arange(self.slots) * vocab_size, persistent=False)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, dim)  # last row: null class / start token
        self.row_emb = nn.Parameter(torch.zeros(self.grid_h, dim))
        self.col_emb = nn.Parameter(torch.zeros(self.grid_w, dim))
        self.time_emb = TimeEmbedding(dim) if time_conditioning else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, layer=i, adaptive=time_conditioning)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, elementwise_affine=not time_conditioning)
        self.ada = nn.Linear(dim, 2 * dim) if time_conditioning else None
        self.head = nn.Linear(dim, self.slots * cfg.codebook_size) if head else None
        self._init_weights(cfg.depth)

    def _init_weights(self, depth: int) -> None:
        init_weights(self, depth)

    @property
    def seq_len(self) -> int:
        """Longest sequence: the class token plus the grid, n + 1."""
        return self.grid_h * self.grid_w + 1

    def positions(self) -> Tensor:
        """Position embedding of every grid cell in raster order: [n d] (row + column)."""
        return rearrange(self.row_emb[:, None] + self.col_emb[None, :], "h w d -> (h w) d")

    def forward(
        self,
        ids: Tensor,
        labels: Tensor | None = None,
        *,
        t: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits float [b m' k] for every position of this call ([b m' g^2 k] with groups).

        ids: long [b m] in [0, vocab_size), raster order ([b m g^2] with groups: the ids of each
        position, its g x g cells in raster order). Without a cache (or with an empty one)
        the sequence is `[class] + ids` (m' = m + 1, ids start at cell 0). With a cache holding L
        positions, the ids are cells L - 1 ... L + m - 2 and m' = m.
        labels: long [b] in [0, num_classes], num_classes = null; None means null.
        t: float [b] in [0, 1], required with time conditioning.
        """
        logits = self.head(self.hidden(ids, labels, t=t, cache=cache))
        return logits if self.slots == 1 else rearrange(logits, "b m (s k) -> b m s k", s=self.slots)

    def hidden(
        self,
        ids: Tensor,
        labels: Tensor | None = None,
        *,
        t: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """The final normed states [b m' d] that `forward` maps to logits; the arguments are forward's."""
        b, m = ids.shape[:2]
        start = cache.length if cache is not None else 0
        cell = max(start - 1, 0)
        if cell + m > self.grid_h * self.grid_w:
            raise ValueError(f"{cell + m} tokens do not fit a {self.grid_h}x{self.grid_w} grid")
        if self.slots == 1:
            x = self.tok_emb(ids)  # [b m d]
        else:
            x = self.tok_emb(ids + self.slot_offset).sum(2)  # [b m s] -> [b m s d] -> [b m d]
        x = x + self.positions()[cell : cell + m]  # [b m d]
        if start == 0:
            if labels is None:
                labels = torch.full((b,), null_class(self.num_classes), dtype=torch.long, device=ids.device)
            x = torch.cat([self.cls_emb(labels)[:, None], x], dim=1)  # [b 1+m d]
        x = self.drop(x)
        c = None
        if self.time_emb is not None:
            if t is None:
                raise ValueError("this trunk is time-conditioned: pass t float [b] in [0, 1]")
            c = self.time_emb(t.expand(b) if t.dim() == 0 else t)  # [b d]
        for block in self.blocks:
            x = block(x, c, causal=self.causal, cache=cache)
        if cache is not None:
            cache.length += x.shape[1]
        x = self.norm(x)
        if self.ada is not None:
            shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return x

    def to_positions(self, ids: Tensor) -> Tensor:
        """long [b h w] cells -> [b n] positions in raster order ([b n g^2] with groups)."""
        if self.slots == 1:
            return rearrange(ids, "b h w -> b (h w)")
        return rearrange(ids, "b (h p) (w q) -> b (h w) (p q)", p=self.group, q=self.group)

    def to_cells(self, x: Tensor) -> Tensor:
        """The inverse of `to_positions` for per-position values x [b n ...] ([b n g^2 ...] with groups):
        [b (h w) ...] over the cells in raster order."""
        if self.slots == 1:
            return x
        g, w = self.group, self.grid_w
        return rearrange(x, "b (h w) (p q) ... -> b (h p w q) ...", w=w, p=g, q=g)
