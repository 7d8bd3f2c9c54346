"""Editing a partial grid: inpainting, outpainting and class edits (issue 23)."""

import pytest
import torch

from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.options import SampleOptions

K, H, W = 16, 4, 4

# (corruption, sampler, eta): every sampler of every corruption, ancestral with and without remasking
SAMPLERS = [
    ("mask", "maskgit", 0.0),
    ("mask", "ancestral", 0.0),
    ("mask", "ancestral", 0.5),
    ("mask", "halton", 0.0),
    ("uniform", "maskgit", 0.0),
    ("mask-and-replace", "maskgit", 0.0),
]


def diffusion(corruption, num_classes=0):
    torch.manual_seed(0)
    cfg = DiffusionConfig(codebook_size=K, grid_h=H, grid_w=W, dim=32, depth=1, heads=2, corruption=corruption, num_classes=num_classes)
    return DiffusionTransformer(cfg).eval()


def partial_grid(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    known = torch.randint(0, K, (n, H, W), generator=g)
    keep = torch.rand(n, H, W, generator=g) < 0.5
    keep[0] = False  # one sample with nothing kept,
    keep[1, :2] = True  # one with the top half kept,
    keep[1, 2:] = False
    keep[2] = True  # one with everything kept
    keep[2, 3, 3] = False
    return known, keep


@pytest.mark.parametrize("corruption,sampler,eta", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_kept_positions_never_change(corruption, sampler, eta, steps):
    model = diffusion(corruption, num_classes=3)
    n = 5
    known, keep = partial_grid(n)
    frames = []
    ids = model.sample(
        n, SampleOptions(steps=steps, temperature=1.0, sampler=sampler, eta=eta, cfg=2.0), known=known, keep=keep,
        labels=torch.tensor([0, 1, 2, 0, 1]), generator=torch.Generator().manual_seed(3), callback=lambda i, x: frames.append(x),
    )  # fmt: skip
    assert len(frames) == steps
    for x in frames:  # at every step, not only at the end
        assert torch.equal(x[keep], known[keep])
    assert torch.equal(ids[keep], known[keep])
    assert ids.min() >= 0 and ids.max() < K  # every free position filled by the last step


@pytest.mark.parametrize("corruption,sampler,eta", SAMPLERS)
def test_nothing_kept_is_the_unconstrained_sampler(corruption, sampler, eta):
    """The samplers draw the same noise with and without a partial grid: an all-False keep gives the
    ids of keep=None bit for bit (which itself is pinned to the pre-edit sampler outputs, see the
    commit that added partial grids)."""
    model = diffusion(corruption)
    n = 4
    kw = dict(steps=5, temperature=1.0, sampler=sampler, eta=eta)
    a = model.sample(n, SampleOptions(**kw), generator=torch.Generator().manual_seed(5))
    b = model.sample(n, SampleOptions(**kw), generator=torch.Generator().manual_seed(5), known=torch.zeros(n, H, W, dtype=torch.long),
                     keep=torch.zeros(n, H, W, dtype=torch.bool))  # fmt: skip
    assert torch.equal(a, b)


def test_mask_samplers_fill_the_free_positions_on_the_schedule():
    """maskgit and halton spread the schedule's reveals over the free positions: with 8 of 16 kept
    and 4 steps, each step reveals part of the 8, and the last leaves none masked."""
    model = diffusion("mask")
    known, keep = torch.zeros(2, H, W, dtype=torch.long), torch.zeros(2, H, W, dtype=torch.bool)
    keep[:, :2] = True
    for sampler in ("maskgit", "halton"):
        frames = []
        model.sample(2, SampleOptions(steps=4, sampler=sampler), known=known, keep=keep, generator=torch.Generator().manual_seed(0),
                     callback=lambda i, x: frames.append(x))  # fmt: skip
        masked = [int((f == model.mask_id).sum(dim=(1, 2))[0]) for f in frames]
        assert masked[-1] == 0 and all(a > b for a, b in zip(masked, masked[1:])), (sampler, masked)
        assert masked[0] < 8


def test_partial_grid_is_checked():
    model = diffusion("mask")
    with pytest.raises(ValueError, match="both"):
        model.sample(2, SampleOptions(steps=2), keep=torch.zeros(2, H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be"):
        model.sample(2, SampleOptions(steps=2), known=torch.zeros(2, H, 3, dtype=torch.long), keep=torch.zeros(2, H, 3, dtype=torch.bool))


# ---------------------------------------------------------------- the next-token generator


def ar_model():
    from vqdiff.ar import ARConfig, ARTransformer

    torch.manual_seed(0)
    return ARTransformer(ARConfig(codebook_size=K, grid_h=H, grid_w=W, dim=32, depth=1, heads=2)).eval()


def test_ar_keeps_a_raster_prefix_of_any_length():
    model = ar_model()
    n = 3
    known = torch.randint(0, K, (n, H, W), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(n, H * W, dtype=torch.bool)
    for b, r in enumerate((0, 6, 13)):  # nothing, a row and a half, all but three cells
        keep[b, :r] = True
    keep = keep.view(n, H, W)
    ids = model.sample(n, known=known, keep=keep, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids[keep], known[keep])
    # whole rows kept: the same ids as the row prefix
    rows = torch.zeros(n, H, W, dtype=torch.bool)
    rows[:, :2] = True
    a = model.sample(n, known=known, keep=rows, generator=torch.Generator().manual_seed(1))
    b = model.sample(n, prefix=known[:, :2], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # nothing kept: the unconstrained sampler
    c = model.sample(n, known=known, keep=torch.zeros(n, H, W, dtype=torch.bool), generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, model.sample(n, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("region", ["centre", "top", "left"])
def test_ar_refuses_a_region_that_is_not_a_suffix(region):
    model = ar_model()
    keep = torch.ones(1, H, W, dtype=torch.bool)
    if region == "centre":
        keep[:, 1:3, 1:3] = False
    elif region == "top":
        keep[:, :2] = False
    else:
        keep[:, :, :2] = False
    with pytest.raises(ValueError) as e:
        model.sample(1, known=torch.zeros(1, H, W, dtype=torch.long), keep=keep)
    message = str(e.value)
    assert "\n" not in message and "suffix in raster order" in message and "diffusion" in message


# ---------------------------------------------------------------- pixels to tokens, edit_images


def test_a_region_maps_to_exactly_the_tokens_it_covers():
    from vqdiff.pipeline import token_keep

    keep = torch.ones(2, 16, 16, dtype=torch.bool)
    keep[0, 4:8, 8:12] = False  # exactly token (1, 2) of a 4x4 grid of 4x4 patches
    keep[1, 3:9, 0:1] = False  # touches tokens (0, 0), (1, 0), (2, 0): any pixel edits the token
    tokens = token_keep(keep, (4, 4))
    expected = torch.ones(2, 4, 4, dtype=torch.bool)
    expected[0, 1, 2] = False
    expected[1, 0:3, 0] = False
    assert torch.equal(tokens, expected)
    # the regenerated tokens cover the edited pixels, and nothing else but their patches
    pixels = (~tokens).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert not (~keep & ~pixels).any()


@pytest.fixture(scope="module")
def models():
    from vqdiff.tokenizer import TokenizerConfig, VQTokenizer

    torch.manual_seed(0)
    tok = VQTokenizer(TokenizerConfig(channels=1, image_size=16, width=8, max_width=16, codebook_size=K, codebook_dim=4)).eval()
    return tok, diffusion("mask", num_classes=3)


def test_edit_images_keeps_the_kept_tokens_and_pixels(models):
    from vqdiff.pipeline import edit_images, encode

    tok, model = models
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = torch.ones(3, 16, 16, dtype=torch.bool)
    keep[:, 4:12, 4:12] = False  # the centre 2x2 tokens
    ids, out = edit_images(model, tok, images, keep, steps=3, seed=1, labels=2)
    assert ids.shape == (3, 4, 4) and out.shape == images.shape
    known = encode(tok, images)
    assert torch.equal(ids[:, 0], known[:, 0]) and torch.equal(ids[:, :, 3], known[:, :, 3])
    again, _ = edit_images(model, tok, images, keep, steps=3, seed=1, labels=2)
    assert torch.equal(ids, again)  # the same seed, the same edit
    _, pasted = edit_images(model, tok, images, keep, steps=3, seed=1, labels=2, paste_back=True)
    assert torch.equal(pasted[:, 0][keep], images[:, 0][keep])
    assert torch.equal(pasted[:, 0][~keep], out[:, 0][~keep])
