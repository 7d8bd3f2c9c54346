"""`vqdiff sample`: name the folder, ask `vqdiff.pipeline` for the images, write the files.

A samples folder holds exactly what its `sample.json` describes: the PNGs, grid.png,
ids.safetensors and (with a GIF) trajectory.gif of one call. A folder whose sample.json records the
same inputs is reused; any other content is replaced, never added to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from recipes.images import save_grid, save_pngs, save_trajectory_gif
from recipes.run import GENERATORS, Run, StageError, sync
from vqdiff.checkpoint import load_tensors, write_json
from vqdiff.data import load_tokens, save_tokens
from vqdiff.distributed import barrier, is_main
from vqdiff.diffusion import DEFAULT_CHOICE_TEMPERATURE, MASK_SAMPLERS
from vqdiff.pipeline import decode, draw_labels, sample_images
from vqdiff.schedules import SCHEDULES

GIF_SAMPLES = 16  # the trajectory GIF shows the first 16 samples of the first batch


@dataclass(frozen=True)
class SampleSpec:
    generator: str
    num: int = 64
    temperature: float = 1.0
    steps: int = 8  # diffusion forward passes; AR takes one per token
    seed: int = 0
    top_k: int | None = None
    top_p: float | None = None
    class_: int | None = None  # None: random classes for a conditional model
    cfg: float = 1.0
    prefix_rows: int = 0
    batch_size: int = 64
    use_cache: bool = True
    choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE  # diffusion, mask corruption (MaskGIT)
    sampler: str = "maskgit"  # diffusion, mask corruption: maskgit | ancestral | halton
    eta: float = 0.0  # diffusion, ancestral sampler: ReMDM remasking
    sample_schedule: str | None = None  # diffusion: the schedule the steps follow (None: the trained one)

    def validate(self) -> None:
        if self.generator not in GENERATORS:
            raise StageError(f"unknown generator {self.generator!r}; choose ar or diffusion")
        check_sampling_values(self)
        if not self.temperature > 0:
            raise StageError(f"temperature must be > 0, got {self.temperature}")
        if self.steps < 1:
            raise StageError(f"steps must be >= 1, got {self.steps}")
        if self.num < 1:
            raise StageError(f"num must be >= 1, got {self.num}")
        if self.batch_size < 1:
            raise StageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise StageError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise StageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.cfg > 0:
            raise StageError(f"cfg must be > 0 (1 = no guidance), got {self.cfg}")
        if self.choice_temperature < 0:
            raise StageError(f"choice temperature must be >= 0, got {self.choice_temperature}")
        if self.prefix_rows < 0:
            raise StageError(f"prefix rows must be >= 0, got {self.prefix_rows}")
        if self.generator == "diffusion" and self.prefix_rows:
            raise StageError("--prefix-rows is for the ar generator")
        if self.sampler not in MASK_SAMPLERS:
            raise StageError(f"unknown sampler {self.sampler!r}; choose from {', '.join(MASK_SAMPLERS)}")
        if not 0 <= self.eta <= 1:
            raise StageError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta and self.sampler != "ancestral":
            raise StageError("--eta (remasking) is for the ancestral sampler")
        if self.sample_schedule is not None and self.sample_schedule not in SCHEDULES:
            raise StageError(f"unknown sample schedule {self.sample_schedule!r}; choose from {', '.join(SCHEDULES)}")

    def options(self, takes: tuple[str, ...]) -> dict[str, Any]:
        """The sampling options among `takes` (a generator's `sample_options`) that differ from their
        defaults; the others have no meaning for that generator and are left out, as they always were."""
        defaults = SampleSpec(self.generator)
        names = ("top_k", "top_p", "use_cache", "choice_temperature", "sampler", "eta", "sample_schedule")
        return {k: getattr(self, k) for k in names if k in takes and getattr(self, k) != getattr(defaults, k)}

    def folder_name(self, forward_passes: int) -> str:
        name = f"{self.generator}-t{self.temperature:g}-s{forward_passes}"
        extras = []
        if self.top_k is not None:
            extras.append(f"k{self.top_k}")
        if self.top_p is not None:
            extras.append(f"p{self.top_p:g}")
        if self.class_ is not None:
            extras.append(f"c{self.class_}")
        if self.cfg != 1.0:
            extras.append(f"g{self.cfg:g}")
        if self.prefix_rows:
            extras.append(f"r{self.prefix_rows}")
        if not self.use_cache:
            extras.append("nocache")
        if self.generator == "diffusion" and self.sampler != "maskgit":
            extras.append(self.sampler)  # maskgit keeps the names of the folders written before samplers
        if self.generator == "diffusion" and self.eta:
            extras.append(f"eta{self.eta:g}")
        if self.generator == "diffusion" and self.sample_schedule is not None:
            extras.append(f"sched{self.sample_schedule}")
        if self.generator == "diffusion" and self.sampler == "maskgit" and self.choice_temperature != DEFAULT_CHOICE_TEMPERATURE:
            extras.append(f"ct{self.choice_temperature:g}")
        return "-".join([name, *extras])


def recipe_sampler(
    run_dir: Path, sampler: str | None, eta: float | None, sample_schedule: str | None = None
) -> tuple[str, float, str | None]:
    """--sampler, --eta and --sample-schedule, each defaulting to the run's recipe (diffusion.sampler,
    diffusion.eta, diffusion.sample_schedule); a sample schedule "" is None, the trained one."""
    recipe_path = Run(run_dir).recipe_path
    section = Run(run_dir).read_recipe()["diffusion"] if recipe_path.exists() else {}
    sampler = sampler if sampler is not None else section.get("sampler", "maskgit")
    if eta is None:
        eta = section.get("eta", 0.0) if sampler == "ancestral" else 0.0
    if sample_schedule is None:
        sample_schedule = section.get("sample_schedule", "")
    return sampler, eta, sample_schedule or None


# one forward pass per step: the cost is linear in steps (--steps 100000 on 2 images ran for minutes)
MAX_SAMPLE_STEPS = 1024


def check_sampling_values(spec: "SampleSpec") -> None:
    """Refuse inf and nan (they passed the > 0 checks and gave degenerate images with exit code 0),
    and steps beyond MAX_SAMPLE_STEPS."""
    for name in ("temperature", "cfg", "choice_temperature", "top_p"):
        v = getattr(spec, name)
        if v is not None and not math.isfinite(v):
            raise StageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if spec.steps > MAX_SAMPLE_STEPS:
        raise StageError(f"steps must be <= {MAX_SAMPLE_STEPS} (one forward pass each), got {spec.steps}")


@dataclass
class Samples:
    ids: torch.Tensor  # long [n h w]
    images: torch.Tensor  # float [n c H W] in [-1, 1]
    seconds: float  # generation + decoding
    forward_passes: int  # per image
    folder: Path
    key: dict[str, Any]  # the inputs that produced them (spec, weights hashes), as in sample.json

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
    if spec.class_ is not None:
        if cfg.num_classes == 0:
            raise StageError(f"the {spec.generator} generator is unconditional; --class needs conditional = true")
        if not 0 <= spec.class_ < cfg.num_classes:
            raise StageError(f"--class must be in [0, {cfg.num_classes}), got {spec.class_}")
    if spec.prefix_rows >= cfg.grid_h:
        raise StageError(f"--prefix-rows must be < the grid height {cfg.grid_h}, got {spec.prefix_rows}")
    steps = spec.steps if model.takes_steps else None  # AR: one pass per token, whatever --steps said
    passes = model.forward_passes(steps)
    folder = out or run.samples_dir / spec.folder_name(passes)
    spec_key = asdict(spec)
    if spec.sample_schedule is None:  # the key of the folders written before sample schedules: they stay reusable
        del spec_key["sample_schedule"]
    key = {
        "spec": spec_key,
        "generator_hash": run.file_hash(weights),
        "tokenizer_hash": run.tokenizer_hash,
        "gif": gif,
    }
    old = run.fresh(folder / "sample.json", key)
    if old is not None and (folder / "ids.safetensors").exists():
        ids, _ = load_tokens(folder / "ids.safetensors")
        return Samples(ids, decode(tokenizer, ids), old["seconds"], old["forward_passes"], folder, key)

    options = spec.options(model.sample_options)
    if spec.prefix_rows:
        from recipes.stages import ensure_tokens

        ensure_tokens(run)
        test_ids, _ = load_tokens(run.tokens_file("test"))
        if len(test_ids) < spec.num:
            raise StageError(f"--prefix-rows takes prefixes from {len(test_ids)} test grids; ask for at most that many")
        options["prefix"] = test_ids[: spec.num, : spec.prefix_rows]
    if spec.class_ is not None:
        labels = torch.full((spec.num,), spec.class_, dtype=torch.long)
    else:
        labels = draw_labels(cfg.num_classes, spec.num, spec.seed)
    frames: list[torch.Tensor] = []

    def record(start: int, step: int, ids: torch.Tensor) -> None:
        if start == 0:
            frames.append(ids[:GIF_SAMPLES].cpu())

    # the folder is about to hold other samples: its marker goes first, so a kill leaves no stale
    # claim, and with it what describes the samples that were here (their FID, their trajectory).
    # Under torchrun every rank samples its share and rank 0 alone writes, once every rank has read
    # the old marker (barrier), and before any rank reads the new files (barrier at the end)
    barrier()
    if is_main():
        for stale in ("sample.json", "metrics.json", "trajectory.gif"):
            (folder / stale).unlink(missing_ok=True)
    sync(device)
    t0 = time.perf_counter()
    ids, images = sample_images(
        model, tokenizer, spec.num, steps=steps, temperature=spec.temperature, labels=labels, cfg_scale=spec.cfg,
        seed=spec.seed, batch_size=spec.batch_size, callback=record if gif else None, on_batch=on_batch, **options,
    )  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - t0
    if not is_main():
        barrier()
        return Samples(ids, images, seconds, passes, folder, key)

    save_pngs(images, folder)
    save_grid(images[:64], folder / "grid.png", nrow=8)
    if frames:
        save_trajectory_gif(tokenizer, frames, folder / "trajectory.gif")
    save_tokens(folder / "ids.safetensors", ids, labels if labels is not None else torch.zeros(len(ids)), cfg.codebook_size)
    record_json = {
        "key": key,
        "seconds": seconds,
        "images_per_second": len(ids) / max(seconds, 1e-9),
        "forward_passes": passes,
        "device": str(device),
        "num": spec.num,  # the PNGs beside it: 000000.png to {num - 1:06d}.png
    }
    write_json(folder / "sample.json", record_json)  # last: its presence means the folder is complete
    barrier()
    return Samples(ids, images, seconds, passes, folder, key)
