"""Step cost of the cifar10 generators at width 128, 192 and 256 (4 layers, batch 128, the recipe's precision "fast"):
the median of 12 timed steps on random ids. `python docs/scripts/width_step_cost.py SIDE GROUP`, e.g. 16 2 for the
recipe's 16x16 grid read as 2x2 groups (AR with its one-layer depth head), 8 1 for the 8x8 grid."""
import sys, time, tempfile, torch
from vqdiff.steps import TensorSource
from vqdiff.train import TrainConfig, train
from vqdiff.distributed import seeded
from vqdiff.ar import ARTransformer, ARConfig
from vqdiff.diffusion import DiffusionTransformer, DiffusionConfig
def timed(model, data, steps, bs):
    cfg = TrainConfig(steps=steps, batch_size=bs, warmup_steps=1, log_every=1, checkpoint_every=10**9, precision="fast")
    times = []; last = [time.perf_counter()]
    def on_log(step, logs):
        now = time.perf_counter(); times.append(now - last[0]); last[0] = now
    with tempfile.TemporaryDirectory() as d:
        train(model, data, cfg, d, device="cpu", on_log=on_log)
    t = sorted(times[2:]); return t[len(t) // 2]
side, group = int(sys.argv[1]), int(sys.argv[2])
ids = torch.randint(0, 512, (5000, side, side)); labels = torch.randint(0, 10, (5000,))
for dim in (128, 192, 256):
    for what in ("ar", "diffusion"):
        kw = dict(codebook_size=512, grid_h=side, grid_w=side, num_classes=10, dim=dim, depth=4, heads=dim // 32 if dim != 192 else 6, group=group)
        with seeded(0):
            m = ARTransformer(ARConfig(**kw, depth_head=1 if group > 1 else 0)) if what == "ar" else DiffusionTransformer(DiffusionConfig(**kw))
        s = timed(m, TensorSource(ids=ids, labels=labels), 14, 128)
        print(f"grid {side} group {group} {what} dim {dim}: {s:.3f} s/step, {sum(p.numel() for p in m.parameters())/1e6:.2f}M", flush=True)
