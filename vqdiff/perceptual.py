"""A perceptual loss that needs no download: the features of a small classifier that vqdiff trains
on the dataset's own train split, compared LPIPS-style (each layer's features unit-normalised over
channels, squared differences summed over channels, averaged over positions, summed over layers).

LPIPS uses an ImageNet VGG, which cannot be fetched offline; the FID network must not be used either
(a loss on the metric's own features inflates the metric). This network is neither: it is built
here, from the images the tokenizer trains on, in a minute or two on a CPU.

    net = PerceptualNet(channels=3)
    info = train_perceptual(net, train_set, steps=600)     # {"accuracy": ..., "seconds": ...}
    d = perceptual_distance(net, x, y)                     # float [], differentiable in x and y
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vqdiff.classify import fit_classifier
from vqdiff.data import ImageSet


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the frozen net behaves the same in the tokenizer's train and eval modes
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(),
    )  # fmt: skip


class PerceptualNet(nn.Module):
    """Three conv stages (width w, 2w, 4w; 2x average pooling between them). `features(x)` gives the
    three stages' outputs, the layers the distance compares. The linear classifier it is trained
    with lives in `train_perceptual` only, so the net does not depend on the number of classes."""

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.out_dim = widths[-1]
        self.stages = nn.ModuleList([_block(c_in, c_out) for c_in, c_out in zip([channels, *widths], widths)])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(F.avg_pool2d(x, 2) if i else x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images float [b c h w] in [-1,1] -> pooled last-stage features [b 4w]."""
        return self.features(x)[-1].mean((2, 3))


def perceptual_distance(net: PerceptualNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of sum over layers of mean over positions of ||f(x)/|f(x)| - f(y)/|f(y)|||^2."""
    total = x.new_zeros((), dtype=torch.float32)
    with torch.set_grad_enabled(y.requires_grad and torch.is_grad_enabled()):  # a target needs no graph
        targets = net.features(y)
    for fx, fy in zip(net.features(x), targets):
        fx, fy = F.normalize(fx.float(), dim=1, eps=1e-6), F.normalize(fy.float(), dim=1, eps=1e-6)
        total = total + (fx - fy).pow(2).sum(1).mean()
    return total


@dataclass(frozen=True)
class PerceptualRecipe:
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def train_perceptual(net: PerceptualNet, train_set: ImageSet, recipe: PerceptualRecipe = PerceptualRecipe(), device: str | torch.device = "cpu", holdout: int = 1000) -> dict:
    """Train `net` to classify `train_set` (random flips; AdamW, cosine decay), freeze it, and return
    {"accuracy": on the last `holdout` train images it did not see, "seconds", "steps", "parameters"}."""
    if train_set.num_classes < 2:
        raise ValueError(f"the perceptual loss trains a classifier on the dataset, and {train_set.name!r} has no class labels; set tokenizer.perceptual_weight = 0")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(recipe.seed)
    n_train = max(len(train_set) - holdout, 1)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        # the tokenizer holds the net frozen: it trains here, and is frozen again at the end
        classifier = nn.Sequential(net.requires_grad_(True), nn.Linear(net.out_dim, train_set.num_classes)).to(device).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=recipe.lr, weight_decay=0.05)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:  # random images, randomly flipped
        b = train_set.batch(torch.randint(0, n_train, (recipe.batch_size,), generator=g))
        x = b["images"].to(device)
        flip = torch.rand(len(x), generator=g) < 0.5
        return torch.where(flip.to(device)[:, None, None, None], x.flip(3), x), b["labels"].to(device)

    def lr_at(step: int) -> float:  # cosine decay to 0
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))

    fit_classifier(classifier, opt, batch, lr_at, recipe.steps)
    classifier.eval().requires_grad_(False)
    held = torch.arange(n_train, len(train_set))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(held), 500):
            batch = train_set.batch(held[i : i + 500])
            correct += (classifier(batch["images"].to(device)).argmax(1).cpu() == batch["labels"]).sum().item()
    accuracy = correct / max(len(held), 1)
    return {
        "network": "PerceptualNet: a 3-stage conv classifier trained by vqdiff on the train split (not Inception)",
        "accuracy_held_out_train": round(accuracy, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": recipe.steps,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
