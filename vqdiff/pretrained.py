"""A pretrained diffusers `VQModel` as the tokenizer: images [b c H W] in [-1,1] <-> ids long [b h w] in [0, k).

The VQ-GANs of aMUSEd, VQ-Diffusion and Kandinsky's MoVQ are published as diffusers `VQModel`s.
A run uses one with `tokenizer.kind = "diffusers"` and `tokenizer.pretrained = PATH_OR_HUB_ID`:
nothing is trained, and RUN/tokenizer/ keeps a copy in vqdiff's own checkpoint format (the
VQModel's config inside `config.json`, its weights in `model.safetensors`), so the run folder alone
rebuilds it, offline, and its hash names the ids like a trained tokenizer's.

Both directions go through the VQModel's own parts:
- encode: `VQModel.encode` gives the features before quantisation, and its quantizer gives the
  ids (diffusers' `VectorQuantizer` returns them as the third item of its info tuple);
- decode: the codebook rows of the ids (`quantize.get_codebook_entry`), then
  `VQModel.decode(..., force_not_quantize=True)`; a model with `lookup_from_codebook` takes the
  ids there itself.
k is `num_vq_embeddings`, and each of the `len(block_out_channels) - 1` down blocks halves the
image, so the grid is image_size / 2 ** (len(block_out_channels) - 1).

Grey datasets go through an RGB VQModel by repeating the channel on the way in and averaging the
three on the way out.

Other diffusers utilities were weighed against the code they would replace, and left out:
- `training_utils.EMAModel`: it averages parameters only; our weight EMA (`steps.ema_update`)
  also carries buffers (the quantizer's EMA codebook statistics), which a tokenizer needs.
- `optimization.get_cosine_schedule_with_warmup`: a stateful LambdaLR that decays to zero; ours is
  a pure function of the step with a floor (`schedules.warmup_cosine`), which resume relies on.
- `VQDiffusionScheduler`: VQ-Diffusion's posterior under its own cumulative schedule; ours uses
  the one gamma of `schedules` in training and sampling, for all three corruptions.
- `utils.torch_utils.randn_tensor`: draws on the generator's device and moves, as `nn.rand` does,
  but only Gaussian noise; the samplers need uniform noise and ids.
- `ModelMixin`/`ConfigMixin` for our own models: the folder format (config.json with `kind` and
  `format_version`, strict safetensors) is a fixed point of the project; `VQModel` is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn



@dataclass(frozen=True)
class DiffusersTokenizerConfig:
    vq_config: dict[str, Any] = field(default_factory=dict)  # VQModel's config, enough to rebuild it
    channels: int = 3  # the dataset's image channels (1 or 3)
    image_size: int = 32  # the dataset's image side
    source: str = ""  # the folder or Hub id it came from, for the record

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not self.vq_config:
            return  # the default instance, for the recipe's list of defaults
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by the VQModel's downsampling {self.downsample}")

    @property
    def codebook_size(self) -> int:
        return int(self.vq_config["num_vq_embeddings"])

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vq_config["block_out_channels"]) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return (side, side)


class DiffusersTokenizer(nn.Module):
    kind = "diffusers"  # its name in vqdiff.registry and in config.json

    def __init__(self, cfg: DiffusersTokenizerConfig) -> None:
        from diffusers import VQModel

        super().__init__()
        self.cfg = cfg
        self.vq = VQModel.from_config(cfg.vq_config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, channels: int, image_size: int) -> "DiffusersTokenizer":
        """A local folder written by `VQModel.save_pretrained`, or a Hub id (needs the network once)."""
        from diffusers import VQModel

        if not str(name_or_path):
            raise ValueError('tokenizer.kind = "diffusers" needs tokenizer.pretrained = a folder or a Hub id')
        try:
            vq = VQModel.from_pretrained(str(name_or_path))
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load a diffusers VQModel from {name_or_path!r}: {first}") from None
        # json-safe: tuples become lists and diffusers' private keys ("_class_name", ...) are kept as they are
        vq_config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(vq.config).items()}
        model = cls(DiffusersTokenizerConfig(vq_config, channels, image_size, source=str(name_or_path)))
        model.vq.load_state_dict(vq.state_dict(), strict=True)
        return model.eval()

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [b c H W] in [-1,1] -> ids long [b h w] in [0, k)."""
        if images.shape[1] == 1 and self.vq.config.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        z = self.vq.encode(images).latents  # features before quantisation: [b d h w]
        _, _, (_, _, ids) = self.vq.quantize(z)  # flat [b*h*w] unless sane_index_shape
        return ids.view(z.shape[0], z.shape[2], z.shape[3]).long()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long [b h w] in [0, k) -> images float [b c H W], clamped to [-1,1]."""
        b, h, w = ids.shape
        shape = (b, h, w, self.vq.quantize.vq_embed_dim)
        if self.vq.config.lookup_from_codebook:
            images = self.vq.decode(ids.flatten(), force_not_quantize=True, shape=shape).sample
        else:
            z_q = self.vq.quantize.get_codebook_entry(ids.flatten(), shape)  # [b d h w]
            images = self.vq.decode(z_q, force_not_quantize=True).sample
        if self.cfg.channels == 1 and images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        return images.clamp(-1, 1)
