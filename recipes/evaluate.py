"""`vqdiff evaluate`: sample every setting, turn the images into numbers, write the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from evaluation import (
    CLASSIFIERS, INCEPTION_MODES, Extractor, class_accuracy, compute_metrics, get_extractor, has_labels, inception_available,
)  # fmt: skip
from recipes.recipe import EvaluateSection, Recipe, check_generator, resolve_options
from recipes.report import reference_note, setting, write_report
from recipes.run import Run, StageError, software_versions
from recipes.sampling import Samples, SampleSpec, generate
from vqdiff.checkpoint import read_config
from vqdiff.io import read_json
from vqdiff.data import from_uint8, to_uint8
from vqdiff.distributed import is_main
from vqdiff.options import DEFAULTS, FIELDS, READS, SampleOptions
from vqdiff.pipeline import decode, encode


OWNER = {"eta": "ancestral", "choice_temperature": "maskgit"}  # the sampler each of these options belongs to


@dataclass(frozen=True)
class EvalOptions(EvaluateSection):
    """The [evaluate] section (its defaults are the recipe's), plus what only the CLI gives: the
    Inception weights, and the sampling options [evaluate] has no key for (`given`, by their
    SampleOptions names: the diffusion's eta, choice temperature and sample schedule), which go to the one resolver
    beside the recipe's diffusion section."""

    inception_weights: str | None = None
    given: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides: Any) -> "EvalOptions":
        opts = recipe.build(cls, "evaluate")
        own = {f.name for f in dataclasses.fields(cls)}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        given = {k: overrides.pop(k) for k in list(overrides) if k in FIELDS and k not in own}
        samplers = overrides.pop("samplers", None) or opts.samplers or (recipe["diffusion"]["sampler"],)
        opts = dataclasses.replace(opts, samplers=samplers, given=given, **overrides)
        opts.validate(recipe)
        return opts

    def validate(self, recipe: Recipe) -> None:
        """What SampleOptions does not check, then the SampleOptions of every setting (its one message)."""
        for g in self.generators:
            check_generator(g)
        if not self.generators:
            raise StageError("no generators to evaluate")
        if self.num < 2:
            raise StageError(f"--num must be >= 2, got {self.num}")
        if not (self.steps and self.samplers):
            raise StageError("--steps and --sampler each need at least one value")
        for extractor in (self.extractor, self.curve_extractor or self.extractor):
            if extractor not in ("auto", "classifier", "inception"):
                raise StageError(f"unknown extractor {extractor!r}; choose auto, classifier or inception")
        if self.classifier not in CLASSIFIERS:
            raise StageError(f"unknown classifier {self.classifier!r}; choose from {', '.join(CLASSIFIERS)}")
        if self.curve_num < 0:
            raise StageError(f"curve_num must be >= 0 (0 = num), got {self.curve_num}")
        r = self.reference_num
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0 or r == 1):
            raise StageError(f"reference_num must be 0 (the whole test split) or at least 2 test images, got {r!r}")
        if self.inception_mode not in INCEPTION_MODES:
            raise StageError(f"unknown inception mode {self.inception_mode!r}; choose one of {', '.join(INCEPTION_MODES)}")
        for steps in (*self.steps, self.curve_steps, self.gif_steps):
            for temperature in self.setting_temperatures:
                for sampler in self.samplers:
                    self.setting_options(recipe, "diffusion", temperature=temperature, steps=steps, sampler=sampler)

    @property
    def setting_temperatures(self) -> tuple[float | None, ...]:
        """The temperatures of the settings: [evaluate] temperatures, or None (each generator's own) when it is empty."""
        return self.temperatures or (None,)

    def setting_options(self, recipe: Recipe, generator: str, *, temperature: float | None, steps: int | None = None, sampler: str | None = None) -> SampleOptions:
        """The SampleOptions of one setting, from the one resolver: this evaluation's cfg, top_k, top_p
        (None: the generator's own) and `given` with the setting's temperature (None: the generator's own), steps and sampler (None: the default, for
        corruptions with one sampler). The settings compare samplers, so eta goes to the ancestral one
        and choice_temperature to maskgit."""
        sampler = sampler or DEFAULTS.sampler
        given = {k: v for k, v in self.given.items() if OWNER.get(k, sampler) == sampler}
        return resolve_options(
            recipe, generator, temperature=temperature, steps=steps, sampler=sampler, cfg=self.cfg, top_k=self.top_k, top_p=self.top_p, **given,
        )  # fmt: skip


FID_ONLY = {"kid": False, "prc": False, "isc": False}  # the other feature space: FID alone


