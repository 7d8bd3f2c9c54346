"""`vqdiff evaluate --checkpoints`: FID and recall of the weights kept every `keep_every` steps."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from safetensors import safe_open

from recipes.evaluate import EvalOptions, Measuring, bars_of
from recipes.report import plot_curve, plot_decoder_curve
from recipes.run import Run, StageError
from recipes.sampling import SampleSpec, generate
from recipes.stages import test_bits_per_token
from vqdiff.data import from_uint8, to_uint8
from vqdiff.io import load_tensors, write_json
from vqdiff.options import NAMED_WHEN_SET
from vqdiff.distributed import is_main
from vqdiff.pipeline import decode, encode
from vqdiff.tokenizer import psnr
from vqdiff.train import HISTORY_DIR


def snapshots(run_dir: Path, kind: str) -> list[tuple[int, float, Path]]:
    """(step, training seconds, path) of the weights kept every `keep_every` steps, by step."""
    out = []
    for path in sorted((Path(run_dir) / kind / HISTORY_DIR).glob("step-*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            out.append((int(meta["step"]), float(meta["train_seconds"]), path))
        except Exception:  # a snapshot cut by a kill: skip it, the next run writes it again
            continue
    return sorted(out)


def held_out_bits(run: Run, kind: str, snapshot: Path, max_grids: int) -> dict[str, float]:
    """Bits per token of a kept snapshot on the test grids and on as many train grids: the gap
    between them is where a generator starts to overfit (cached next to the snapshot's samples)."""
    key = {"snapshot": run.file_hash(snapshot), "max_grids": max_grids}
    cache = run.report_dir / "curve-bits" / f"{kind}-{snapshot.stem}.json"

    def compute() -> dict[str, float]:
        model = run.load_generator(kind)
        model.load_state_dict(load_tensors(snapshot), strict=True)
        return {
            f"{split}_bits_per_token": test_bits_per_token(model.eval(), run, max_grids, split=split)["bits_per_token"]
            for split in ("test", "train")
        }

    return run.cached(cache, key, compute)


def learning_curve(run: Run, opts: EvalOptions, bars=None) -> dict[str, Any]:
    """FID and recall of every kept snapshot of each generator, on the same axes: training step and
    training wall time. AR samples at the first temperature (none: its own); diffusion at the first temperature,
    `curve_steps` steps and the first sampler. Writes RUN/report/curve.json and
    learning_curve.png; re-runs reuse samples and metrics."""
    bar = bars_of(bars)
    recipe = run.read_recipe()
    found = {g: snapshots(run.run_dir, g) for g in opts.generators}
    if not any(found.values()):
        raise StageError(
            f"no kept weights in {run.run_dir}/{{{','.join(opts.generators)}}}/history; train with "
            "keep_every > 0, e.g. --set ar.keep_every=100 --set diffusion.keep_every=100"
        )
    curve_opts = dataclasses.replace(
        opts, num=opts.curve_num or opts.num, extractor=opts.curve_extractor or opts.extractor, both_spaces=False
    )  # one space: a curve compares snapshots with each other
    m = Measuring.of(run, curve_opts, recipe, bar)
    temperature, steps, sampler = opts.setting_temperatures[0], opts.curve_steps, opts.samplers[0]
    diffusion_options = opts.setting_options(recipe, "diffusion", temperature=temperature, steps=steps, sampler=sampler)
    points = []
    for g, snaps in found.items():
        for step, seconds, path in snaps:
            options = opts.setting_options(recipe, g, temperature=temperature, steps=steps, sampler=sampler)
            spec = SampleSpec(generator=g, options=options, num=m.n, seed=opts.seed, batch_size=opts.batch_size)
            label = f"{g} step {step}"
            # a curve folder names AR "-s0-" (not its forward passes): a name that stays put keeps its samples reusable
            folder = run.samples_dir / "curve" / f"{spec.folder_name(steps if g == 'diffusion' else 0)}-step{step}"
            samples = generate(run, spec, out=folder, on_batch=bar(f"sample {label}"), snapshot=path)
            metrics = m.of_samples(samples, label)
            points.append(
                {"generator": g, "step": step, "train_seconds": seconds, "fid": metrics["fid"], "recall": metrics.get("recall"),
                 "precision": metrics.get("precision"), "temperature": options.temperature, "cfg": options.cfg, "setting": spec.folder_name(samples.forward_passes),
                 **held_out_bits(run, g, path, recipe[g]["eval_grids"])}
            )  # fmt: skip
    curve = {
        "extractor": m.extractor.name, "extractor_hash": m.extractor.hash, "num_samples": m.n,
        "temperature": temperature, "cfg": opts.cfg, "diffusion_steps": steps, "diffusion_sampler": sampler,
        **{f"diffusion_{k}": getattr(diffusion_options, k) for k in NAMED_WHEN_SET}, "points": points,
    }  # fmt: skip
    if not is_main():  # under torchrun rank 0 writes
        return curve
    run.report_dir.mkdir(parents=True, exist_ok=True)
    curve["plot"] = plot_curve(curve, run.report_dir, name=f"{recipe.name} ({recipe.data.dataset})")
    write_json(run.report_dir / "curve.json", curve)
    return curve


def decoder_curve(run: Run, opts: EvalOptions, bars=None) -> dict[str, Any] | None:
    """rFID in every feature space and PSNR of the decoder refinement at each kept snapshot (and at
    step 0, the tokenizer's own decoder), on the first `curve_num` (else `num`) test images against
    the reference. None without kept snapshots (decoder.keep_every = 0). Writes RUN/report/
    decoder_curve.json and decoder_curve.png; re-runs reuse each point."""
    snaps = snapshots(run.run_dir, "decoder")
    if not snaps or not run.refined():
        return None
    bar = bars_of(bars)
    recipe = run.read_recipe()
    m = Measuring.of(run, dataclasses.replace(opts, num=opts.curve_num or opts.num, both_spaces=True), recipe, bar)
    images = m.first_test()
    base = run.load_tokenizer(refined=False)
    ids = encode(base, from_uint8(images))  # the same ids for every snapshot: the codes are frozen
    refined = run.load_tokenizer()
    points = []
    for step, seconds, path in [(0, 0.0, None), *snaps]:
        key = {"weights": run.file_hash(path) if path else run.tokenizer_hash, "spaces": [e.key for e in m.spaces], "n": m.n, "real": m.reference}

        def compute() -> dict[str, Any]:
            model = base
            if path is not None:
                refined.load_state_dict(load_tensors(path), strict=True)
                model = refined.eval()
            recon = to_uint8(decode(model, ids))
            mse = (from_uint8(recon) - from_uint8(images)).pow(2).mean().item()
            return {"rfids": m.fids(recon, f"decoder step {step}"), "psnr": psnr(mse)}

        point = run.cached(run.report_dir / "decoder-curve" / f"step-{step:07d}.json", key, compute)
        points.append({"step": step, "train_seconds": seconds, **point})
    curve = {"num_images": m.n, "reference": m.reference_text(recipe), "spaces": [e.name for e in m.spaces], "points": points}
    if is_main():
        run.report_dir.mkdir(parents=True, exist_ok=True)
        curve["plot"] = plot_decoder_curve(curve, run.report_dir, name=f"{recipe.name} ({recipe.data.dataset})")
        write_json(run.report_dir / "decoder_curve.json", curve)
    return curve
