"""The decoder refinement (`vqdiff train decoder`): the encoder, the codebook and every id stay
bit-identical, the run decodes with the refined decoder from then on, an interrupted refinement
resumes to the same weights, and the perceptual network needs nothing from the network."""

import shutil
import socket

import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error

import recipes.stages as stages
from recipes.curves import decoder_curve
from recipes.evaluate import EvalOptions
from recipes.recipe import RecipeError, load_recipe
from recipes.run import Run, StageError
from vqdiff.checkpoint import load_model
from vqdiff.io import load_tensors, read_json
from vqdiff.pipeline import encode
from vqdiff.train import train as real_train

REFINE = ["decoder.steps=4", "decoder.batch_size=8", "decoder.warmup_steps=1", "decoder.checkpoint_every=2", "decoder.lr=1e-3",
          "decoder.disc_width=8", "decoder.perceptual_width=8", "decoder.perceptual_steps=3", "decoder.keep_every=2"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A run folder with a (tiny, briefly) trained tokenizer and its tokens."""
    path = tmp_path_factory.mktemp("decoder") / "run"
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", path, *sum((["--set", s] for s in TINY), [])))
    ok(invoke("encode", path))
    return path


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def refine(path, *extra):
    return invoke("train", "decoder", "shapes", "--run-dir", path, *sum((["--set", s] for s in [*TINY, *REFINE, *extra]), []))


def test_refinement_keeps_the_encoder_the_codebook_and_the_ids(tokenized, tmp_path):
    run_dir = copy_run(tokenized, tmp_path / "run")
    tokens_before = load_tensors(run_dir / "tokens" / "train.safetensors")
    ok(refine(run_dir, "decoder.perceptual_net=random"))
    base = load_tensors(run_dir / "tokenizer" / "model.safetensors")
    refined = load_tensors(run_dir / "decoder" / "model.safetensors")
    frozen = [k for k in base if k.startswith(("encoder.", "quantizer."))]
    assert frozen and all(torch.equal(base[k], refined[k]) for k in frozen)  # codebook buffers included
    assert any(not torch.equal(base[k], refined[k]) for k in base if k.startswith("decoder."))  # the decoder did train
    run = Run(run_dir)
    assert run.refined() and run.load_tokenizer().cfg.frozen_codes and not run.load_tokenizer(refined=False).cfg.frozen_codes
    images = run.load_split(run.read_recipe(), "test").batch(torch.arange(16))["images"]
    assert torch.equal(encode(run.load_tokenizer(), images), encode(run.load_tokenizer(refined=False), images))
    tokens_after = load_tensors(run_dir / "tokens" / "train.safetensors")
    assert all(torch.equal(tokens_before[k], tokens_after[k]) for k in tokens_before)
    metrics = read_json(run_dir / "decoder" / "metrics.json")
    assert metrics["steps"] == 4 and metrics["losses"]["perceptual_net"] == "random" and "psnr" in metrics
    assert read_json(run_dir / "decoder" / "config.json")["config"]["perceptual_net"] == "random"
    assert run.decoding_hash != run.tokenizer_hash  # sample caches key on the weights that decode


def test_an_interrupted_refinement_resumes_to_the_same_weights(tokenized, tmp_path, monkeypatch):
    straight = copy_run(tokenized, tmp_path / "straight")
    ok(refine(straight, "decoder.perceptual_net=random"))
    resumed = copy_run(tokenized, tmp_path / "resumed")

    def crash_after_two(*args, **kwargs):
        real_train(*args, **kwargs, stop_after=2)
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "train", crash_after_two)
    assert refine(resumed, "decoder.perceptual_net=random").exit_code != 0
    assert read_json(resumed / "decoder" / "config.json")["trained_steps"] == 2 and not Run(resumed).refined()
    monkeypatch.setattr(stages, "train", real_train)
    ok(refine(resumed, "decoder.perceptual_net=random"))
    a, b = load_tensors(straight / "decoder" / "model.safetensors"), load_tensors(resumed / "decoder" / "model.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_perceptual_network_builds_offline(tokenized, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    run_dir = copy_run(tokenized, tmp_path / "run")
    ok(refine(run_dir, "decoder.perceptual_net=classifier"))
    info = read_json(run_dir / "decoder" / "perceptual.json")
    assert "not Inception" in info["network"] and 0 <= info["accuracy_held_out_train"] <= 1
    model = load_model(run_dir / "decoder")
    assert model.perceptual is not None and not any(p.requires_grad for p in model.perceptual.parameters())


def test_the_refinement_curve_starts_at_the_tokenizers_own_decoder(tokenized, tmp_path, monkeypatch):
    monkeypatch.delenv("VQDIFF_INCEPTION_WEIGHTS", raising=False)  # else Inception's space joins the curve
    run_dir = copy_run(tokenized, tmp_path / "run")
    ok(refine(run_dir, "decoder.perceptual_net=random"))
    run = Run(run_dir)
    opts = EvalOptions.from_recipe(run.read_recipe(), num=8, extractor="classifier", classifier_steps=2)
    curve = decoder_curve(run, opts)
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    assert all(set(p["rfids"]) == {"classifier"} and p["psnr"] > 0 for p in curve["points"])
    assert (run_dir / "report" / "decoder_curve.png").stat().st_size > 0
    assert decoder_curve(run, opts) == {**curve}  # the points are cached


def test_bad_refinements_are_refused_in_one_line(tokenized, tmp_path):
    with pytest.raises(RecipeError, match="perceptual_net must be classifier or random"):
        load_recipe("shapes", [*TINY, "decoder.steps=4", "decoder.perceptual_net=vgg"])
    one_line_error(invoke("train", "decoder", "shapes", "--run-dir", tmp_path / "none", *sum((["--set", s] for s in TINY), [])), "decoder.steps = 0")
    one_line_error(invoke("train", "decoder", "shapes", "--run-dir", tmp_path / "empty", "--set", "decoder.steps=2"), "no tokenizer")
    # a refinement of a tokenizer that was retrained since is refused, not silently used
    run_dir = copy_run(tokenized, tmp_path / "run")
    ok(refine(run_dir, "decoder.perceptual_net=random"))
    (run_dir / "decoder" / "base.json").write_text('{"tokenizer_hash": "another"}')
    one_line_error(refine(run_dir, "decoder.perceptual_net=random"), "refines another tokenizer")
    with pytest.raises(StageError, match="refines another tokenizer"):
        Run(run_dir).load_tokenizer()  # what sample, evaluate, edit, the codec and the demo decode with
