"""`vqdiff evaluate`: sample every setting, turn the images into numbers, write the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from recipes.recipe import EvaluateSection, Recipe
from recipes.run import GENERATORS, Run, StageError, check_generator
from recipes.sampling import SampleSpec, generate
from vqdiff.checkpoint import read_json
from vqdiff.data import from_uint8, to_uint8
from vqdiff.pipeline import decode, encode


@dataclass(frozen=True)
class EvalOptions(EvaluateSection):
    """The [evaluate] section (its defaults are the recipe's), plus what only the CLI gives."""

    inception_weights: str | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides: Any) -> "EvalOptions":
        opts = dataclasses.replace(recipe.build(cls, "evaluate"), **{k: v for k, v in overrides.items() if v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        for g in self.generators:
            if g not in GENERATORS:
                raise StageError(f"unknown generator {g!r}; choose from ar, diffusion")
        if not self.generators:
            raise StageError("no generators to evaluate")
        if self.num < 2:
            raise StageError(f"--num must be >= 2, got {self.num}")
        if any(s < 1 for s in self.steps) or not self.steps:
            raise StageError(f"--steps must be >= 1, got {list(self.steps)}")
        if any(not t > 0 for t in self.temperatures) or not self.temperatures:
            raise StageError(f"--temperatures must be > 0, got {list(self.temperatures)}")
        if self.extractor not in ("auto", "classifier", "inception"):
            raise StageError(f"unknown extractor {self.extractor!r}; choose auto, classifier or inception")


def evaluate(run: Run, opts: EvalOptions, bars=None) -> dict[str, Any]:
    """Sample every (generator, temperature, steps), measure FID/KID/PR against the test split, write the report.

    `bars(description)` returns an on_batch(done, total) progress callback (from the CLI), or None.
    Re-runs reuse samples and metrics whose inputs have not changed.
    """
    from evaluation import ClassifierRecipe, compute_metrics, get_extractor

    def bar(description: str):
        return bars(description) if bars is not None else None

    recipe = run.read_recipe()
    dataset = recipe.data.dataset
    for g in opts.generators:
        run.load_generator(g)  # fail now, not after the extractor is trained
    train_set = run.load_split(recipe, "train")
    test_set = run.load_split(recipe, "test")
    extractor = get_extractor(
        opts.extractor,
        dataset=dataset,
        image_size=recipe.data.image_size,
        data_root=run.data_root,
        train_set=train_set,
        test_set=test_set,
        inception_weights=opts.inception_weights,
        device=run.device,
        recipe=ClassifierRecipe(steps=opts.classifier_steps) if opts.classifier_steps else None,
        progress=bar("feature extractor"),
    )
    n = min(opts.num, len(test_set))
    real = test_set.images_uint8(torch.arange(n))
    real_key = f"{dataset}-test-{recipe.data.image_size}"

    def metrics_for(images_uint8: torch.Tensor, what: str) -> dict[str, Any]:
        return compute_metrics(images_uint8, real, extractor, real_key=real_key, progress=bar(what))

    def context() -> dict[str, Any]:
        tokenizer = run.load_tokenizer()
        recon = to_uint8(decode(tokenizer, encode(tokenizer, from_uint8(real))))
        train_idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(opts.seed))[:n]
        return {"rfid": metrics_for(recon, "rFID")["fid"], "floor_fid": metrics_for(train_set.images_uint8(train_idx), "floor")["fid"]}

    extractor_key = [extractor.name, extractor.hash]
    context_key = {"tokenizer": run.tokenizer_hash, "extractor": extractor_key, "n": n, "real": real_key}
    ctx = run.cached(run.report_dir / "context.json", context_key, context)

    results: list[dict[str, Any]] = []
    for g in opts.generators:
        for temperature in opts.temperatures:
            for steps in opts.steps if check_generator(g).takes_steps else (None,):
                spec = SampleSpec(
                    generator=g, num=n, temperature=temperature, steps=steps or 1, seed=opts.seed, cfg=opts.cfg,
                    batch_size=opts.batch_size,
                )  # fmt: skip
                label = f"{g} t={temperature:g}" + (f" s={steps}" if steps else "")
                samples = generate(run, spec, on_batch=bar(f"sample {label}"))
                key = {"sample": samples.key, "extractor": extractor_key, "real": [real_key, n]}
                m = run.cached(
                    samples.folder / "metrics.json", key, lambda: metrics_for(to_uint8(samples.images), f"metrics {label}")
                )
                results.append(
                    {
                        "generator": g,
                        "temperature": temperature,
                        "steps": steps,
                        "fid": m["fid"],
                        **{k: m.get(k) for k in ("kid", "kid_std", "precision", "recall", "isc")},
                        "images_per_second": samples.images_per_second,
                        "forward_passes": samples.forward_passes,
                        "samples": str(samples.folder.relative_to(run.run_dir)),
                    }
                )
    gif = None
    if "diffusion" in opts.generators:
        spec = SampleSpec(generator="diffusion", num=16, temperature=opts.temperatures[0], steps=opts.gif_steps, seed=opts.seed, cfg=opts.cfg)
        gif_samples = generate(run, spec, out=run.samples_dir / f"trajectory-s{opts.gif_steps}", gif=True)
        gif = str((gif_samples.folder / "trajectory.gif").relative_to(run.run_dir))
    tok_metrics = read_json(run.metrics_path("tokenizer")) if run.metrics_path("tokenizer").exists() else {}
    bits = {}
    for g in opts.generators:
        if run.metrics_path(g).exists():
            mj = read_json(run.metrics_path(g))
            bits[g] = {"bits_per_token": mj.get("bits_per_token"), "kind": mj.get("kind")}
    report = {
        "run": str(run.run_dir),
        "recipe": recipe.name,
        "dataset": dataset,
        "extractor": extractor.name,
        "extractor_hash": extractor.hash,
        "extractor_info": extractor.info,
        "num_samples": n,
        "reference": f"{dataset} test split, first {n} images",
        "floor_fid": ctx["floor_fid"],
        "tokenizer": {
            "rfid": ctx["rfid"],
            "psnr": tok_metrics.get("psnr"),
            "codebook_usage": tok_metrics.get("codebook_usage"),
        },
        "bits_per_token": bits,
        "cfg": opts.cfg,
        "device": str(run.torch_device),
        "results": results,
        "trajectory_gif": gif,
    }
    from recipes.report import write_report

    write_report(report, run.report_dir)
    return report
