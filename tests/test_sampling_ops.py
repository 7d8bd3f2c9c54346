import pytest
import torch

from vqdiff.sampling_ops import cfg_mix, filter_logits, guidance_labels, sample_labels, sample_logits


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # about [0.09, 0.64, 0.24, 0.03]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=float(probs[1] + 0.01))).tolist() == [[True, False, False, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_sample_logits_seed_greedy_and_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(20_000, 3)
    g = lambda s: torch.Generator().manual_seed(s)
    a = sample_logits(logits, generator=g(1))
    assert torch.equal(a, sample_logits(logits, generator=g(1)))
    assert not torch.equal(a, sample_logits(logits, generator=g(2)))
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.02)  # Gumbel-max samples softmax
    assert (sample_logits(logits, temperature=0) == 2).all()
    assert (sample_logits(logits, top_k=1, generator=g(3)) == 2).all()
    cold = sample_logits(logits, temperature=0.1, generator=g(4))
    assert (cold == 2).float().mean() > 0.99


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_p": 0.8, "temperature": 0.7}])
def test_sample_logits_where_draws_only_those_rows_bit_identical_to_a_full_draw(kw):
    logits = torch.randn(4, 50, 16)
    where = torch.rand(4, 50) < 0.2
    full_g, part_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = sample_logits(logits, generator=full_g, **kw)
    part = sample_logits(logits, generator=part_g, where=where, **kw)
    assert torch.equal(part[where], full[where]) and (part[~where] == 0).all()
    # the generator moved exactly as for the full draw: the next numbers agree
    assert torch.equal(torch.rand(3, generator=full_g), torch.rand(3, generator=part_g))
    assert torch.equal(sample_logits(logits, temperature=0, where=where), logits.argmax(-1))


def test_cfg_mix_and_labels():
    cond, uncond = torch.randn(2, 5), torch.randn(2, 5)
    both = torch.cat([cond, uncond])
    assert torch.allclose(cfg_mix(both, 1.0), cond)
    assert torch.allclose(cfg_mix(both, 0.0), uncond)
    assert torch.allclose(cfg_mix(both, 3.0), uncond + 3 * (cond - uncond))
    labels = sample_labels(2, 4, num_classes=3, device=torch.device("cpu"))
    assert labels.tolist() == [2, 2, 2, 2]
    doubled, guided = guidance_labels(labels, 3, 2.0)
    assert guided and doubled.tolist() == [2, 2, 2, 2, 3, 3, 3, 3]  # null class = num_classes
    assert guidance_labels(labels, 3, 1.0) == (labels, False)
    with pytest.raises(ValueError, match="unconditional"):
        sample_labels(1, 4, num_classes=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        sample_labels(torch.tensor([0, 3]), 2, num_classes=3, device=torch.device("cpu"))
