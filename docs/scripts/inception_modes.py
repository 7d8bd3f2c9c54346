"""Inception (torch-fidelity's inception-v3-compat) on the CPU: fp32 against channels-last, bf16
autocast, and both. The same images go through each mode: the first N CIFAR-10 test images and the
first N train images (the JPEG folder under the data root). Prints images/s of each mode and the FID
of test against train in each mode, with its difference from fp32's (the default rule: a fast mode
is the default only when |difference| <= 0.5). The results: docs/results.md.

    nice -n 19 env VQDIFF_DATA_ROOT=/work/shared/data PYTHONPATH=. python docs/scripts/inception_modes.py \
        --weights /work/shared/weights/inception-v3-compat-features.pth --num 1000
"""

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor

from evaluation import get_extractor
from evaluation.extractors import INCEPTION_MODES
from vqdiff.data import load_dataset, resolve_data_root

ap = argparse.ArgumentParser()
ap.add_argument("--weights", required=True, help="inception-v3-compat weights (.pth)")
ap.add_argument("--num", type=int, default=1000, help="images of each split")
ap.add_argument("--batch-size", type=int, default=None, help="default: the extractor's CPU batch size")
ap.add_argument("--folder", default=None, help="CIFAR-10 in ImageFolder layout (default: DATA_ROOT/cifar10-jpeg)")
args = ap.parse_args()

folder = Path(args.folder or resolve_data_root() / "cifar10-jpeg")
test = load_dataset("folder", "test", path=folder, limit=args.num).uint8
train = load_dataset("folder", "train", path=folder, limit=args.num).uint8
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
print(f"{len(test)} test and {len(train)} train images; torch {torch.__version__}, {torch.get_num_threads()} threads, "
      f"{os.cpu_count()} cores: {cpu}", flush=True)  # fmt: skip

# one module per mode, timed batch by batch in turn (the order rotating), so that other work on the
# machine slows every mode alike
modes = [m for m in INCEPTION_MODES if m != "auto"]
modules, feats, seconds = {}, {m: [] for m in modes}, {m: 0.0 for m in modes}
for mode in modes:
    ex = get_extractor("inception", dataset="cifar10", inception_weights=args.weights, device="cpu", inception_mode=mode)
    modules[mode] = create_feature_extractor(ex.fidelity_name, ["2048"], cuda=False, feature_extractor_weights_path=args.weights, verbose=False)
bs = args.batch_size or ex.batch_size
images = torch.cat([test, train])
with torch.no_grad():
    for mode in modes:
        modules[mode](images[:bs])  # warm-up: oneDNN picks its kernels on the first batch
    for j, i in enumerate(range(0, len(images), bs)):
        batch = images[i : i + bs]
        for mode in modes[j % len(modes) :] + modes[: j % len(modes)]:
            t0 = time.perf_counter()
            feats[mode].append(modules[mode](batch)[0].double())
            seconds[mode] += time.perf_counter() - t0

rows = []
for mode in modes:
    f = torch.cat(feats[mode])
    f_test, f_train = f[: len(test)], f[len(test) :]
    fid = float(fid_statistics_to_metric(fid_features_to_statistics(f_test), fid_features_to_statistics(f_train), False)["frechet_inception_distance"])
    rows.append((mode, bs, len(images) / seconds[mode], seconds["fp32"] / seconds[mode], fid, (f - torch.cat(feats["fp32"])).abs().max().item()))
fid32 = rows[0][4]
rows = [(m, b, ips, sp, fid, fid - fid32, drift) for m, b, ips, sp, fid, drift in rows]
print("\n| mode | batch | images/s | speed-up | FID test vs train | difference from fp32 | max abs feature difference |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for mode, bs, ips, speedup, fid, diff, drift in rows:
    print(f"| {mode} | {bs} | {ips:.1f} | {speedup:.2f}x | {fid:.3f} | {diff:+.3f} | {drift:.2g} |")
