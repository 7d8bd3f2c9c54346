from dataclasses import dataclass

import pytest
import torch

from vqdiff.trunk import KVCache, Transformer


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
