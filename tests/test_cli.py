"""CliRunner runs of every command on a tiny `shapes` run, and of bad input."""

import json

import pytest
from helpers import TINY_TOKENIZER as TINY
from helpers import invoke, one_line_error, sets


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shapes"
    result = invoke("train", "tokenizer", "shapes", "--run-dir", run, *sets(TINY))
    assert result.exit_code == 0, result.output
    return run


def test_train_tokenizer_writes_metrics_and_reconstructions(tok_run):
    metrics = json.loads((tok_run / "tokenizer" / "metrics.json").read_text())
    for key in ("psnr", "mse", "codebook_usage", "perplexity"):
        assert key in metrics
    assert 0 <= metrics["codebook_usage"] <= 1
    assert (tok_run / "tokenizer" / "reconstructions.png").stat().st_size > 0
    for f in ("config.json", "model.safetensors", "train_state.pt", "log.jsonl"):
        assert (tok_run / "tokenizer" / f).exists()
    assert "steps = 6" in (tok_run / "recipe.toml").read_text()


def test_train_tokenizer_again_skips_finished_stage(tok_run):
    before = (tok_run / "tokenizer" / "model.safetensors").stat().st_mtime_ns
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tok_run, *sets(TINY))
    assert result.exit_code == 0, result.output
    assert (tok_run / "tokenizer" / "model.safetensors").stat().st_mtime_ns == before


def test_encode_writes_tokens(tok_run):
    result = invoke("encode", tok_run)
    assert result.exit_code == 0, result.output
    from vqdiff.data import load_tokens

    ids, labels = load_tokens(tok_run / "tokens" / "train.safetensors")
    assert ids.shape == (96, 8, 8) and labels.shape == (96,)
    assert 0 <= ids.min() and ids.max() < 16
    ids_test, _ = load_tokens(tok_run / "tokens" / "test.safetensors")
    assert ids_test.shape == (48, 8, 8)


def test_unknown_recipe_key_in_set(tmp_path):
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path, "--set", "tokenizer.stepz=5")
    one_line_error(result, "tokenizer.stepz")


def test_unknown_key_in_recipe_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndataset = "shapes"\ncolour = "blue"\n')
    result = invoke("train", "tokenizer", bad, "--run-dir", tmp_path / "run")
    one_line_error(result, "data.colour")


def test_unknown_recipe_name(tmp_path):
    result = invoke("train", "tokenizer", "no-such-recipe", "--run-dir", tmp_path)
    one_line_error(result, "no-such-recipe")


def test_bad_value_type(tmp_path):
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path, "--set", "tokenizer.steps=many")
    one_line_error(result, "tokenizer.steps")


def test_bad_model_value_names_its_section(tmp_path):
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path, *sets(TINY), "--set", "tokenizer.downsample=3")
    one_line_error(result, "[tokenizer]", "power of 2")
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path, "--set", "tokenizer.lr=-1")
    one_line_error(result, "[tokenizer] lr must be > 0")


def test_missing_data_root(tmp_path):
    result = invoke(
        "train", "tokenizer", "mnist", "--run-dir", tmp_path / "run", "--data-root", tmp_path / "nowhere"
    )
    one_line_error(result, str(tmp_path / "nowhere"), "VQDIFF_DATA_ROOT")


def test_encode_without_run(tmp_path):
    result = invoke("encode", tmp_path)
    one_line_error(result, "not a run folder")


def test_same_recipe_same_weights(tok_run, tmp_path):
    import torch

    torch.manual_seed(1234)  # whatever ran before must not change the result
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path, *sets(TINY))
    assert result.exit_code == 0, result.output
    a = (tok_run / "tokenizer" / "model.safetensors").read_bytes()
    assert (tmp_path / "tokenizer" / "model.safetensors").read_bytes() == a


def test_help_keeps_bracketed_text():
    # help texts are not read as rich markup, which would drop "[default: ...]" and ".[demo]"
    demo_help = " ".join(invoke("demo", "--help").output.split())
    assert 'pip install -e ".[demo]"' in demo_help
    assert "cpu, cuda, cuda:1 ... [default: cpu]" in demo_help
    sample_help = " ".join(invoke("sample", "--help").output.split())
    assert "[default: the recipe's diffusion.sampler]" in sample_help
