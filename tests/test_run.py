"""The run folder object (recipes.run.Run), the one registry and the one config builder."""

import os

import pytest

from recipes.recipe import EvaluateSection, load_recipe
from recipes.run import Run
from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.checkpoint import ConfigError, CheckpointError, config_from_dict
from vqdiff.registry import config_class, model_class


def test_cached_computes_once_per_key(tmp_path):
    run, calls = Run(tmp_path), []

    def compute():
        calls.append(1)
        return {"fid": len(calls)}

    path = tmp_path / "report" / "context.json"
    assert run.cached(path, {"n": 1}, compute) == {"fid": 1}
    assert run.cached(path, {"n": 1}, compute) == {"fid": 1} and len(calls) == 1
    assert run.cached(path, {"n": 2}, compute) == {"fid": 2}  # another key: computed again
    path.write_text("{not json")
    assert run.cached(path, {"n": 2}, compute) == {"fid": 3}  # a corrupt marker is a miss, not an error
    assert run.fresh(path, {"n": 2}) == {"key": {"n": 2}, "value": {"fid": 3}}
    assert run.fresh(tmp_path / "missing.json", {"n": 2}) is None


def test_weights_hash_follows_the_file(tmp_path):
    run = Run(tmp_path)
    weights = run.weights("tokenizer")
    weights.parent.mkdir()
    weights.write_bytes(b"one")
    first = run.tokenizer_hash
    assert run.tokenizer_hash == first and len(first) == 12
    weights.write_bytes(b"two, longer")
    os.utime(weights, ns=(1, 1))  # even with an old timestamp: the size changed
    assert run.tokenizer_hash != first


def test_paths_are_the_documented_layout(tmp_path):
    run = Run(tmp_path)
    assert run.recipe_path == tmp_path / "recipe.toml"
    assert run.weights("ar") == tmp_path / "ar" / "model.safetensors"
    assert run.tokens_file("test") == tmp_path / "tokens" / "test.safetensors"
    assert run.tokens_meta_path == tmp_path / "tokens" / "meta.json"
    assert (run.samples_dir, run.report_dir) == (tmp_path / "samples", tmp_path / "report")


def test_one_registry_and_one_builder():
    assert model_class("ar") is ARTransformer and config_class("ar") is ARConfig
    assert model_class("diffusers").__name__ == "DiffusersTokenizer"
    with pytest.raises(CheckpointError, match="unknown model kind 'gan'"):
        model_class("gan")
    cfg = config_from_dict(EvaluateSection, {"steps": [2, 4], "generators": ["ar"]})
    assert cfg.steps == (2, 4) and cfg.generators == ("ar",)  # TOML/JSON lists back to tuples
    with pytest.raises(ConfigError, match="colour"):
        config_from_dict(EvaluateSection, {"colour": 1})


def test_section_defaults_come_from_the_schemas():
    recipe = load_recipe("shapes")
    assert recipe.data.dataset == "shapes"
    evaluate = recipe.build(EvaluateSection, "evaluate")
    assert isinstance(evaluate, EvaluateSection) and evaluate.gif_steps == EvaluateSection().gif_steps
    assert recipe["tokenizer"]["kind"] == "vqvae" and recipe["diffusion"]["sampler"] == "maskgit"
