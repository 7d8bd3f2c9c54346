"""Shared helpers of the CLI tests: a tiny `shapes` recipe, CliRunner calls, random Inception weights."""

import platform
from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from typer.testing import CliRunner

from recipes.cli import app

runner = CliRunner()

TINY = [
    "data.limit_train=96",
    "data.limit_test=48",
    "tokenizer.steps=6",
    "tokenizer.batch_size=16",
    "tokenizer.width=8",
    "tokenizer.max_width=16",
    "tokenizer.codebook_size=16",
    "tokenizer.codebook_dim=4",
    "tokenizer.warmup_steps=1",
    "tokenizer.checkpoint_every=3",
    "ar.steps=4",
    "ar.dim=32",
    "ar.depth=1",
    "ar.heads=2",
    "ar.batch_size=16",
    "ar.warmup_steps=1",
    "ar.checkpoint_every=2",
    "diffusion.steps=6",
    "diffusion.dim=32",
    "diffusion.depth=1",
    "diffusion.heads=2",
    "diffusion.batch_size=16",
    "diffusion.warmup_steps=1",
    "diffusion.checkpoint_every=3",
    "evaluate.num=40",
    "evaluate.steps=[2,4]",
    "evaluate.batch_size=20",
    "evaluate.gif_steps=3",
    "evaluate.classifier_steps=20",  # a classifier extractor trained briefly, so that evaluate takes seconds
]


TINY_TOKENIZER = [s for s in TINY if s.startswith(("data.", "tokenizer."))]


def sets(items):
    return [x for item in items for x in ("--set", item)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in result.output, result.output


def save_random_inception_weights(path):
    """A randomly initialised Inception state dict in torch-fidelity's format at `path` (the real one
    needs a download); returns `path`."""
    mp = pytest.MonkeyPatch()
    mp.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    torch.save(net.state_dict(), path)
    return path


def cpu_flags() -> set[str] | None:
    """The kernel's CPU flags (/proc/cpuinfo) on x86 Linux, an independent reading to check torch's
    capability probes against; None elsewhere."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
