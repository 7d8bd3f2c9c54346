"""The levers of a training step besides the attention kernel, each timed against the step without it,
at a recipe's model sizes: AdamW's fused (single-kernel) step and `torch.compile` of the loss. The
measurements behind `vqdiff.train.make_optimizer` and the recipes' `compile` setting.

    python docs/scripts/step_levers.py --recipe cifar10 --reps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from recipes.bench import build_models, train_call, NEW
from recipes.recipe import load_recipe


def per_step(step, reps: int) -> float:
    step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="cifar10")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=["tokenizer", "ar", "diffusion"])
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, [])
    dev = torch.device("cpu")
    models = build_models(recipe, dev, channels=3 if recipe["data"]["dataset"] != "mnist" else 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, recipe {args.recipe}")
    for kind in args.kinds:
        model = models.tokenizer if kind == "tokenizer" else models.generators[kind]
        plain, _ = train_call(models, recipe, kind, dev, NEW)
        base = per_step(plain, args.reps)
        # fused AdamW: the same step with torch.optim.AdamW(fused=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        opt_plain = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        t_fused = per_step(opt.step, 20)
        t_plain = per_step(opt_plain.step, 20)
        # torch.compile of the loss
        compiled, _ = train_call(models, recipe, kind, dev, NEW)  # the step calls model.loss: patched below
        loss_fn = model.loss
        model.loss = torch.compile(loss_fn)
        t0 = time.perf_counter()
        compiled()
        first = time.perf_counter() - t0
        comp = per_step(compiled, args.reps)
        model.loss = loss_fn
        print(f"{kind}: step {1000 * base:.0f} ms; AdamW step alone {1000 * t_plain:.1f} ms, fused {1000 * t_fused:.1f} ms; "
              f"compiled step {1000 * comp:.0f} ms ({base / comp:.2f}x), first compiled step {first:.0f} s", flush=True)


if __name__ == "__main__":
    main()