@dataclass
class Measuring:
    """What every FID of a run needs: the splits, the extractors and the real images it is measured against.

    `extractor` is the configured one (`fid` and every other metric); `others` the other feature
    space where both can run (FID only); `classifier` the dataset's classifier for class accuracy
    (None without labels). `n` images are sampled per setting and reconstructed for rFID; `real` is
    the reference, the first `reference_num` test images (opts.reference_num: None = n, 0 = all).
    """

    run: Run
    train_set: Any
    test_set: Any
    extractor: Extractor
    others: list[Extractor]
    classifier: Extractor | None
    n: int  # samples per setting
    real: torch.Tensor  # uint8 [r c h w], the first r test images
    real_key: str
    bar: Any

    @classmethod
    def of(cls, run: Run, opts: EvalOptions, recipe: Recipe, bar) -> "Measuring":
        train_set, test_set = run.load_split(recipe, "train"), run.load_split(recipe, "test")

        def extractor(kind: str) -> Extractor:
            return get_extractor(
                kind, dataset=recipe.data.dataset, image_size=recipe.data.image_size, data_root=run.data_root,
                train_set=train_set, test_set=test_set, inception_weights=opts.inception_weights, device=run.device,
                recipe=dataclasses.replace(CLASSIFIERS[opts.classifier], **({"steps": opts.classifier_steps} if opts.classifier_steps else {})),
                progress=bar("feature extractor"), inception_mode=opts.inception_mode,
            )  # fmt: skip

        primary = extractor(opts.extractor)
        labelled = has_labels(recipe.data.dataset, train_set)
        other = "classifier" if primary.name == "inception" else "inception"
        can_run = labelled if other == "classifier" else inception_available(opts.inception_weights)
        others = [extractor(other)] if opts.both_spaces and can_run else []
        classifier = next((e for e in (primary, *others) if e.name == "classifier"), None)
        if classifier is None and labelled:
            classifier = extractor("classifier")
        n = min(opts.num, len(test_set))
        r = len(test_set) if opts.reference_num == 0 else min(n if opts.reference_num is None else opts.reference_num, len(test_set))
        real_key = f"{recipe.data.dataset}-test-{recipe.data.image_size}"  # the cache name adds r and a hash of the pixels
        real = test_set.images_uint8(torch.arange(r))
        return cls(run, train_set, test_set, primary, others, classifier, n, real, real_key, bar)

    @property
    def spaces(self) -> list[Extractor]:
        return [self.extractor, *self.others]

    @property
    def reference(self) -> list[Any]:
        """What a cached FID must match about the reference: its name and size."""
        return [self.real_key, len(self.real)]

    def reference_text(self, recipe: Recipe) -> str:
        """E.g. "cifar10 test split, all 10000 images" or "mnist test split, first 500 of 10000 images"."""
        d = recipe.data
        name = f"{d.dataset} ({d.path})" if d.path else d.dataset
        r, size = len(self.real), len(self.test_set)
        return f"{name} test split, " + (f"all {r} images" if r == size else f"first {r} of {size} images")

    def first_test(self) -> torch.Tensor:
        """uint8 [n c h w]: the first n test images (rFID reconstructs them; edits edit them)."""
        return self.test_set.images_uint8(torch.arange(self.n))

    def metrics(self, images_uint8: torch.Tensor, what: str, extractor: Extractor | None = None) -> dict[str, Any]:
        """Every metric in the configured space; FID alone in another (`extractor`)."""
        extractor = extractor or self.extractor
        only = {} if extractor is self.extractor else FID_ONLY
        return compute_metrics(images_uint8, self.real, extractor, real_key=self.real_key, progress=self.bar(what), **only)

    def fids(self, images_uint8: torch.Tensor, what: str) -> dict[str, float]:
        """{extractor name: FID} in every feature space, the configured one first."""
        return {e.name: self.metrics(images_uint8, f"{what} ({e.name})", e)["fid"] for e in self.spaces}

    def of_samples(self, samples: Samples, label: str, extractor: Extractor | None = None) -> dict[str, Any]:
        """FID etc. of `samples` in the configured space (`extractor` None), cached in their folder's
        metrics.json, or FID in another space, cached in metrics-NAME.json, under the inputs that made them."""
        extractor = extractor or self.extractor
        name = "metrics.json" if extractor is self.extractor else f"metrics-{extractor.name}.json"
        key = {"sample": samples.key, "extractor": extractor.key, "real": self.reference}
        what = f"metrics {label}" + ("" if extractor is self.extractor else f" ({extractor.name})")
        return self.run.cached(samples.folder / name, key, lambda: self.metrics(to_uint8(samples.images), what, extractor))

    def class_accuracy(self, samples: Samples, label: str) -> float | None:
        """The share of conditional samples the classifier assigns to their class (class_accuracy.json);
        None for an unconditional generator or a dataset without labels."""
        if samples.labels is None or self.classifier is None:
            return None
        key = {"sample": samples.key, "classifier": self.classifier.key}
        compute = lambda: class_accuracy(to_uint8(samples.images), samples.labels, self.classifier, progress=self.bar(f"classes {label}"))  # noqa: E731
        return self.run.cached(samples.folder / "class_accuracy.json", key, compute)

    def test_accuracy(self) -> float | None:
        """The classifier's accuracy on the whole test split (the yardstick of class_accuracy)."""
        if self.classifier is None:
            return None
        images = self.test_set.images_uint8(torch.arange(len(self.test_set)))
        return class_accuracy(images, self.test_set.labels, self.classifier, progress=self.bar("classifier test accuracy"))


