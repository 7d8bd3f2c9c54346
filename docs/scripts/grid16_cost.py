"""What a 16x16 token grid costs the cifar10 recipe's generators against its 8x8 grid (docs/results.md):
seconds per training step at the recipe's batch and precision, and sampling images/s at batch 64
(AR with its KV cache; diffusion 16 steps; no guidance), both grids measured in one process, two
rounds, one after the other.

    python docs/scripts/grid16_cost.py
"""

import json

import torch

from recipes.bench import build_models, bench_training, timeit
from recipes.recipe import load_recipe
from vqdiff.options import DEFAULTS


def main() -> None:
    dev = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(64, dtype=torch.long)
    for rnd in range(2):
        for downsample in (4, 2):  # 32 px -> 8x8, 16x16
            r = load_recipe("cifar10", [f"tokenizer.downsample={downsample}"])
            m = build_models(r, dev, channels=3)
            rows = [x for x in bench_training(m, r, dev, min_seconds=3.0) if x["model"] != "tokenizer"]
            ar, diff = m.generators["ar"], m.generators["diffusion"]
            s_ar = timeit(lambda: ar.sample(64, use_cache=True, generator=gen, labels=labels), dev, 2.0)
            s_df = timeit(lambda: diff.sample(64, DEFAULTS.replace(steps=16), generator=gen, labels=labels), dev, 2.0)
            row = {
                "round": rnd, "grid": list(m.tokenizer.grid),
                **{f"{x['model']}_seconds_per_step": round(1 / x["steps_per_second"], 3) for x in rows},
                "ar_images_per_second": round(64 / s_ar, 1), "diffusion16_images_per_second": round(64 / s_df, 1),
            }  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
