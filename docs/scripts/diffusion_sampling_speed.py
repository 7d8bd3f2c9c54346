"""Images per second of the diffusion samplers on trained models: 100 samples, 16 steps, CFG 3, t = 1,
the fastest of 2 rounds after a warm-up, 2 threads. Run it at two commits to compare them.

    python docs/scripts/diffusion_sampling_speed.py runs/cifar10-8x8 runs/cifar10
"""

import sys
import time

import torch

from vqdiff.checkpoint import load_model
from vqdiff.options import SampleOptions

torch.set_num_threads(2)
for run in sys.argv[1:]:
    m = load_model(f"{run}/diffusion", "diffusion").eval()
    for sampler in ("ancestral", "maskgit"):
        o = SampleOptions(steps=16, temperature=1.0, cfg=3.0, sampler=sampler)
        g = torch.Generator().manual_seed(0)
        m.sample(8, o, labels=0, generator=g)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            m.sample(100, o, labels=torch.arange(100) % 10, generator=g)
            best = min(best, time.perf_counter() - t)
        print(f"{run} {sampler}: {100 / best:.1f} images/s", flush=True)
