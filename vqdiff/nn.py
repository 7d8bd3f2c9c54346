"""The transformer trunk shared by both generators, and the sampling helpers they share.

Reads top to bottom: random helpers (every one takes a `torch.Generator`), logits helpers
(temperature, top-k, top-p, classifier-free guidance), labels for class conditioning, then the
building blocks (attention with a KV cache, MLP, pre-norm block), then `Transformer`.

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

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# ---------------------------------------------------------------- randomness


def _noise_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    # noise is drawn where the generator lives, then moved: a CPU generator drives a CUDA model
    # and still gives the same numbers for the same seed
    return generator.device if generator is not None else torch.device(device)


def rand(shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [0, 1), float32, drawn on the generator's device and moved to `device`."""
    return torch.rand(tuple(shape), generator=generator, device=_noise_device(generator, device)).to(device)


def randint(high: int, shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """Uniform ids: long `shape` in [0, high), drawn on the generator's device and moved to `device`."""
    return torch.randint(high, tuple(shape), generator=generator, device=_noise_device(generator, device)).to(device)


def gumbel(shape: tuple[int, ...] | torch.Size, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise, float64: argmax(logits + gumbel) is a sample of softmax(logits).

    float64 on purpose: float32 uniforms are multiples of 2^-24, which caps the Gumbel tail at
    -log(-log(1 - 2^-24)) ~ 16.6 and truncates rare ids, so float32 Gumbel-max samples at an
    effective temperature below the one asked for (a known bug in the MaskGIT re-implementations).
    """
    u = torch.rand(tuple(shape), generator=generator, device=_noise_device(generator, device), dtype=torch.float64)
    u = u.to(device).clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------- logits


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf.

    logits: float [... k]. top_k >= 1 keeps the k largest; top_p in (0, 1] keeps the smallest set
    whose probability reaches top_p (Holtzman et al. 2020). The most likely id always survives.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop an id when the ids strictly more likely than it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One id per row of `logits: float [... k]` -> `long [...]` in [0, k).

    Gumbel-max on `logits / temperature` after top-k / top-p filtering; temperature 0 is argmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.double() / temperature, top_k, top_p)  # float64: see `gumbel`
    return (logits + gumbel(logits.shape, device=logits.device, generator=generator)).argmax(-1)


def cfg_mix(logits: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance on a doubled batch: `[cond; uncond]` [2b ...] -> [b ...].

    uncond + s * (cond - uncond): s = 1 is the conditional model, s = 0 the unconditional one.
    """
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


# ---------------------------------------------------------------- class labels


def null_class(num_classes: int) -> int:
    """Index of the null class (the last row of the class table): used for CFG and unconditional models."""
    return num_classes


def sample_labels(labels: Tensor | int | None, n: int, num_classes: int, device: torch.device) -> Tensor | None:
    """Labels for a sampling call: long [n] in [0, num_classes), or None for the null class.

    Accepts None, one int for every sample, or a tensor of shape [n].
    """
    if labels is None:
        return None
    if num_classes == 0:
        raise ValueError("labels were given but the model is unconditional (num_classes = 0)")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def train_labels(batch: dict[str, Tensor], num_classes: int, class_dropout: float) -> Tensor | None:
    """Labels for a training step: long [b], with each one replaced by the null class with prob
    `class_dropout` (uses the global RNG, re-seeded per step by the training loop).

    None for an unconditional model or a batch without "labels" (the dataset's labels are ignored
    when num_classes = 0).
    """
    if num_classes == 0 or "labels" not in batch:
        return None
    labels = batch["labels"].long()
    if class_dropout > 0:
        drop = torch.rand(labels.shape, device=labels.device) < class_dropout
        labels = labels.masked_fill(drop, null_class(num_classes))
    return labels


def guidance_labels(labels: Tensor | None, num_classes: int, cfg_scale: float) -> tuple[Tensor | None, bool]:
    """(labels for the trunk, guided): doubles the labels to `[labels; null]` when CFG is on."""
    guided = labels is not None and cfg_scale != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_class(num_classes))])
    return labels, guided


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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
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


# ---------------------------------------------------------------- the trunk


class Transformer(nn.Module):
    """Embeddings, blocks and head over the sequence `[class token] + ids` (raster order).

    `cfg` is any config with the shared fields (codebook_size, grid_h, grid_w, num_classes, dim,
    depth, heads, mlp_ratio, dropout). `vocab_size` is the number of input ids (k, or k + 1 when
    mask_id = k is used); the head predicts `codebook_size` logits. `causal` picks next-token
    attention; `time_conditioning` adds adaLN modulation by a time embedding.
    """

    def __init__(self, cfg: Any, *, vocab_size: int, causal: bool, time_conditioning: bool) -> None:
        super().__init__()
        self.causal = causal
        self.grid_h, self.grid_w = cfg.grid_h, cfg.grid_w
        self.num_classes = cfg.num_classes
        dim = cfg.dim
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, dim)  # last row: null class / start token
        self.row_emb = nn.Parameter(torch.zeros(cfg.grid_h, dim))
        self.col_emb = nn.Parameter(torch.zeros(cfg.grid_w, dim))
        self.time_emb = TimeEmbedding(dim) if time_conditioning else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, layer=i, adaptive=time_conditioning)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, elementwise_affine=not time_conditioning)
        self.ada = nn.Linear(dim, 2 * dim) if time_conditioning else None
        self.head = nn.Linear(dim, cfg.codebook_size)
        self._init_weights(cfg.depth)

    def _init_weights(self, depth: int) -> None:
        # GPT-2 / nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 depth)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
        for module in self.modules():
            if isinstance(module, (Block, Transformer)) and module.ada is not None:
                nn.init.zeros_(module.ada.weight)  # no modulation at first: the plain block
                nn.init.zeros_(module.ada.bias)

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
        """Logits float [b m' k] for every position of this call.

        ids: long [b m] in [0, vocab_size), raster order. Without a cache (or with an empty one)
        the sequence is `[class] + ids` (m' = m + 1, ids start at cell 0). With a cache holding L
        positions, the ids are cells L - 1 ... L + m - 2 and m' = m.
        labels: long [b] in [0, num_classes], num_classes = null; None means null.
        t: float [b] in [0, 1], required with time conditioning.
        """
        b, m = ids.shape
        start = cache.length if cache is not None else 0
        cell = max(start - 1, 0)
        if cell + m > self.grid_h * self.grid_w:
            raise ValueError(f"{cell + m} tokens do not fit a {self.grid_h}x{self.grid_w} grid")
        x = self.tok_emb(ids) + self.positions()[cell : cell + m]  # [b m d]
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
        return self.head(x)
