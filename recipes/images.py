"""Image files: PNGs of samples, a PNG grid, and the GIF of a trajectory. Every write is atomic."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from vqdiff.io import atomic_write
from vqdiff.data import to_uint8
from vqdiff.pipeline import decode_partial

SAMPLE_PNG = re.compile(r"\d{6}\.png")  # 000000.png, 000001.png, ...: one per sample
GIF_SAMPLES = 16  # a trajectory GIF shows the first 16 samples of the first batch


def _picture(images: torch.Tensor, nrow: int):
    """images float [b c h w] in [-1,1] -> one PIL image, a grid with grey padding."""
    from PIL import Image
    from torchvision.utils import make_grid

    return Image.fromarray(make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=128).permute(1, 2, 0).numpy())


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, upscale: int = 1) -> None:
    """images float [b c h w] in [-1,1] -> one PNG grid, `upscale` times larger (nearest-neighbour)."""
    picture = _picture(images, nrow)
    if upscale > 1:
        from PIL import Image

        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_pngs(images: torch.Tensor, folder: Path) -> None:
    """One PNG per image, 000000.png on. Sample PNGs of an earlier call that are not overwritten are
    removed first: a folder holds exactly the images its sample.json describes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    clear_sample_pngs(folder)
    for i, a in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        picture = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        atomic_write(folder / f"{i:06d}.png", lambda tmp: picture.save(tmp, format="PNG"))


def clear_sample_pngs(folder: Path) -> None:
    for p in folder.iterdir():
        if SAMPLE_PNG.fullmatch(p.name):
            p.unlink()


def frame_recorder(frames: list[torch.Tensor]) -> Callable[[int, int, torch.Tensor], None]:
    """A sampling callback (vqdiff.pipeline's callback(start, step, ids)) that appends the first
    GIF_SAMPLES grids of the first batch to `frames` at every step: the frames of `save_trajectory_gif`."""

    def record(start: int, step: int, ids: torch.Tensor) -> None:
        if start == 0:
            frames.append(ids[:GIF_SAMPLES].cpu())

    return record


@torch.no_grad()
def save_trajectory_gif(tokenizer: torch.nn.Module, frames: list[torch.Tensor], path: Path) -> None:
    """frames: the ids after every step, long [n h w] in [0, k] -> a GIF of their decoded grids;
    positions still masked (k) are shown grey."""
    from PIL import Image

    pictures = []
    for images in decode_partial(tokenizer, torch.cat(frames)).split(len(frames[0])):  # one frame per step
        picture = _picture(images, nrow=4)
        picture = picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST)
        # an adaptive palette without dithering: the web palette would dither the grey into a checkerboard
        pictures.append(picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=256, dither=Image.Dither.NONE))
    durations = [250] * (len(pictures) - 1) + [1500]  # hold the last frame
    atomic_write(path, lambda tmp: pictures[0].save(
        tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0
    ))  # fmt: skip
