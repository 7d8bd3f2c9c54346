import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.checkpoint import load_model, save_model
from vqdiff.options import SampleOptions
from vqdiff.steps import TensorSource
from vqdiff.train import TRAIN_KEYS, TrainConfig, train

K, H, W = 16, 4, 4



def make(num_classes=0, seed=0, **kw):
    torch.manual_seed(seed)
    sizes = {"dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.0, **kw}
    cfg = ARConfig(codebook_size=K, grid_h=H, grid_w=W, num_classes=num_classes, **sizes)
    return ARTransformer(cfg).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_config_validation_and_names():
    assert not {f.name for f in dataclasses.fields(ARConfig)} & TRAIN_KEYS
    with pytest.raises(ValueError, match="divisible by heads"):
        ARConfig(codebook_size=K, grid_h=H, grid_w=W, dim=30, heads=4)
    with pytest.raises(ValueError, match="class_dropout"):
        ARConfig(codebook_size=K, grid_h=H, grid_w=W, class_dropout=1.5)


def test_causality():
    model = make()
    ids = torch.randint(0, K, (2, H, W))
    j = 6  # raster index of the changed token
    changed = ids.clone()
    changed.view(2, -1)[:, j] = (changed.view(2, -1)[:, j] + 1) % K
    a, b = model(ids), model(changed)
    assert a.shape == (2, H * W, K)
    # logits[:, i] predicts ids[i] from ids[:i]: positions <= j never see token j
    assert torch.allclose(a[:, : j + 1], b[:, : j + 1], atol=1e-6)
    assert not torch.allclose(a[:, j + 1 :], b[:, j + 1 :], atol=1e-4)


def test_shift_perfect_predictor_has_zero_loss(monkeypatch):
    model = make(num_classes=3)
    ids = torch.randint(0, K, (3, H, W))
    batch = {"ids": ids, "labels": torch.tensor([0, 1, 2])}

    def oracle(shift):
        # the trunk sees [class] + ids and returns logits for every sequence position; this fake
        # one cheats: position p puts all its mass on the sequence token at p + shift
        def trunk(seq, labels=None, **kw):
            full = torch.cat([torch.zeros_like(seq[:, :1]), seq], dim=1)  # [b 1+n]
            return 100.0 * F.one_hot(torch.roll(full, -shift, dims=1), K).float()

        return trunk

    monkeypatch.setattr(model.trunk, "forward", oracle(1))  # predicts the next token
    loss, logs = model.loss(batch)
    assert loss.item() < 1e-6 and logs["bits_per_token"] < 1e-6
    assert model.bits_per_token(batch)["bits_per_token"] < 1e-6
    monkeypatch.setattr(model.trunk, "forward", oracle(0))  # off by one: repeats the current token
    assert model.loss(batch)[0].item() > 10


@pytest.mark.parametrize(
    "options,kw",
    [
        ({}, {}),
        ({"temperature": 0.7, "top_k": 5}, {}),
        ({"top_p": 0.8, "cfg": 2.5}, {"labels": torch.tensor([0, 1, 2, 0])}),
        ({}, {"prefix": torch.randint(0, K, (4, 2, W), generator=torch.Generator().manual_seed(9)), "labels": 1}),
    ],
)
def test_kv_cache_sampling_equals_uncached(options, kw):
    model = make(num_classes=3)
    cached = model.sample(4, SampleOptions(**options), generator=gen(0), **kw)
    uncached = model.sample(4, SampleOptions(**options), generator=gen(0), use_cache=False, **kw)
    assert cached.shape == (4, H, W) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert cached.min() >= 0 and cached.max() < K


def test_top_k_1_is_greedy():
    model = make(num_classes=3)
    labels = torch.tensor([0, 2, 1])
    greedy = torch.zeros(3, H, W, dtype=torch.long)  # argmax decoding through forward()
    for i in range(H * W):
        greedy.view(3, -1)[:, i] = model(greedy, labels)[:, i].argmax(-1)
    assert torch.equal(model.sample(3, SampleOptions(top_k=1), labels=labels, generator=gen(5)), greedy)
    assert torch.equal(model.sample(3, SampleOptions(temperature=0), labels=labels), greedy)


def test_prefix_rows_are_kept():
    model = make()
    prefix = torch.randint(0, K, (5, 3, W))
    out = model.sample(5, prefix=prefix, generator=gen(1))
    assert torch.equal(out[:, :3], prefix)
    full = torch.randint(0, K, (5, H, W))
    assert torch.equal(model.sample(5, prefix=full), full)  # nothing left to generate
    with pytest.raises(ValueError, match="prefix"):
        model.sample(5, prefix=torch.zeros(5, 2, W + 1, dtype=torch.long))


def test_seeds_and_guidance():
    model = make(num_classes=3)
    a = model.sample(6, generator=gen(0))
    assert torch.equal(a, model.sample(6, generator=gen(0)))
    assert not torch.equal(a, model.sample(6, generator=gen(1)))
    # cfg = 0 is the unconditional half of the doubled batch: the null class
    guided = model.sample(6, SampleOptions(cfg=0.0), labels=1, generator=gen(2))
    assert torch.equal(guided, model.sample(6, generator=gen(2)))
    # one forward pass per token, whatever the options' steps say: the next-token generator does not read them
    assert model.forward_passes() == model.forward_passes(SampleOptions(steps=3)) == H * W
    assert torch.equal(model.sample(6, SampleOptions(steps=3), generator=gen(0)), a)


def test_callback_shows_the_grid_filling_in_raster_order():
    model = make()
    frames = []
    out = model.sample(2, generator=gen(3), callback=lambda i, ids: frames.append((i, ids)))
    assert [i for i, _ in frames] == list(range(H * W))
    for i, ids in frames:
        flat = ids.flatten(1)
        assert torch.equal(flat[:, : i + 1], out.flatten(1)[:, : i + 1])  # decided cells are the final ids
        assert (flat[:, i + 1 :] == model.cfg.codebook_size).all()  # the rest hold k, like a mask


def test_overfit_four_grids(tmp_path):
    torch.manual_seed(0)
    grids = torch.randint(0, K, (4, H, W))
    model = make(num_classes=4, class_dropout=0.3, dim=64)
    data = TensorSource(ids=grids.repeat(4, 1, 1), labels=torch.arange(4).repeat(4))
    cfg = TrainConfig(steps=100, batch_size=16, lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=1000)
    trained = train(model, data, cfg, tmp_path, device="cpu").model
    labels = torch.arange(8) % 4
    cond = trained.sample(8, SampleOptions(temperature=0.5), labels=labels, generator=gen(0))
    assert torch.equal(cond, grids[labels])
    uncond = trained.sample(8, SampleOptions(temperature=0.3), generator=gen(1))
    assert all((x == grids).flatten(1).all(1).any() for x in uncond)
    bits = trained.bits_per_token({"ids": grids, "labels": torch.arange(4)})
    assert bits["kind"] == "exact" and bits["bits_per_token"] < 0.5


def test_save_load_round_trip(tmp_path):
    model = make(num_classes=3)
    save_model(model, tmp_path / "ar")
    loaded = load_model(tmp_path / "ar", kind="ar")
    assert loaded.cfg == model.cfg
    ids = torch.randint(0, K, (2, H, W))
    labels = torch.tensor([2, 0])
    assert torch.equal(model(ids, labels), loaded(ids, labels))
    bits = loaded.bits_per_token({"ids": ids, "labels": labels})
    assert math.isfinite(bits["bits_per_token"]) and bits["bits_per_token"] > 0
    # an untrained model is close to uniform: about log2(k) bits
    assert abs(bits["bits_per_token"] - math.log2(K)) < 0.5
