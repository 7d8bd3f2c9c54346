"""`vqdiff sample`: name the folder, ask `vqdiff.pipeline` for the images, write the files.

A samples folder holds exactly what its `sample.json` describes: the PNGs, grid.png,
ids.safetensors (the ids, and the classes they were conditioned on: zeros for an unconditional
generator) and (with a GIF) trajectory.gif of one call; `vqdiff evaluate` adds its metrics*.json and
class_accuracy.json. A folder whose sample.json records the same inputs is reused; any other content
is replaced, never added to.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.images import frame_recorder, save_grid, save_pngs, save_trajectory_gif
from recipes.recipe import check_generator
from recipes.run import Run, StageError, ensure_tokens, sync
from vqdiff.io import load_tensors, write_json
from vqdiff.data import load_tokens, save_tokens
from vqdiff.distributed import barrier, is_main
from vqdiff.options import DEFAULTS, READS, SampleOptions
from vqdiff.pipeline import decode, draw_labels, sample_images

@dataclass(frozen=True)
class SampleSpec:
    """One `vqdiff sample` call: the generator, its SampleOptions, and what only the CLI chooses."""

    generator: str
    options: SampleOptions = DEFAULTS
    num: int = 64
    seed: int = 0
    class_: int | None = None  # None: random classes for a conditional model
    prefix_rows: int = 0
    batch_size: int = 64
    use_cache: bool = True

    def validate(self) -> None:
        """What SampleOptions does not check (it checked itself when it was built)."""
        check_generator(self.generator)
        if self.num < 1:
            raise StageError(f"num must be >= 1, got {self.num}")
        if self.batch_size < 1:
            raise StageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.prefix_rows < 0:
            raise StageError(f"prefix rows must be >= 0, got {self.prefix_rows}")
        if self.generator == "diffusion" and self.prefix_rows:
            raise StageError("--prefix-rows is for the ar generator")

    def key(self) -> dict[str, Any]:
        """The inputs as sample.json records them: one flat dict, the options' fields
        (`SampleOptions.record`) beside the spec's."""
        return {"generator": self.generator, **self.options.record(), **{k: v for k, v in asdict(self).items() if k not in ("generator", "options")}}

    def folder_name(self, forward_passes: int) -> str:
        o = self.options
        name = f"{self.generator}-t{o.temperature:g}-s{forward_passes}"
        extras = []
        if o.top_k is not None:
            extras.append(f"k{o.top_k}")
        if o.top_p is not None:
            extras.append(f"p{o.top_p:g}")
        if self.class_ is not None:
            extras.append(f"c{self.class_}")
        if o.cfg != DEFAULTS.cfg:
            extras.append(f"g{o.cfg:g}")
        if o.cfg_schedule is not None:
            extras.append(f"cfg{o.cfg_schedule}")
        if self.prefix_rows:
            extras.append(f"r{self.prefix_rows}")
        if not self.use_cache:
            extras.append("nocache")
        if self.generator == "diffusion":
            extras += o.diffusion_tags()
        return "-".join([name, *extras])


def extra_options(options: SampleOptions, kind: str) -> dict[str, Any]:
    """The fields generator `kind` reads, besides temperature, steps and cfg, that differ from their
    defaults: what edit.json ("options") and the edit caches record beside those three."""
    return {k: getattr(options, k) for k in READS[kind] if k not in ("temperature", "steps", "cfg") and getattr(options, k) != getattr(DEFAULTS, k)}


@dataclass
class Samples:
    ids: torch.Tensor  # long [n h w]
    images: torch.Tensor  # float [n c H W] in [-1, 1]
    seconds: float  # generation + decoding
    forward_passes: int  # per image
    folder: Path
    key: dict[str, Any]  # the inputs that produced them (spec, weights hashes), as in sample.json
    labels: torch.Tensor | None = None  # long [n]: the classes they were conditioned on; None: unconditional

    @property
    def images_per_second(self) -> float:
        return len(self.ids) / max(self.seconds, 1e-9)


