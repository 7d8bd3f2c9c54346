"""Per-step times of candidate cifar10 recipe models, and the folder dataset's load times."""
import sys, time, shutil, json, tempfile
import torch
from vqdiff.data import load_dataset, resolve_cache_dir
from vqdiff.steps import TensorSource
from vqdiff.distributed import seeded
from vqdiff.train import TrainConfig, train
from vqdiff.tokenizer import VQTokenizer, TokenizerConfig
from vqdiff.ar import ARTransformer, ARConfig
from vqdiff.diffusion import DiffusionTransformer, DiffusionConfig

what = sys.argv[1]
import os
if os.environ.get("THREADS"): torch.set_num_threads(int(os.environ["THREADS"]))
root = "/work/shared/data/cifar10-jpeg"
if what == "load":
    shutil.rmtree(resolve_cache_dir() / "folders", ignore_errors=True)
    for label in ("cold", "warm"):
        for split in ("train", "test"):
            t = time.perf_counter(); ds = load_dataset("folder", split, path=root)
            print(label, split, len(ds), f"{time.perf_counter() - t:.1f}s", flush=True)
    idx = torch.randperm(len(ds))[:128]
    t = time.perf_counter()
    for _ in range(100): ds.batch(idx)
    print(f"batch gather: {12800 / (time.perf_counter() - t):.0f} images/s")
    sys.exit()

def timed(model, data, steps, bs, precision="fp32"):
    cfg = TrainConfig(steps=steps, batch_size=bs, warmup_steps=1, log_every=1, checkpoint_every=10**9, precision=precision)
    times = []
    last = [time.perf_counter()]
    def on_log(step, logs):
        now = time.perf_counter(); times.append(now - last[0]); last[0] = now
    with tempfile.TemporaryDirectory() as d:
        train(model, data, cfg, d, device="cpu", on_log=on_log)
    t = sorted(times[2:])
    return t[len(t) // 2]

n = int(sys.argv[3]) if len(sys.argv) > 3 else 12
if what == "tok":
    width = int(sys.argv[2])
    ds = load_dataset("folder", "train", path=root)
    with seeded(0):
        m = VQTokenizer(TokenizerConfig(channels=3, width=width, max_width=2 * width, codebook_size=512, codebook_dim=32))
    s = timed(m, ds, n, 128)
    print(f"tokenizer width {width}: {s:.3f} s/step, {128 / s:.0f} images/s, {sum(p.numel() for p in m.parameters())/1e6:.2f}M")
else:
    dim, depth = int(sys.argv[2]), 4
    ids = torch.randint(0, 512, (5000, 8, 8)); labels = torch.randint(0, 10, (5000,))
    kw = dict(codebook_size=512, grid_h=8, grid_w=8, num_classes=10, dim=dim, depth=depth, heads=dim // 32)
    with seeded(0):
        m = ARTransformer(ARConfig(**kw)) if what == "ar" else DiffusionTransformer(DiffusionConfig(**kw))
    s = timed(m, TensorSource(ids=ids, labels=labels), n, 128, "bf16")
    print(f"{what} dim {dim}: {s:.3f} s/step (bf16), {sum(p.numel() for p in m.parameters())/1e6:.2f}M")
