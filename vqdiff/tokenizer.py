"""The VQ-VAE tokenizer: images [b c h w] in [-1,1] <-> ids long [b h' w'] in [0, k).

A conv encoder with residual blocks downsamples by `downsample` (2, 4 or 8), the vector
quantizer snaps each feature to one of `codebook_size` codes, and a mirrored decoder maps the
codes back to pixels. An optional VQGAN PatchGAN discriminator (Esser et al. 2021) adds a hinge
loss with the adaptive weight of taming-transformers, from step `disc_start` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqdiff.perceptual import PerceptualNet, perceptual_distance
from vqdiff.quantize import FiniteScalarQuantizer, VectorQuantizer

# ---------------------------------------------------------------- building blocks


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, twice, plus a skip (1x1 when the width changes)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """images float [b c H W] -> z float [b d H/f W/f].

    The first convolution already downsamples (stride 2): on a CPU, full-resolution feature
    maps cost most of the time and buy little on 32x32 images.
    """

    def __init__(self, channels: int, widths: list[int], num_res: int, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, stride=2, padding=1)]
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.Conv2d(widths[i - 1], w, 4, stride=2, padding=1))
            layers += [ResBlock(w, w) for _ in range(num_res)]
        layers += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z float [b d h w] -> images float [b c h*f w*f] (unbounded; trained towards [-1,1])."""

    def __init__(self, channels: int, widths: list[int], num_res: int, dim: int) -> None:
        super().__init__()
        widths = widths[::-1]
        layers: list[nn.Module] = [nn.Conv2d(dim, widths[0], 3, padding=1)]
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.ConvTranspose2d(widths[i - 1], w, 4, stride=2, padding=1))
            layers += [ResBlock(w, w) for _ in range(num_res)]
        layers += [_norm(widths[-1]), nn.SiLU(), nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last(self) -> nn.Module:
        """The output layer: the VQGAN adaptive weight balances gradients here."""
        return self.net[-1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): images -> logits [b 1 h' w']."""

    def __init__(self, channels: int, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            c_out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), _norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------- config and model


@dataclass(frozen=True)
class TokenizerConfig:
    channels: int = 1  # image channels
    image_size: int = 32
    downsample: int = 4  # 32 -> 8x8 grid; 2 gives 16x16
    width: int = 64  # channels after the first downsampling; doubled at each further one
    max_width: int = 128
    num_res_blocks: int = 1
    codebook_size: int = 512
    codebook_dim: int = 32
    beta: float = 0.25  # commitment weight
    quantizer_ema: bool = True
    quantizer_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_dead: bool = True
    dead_threshold: float = 1.0
    cosine: bool = False
    disc: bool = False  # VQGAN PatchGAN discriminator
    disc_start: int = 2000  # training step at which the adversarial loss switches on
    disc_weight: float = 0.1
    disc_width: int = 32
    disc_layers: int = 2
    lecam_weight: float = 0.0  # LeCAM regulariser of the discriminator (Tseng et al. 2021); 0 = off
    perceptual_weight: float = 0.0  # the vqdiff.perceptual loss; 0 = off
    perceptual_net: str = "classifier"  # classifier: trained on the data first | random: seeded random weights, untrained
    perceptual_width: int = 32
    perceptual_steps: int = 600  # classification steps that train the perceptual network, before the tokenizer
    # decoder refinement: the encoder and the codebook are frozen (no gradient, no codebook update), so
    # every image keeps its ids and only the decoder (and the discriminator) train
    frozen_codes: bool = False
    quantizer: str = "vq"  # vq: the codebook of vqdiff.quantize | fsq: finite scalar quantization
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # quantizer = "fsq": levels per channel; codebook_size = their product

    def __post_init__(self) -> None:
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"tokenizer.downsample must be a power of 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.perceptual_net not in ("classifier", "random"):
            raise ValueError(f"tokenizer.perceptual_net must be classifier or random, got {self.perceptual_net!r}")
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"tokenizer.quantizer must be vq or fsq, got {self.quantizer!r}")
        if self.quantizer == "fsq" and self.codebook_size != math.prod(self.fsq_levels):
            raise ValueError(
                f"with quantizer = fsq, codebook_size must be the product of fsq_levels {list(self.fsq_levels)} "
                f"({math.prod(self.fsq_levels)}), got {self.codebook_size}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)


class VQTokenizer(nn.Module):
    kind = "tokenizer"  # its name in vqdiff.registry and in config.json
    convolutional = True  # its time is in convolutions: `precision = "fast"` takes their rule (vqdiff.precision)

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = int(math.log2(cfg.downsample))
        widths = [min(cfg.width * 2**i, cfg.max_width) for i in range(levels)]
        self.encoder = Encoder(cfg.channels, widths, cfg.num_res_blocks, cfg.codebook_dim)
        self.decoder = Decoder(cfg.channels, widths, cfg.num_res_blocks, cfg.codebook_dim)
        self.quantizer = FiniteScalarQuantizer(cfg.fsq_levels, cfg.codebook_dim) if cfg.quantizer == "fsq" else VectorQuantizer(
            cfg.codebook_size,
            cfg.codebook_dim,
            beta=cfg.beta,
            ema=cfg.quantizer_ema,
            decay=cfg.quantizer_decay,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            restart_dead=cfg.restart_dead,
            dead_threshold=cfg.dead_threshold,
            cosine=cfg.cosine,
        )
        self.discriminator = PatchDiscriminator(cfg.channels, cfg.disc_width, cfg.disc_layers) if cfg.disc else None
        if cfg.disc and cfg.lecam_weight > 0:  # EMAs of the discriminator's mean logits on real and fake images
            self.register_buffer("lecam_ema", torch.zeros(2))
        # frozen; its weights come from vqdiff.perceptual.train_perceptual before training (and with a resume)
        self.perceptual = PerceptualNet(cfg.channels, cfg.perceptual_width).requires_grad_(False) if cfg.perceptual_weight > 0 else None
        # training steps seen by `loss`, so the discriminator switches on at the same step after a resume
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        if cfg.frozen_codes:
            self.encoder.requires_grad_(False)
            self.quantizer.requires_grad_(False)

    def train(self, mode: bool = True) -> "VQTokenizer":
        """With frozen_codes the encoder and the quantizer stay in eval mode (no codebook statistics move)."""
        super().train(mode)
        if self.cfg.frozen_codes:
            self.encoder.eval()
            self.quantizer.eval()
        return self

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    # ---------------------------------------------------------------- encode / decode

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [b c H W] in [-1,1] -> ids long [b h w] in [0, k)."""
        z = self.encoder(images)
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            return self.quantizer.nearest(z_flat).view(b, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long [b h w] in [0, k) -> images float [b c H W], clamped to [-1,1]."""
        return self.decoder(self.quantizer.lookup(ids)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images float [b c H W] -> reconstructions float [b c H W] (through the quantizer)."""
        q = self.quantizer(self.encoder(images))
        return self.decoder(q.z_q)

    # ---------------------------------------------------------------- training

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch {"images": float [b c H W] in [-1,1]} -> (loss, logs)."""
        x = batch["images"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen_codes):
            q = self.quantizer(self.encoder(x))
        rec = self.decoder(q.z_q)
        mse = F.mse_loss(rec.float(), x.float())
        logs = {"mse": mse.item(), "psnr": psnr(mse.item()), **q.logs}
        nll = mse  # the reconstruction terms, which the adversarial weight balances against
        if self.perceptual is not None:
            p = perceptual_distance(self.perceptual, rec, x)
            nll = nll + self.cfg.perceptual_weight * p
            logs["perceptual"] = p.item()
        loss = nll if self.cfg.frozen_codes else nll + q.loss  # frozen codes: the commitment term is a constant
        if self.discriminator is not None and self.training:
            loss = loss + self._adversarial(x, rec, nll, logs)
        if self.training:
            self.train_step += 1
        return loss, logs

    def _adversarial(self, x: torch.Tensor, rec: torch.Tensor, nll: torch.Tensor, logs: dict) -> torch.Tensor:
        """Hinge GAN terms, one optimizer: the generator term sees detached discriminator weights,
        and the discriminator term sees detached reconstructions, so neither trains the other."""
        if int(self.train_step) < self.cfg.disc_start:
            return torch.zeros((), device=x.device)
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        frozen.update(dict(self.discriminator.named_buffers()))
        g_loss = -torch.func.functional_call(self.discriminator, frozen, (rec,)).mean()
        # adaptive weight (taming-transformers): balance the gradients at the decoder's last layer
        last = self.decoder.last.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * self.cfg.disc_weight
        d_real = self.discriminator(x.detach())
        d_fake = self.discriminator(rec.detach())
        d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
        if self.cfg.lecam_weight > 0:
            d_loss = d_loss + self.cfg.lecam_weight * self._lecam(d_real, d_fake)
        logs.update(g_loss=g_loss.item(), d_loss=d_loss.item(), disc_weight=weight.item())
        return weight * g_loss + d_loss

    def _lecam(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        """LeCAM (Tseng et al. 2021): ||D(x) - ema(D(G(z)))||^2 + ||D(G(z)) - ema(D(x))||^2, hinge-clipped
        as in its reference code; keeps the discriminator's logits from drifting apart on little data."""
        with torch.no_grad():
            means = torch.stack([d_real.float().mean(), d_fake.float().mean()])
            self.lecam_ema.lerp_(means, 0.01)
        ema_real, ema_fake = self.lecam_ema
        return F.relu(d_real - ema_fake).pow(2).mean() + F.relu(ema_real - d_fake).pow(2).mean()


def psnr(mse_pm1: float) -> float:
    """PSNR in dB on the [0,1] scale from an MSE measured on [-1,1] images (range 2 -> mse / 4)."""
    return 10 * math.log10(1.0 / max(mse_pm1 / 4, 1e-12))