def generate(
    run: Run, spec: SampleSpec, *, out: Path | None = None, gif: bool = False, on_batch=None, snapshot: Path | None = None
) -> Samples:
    """Sample `spec.num` images into RUN/samples/GENERATOR-tTEMP-sSTEPS/ (or `out`).

    Writes the PNGs, grid.png, ids.safetensors and sample.json; with `gif`, trajectory.gif. A folder
    whose sample.json records the same inputs (spec, generator and tokenizer weights) is reused.
    `snapshot`: weights kept at an earlier step (learning curves) instead of the final ones.
    """
    spec.validate()
    device = run.torch_device
    model = run.load_generator(spec.generator, device)
    weights = run.weights(spec.generator)
    if snapshot is not None:
        model.load_state_dict(load_tensors(snapshot), strict=True)
        weights = snapshot
    tokenizer = run.load_tokenizer(device)
    cfg = model.cfg
    check_fits(spec, cfg)
    passes = model.forward_passes(spec.options)
    folder = out or run.samples_dir / spec.folder_name(passes)
    key = {
        "spec": spec.key(),
        "generator_hash": run.file_hash(weights),
        "tokenizer_hash": run.decoding_hash,
        "gif": gif,
    }
    old = run.fresh(folder / "sample.json", key)
    if old is not None and (folder / "ids.safetensors").exists():
        ids, saved = load_tokens(folder / "ids.safetensors")  # the labels are saved with the ids (zeros: unconditional)
        labels = saved if cfg.num_classes > 0 else None
        return Samples(ids, decode(tokenizer, ids), old["seconds"], old["forward_passes"], folder, key, labels)

    prefix = _prefixes(run, spec) if spec.prefix_rows else None
    use_cache = spec.use_cache if spec.generator == "ar" else None  # the KV cache is the next-token generator's
    if spec.class_ is not None:
        labels = torch.full((spec.num,), spec.class_, dtype=torch.long)
    else:
        labels = draw_labels(cfg.num_classes, spec.num, spec.seed)
    frames: list[torch.Tensor] = []
    # the folder is about to hold other samples: its marker goes first, so a kill leaves no stale
    # claim, and with it what describes the samples that were here (their FID, their trajectory).
    # Under torchrun every rank samples its share and rank 0 alone writes, once every rank has read
    # the old marker (barrier), and before any rank reads the new files (barrier at the end)
    barrier()
    if is_main():
        # metrics*.json: metrics.json (the configured feature space) and metrics-NAME.json (the other one)
        for stale in ("sample.json", "trajectory.gif", "class_accuracy.json", *(p.name for p in folder.glob("metrics*.json"))):
            (folder / stale).unlink(missing_ok=True)
    sync(device)
    t0 = time.perf_counter()
    ids, images = sample_images(
        model, tokenizer, spec.num, spec.options, labels=labels, seed=spec.seed, batch_size=spec.batch_size,
        callback=frame_recorder(frames) if gif else None, on_batch=on_batch, prefix=prefix, use_cache=use_cache,
    )  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - t0
    if not is_main():
        barrier()
        return Samples(ids, images, seconds, passes, folder, key, labels)

    samples = Samples(ids, images, seconds, passes, folder, key, labels)
    _write(samples, tokenizer, frames, cfg.codebook_size, device)
    barrier()
    return samples


def check_fits(spec: SampleSpec, cfg: Any) -> None:
    """Refuse a class or a prefix the generator's config cannot take."""
    if spec.class_ is not None:
        if cfg.num_classes == 0:
            raise StageError(f"the {spec.generator} generator is unconditional; --class needs conditional = true")
        if not 0 <= spec.class_ < cfg.num_classes:
            raise StageError(f"--class must be in [0, {cfg.num_classes}), got {spec.class_}")
    if spec.prefix_rows >= cfg.grid_h:
        raise StageError(f"--prefix-rows must be < the grid height {cfg.grid_h}, got {spec.prefix_rows}")


def _prefixes(run: Run, spec: SampleSpec) -> torch.Tensor:
    """The first `prefix_rows` token rows of the first `num` test grids (RUN/tokens, written when missing)."""
    ensure_tokens(run)
    test_ids, _ = load_tokens(run.tokens_file("test"))
    if len(test_ids) < spec.num:
        raise StageError(f"--prefix-rows takes prefixes from {len(test_ids)} test grids; ask for at most that many")
    return test_ids[: spec.num, : spec.prefix_rows]


def _write(samples: Samples, tokenizer, frames: list[torch.Tensor], codebook_size: int, device) -> None:
    """The folder's files; sample.json last: its presence means the folder is complete."""
    folder, ids, labels = samples.folder, samples.ids, samples.labels
    save_pngs(samples.images, folder)
    save_grid(samples.images[:64], folder / "grid.png", nrow=8)
    if frames:
        save_trajectory_gif(tokenizer, frames, folder / "trajectory.gif")
    save_tokens(folder / "ids.safetensors", ids, labels if labels is not None else torch.zeros(len(ids)), codebook_size)
    record_json = {
        "key": samples.key,
        "seconds": samples.seconds,
        "images_per_second": samples.images_per_second,
        "forward_passes": samples.forward_passes,
        "device": str(device),
        "num": len(ids),  # the PNGs beside it: 000000.png to {num - 1:06d}.png
    }
    write_json(folder / "sample.json", record_json)
