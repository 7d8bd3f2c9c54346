"""The decoder refinement's arms on a finished cifar10 run: each arm refines a copy of the run's
tokenizer (same seed, same steps, same batch) with other losses, and its curve (rFID in both
feature spaces and PSNR at every kept snapshot, on the first N test images against the recipe's
reference) is printed as a table row and written to ARMS_DIR/ARM/report/decoder_curve.json.

    python docs/scripts/decoder_arms.py runs/cifar10 runs/decoder-arms              # every arm
    python docs/scripts/decoder_arms.py runs/cifar10 runs/decoder-arms random gan    # some arms
    STEPS=800 N=1000 python docs/scripts/decoder_arms.py ...                         # the defaults
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from recipes.curves import decoder_curve
from recipes.evaluate import EvalOptions
from recipes.run import Run

STEPS, N = int(os.environ.get("STEPS", 800)), int(os.environ.get("N", 1000))
COMMON = [f"decoder.steps={STEPS}", "decoder.batch_size=128", "decoder.lr=2e-4", "decoder.warmup_steps=50",
          f"decoder.keep_every={STEPS // 4}", f"decoder.checkpoint_every={STEPS // 4}", "decoder.precision=fast"]  # fmt: skip
ARMS = {
    "gan": ["decoder.perceptual_weight=0"],  # MSE + PatchGAN
    "random": ["decoder.perceptual_net=random"],  # + a random-weight perceptual net
    "classifier": ["decoder.perceptual_net=classifier"],  # + the perceptual net trained on the data
    "random-nogan": ["decoder.perceptual_net=random", "decoder.disc=false"],  # the perceptual term alone
    "random-w1": ["decoder.perceptual_net=random", "decoder.perceptual_weight=1.0"],
    "gan-w05": ["decoder.perceptual_net=random", "decoder.disc_weight=0.5"],
    "gan1": ["decoder.perceptual_weight=0", "decoder.disc_weight=1.0"],  # MSE + PatchGAN at VQGAN's strength
    "classifier-w1-gan05": ["decoder.perceptual_net=classifier", "decoder.perceptual_weight=1.0", "decoder.disc_weight=0.5"],
}


def main(src: str, out: str, *names: str) -> None:
    for name in names or ARMS:
        run_dir = Path(out) / name
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            for part in ("recipe.toml", "tokenizer", "tokens"):
                (shutil.copytree if (Path(src) / part).is_dir() else shutil.copy)(Path(src) / part, run_dir / part)
        sets = sum((["--set", s] for s in [*COMMON, *ARMS[name]]), [])
        t0 = time.perf_counter()
        subprocess.run(["vqdiff", "train", "decoder", str(run_dir / "recipe.toml"), "--run-dir", str(run_dir), *sets], check=True)
        seconds = time.perf_counter() - t0
        run = Run(run_dir)
        opts = EvalOptions.from_recipe(run.read_recipe(), curve_num=N, inception_weights=os.environ.get("VQDIFF_INCEPTION_WEIGHTS"))
        curve = decoder_curve(run, opts)
        last = curve["points"][-1]
        row = {"arm": name, "train_seconds": round(seconds, 1), **{f"rFID {k}": round(v, 2) for k, v in last["rfids"].items()}, "psnr": round(last["psnr"], 2),
               "curve": [(p["step"], {k: round(v, 2) for k, v in p["rfids"].items()}, round(p["psnr"], 2)) for p in curve["points"]]}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
