"""The CIFAR-10 classifier behind class accuracy and classifier-space FID: test accuracy and training
time of each recipe in evaluation.classifier.CLASSIFIERS (optionally with other steps), trained from
an empty cache on the train split, measured on the whole test split.

    VQDIFF_DATA_ROOT=../shared/data python docs/scripts/classifier_judge.py airbench cnn3
    STEPS=1000 python docs/scripts/classifier_judge.py airbench
"""

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from evaluation.classifier import CLASSIFIERS, ClassifierConfig, load_or_train
from vqdiff.data import load_dataset

path = os.environ.get("CIFAR_PATH", str(Path(os.environ.get("VQDIFF_DATA_ROOT", "../shared/data")) / "cifar10-jpeg"))
train_set = load_dataset("folder", "train", image_size=32, path=path)
test_set = load_dataset("folder", "test", image_size=32, path=path)
for name in sys.argv[1:] or list(CLASSIFIERS):
    recipe = CLASSIFIERS[name]
    if os.environ.get("STEPS"):
        recipe = dataclasses.replace(recipe, steps=int(os.environ["STEPS"]))
    cfg = ClassifierConfig(channels=3, num_classes=10, image_size=32, recipe=recipe)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        trained = load_or_train(train_set, test_set, cfg, cache_dir=Path(cache))
        seconds = time.perf_counter() - t0
    row = {"classifier": name, "steps": recipe.steps, "batch_size": recipe.batch_size, "test_accuracy": round(trained.info["test_accuracy"], 4),
           "train_seconds": round(trained.info["train_seconds"], 1), "seconds_with_test": round(seconds, 1), "threads": torch.get_num_threads()}  # fmt: skip
    print(json.dumps(row), flush=True)
