"""The CIFAR-10 tokenizer ablation of issue 21 at equal training wall time (docs/results.md).

    VQDIFF_DATA_ROOT=../shared/data python docs/scripts/tokenizer_ablation.py ARM [--minutes 5] \
        --inception-weights ../shared/weights/inception-v3-compat-features.pth --out runs/tok-ablation

Each arm trains a tokenizer on the CIFAR-10 JPEG folder for the same wall time: the first call
times a step of every arm, one after another in one process (OUT/probe.json; an arm with a
discriminator averages the steps before and after it switches on), and each arm trains
`steps` = budget / its step time, so the cosine schedule ends on time and the allocation does not
depend on what else ran on the machine while an arm trained. The
perceptual network (vqdiff.perceptual) is trained once and shared by the arms that use it; its cost
is reported apart. Each arm is measured on the test split: PSNR and codebook usage on all 10,000
images, and Inception rFID of the first `--rfid-num` reconstructions against the same real test
images. One line of JSON per arm is appended to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from evaluation import compute_metrics, get_extractor
from vqdiff.data import from_uint8, load_dataset, to_uint8
from vqdiff.perceptual import PerceptualNet, PerceptualRecipe, train_perceptual
from vqdiff.pipeline import decode, encode, measure_tokenizer
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.distributed import seeded
from vqdiff.train import TrainConfig, train

BASE = dict(channels=3, image_size=32, downsample=4, width=64, max_width=128, codebook_size=512, codebook_dim=32)
ARMS = {
    "baseline": {},  # the cifar10 recipe's tokenizer before issue 21: MSE + VQ (EMA, k-means, restarts)
    "perceptual": dict(perceptual_weight=1.0),
    "perceptual-gan": dict(perceptual_weight=1.0, disc=True, disc_weight=0.5, lecam_weight=0.001),  # disc_start: half way
    "perceptual-gan-nolecam": dict(perceptual_weight=1.0, disc=True, disc_weight=0.5),
    "fsq": dict(perceptual_weight=1.0, quantizer="fsq", fsq_levels=(8, 8, 8), codebook_size=512),
    "res2": dict(perceptual_weight=1.0, num_res_blocks=2),
    "codes1024": dict(perceptual_weight=1.0, codebook_size=1024),
    "grid16": dict(perceptual_weight=1.0, downsample=2),
    "fsq-mse": dict(quantizer="fsq", fsq_levels=(8, 8, 8), codebook_size=512),  # the MSE loss of the baseline
    "grid16-mse": dict(downsample=2),
    "disc-mse": dict(disc=True, disc_weight=0.5),
    "disc-mse-lecam": dict(disc=True, disc_weight=0.5, lecam_weight=0.001),  # the LeCAM pair without the perceptual loss
    "perceptual-0.1": dict(perceptual_weight=0.1),
    # capacity at the 8x8 grid, with the baseline's MSE loss
    "res2-mse": dict(num_res_blocks=2),
    "wide-mse": dict(width=128, max_width=256),
    "codes1024-mse": dict(codebook_size=1024),
    "codes4096-mse": dict(codebook_size=4096),
    "dim8-mse": dict(codebook_dim=8),
}


def seconds_per_step(cfg: TokenizerConfig, train_set, batch_size: int, perceptual: PerceptualNet | None) -> float:
    model = VQTokenizer(dataclasses.replace(cfg, disc_start=0)).train()
    if perceptual is not None:
        model.perceptual.load_state_dict(perceptual.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    times = []
    for i in range(6):
        t = time.perf_counter()
        loss, _ = model.loss(train_set.batch(torch.arange(i * batch_size, (i + 1) * batch_size)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return sum(times[2:]) / 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arm", choices=sorted(ARMS))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rfid-num", type=int, default=1000)
    ap.add_argument("--inception-weights", required=True)
    ap.add_argument("--out", default="runs/tok-ablation")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = os.environ.get("VQDIFF_DATA_ROOT", "../shared/data")
    kw = dict(image_size=32, path=Path(root) / "cifar10-jpeg")
    train_set, test_set = load_dataset("folder", "train", **kw), load_dataset("folder", "test", **kw)

    cfg = TokenizerConfig(**{**BASE, **ARMS[args.arm]})
    perceptual, p_info = None, None
    if cfg.perceptual_weight > 0:  # trained once, shared by the arms
        perceptual = PerceptualNet(cfg.channels, cfg.perceptual_width)
        p_path = out / "perceptual.pt"
        if p_path.exists():
            perceptual.load_state_dict(torch.load(p_path))
            p_info = json.loads((out / "perceptual.json").read_text())
        else:
            p_info = train_perceptual(perceptual, train_set, PerceptualRecipe(steps=cfg.perceptual_steps))
            torch.save(perceptual.state_dict(), p_path)
            (out / "perceptual.json").write_text(json.dumps(p_info))
    # the step costs of all arms, measured once, one after another in one process: the allocation of
    # steps does not depend on what else the machine ran while an arm trained
    probe_path = out / "probe.json"
    if not probe_path.exists():
        probe: dict[str, float] = {}
        for _ in range(2):  # two rounds, round-robin; the faster of each arm's two readings
            for arm, extra in ARMS.items():
                arm_cfg = TokenizerConfig(**{**BASE, **extra})
                arm_net = perceptual if arm_cfg.perceptual_weight > 0 else None
                t = seconds_per_step(dataclasses.replace(arm_cfg, disc=False), train_set, args.batch_size, arm_net)
                if arm_cfg.disc:  # the discriminator costs only after disc_start (half the steps)
                    t = 0.5 * t + 0.5 * seconds_per_step(arm_cfg, train_set, args.batch_size, arm_net)
                probe[arm] = min(probe.get(arm, t), t)
                print(f"probe {arm}: {t:.3f} s/step", flush=True)
        probe_path.write_text(json.dumps(probe, indent=1))
    probe = json.loads(probe_path.read_text())
    if args.arm not in probe:  # an arm added after the first probe: timed alone, as the others were
        arm_cfg = dataclasses.replace(cfg, disc=False)
        probe[args.arm] = min(seconds_per_step(arm_cfg, train_set, args.batch_size, perceptual) for _ in range(2))
        if cfg.disc:
            probe[args.arm] = 0.5 * probe[args.arm] + 0.5 * seconds_per_step(cfg, train_set, args.batch_size, perceptual)
        probe_path.write_text(json.dumps(probe, indent=1))
    per_step = probe[args.arm]
    steps = max(int(args.minutes * 60 / per_step), 50)
    if cfg.disc:
        cfg = dataclasses.replace(cfg, disc_start=steps // 2)
    tcfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=min(100, steps // 10), checkpoint_every=max(steps // 4, 1), seed=0)
    with seeded(0):
        model = VQTokenizer(cfg)
    if perceptual is not None and not (out / args.arm / "train_state.pt").exists():
        model.perceptual.load_state_dict(perceptual.state_dict())
    t0 = time.perf_counter()
    model = train(model, train_set, tcfg, out / args.arm).model.eval()
    train_seconds = time.perf_counter() - t0
    tok = measure_tokenizer(model, test_set)
    extractor = get_extractor("inception", dataset="cifar10", inception_weights=args.inception_weights)
    real = test_set.images_uint8(torch.arange(args.rfid_num))
    recon = to_uint8(decode(model, encode(model, from_uint8(real))))
    m = compute_metrics(recon, real, extractor, real_key=f"cifar10-test-{args.rfid_num}", kid=False, prc=False)
    row = {
        "arm": args.arm, "config": ARMS[args.arm], "steps": steps, "seconds_per_step_probe": round(per_step, 3),
        "train_seconds": round(train_seconds, 1), "psnr": round(tok["psnr"], 2), "codebook_usage": round(tok["codebook_usage"], 3),
        "perplexity": round(tok["perplexity"], 1), "rfid": round(m["fid"], 2), "rfid_num": args.rfid_num,
        "perceptual": p_info, "grid": list(cfg.grid),
    }  # fmt: skip
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
