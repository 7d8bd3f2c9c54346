"""The tokenizer's natural-image losses (issue 21): the discriminator's switch-on step across a resume,
LeCAM, the offline perceptual network, and the FSQ quantizer option."""

import socket

import pytest
import torch

from vqdiff.checkpoint import load_model, save_model
from vqdiff.data import load_dataset
from vqdiff.perceptual import PerceptualNet, PerceptualRecipe, perceptual_distance, train_perceptual
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import TrainConfig, train


def tiny(**kw) -> TokenizerConfig:
    base = dict(channels=3, width=8, max_width=16, codebook_size=16, codebook_dim=4, kmeans_init=False)
    return TokenizerConfig(**{**base, **kw})


def _logged(path) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_discriminator_switches_on_at_its_step_across_a_resume(tmp_path):
    """A run stopped before disc_start and resumed switches the discriminator on at the same step as
    a straight run, with the same losses and weights (train_step and the LeCAM EMAs are checkpointed)."""
    data = load_dataset("shapes", "train", limit=64)
    cfg = TrainConfig(steps=8, batch_size=8, lr=2e-3, warmup_steps=2, checkpoint_every=3, log_every=1)
    tok = tiny(disc=True, disc_start=5, disc_width=8, lecam_weight=0.1)
    torch.manual_seed(0)
    straight = train(VQTokenizer(tok), data, cfg, tmp_path / "a")
    torch.manual_seed(0)
    train(VQTokenizer(tok), data, cfg, tmp_path / "b", stop_after=3)
    resumed = train(VQTokenizer(tok), data, cfg, tmp_path / "b")
    assert resumed.resumed_from == 3
    a, b = _logged(tmp_path / "a" / "log.jsonl"), _logged(tmp_path / "b" / "log.jsonl")
    # logged step s is the s-th step: the loss of step s sees train_step = s - 1
    assert [s for s in sorted(a) if "d_loss" in a[s]] == [6, 7, 8]
    assert [s for s in sorted(b) if "d_loss" in b[s]] == [6, 7, 8]
    for s in (6, 7, 8):
        assert b[s]["d_loss"] == pytest.approx(a[s]["d_loss"], rel=1e-5)
    for (name, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name
    assert int(resumed.model.train_step) == 8
    assert resumed.model.lecam_ema.abs().sum() > 0  # it moved once the discriminator was on


def test_lecam_pulls_the_discriminator_logits_towards_the_other_side():
    torch.manual_seed(0)
    model = VQTokenizer(tiny(disc=True, disc_start=0, disc_width=8, lecam_weight=1.0)).train()
    model.lecam_ema.copy_(torch.tensor([0.0, 0.0]))
    far = model._lecam(torch.full((4,), 3.0), torch.full((4,), -3.0))
    near = model._lecam(torch.full((4,), 0.1), torch.full((4,), -0.1))
    assert far > near > 0


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_perceptual_network_builds_offline_and_learns_the_classes(no_network):
    data = load_dataset("shapes", "train", limit=600)
    torch.manual_seed(0)
    net = PerceptualNet(channels=3, width=8)
    info = train_perceptual(net, data, PerceptualRecipe(steps=60, batch_size=32), holdout=200)
    assert info["accuracy_held_out_train"] > 0.6  # 3 classes: chance is 1/3
    assert "not Inception" in info["network"]
    assert not any(p.requires_grad for p in net.parameters())
    # the same seed builds the same network
    torch.manual_seed(0)
    again = PerceptualNet(channels=3, width=8)
    train_perceptual(again, data, PerceptualRecipe(steps=60, batch_size=32), holdout=200)
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), again.state_dict().values()))
    x = data.batch(torch.arange(4))["images"]
    y = data.batch(torch.arange(4, 8))["images"].requires_grad_(True)
    assert perceptual_distance(net, x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = perceptual_distance(net, x, y)
    d.backward()
    assert d > 0 and y.grad is not None and y.grad.abs().sum() > 0


def test_the_tokenizers_frozen_perceptual_network_is_the_one_that_trains():
    # the tokenizer holds its perceptual net with requires_grad off; training it must still move its
    # convolutions (a linear probe on frozen random features is not a trained net)
    data = load_dataset("shapes", "train", limit=300)
    torch.manual_seed(0)
    model = VQTokenizer(tiny(perceptual_weight=1.0, perceptual_width=8))
    before = {k: v.clone() for k, v in model.perceptual.state_dict().items()}
    train_perceptual(model.perceptual, data, PerceptualRecipe(steps=5, batch_size=16), holdout=50)
    after = model.perceptual.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not any(p.requires_grad for p in model.perceptual.parameters())


def test_perceptual_network_needs_labels():
    data = load_dataset("shapes", "train", limit=64)
    data.num_classes = 0
    with pytest.raises(ValueError, match="no class labels"):
        train_perceptual(PerceptualNet(channels=3, width=8), data, PerceptualRecipe(steps=1))


def test_tokenizer_with_perceptual_loss_trains_and_saves_the_network(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(tiny(perceptual_weight=1.0, perceptual_width=8)).train()
    _, logs = model.loss({"images": torch.rand(4, 3, 32, 32) * 2 - 1})
    assert logs["perceptual"] > 0
    save_model(model.eval(), tmp_path / "tok")
    loaded = load_model(tmp_path / "tok", "tokenizer")
    for a, b in zip(model.perceptual.state_dict().values(), loaded.perceptual.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 4)])
def test_fsq_round_trip(tmp_path, levels):
    k = 1
    for n in levels:
        k *= n
    torch.manual_seed(0)
    model = VQTokenizer(tiny(quantizer="fsq", fsq_levels=levels, codebook_size=k)).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = model.encode(images)
    assert ids.dtype == torch.long and ids.shape == (3, 8, 8) and 0 <= ids.min() and ids.max() < k
    # the ids name the codes the forward pass used, and decode(encode) is the quantized forward pass
    q = model.quantizer(model.encoder(images))
    assert torch.equal(q.ids, ids)
    assert torch.allclose(model.quantizer.lookup(ids), q.z_q, atol=1e-5)
    assert torch.allclose(model.decode(ids), model(images).clamp(-1, 1), atol=1e-5)
    # the implicit codebook has k distinct codes
    codes = model.quantizer.lookup(torch.arange(k).view(1, 1, k)).permute(0, 2, 3, 1).reshape(k, -1)
    assert len(torch.unique(codes.detach(), dim=0)) == k
    save_model(model, tmp_path / "tok")
    loaded = load_model(tmp_path / "tok", "tokenizer")
    assert torch.equal(loaded.encode(images), ids) and torch.equal(loaded.decode(ids), model.decode(ids))


def test_fsq_codebook_size_must_match_its_levels():
    with pytest.raises(ValueError, match="product of fsq_levels"):
        tiny(quantizer="fsq", fsq_levels=(8, 5, 5, 5), codebook_size=512)
    with pytest.raises(ValueError, match="vq or fsq"):
        tiny(quantizer="lfq")
