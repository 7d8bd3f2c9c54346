"""The tokenizer and the next-token prior as an image codec (vqdiff.compress does the coding), and its
benchmark against PNG, WebP and JPEG. The commands (`vqdiff compress`, `decompress`, `bench compress`)
are in recipes.commands.codec."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from recipes.run import Run, StageError
from vqdiff.compress import CompressError, Encoded, decompress_ids, encode_grid, read_header, weights_hash
from vqdiff.data import from_uint8, to_uint8
from vqdiff.pipeline import decode, encode

SUFFIX = ".vqd"


class Codec:
    """A run's tokenizer and AR model on the CPU in fp32 (what the coder needs), with their hashes."""

    def __init__(self, run: Path) -> None:
        self.tokenizer = Run(run).load_tokenizer("cpu").float()
        self.ar = Run(run).load_generator("ar", "cpu").float()
        self.tokenizer_hash = weights_hash(self.tokenizer)
        self.ar_hash = weights_hash(self.ar)

    @property
    def num_classes(self) -> int:
        return self.ar.cfg.num_classes

    def check_class(self, label: int | None) -> None:
        if label is None:
            return
        if self.num_classes == 0:
            raise StageError("the run's ar generator is unconditional; drop --class")
        if not 0 <= label < self.num_classes:
            raise StageError(f"--class must be in [0, {self.num_classes}), got {label}")

    def encode_images(self, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 [b c H W] -> ids long [b h w] (vqdiff.pipeline.encode)."""
        return encode(self.tokenizer, from_uint8(images_uint8), batch_size)

    def decode_ids(self, ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """ids long [b h w] -> uint8 [b c H W] (vqdiff.pipeline.decode)."""
        return to_uint8(decode(self.tokenizer, ids, batch_size))

    def compress(self, ids: torch.Tensor, label: int | None) -> Encoded:
        return encode_grid(self.ar, ids, label, tokenizer_hash=self.tokenizer_hash, ar_hash=self.ar_hash)

    def decompress(self, data: bytes) -> tuple[torch.Tensor, int | None]:
        return decompress_ids(self.ar, data, tokenizer_hash=self.tokenizer_hash, ar_hash=self.ar_hash)


def png_bytes(image_uint8: torch.Tensor, **options: Any) -> bytes:
    return pil_bytes(image_uint8, "PNG", **options)


def pil_image(image_uint8: torch.Tensor):
    """uint8 [c H W] -> a PIL image (L or RGB)."""
    arr = image_uint8.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def pil_bytes(image_uint8: torch.Tensor, format: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    pil_image(image_uint8).save(buf, format=format, **options)
    return buf.getvalue()


def pil_load(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 [c H W]."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def _check_files(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise StageError(f"no such {what}: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise StageError(f"{stems[p.stem]} and {p} would both be written as {p.stem}; rename one")
        stems[p.stem] = p


def find_codec(path: Path, root: Path = Path("runs")) -> Codec:
    """The Codec of the run under `root` whose tokenizer and AR weights made `path` (by the header's
    hashes), so that `vqdiff decompress FILE` needs no run named."""
    try:
        header = read_header(path.read_bytes())
    except CompressError as e:
        raise CompressError(f"{path}: {e}") from None
    candidates = sorted(p for p in root.glob("*") if (p / "tokenizer" / "config.json").exists() and (p / "ar" / "config.json").exists())
    for candidate in candidates:
        try:
            codec = Codec(candidate)
        except Exception:  # a half-trained or broken run is simply not the one
            continue
        if codec.tokenizer_hash == header.tokenizer_hash and codec.ar_hash == header.ar_hash:
            return codec
    raise StageError(
        f"{path}: no run under {root}/ has the tokenizer and AR weights that made it "
        f"(looked at {len(candidates)}); name it with --run RUN"
    )


# ------------------------------------------------------------------ benchmark


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of uint8 images against uint8 references, from the MSE over the whole set."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def _pil_codec(images: torch.Tensor, format: str, **options: Any) -> dict[str, Any]:
    """Encode and decode every image with Pillow: sizes, PSNR, images/s."""
    channels = images.shape[1]
    t0 = time.perf_counter()
    blobs = [pil_bytes(im, format, **options) for im in images]
    t1 = time.perf_counter()
    decoded = torch.stack([pil_load(b, channels) for b in blobs])
    t2 = time.perf_counter()
    return {
        "bytes_per_image": sum(map(len, blobs)) / len(blobs),
        "psnr": psnr_uint8(decoded, images),
        "encode_images_per_second": len(blobs) / (t1 - t0),
        "decode_images_per_second": len(blobs) / (t2 - t1),
    }


def _closest_quality(images: torch.Tensor, format: str, target: float, **options: Any) -> dict[str, Any]:
    """The quality in 1..100 whose PSNR is closest to `target`: a coarse scan, then +-4 around the best."""
    tried: dict[int, dict[str, Any]] = {}

    def at(q: int) -> dict[str, Any]:
        if q not in tried:
            tried[q] = {"quality": q, **_pil_codec(images, format, quality=q, **options)}
        return tried[q]

    def best() -> int:
        return min(tried, key=lambda q: (abs(tried[q]["psnr"] - target), q))

    for q in (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100):
        at(q)
    centre = best()
    for q in range(max(1, centre - 4), min(100, centre + 4) + 1):
        at(q)
    return tried[best()]


def _code_grids(codec: Codec, ids: torch.Tensor, cond: torch.Tensor | None, tok_encode: float, tok_decode: float) -> dict[str, Any]:
    """Compress and decompress every grid of `ids` (one at a time) under the labels `cond` (None: the
    null class): sizes, bits per token against the model's, the coder's excess, round trips, speeds."""
    ar, (n, h, w) = codec.ar, ids.shape
    tokens = n * h * w
    t0 = time.perf_counter()
    encoded = [codec.compress(ids[i], None if cond is None else int(cond[i])) for i in range(n)]
    encode_s = time.perf_counter() - t0
    files = [e.data for e in encoded]
    t0 = time.perf_counter()
    back = [codec.decompress(f)[0] for f in files]
    decode_s = time.perf_counter() - t0
    label_arg = cond if cond is not None else torch.full((n,), ar.cfg.num_classes)  # the null class row
    model_bits = 0.0
    for s in range(0, n, 250):
        info = ar.bits_per_token({"ids": ids[s : s + 250], "labels": label_arg[s : s + 250]})
        model_bits += info["bits_per_token"] * len(ids[s : s + 250]) * h * w
    total = sum(map(len, files))
    overhead = sum(read_header(f).overhead for f in files)
    payload_bits = 8 * (total - overhead)
    return {
        "bytes_per_image": total / n,
        "payload_bytes_per_image": (total - overhead) / n,
        "header_bytes": overhead / n,  # header and checks
        "bits_per_token": payload_bits / tokens,
        "model_bits_per_token": model_bits / tokens,
        # under the integer frequencies, before the coder's termination: the per-token cost
        # of quantising; the rest of the excess is per file (under a byte of termination)
        "ideal_bits_per_token": sum(e.ideal_bits for e in encoded) / tokens,
        "excess": payload_bits / model_bits - 1,
        "termination_bytes_per_image": (payload_bits - sum(e.ideal_bits for e in encoded)) / 8 / n,
        "round_trip_exact": sum(bool(torch.equal(a, b)) for a, b in zip(back, ids)),
        # the tokenizer's share is batched; the coding is one grid at a time
        "encode_images_per_second": n / (tok_encode + encode_s),
        "decode_images_per_second": n / (decode_s + tok_decode),
    }


def run_codec_bench(run: Path, num: int | None = None, quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compress `num` test images of RUN (1000 by default; 0 = all) and compare with PNG, WebP, JPEG."""
    say = progress or (lambda what: None)
    recipe = Run(run).read_recipe()
    codec = Codec(run)
    test = Run(run, None, "cpu").load_split(recipe, "test")
    n = len(test) if num == 0 else min(num or 1000, len(test))
    if quick:
        n = min(n, 16)
    idx = torch.arange(n)
    images, labels = test.images_uint8(idx), test.labels[idx]

    say(f"tokenizer on {n} test images")
    t0 = time.perf_counter()
    ids = codec.encode_images(images)
    tok_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    recon = codec.decode_ids(ids)
    tok_decode = time.perf_counter() - t0
    psnr = psnr_uint8(recon, images)
    h, w = ids.shape[1:]

    ar = codec.ar
    settings = [("class", labels)] if ar.cfg.num_classes > 0 else []
    settings.append(("null class", None))
    rows = []
    for name, cond in settings:
        say(f"vqdiff, {name}: encode and decode {n} grids one token at a time")
        rows.append({"conditioning": name, **_code_grids(codec, ids, cond, tok_encode, tok_decode)})

    say("PNG, WebP and JPEG at the quality closest to the tokenizer's PSNR")
    png = _pil_codec(images, "PNG", optimize=True)
    png["psnr"] = None  # lossless (JSON has no infinity)
    webp = _closest_quality(images, "WEBP", psnr)
    jpeg = _closest_quality(images, "JPEG", psnr, optimize=True)
    metrics_path = run / "ar" / "metrics.json"
    reported = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {
        "run": str(run),
        "split": "test",
        "num_images": n,
        "grid": [h, w],
        "codebook_size": ar.cfg.codebook_size,
        "tokenizer_psnr": psnr,
        "ar_reported_bits_per_token": reported.get("bits_per_token"),
        "ar_reported_num_grids": reported.get("num_grids"),
        "vqdiff": rows,
        "png": png,
        "webp": webp,
        "jpeg": jpeg,
        "torch_threads_for_coding": 1,
        "quick": quick,
    }
