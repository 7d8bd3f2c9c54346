"""Multi-token positions (`group = 2`): both generators read a 2x2-grouped id grid as a quarter as
many positions, predict the 4 ids of a position with 4 heads, and keep every sampling path working
on the full grid: CFG, the KV cache, prefixes, partial grids (edits) and trajectories; the codec
refuses them in one line. The AR generator draws a position's ids either at once from 4 heads or in
slot order through a depth head (`depth_head` layers), and every AR test runs both."""

import pytest
import torch

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.compress import CompressError, compress_ids
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.options import SampleOptions

K, H, W, G = 16, 4, 6, 2


def make(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = cfg_cls(codebook_size=K, grid_h=H, grid_w=W, num_classes=3, dim=32, depth=2, heads=4, mlp_ratio=2.0, group=G, **kw)
    return cls(cfg).eval()


def ar(depth_head=0):
    return make(ARTransformer, ARConfig, depth_head=depth_head)


both_heads = pytest.mark.parametrize("depth_head", [0, 2], ids=["heads", "depth"])


def diffusion(**kw):
    return make(DiffusionTransformer, DiffusionConfig, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_positions_and_cells_round_trip():
    trunk = ar().trunk
    ids = torch.randint(0, K, (2, H, W))
    pos = trunk.to_positions(ids)
    assert pos.shape == (2, (H // G) * (W // G), G * G)
    assert torch.equal(pos[:, 0], torch.stack([ids[:, 0, 0], ids[:, 0, 1], ids[:, 1, 0], ids[:, 1, 1]], 1))  # a 2x2 group, raster order
    assert torch.equal(trunk.to_cells(pos).view(2, H, W), ids)
    with pytest.raises(ValueError, match="group must be >= 1 and divide"):
        ARConfig(codebook_size=K, grid_h=H, grid_w=5, group=2)


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_the_trunk_tells_the_arrangement_of_a_positions_ids_apart(kind):
    # one table per slot: the same ids in other cells of a group are another input (with one shared table
    # plus a slot embedding the sums were equal, and neither generator knew which cell held which id)
    model = ar() if kind == "ar" else diffusion()
    trunk = model.trunk
    ids = torch.arange(4).view(1, 1, 4).repeat(1, (H // G) * (W // G), 1)  # ids 0, 1, 2, 3 in every position
    swapped = ids.flip(-1)  # 3, 2, 1, 0: the same ids, the group mirrored
    t = {} if kind == "ar" else {"t": torch.tensor([0.5])}
    with torch.no_grad():
        assert not torch.allclose(trunk.hidden(ids, **t), trunk.hidden(swapped, **t))
        assert torch.equal(trunk.hidden(ids, **t), trunk.hidden(ids.clone(), **t))


@both_heads
def test_ar_predicts_a_position_from_the_positions_before_it_only(depth_head):
    model = ar(depth_head)
    ids = torch.randint(0, K, (1, H, W))
    logits = model(ids, torch.tensor([1]))
    changed = ids.clone()
    changed[0, 0, 3] = (ids[0, 0, 3] + 1) % K  # a cell of position 1 (row 0 of groups, column 1)
    after = model(changed, torch.tensor([1]))
    cells = lambda r, c: r * W + c  # noqa: E731
    same = [cells(r, c) for r in (0, 1) for c in (0, 1, 2, 3)]  # positions 0 and 1: before or at the change
    if depth_head:  # slots 2 and 3 of position 1 (cells (1, 2) and (1, 3)) see its slot 1, the changed id
        same = [cells(r, c) for r, c in ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3))]
        assert not torch.allclose(logits[0, cells(1, 2)], after[0, cells(1, 2)])
    assert torch.allclose(logits[0, same], after[0, same], atol=1e-6)
    assert not torch.allclose(logits[0, cells(0, 4)], after[0, cells(0, 4)])  # position 2 sees position 1
    assert model.forward_passes() == (H // G) * (W // G)
    loss, logs = model.loss({"ids": ids, "labels": torch.tensor([1])})
    assert torch.isfinite(loss) and abs(logs["bits_per_token"] - model.bits_per_token({"ids": ids, "labels": torch.tensor([1])})["bits_per_token"]) < 0.05


@both_heads
def test_ar_sampling_with_groups_cache_cfg_prefix_and_partial_grids(depth_head):
    model = ar(depth_head)
    opts = SampleOptions(cfg=2.0)
    a = model.sample(3, opts, labels=torch.tensor([0, 1, 2]), generator=gen())
    b = model.sample(3, opts, labels=torch.tensor([0, 1, 2]), generator=gen(), use_cache=False)
    assert a.shape == (3, H, W) and a.min() >= 0 and a.max() < K
    assert torch.equal(a, b)  # the KV cache changes no id
    prefix = torch.randint(0, K, (3, 2, W))
    assert torch.equal(model.sample(3, generator=gen(), prefix=prefix)[:, :2], prefix)
    with pytest.raises(ValueError, match="multiple of 2"):
        model.sample(3, generator=gen(), prefix=prefix[:, :1])
    known = torch.randint(0, K, (3, H, W))
    keep = torch.zeros(3, H, W, dtype=torch.bool)
    keep[:, :2] = True  # the first row of groups
    keep[1, 2:, :2] = True  # and one more group for the second sample
    out = model.sample(3, known=known, keep=keep, generator=gen())
    assert torch.equal(out[keep], known[keep])
    keep[0, 2, 0] = True  # part of a group
    with pytest.raises(ValueError, match="keep whole groups"):
        model.sample(3, known=known, keep=keep, generator=gen())
    frames = []
    model.sample(2, generator=gen(), callback=lambda i, x: frames.append(x.clone()))
    assert len(frames) == (H // G) * (W // G) and (frames[0] == K).sum(dim=(1, 2)).tolist() == [H * W - 4] * 2


def test_the_depth_head_predicts_each_slot_from_the_slots_before_it():
    model = ar(depth_head=2)
    assert model.trunk.head is None and model.depth is not None  # no unused parameters
    ids = torch.randint(0, K, (1, H, W))
    logits = model(ids)
    changed = ids.clone()
    changed[0, 1, 0] = (ids[0, 1, 0] + 1) % K  # slot 2 of position 0
    after = model(changed)
    slot = [0, 1, W, W + 1]  # the cells of position 0, slots 0-3
    assert torch.allclose(logits[0, slot[:3]], after[0, slot[:3]], atol=1e-6)  # slots 0-2 do not see slot 2
    assert not torch.allclose(logits[0, slot[3]], after[0, slot[3]])  # slot 3 does
    with pytest.raises(ValueError, match="depth_head .* needs group >= 2"):
        ARConfig(codebook_size=K, grid_h=H, grid_w=W, depth_head=1)


@pytest.mark.parametrize("sampler", ["maskgit", "ancestral", "halton"])
def test_diffusion_with_groups_masks_each_id_and_samples_every_way(sampler):
    model = diffusion()
    ids = torch.randint(0, K, (4, H, W))
    loss, _ = model.loss({"ids": ids, "labels": torch.tensor([0, 1, 2, 0])})
    assert torch.isfinite(loss)
    assert model(ids, t=torch.full((4,), 0.5)).shape == (4, H * W, K)
    opts = SampleOptions(steps=4, sampler=sampler, cfg=2.0)
    a = model.sample(2, opts, labels=torch.tensor([0, 1]), generator=gen())
    assert a.shape == (2, H, W) and a.min() >= 0 and a.max() < K
    assert torch.equal(a, model.sample(2, opts, labels=torch.tensor([0, 1]), generator=gen()))  # the same seed
    known = torch.randint(0, K, (2, H, W))
    keep = torch.rand(2, H, W, generator=gen(1)) < 0.5  # any region: single ids of a group too
    out = model.sample(2, opts, known=known, keep=keep, generator=gen())
    assert torch.equal(out[keep], known[keep])


def test_the_codec_refuses_grouped_positions_in_one_line():
    with pytest.raises(CompressError, match="one id per position"):
        compress_ids(ar(), torch.zeros(H, W, dtype=torch.long), 1)


def test_a_run_with_grouped_generators_trains_samples_edits_and_evaluates(tmp_path):  # AR with its depth head
    from helpers import TINY, invoke, ok, one_line_error

    from recipes.run import Run

    grouped = [*TINY, "tokenizer.downsample=2", "ar.group=2", "ar.depth_head=1", "diffusion.group=2", "evaluate.num=8", "evaluate.steps=[2]"]
    run = tmp_path / "run"
    ok(invoke("run", "shapes", "--run-dir", run, "--extractor", "classifier", *sum((["--set", s] for s in grouped), [])))
    assert Run(run).load_generator("ar").cfg.group == 2 and Run(run).load_generator("ar").cfg.depth_head == 1 and Run(run).tokenizer_meta()["grid"] == [16, 16]
    for g in ("ar", "diffusion"):
        ok(invoke("sample", run, "-g", g, "-n", 2, "--cfg", 2.0, "--out", tmp_path / g))
    ok(invoke("sample", run, "-g", "ar", "-n", 2, "--prefix-rows", 4, "--out", tmp_path / "prefix"))
    image = sorted((tmp_path / "ar").glob("*.png"))[0]
    for g in ("ar", "diffusion"):  # the bottom half: a raster-order suffix of whole groups
        ok(invoke("edit", run, image, "--outpaint", "bottom", "-g", g, "--out", tmp_path / f"edit-{g}"))
    ok(invoke("edit", run, image, "--region", "4,4,20,20", "-g", "diffusion", "--out", tmp_path / "edit-region"))
    one_line_error(invoke("compress", run, image, "--out", tmp_path / "x"), "one id per position")
