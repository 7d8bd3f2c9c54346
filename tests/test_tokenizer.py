import json

import pytest
import torch

from vqdiff.checkpoint import CheckpointError, load_model, save_model
from vqdiff.data import load_dataset
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import TrainConfig, batch_indices, train


def tiny(**kw) -> TokenizerConfig:
    base = dict(channels=3, width=8, max_width=16, codebook_size=16, codebook_dim=4, kmeans_init=False)
    return TokenizerConfig(**{**base, **kw})


@pytest.mark.parametrize("downsample,grid", [(4, 8), (2, 16)])
def test_encode_decode_shapes(downsample, grid):
    model = VQTokenizer(tiny(downsample=downsample)).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = model.encode(images)
    assert ids.shape == (3, grid, grid) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < 16
    rec = model.decode(ids)
    assert rec.shape == images.shape and rec.dtype == torch.float32
    assert rec.min() >= -1 and rec.max() <= 1
    # encode is the argmin of the quantizer, decode(encode) equals the quantized forward pass
    assert torch.allclose(rec, model(images).clamp(-1, 1), atol=1e-5)


def test_save_load_identical_and_strict(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(tiny()).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    save_model(model, tmp_path / "tok")
    loaded = load_model(tmp_path / "tok", "tokenizer")
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))
    # a config that does not fit the weights is refused, not silently loaded
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    meta["config"]["codebook_size"] = 32
    (tmp_path / "tok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(tmp_path / "tok")
    meta["config"]["no_such_field"] = 1
    (tmp_path / "tok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown key"):
        load_model(tmp_path / "tok")


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    model = VQTokenizer(tiny())
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"kind": "tokeni')
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path)


def test_batch_indices_cover_epochs():
    seen = torch.cat([batch_indices(10, 4, s, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 2, 3), batch_indices(10, 4, 2, 3))
    assert not torch.equal(batch_indices(10, 4, 2, 3), batch_indices(10, 4, 2, 4))


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def test_resume_after_checkpoint_matches_uninterrupted_run(tmp_path):
    data = load_dataset("shapes", "train", limit=64)
    cfg = TrainConfig(steps=8, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=3, log_every=1, ema=0.9)
    torch.manual_seed(0)
    straight = train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "a")
    torch.manual_seed(0)
    # a run killed right after its step-3 checkpoint
    first = train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "b", stop_after=3)
    assert first.step == 3
    torch.manual_seed(123)  # a different global seed must not matter: the loop re-seeds per step
    resumed = train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.step == 8
    assert _losses(tmp_path / "b" / "log.jsonl") == pytest.approx(_losses(tmp_path / "a" / "log.jsonl"), rel=1e-5)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    # running the finished run again does nothing
    again = train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "b")
    assert again.resumed_from == 8 and again.logs == []


def test_resume_refuses_another_config(tmp_path):
    data = load_dataset("shapes", "train", limit=16)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1)
    train(VQTokenizer(tiny()), data, cfg, tmp_path)
    with pytest.raises(CheckpointError, match="another tokenizer config"):
        train(VQTokenizer(tiny(codebook_size=8)), data, TrainConfig(steps=4, batch_size=4, warmup_steps=1), tmp_path)


def test_training_reduces_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    data = load_dataset("shapes", "train", limit=256)
    model = VQTokenizer(tiny(width=16, codebook_size=32, kmeans_init=True, restart_dead=True))
    x = data.batch(torch.arange(32))["images"]
    before = ((model.eval().decode(model.encode(x)) - x) ** 2).mean()
    cfg = TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, log_every=10, checkpoint_every=1000)
    trained = train(model, data, cfg, tmp_path).model
    after = ((trained.decode(trained.encode(x)) - x) ** 2).mean()
    assert after < 0.5 * before


def test_discriminator_switches_on_at_its_step(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(tiny(disc=True, disc_start=2, disc_width=8)).train()
    batch = {"images": torch.rand(4, 3, 32, 32) * 2 - 1}
    _, logs0 = model.loss(batch)
    _, logs1 = model.loss(batch)
    loss2, logs2 = model.loss(batch)
    assert "d_loss" not in logs0 and "d_loss" not in logs1 and "d_loss" in logs2
    loss2.backward()
    assert all(p.grad is not None for p in model.discriminator.parameters())


def test_interrupt_saves_the_last_finished_step(tmp_path):
    data = load_dataset("shapes", "train", limit=64)
    cfg = TrainConfig(steps=8, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=100, log_every=1)
    torch.manual_seed(0)
    train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "a")

    def ctrl_c_at_5(step, logs):
        if step == 5:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "b", on_log=ctrl_c_at_5)
    resumed = train(VQTokenizer(tiny(kmeans_init=True)), data, cfg, tmp_path / "b")
    assert resumed.resumed_from == 5
    assert _losses(tmp_path / "b" / "log.jsonl") == pytest.approx(_losses(tmp_path / "a" / "log.jsonl"), rel=1e-5)