def bars_of(bars):
    """bar(description) -> an on_batch(done, total) callback or None, from the CLI's `bars`."""
    return lambda description: bars(description) if bars is not None else None


def _context(run: Run, opts: EvalOptions, m: Measuring) -> dict[str, Any]:
    """rFID (the tokenizer's reconstructions of the first n test images) and the floor FID (n train
    images), both against the reference and in every feature space, and the classifier's test
    accuracy; cached in RUN/report/context.json."""

    def compute() -> dict[str, Any]:
        tokenizer = run.load_tokenizer()
        recon = to_uint8(decode(tokenizer, encode(tokenizer, from_uint8(m.first_test()))))
        train_idx = torch.randperm(len(m.train_set), generator=torch.Generator().manual_seed(opts.seed))[: m.n]
        rfids, floor_fids = m.fids(recon, "rFID"), m.fids(m.train_set.images_uint8(train_idx), "floor")
        primary = m.extractor.name
        return {"rfid": rfids[primary], "floor_fid": floor_fids[primary], "rfids": rfids, "floor_fids": floor_fids,
                "classifier_test_accuracy": m.test_accuracy()}  # fmt: skip

    key = {
        "tokenizer": run.decoding_hash, "extractors": [e.key for e in m.spaces], "n": m.n, "real": m.reference,
        "classifier": m.classifier.key if m.classifier is not None else None,
    }  # fmt: skip
    return run.cached(run.report_dir / "context.json", key, compute)


def _settings(recipe: Recipe, opts: EvalOptions, g: str, diffusion_kind: str | None):
    """(report row, SampleOptions) of every setting of generator `g`."""
    # one sampler per setting, except the mask corruption, which compares its samplers
    samplers = opts.samplers if g == "diffusion" and diffusion_kind == "mask" else (None,)
    steps_list = opts.steps if "steps" in READS[g] else (None,)
    for sampler, temperature, steps in ((sm, tp, st) for sm in samplers for tp in opts.setting_temperatures for st in steps_list):
        options = opts.setting_options(recipe, g, temperature=temperature, steps=steps, sampler=sampler)
        yield {"generator": g, "sampler": sampler, "temperature": options.temperature, "cfg": options.cfg, "steps": steps, **options.named(g)}, options


def _measure_settings(run: Run, recipe: Recipe, opts: EvalOptions, m: Measuring, diffusion_kind: str | None) -> list[dict[str, Any]]:
    """Sample every setting of every generator and measure it: the report's rows."""
    results = []
    for g in opts.generators:
        for row, options in _settings(recipe, opts, g, diffusion_kind):
            spec = SampleSpec(generator=g, options=options, num=m.n, seed=opts.seed, batch_size=opts.batch_size)
            label = setting(row)  # the report's name for this setting, also on the progress bars
            samples = generate(run, spec, on_batch=m.bar(f"sample {label}"))
            metrics = m.of_samples(samples, label)
            fids = {m.extractor.name: metrics["fid"], **{e.name: m.of_samples(samples, label, e)["fid"] for e in m.others}}
            results.append(
                {
                    **row,
                    "fid": metrics["fid"],
                    **{k: metrics.get(k) for k in ("kid", "kid_std", "precision", "recall", "isc")},
                    "fids": fids,  # {extractor name: FID}: every feature space, the configured one (`fid`) first
                    "class_accuracy": m.class_accuracy(samples, label),
                    "images_per_second": samples.images_per_second,
                    "forward_passes": samples.forward_passes,
                    "samples": str(samples.folder.relative_to(run.run_dir)),
                }
            )
    return results


