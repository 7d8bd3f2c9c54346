from dataclasses import dataclass

import pytest
import torch

from vqdiff.nn import (
    KVCache,
    Transformer,
    cfg_mix,
    filter_logits,
    guidance_labels,
    sample_labels,
    sample_logits,
)



@dataclass(frozen=True)
class Cfg:
    codebook_size: int = 11
    grid_h: int = 3
    grid_w: int = 4
    num_classes: int = 3
    dim: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0


def trunk(causal=True, time_conditioning=False, seed=0):
    torch.manual_seed(seed)
    model = Transformer(Cfg(), vocab_size=12, causal=causal, time_conditioning=time_conditioning).eval()
    if time_conditioning:  # adaLN-Zero starts as the identity: give t something to do
        for name, p in model.named_parameters():
            if "ada" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


def test_kv_cache_in_chunks_equals_full_sequence():
    model = trunk(causal=True)
    ids = torch.randint(0, 12, (2, 12))
    labels = torch.tensor([0, 3])
    full = model(ids, labels)  # [2 13 k]
    cache = KVCache(model.seq_len)
    parts = [model(ids[:, :3], labels, cache=cache)]  # [class] + cells 0..2
    parts.append(model(ids[:, 3:7], cache=cache))  # 4 at once after a cache: the explicit mask path
    for j in range(7, 12):
        parts.append(model(ids[:, j : j + 1], cache=cache))
    assert cache.length == 13
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:, :1], cache=cache)


def test_causal_and_bidirectional():
    ids = torch.randint(0, 12, (1, 12))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 12  # cell 6 sits at sequence position 7
    causal = trunk(causal=True)
    a, b = causal(ids), causal(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-4)
    bidi = trunk(causal=False)
    a, b = bidi(ids), bidi(changed)
    assert not torch.allclose(a[:, :7], b[:, :7], atol=1e-4)


def test_grid_positions_and_conditioning_matter():
    model = trunk(causal=False, time_conditioning=True)
    ids = torch.full((1, 12), 5)  # the same id everywhere: only positions tell cells apart
    t = torch.tensor([0.3])
    out = model(ids, torch.tensor([1]), t=t)
    assert not torch.allclose(out[0, 1], out[0, 2], atol=1e-4)
    assert not torch.allclose(out, model(ids, torch.tensor([2]), t=t), atol=1e-4)
    assert not torch.allclose(out, model(ids, torch.tensor([1]), t=torch.tensor([0.8])), atol=1e-4)
    with pytest.raises(ValueError, match="time-conditioned"):
        model(ids)


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
