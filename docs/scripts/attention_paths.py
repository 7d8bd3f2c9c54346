"""Time each attention path (SDPA's own choice and SDPA's math backend) in the
generators' training step and in their sampling, at the cifar10 recipe's sizes, for the grids given:
the measurements behind `vqdiff.precision.attention_path`.

    python docs/scripts/attention_paths.py --grids 8 16 --batch 128
"""

from __future__ import annotations

import argparse
import time

import torch

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.options import DEFAULTS
from vqdiff.precision import native_bf16, use_attention

PATHS = ("sdpa", "math")


def seconds(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample", type=int, default=32, help="images per sampling call (CFG 3 doubles the batch)")
    args = ap.parse_args()
    dtypes = [None, torch.bfloat16] if native_bf16(torch.device("cpu")) else [None]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native_bf16(torch.device('cpu'))}")
    for g in args.grids:
        common = dict(codebook_size=512, grid_h=g, grid_w=g, num_classes=10, dim=args.dim, depth=args.depth, heads=args.heads)
        models = {"ar": ARTransformer(ARConfig(**common)), "diffusion": DiffusionTransformer(DiffusionConfig(**common))}
        batch = {"ids": torch.randint(0, 512, (args.batch, g, g)), "labels": torch.randint(0, 10, (args.batch,))}
        for kind, model in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for dtype in dtypes:
                row = []
                for path in PATHS:
                    def step():
                        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                            loss, _ = model.train().loss(batch)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    with use_attention(path):
                        row.append(seconds(step, args.reps))
                name = "bf16" if dtype else "fp32"
                print(f"train {kind:9s} {g}x{g} {name} batch {args.batch}: " + ", ".join(f"{p} {1000 * s:.0f} ms" for p, s in zip(PATHS, row)), flush=True)
            model.eval()
            gen = torch.Generator().manual_seed(0)
            options = DEFAULTS.replace(steps=16, cfg=3.0)  # the ar generator takes one pass per token, whatever steps is
            row = []
            for path in PATHS:
                with use_attention(path):
                    row.append(seconds(lambda: model.sample(args.sample, options, labels=3, generator=gen), 1))
            print(f"sample {kind:9s} {g}x{g} fp32 {args.sample} images, cfg 3: " + ", ".join(f"{p} {args.sample / s:.1f} img/s" for p, s in zip(PATHS, row)), flush=True)


if __name__ == "__main__":
    main()