def _trajectory_gif(run: Run, recipe: Recipe, opts: EvalOptions, diffusion_kind: str | None) -> str | None:
    """The report's GIF of the diffusion at work (16 samples, gif_steps steps), relative to RUN."""
    if "diffusion" not in opts.generators:
        return None
    sampler = opts.samplers[0] if diffusion_kind == "mask" else None
    options = opts.setting_options(recipe, "diffusion", temperature=opts.setting_temperatures[0], steps=opts.gif_steps, sampler=sampler)
    spec = SampleSpec(generator="diffusion", options=options, num=16, seed=opts.seed)
    samples = generate(run, spec, out=run.samples_dir / f"trajectory-s{opts.gif_steps}", gif=True)
    return str((samples.folder / "trajectory.gif").relative_to(run.run_dir))


def _model_metrics(run: Run, opts: EvalOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer metrics, bits per token of each generator) from their metrics.json."""
    kind = "decoder" if run.refined() else "tokenizer"  # the metrics of the weights that decode
    tok = read_json(run.metrics_path(kind)) if run.metrics_path(kind).exists() else {}
    bits = {}
    for g in opts.generators:
        if run.metrics_path(g).exists():
            mj = read_json(run.metrics_path(g))
            bits[g] = {"bits_per_token": mj.get("bits_per_token"), "kind": mj.get("kind")}
    return tok, bits


def evaluate(run: Run, opts: EvalOptions, bars=None) -> dict[str, Any]:
    """Sample every (generator, sampler, temperature, steps), measure FID/KID/PR against the test
    split, write the report.

    `bars(description)` returns an on_batch(done, total) progress callback (from the CLI), or None.
    Re-runs reuse samples and metrics whose inputs have not changed.
    """
    recipe = run.read_recipe()
    dataset = recipe.data.dataset
    for g in opts.generators:
        run.load_generator(g)  # fail now, not after the extractor is trained
    m = Measuring.of(run, opts, recipe, bars_of(bars))
    n, extractor = m.n, m.extractor
    ctx = _context(run, opts, m)
    diffusion_kind = read_config(run.model_dir("diffusion"), "diffusion")[1].corruption if "diffusion" in opts.generators else None
    results = _measure_settings(run, recipe, opts, m, diffusion_kind)
    gif = _trajectory_gif(run, recipe, opts, diffusion_kind)
    tok_metrics, bits = _model_metrics(run, opts)
    report = {
        "run": str(run.run_dir),
        "recipe": recipe.name,
        "dataset": dataset,
        "extractor": extractor.name,
        "extractor_hash": extractor.hash,
        "extractor_info": extractor.info,
        "extractor_mode": extractor.mode,
        "num_samples": n,
        "reference": m.reference_text(recipe),
        # FID depends on the reference set and its size as much as on the samples: state both
        "reference_set": {"dataset": dataset, "path": recipe.data.path or None, "split": "test", "size": len(m.real), "split_size": len(m.test_set)},
        "reference_note": reference_note(n, len(m.real)),
        # every feature space FID was taken in, the configured one (`fid`, `floor_fid`, `rfid`) first
        "spaces": [{"extractor": e.name, "hash": e.hash, "mode": e.mode, "primary": e is extractor} for e in m.spaces],
        "isc_omitted": extractor.info.get("isc_omitted"),
        "floor_fid": ctx["floor_fid"],
        "floor_fids": ctx["floor_fids"],
        "tokenizer": {
            "rfid": ctx["rfid"], "rfids": ctx["rfids"], "psnr": tok_metrics.get("psnr"), "codebook_usage": tok_metrics.get("codebook_usage"),
            "refined_decoder": {"steps": tok_metrics["steps"], **tok_metrics["losses"]} if "losses" in tok_metrics else None,
        },  # fmt: skip
        # the yardstick of each row's class_accuracy: the same classifier on the real test images
        "classifier_test_accuracy": ctx["classifier_test_accuracy"],
        "classifier_hash": m.classifier.hash if m.classifier is not None else None,
        "bits_per_token": bits,
        "cfg": opts.cfg,  # None: each generator's own (the rows' cfg)
        "top_k": opts.top_k,
        "top_p": opts.top_p,
        "device": str(run.torch_device),
        # bit-for-bit reproduction holds for one torch build on one kind of machine; say which
        "software": software_versions(),
        "results": results,
        "trajectory_gif": gif,
    }
    if (run.report_dir / "curve.json").exists():
        report["learning_curve"] = read_json(run.report_dir / "curve.json")
    if run.refined() and (run.report_dir / "decoder_curve.json").exists():
        report["decoder_curve"] = read_json(run.report_dir / "decoder_curve.json")
    if is_main():  # under torchrun every rank measured its share; rank 0 writes
        write_report(report, run.report_dir)
    return report
