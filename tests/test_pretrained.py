"""A diffusers VQModel as the tokenizer, offline: a tiny one is built and saved to a temp folder."""

import json

import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error, sets

diffusers = pytest.importorskip("diffusers")

from vqdiff.checkpoint import load_model  # noqa: E402
from vqdiff.pretrained import DiffusersTokenizer  # noqa: E402

K = 16


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory):
    torch.manual_seed(0)
    vq = diffusers.VQModel(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        num_vq_embeddings=K, norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("vq") / "tiny-vqmodel"
    vq.save_pretrained(folder)
    return folder


def test_ids_and_images_are_the_vqmodels_own(vq_folder):
    vq = diffusers.VQModel.from_pretrained(vq_folder).eval()
    tok = DiffusersTokenizer.from_pretrained(vq_folder, channels=3, image_size=32)
    assert tok.codebook_size == K and tok.grid == (8, 8)  # 32 / 2 ** (3 blocks - 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.encode(x)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < K
    with torch.no_grad():
        reference = vq(x).sample  # VQModel's own encode -> quantize -> decode
    assert torch.allclose(tok.decode(ids), reference.clamp(-1, 1), atol=1e-5)
    grey = DiffusersTokenizer.from_pretrained(vq_folder, channels=1, image_size=32)
    assert grey.decode(grey.encode(x[:, :1])).shape == (2, 1, 32, 32)


def test_run_with_a_diffusers_tokenizer(vq_folder, tmp_path):
    run = tmp_path / "run"
    use = ["tokenizer.kind=diffusers", f'tokenizer.pretrained="{vq_folder}"']
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", run, *sets(TINY + use)))
    cfg = json.loads((run / "tokenizer" / "config.json").read_text())
    assert cfg["kind"] == "diffusers" and cfg["trained_steps"] == 0 and not (run / "tokenizer" / "log.jsonl").exists()
    metrics = json.loads((run / "tokenizer" / "metrics.json").read_text())
    assert metrics["codebook_size"] == K and metrics["grid"] == [8, 8]
    # the run folder alone rebuilds it, equal to the source
    again = load_model(run / "tokenizer")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(again.encode(x), DiffusersTokenizer.from_pretrained(vq_folder, channels=3, image_size=32).encode(x))
    ok(invoke("encode", run))
    ok(invoke("train", "ar", "shapes", "--run-dir", run, *sets(TINY + use)))
    ok(invoke("train", "diffusion", "shapes", "--run-dir", run, *sets(TINY + use)))
    for generator in ("ar", "diffusion"):
        ok(invoke("sample", run, "-g", generator, "-n", 3, "-s", 2, "--out", tmp_path / generator))
        assert len(list((tmp_path / generator).glob("0*.png"))) == 3


def test_bad_pretrained_is_one_line(tmp_path):
    def train(*use):
        return invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "run", *sets(TINY + list(use)))

    one_line_error(train("tokenizer.kind=diffusers", f'tokenizer.pretrained="{tmp_path / "nowhere"}"'), "nowhere")
    one_line_error(train("tokenizer.kind=diffusers"), "[tokenizer]", "needs pretrained")
    one_line_error(train("tokenizer.kind=taming"), "[tokenizer]", "vqvae or diffusers")
