"""vqdiff.pipeline: sampling images without the CLI, on tiny random models."""

import pytest
import torch

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.options import DEFAULTS, SampleOptions
from vqdiff.pipeline import batch_seed, decode, decode_partial, draw_labels, encode, sample_ids, sample_images
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer

K, SIZE, F = 16, 16, 4  # 16x16 images, 4x4 grids
H = SIZE // F


def tokenizer():
    torch.manual_seed(0)
    cfg = TokenizerConfig(image_size=SIZE, downsample=F, width=8, max_width=8, codebook_size=K, codebook_dim=4, kmeans_init=False)
    return VQTokenizer(cfg).eval()


def generator(kind, num_classes=0):
    torch.manual_seed(0)
    sizes = dict(codebook_size=K, grid_h=H, grid_w=H, num_classes=num_classes, dim=32, depth=1, heads=2)
    if kind == "ar":
        return ARTransformer(ARConfig(**sizes)).eval()
    return DiffusionTransformer(DiffusionConfig(**sizes)).eval()


@pytest.mark.parametrize("kind,steps", [("ar", 3), ("diffusion", 3)])  # the ar generator takes one pass per token whatever steps is
def test_one_call_for_both_generators(kind, steps):
    gen, tok = generator(kind, num_classes=3), tokenizer()
    ids, images = sample_images(gen, tok, 5, steps=steps, seed=1, batch_size=2, cfg=2.0)
    assert ids.shape == (5, H, H) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < K
    assert images.shape == (5, 1, SIZE, SIZE) and images.abs().max() <= 1
    assert torch.equal(images, decode(tok, ids))
    again, _ = sample_images(gen, tok, 5, steps=steps, seed=1, batch_size=2, cfg=2.0)
    other, _ = sample_images(gen, tok, 5, steps=steps, seed=2, batch_size=2, cfg=2.0)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


@pytest.mark.parametrize("kind,steps", [("ar", 3), ("diffusion", 3)])  # the ar generator takes one pass per token whatever steps is
def test_batch_j_is_a_function_of_seed_and_j_alone(kind, steps):
    """The rule a sharded run relies on: batch j's noise comes from batch_seed(seed, j), its labels
    from the first draw of `seed`, so any process can make batch j by itself."""
    gen = generator(kind, num_classes=3)
    ids = sample_ids(gen, 7, steps=steps, seed=5, batch_size=3)
    labels = draw_labels(3, 7, 5)
    for j, start in enumerate(range(0, 7, 3)):
        stop = min(start + 3, 7)
        alone = gen.sample(
            stop - start, SampleOptions(steps=steps), labels=labels[start:stop], generator=torch.Generator().manual_seed(batch_seed(5, j))
        )
        assert torch.equal(ids[start:stop], alone)


def test_options_reach_the_generator_and_per_sample_tensors_are_split():
    gen = generator("ar")
    prefix = torch.randint(0, K, (5, 2, H))
    ids = sample_ids(gen, 5, batch_size=2, prefix=prefix, top_k=1)
    assert torch.equal(ids[:, :2], prefix)  # each batch got its own rows of the prefix
    greedy = sample_ids(gen, 5, batch_size=5, prefix=prefix, temperature=0)
    assert torch.equal(ids, greedy)  # top_k = 1 is greedy: the option got through
    with pytest.raises(TypeError):
        sample_ids(generator("diffusion"), 2, steps=2, use_cache=False)  # an option the sampler does not take


def test_callback_sees_every_step_of_every_batch():
    calls = []
    sample_ids(generator("diffusion"), 5, steps=3, batch_size=2, callback=lambda start, i, ids: calls.append((start, i, len(ids))))
    assert calls == [(s, i, min(2, 5 - s)) for s in (0, 2, 4) for i in range(3)]


def test_labels_int_and_drawn():
    gen = generator("diffusion", num_classes=3)
    a = sample_ids(gen, 4, steps=2, labels=1, seed=0)
    b = sample_ids(gen, 4, steps=2, labels=torch.ones(4, dtype=torch.long), seed=0)
    assert torch.equal(a, b)
    assert torch.equal(sample_ids(gen, 4, steps=2, seed=0), sample_ids(gen, 4, steps=2, labels=draw_labels(3, 4, 0), seed=0))
    assert draw_labels(0, 4, 0) is None


def test_encode_decode_and_partial_grids():
    tok = tokenizer()
    images = torch.rand(3, 1, SIZE, SIZE) * 2 - 1
    ids = encode(tok, images, batch_size=2)
    assert torch.equal(ids, tok.encode(images))
    partial = ids.clone()
    partial[:, 0, 0] = K  # not decided yet
    shown = decode_partial(tok, partial)
    assert (shown[:, :, :F, :F] == 0).all()
    assert torch.equal(shown[:, :, F:, :], decode(tok, partial.clamp_max(K - 1))[:, :, F:, :])


def test_noise_comes_from_a_cpu_generator_whatever_the_model_device(monkeypatch):
    """The CPU-generator design of vqdiff.sampling_ops: the same seed gives the same noise on any device."""
    gen, seen = generator("diffusion"), []

    def spy(n, options, **kw):
        seen.append(kw["generator"].device)
        return torch.zeros(n, H, H, dtype=torch.long)

    monkeypatch.setattr(gen, "sample", spy)
    # a model that says it is on a GPU: a generator made on the model's device would be a CUDA one
    monkeypatch.setattr(type(gen), "device", property(lambda self: torch.device("cuda")))
    sample_ids(gen, 3, steps=2, batch_size=2)
    assert seen == [torch.device("cpu")] * 2


def test_one_options_object_reaches_every_batch_and_overrides_apply_once(monkeypatch):
    gen, seen = generator("diffusion"), []

    def spy(n, options, **kw):
        seen.append(options)
        return torch.zeros(n, H, H, dtype=torch.long)

    monkeypatch.setattr(gen, "sample", spy)
    sample_ids(gen, 5, batch_size=2)
    assert len(seen) == 3 and all(o is DEFAULTS for o in seen)  # no override: the object itself
    mine, seen[:] = SampleOptions(steps=2, sampler="halton"), []
    sample_ids(gen, 5, mine, batch_size=2)
    assert all(o is mine for o in seen)
    seen.clear()
    sample_ids(gen, 5, mine, batch_size=2, temperature=0.5)
    assert seen[0] == mine.replace(temperature=0.5) and all(o is seen[0] for o in seen)  # replaced once, then shared
    assert mine.temperature == DEFAULTS.temperature  # options are never changed in place
    with pytest.raises(TypeError):
        sample_ids(gen, 2, cfg_scale=2.0)  # not a SampleOptions field
