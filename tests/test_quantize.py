import torch

from vqdiff.quantize import VectorQuantizer, codebook_stats, kmeans, squared_distances


def test_nearest_equals_brute_force():
    torch.manual_seed(0)
    q = VectorQuantizer(37, 5).eval()
    z = torch.randn(3, 5, 4, 6)
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.stack([((q.codebook.detach() - v) ** 2).sum(1).argmin() for v in flat]).view(3, 4, 6)
    assert torch.equal(out.ids, brute)
    assert out.ids.dtype == torch.long and out.ids.shape == (3, 4, 6)
    # the forward value of z_q is the chosen code
    assert torch.allclose(out.z_q.permute(0, 2, 3, 1), q.codebook.detach()[out.ids], atol=1e-6)


def test_expanded_distance_matches_cdist():
    x, c = torch.randn(50, 8), torch.randn(20, 8)
    assert torch.allclose(squared_distances(x, c), torch.cdist(x, c) ** 2, atol=1e-4)


def test_straight_through_gradient_reaches_encoder_and_codebook_loss_moves_codes():
    torch.manual_seed(0)
    enc = torch.nn.Conv2d(1, 4, 1)
    q = VectorQuantizer(16, 4).train()
    x = torch.randn(2, 1, 3, 3)
    out = q(enc(x))
    (out.z_q.sum() + out.loss).backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
    # without the codebook loss, the straight-through path alone gives the codes no gradient
    q.codebook.grad = None
    out = q(enc(x))
    out.z_q.sum().backward()
    assert q.codebook.grad is None or q.codebook.grad.abs().sum() == 0


def test_ema_update_matches_equation():
    k, d, decay, eps = 3, 2, 0.9, 1e-5
    q = VectorQuantizer(k, d, ema=True, decay=decay, eps=eps).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q.codebook.copy_(codes)
    q.code_sum.copy_(codes)
    q.cluster_size.fill_(1.0)
    # hand-made batch: two vectors near code 0, one near code 1, none near code 2
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])
    q(z.t().reshape(1, d, 1, 3))
    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.tensor([[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]])
    n_exp = decay * torch.ones(k) + (1 - decay) * counts
    m_exp = decay * codes + (1 - decay) * sums
    total = n_exp.sum()
    smoothed = (n_exp + eps) / (total + k * eps) * total
    assert torch.allclose(q.cluster_size, n_exp)
    assert torch.allclose(q.code_sum, m_exp)
    assert torch.allclose(q.codebook, m_exp / smoothed[:, None], atol=1e-6)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, restart_dead=True, dead_threshold=0.5, decay=0.5).train()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(8, 2) * 0.1)
        q.codebook[4:] += 100.0  # codes far from every input: never chosen
    far = q.codebook.detach()[4:].clone()
    z = torch.randn(1, 2, 8, 8) * 0.1
    for _ in range(3):
        q(z)
    # the far codes were replaced by encoder outputs and now sit among the data
    assert not torch.allclose(q.codebook.detach()[4:], far)
    assert q.codebook.detach()[4:].abs().max() < 1.0
    ids = q.eval()(z).ids
    usage, _ = codebook_stats(torch.bincount(ids.flatten(), minlength=8))
    assert usage > 0.5


def test_kmeans_init_and_cosine():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -5.0]])
    x = torch.cat([c + 0.1 * torch.randn(100, 2) for c in centers])
    found = kmeans(x, 12, iters=10)
    # every centroid ends inside a cluster, and every cluster gets a centroid
    assert (torch.cdist(found, centers).min(1).values < 0.5).all()
    assert (torch.cdist(centers, found).min(1).values < 0.5).all()
    q = VectorQuantizer(4, 3, cosine=True, kmeans_init=True).train()
    q(torch.randn(2, 3, 4, 4))
    assert bool(q.initted)
    assert torch.allclose(q.codes().norm(dim=1), torch.ones(4), atol=1e-5)


def test_float32_under_bf16_autocast():
    q = VectorQuantizer(16, 4).eval()
    z = torch.randn(2, 4, 3, 3)
    ref = q(z).ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    # distances are computed in float32, so bf16 inputs pick codes as float32 inputs rounded to bf16 do
    assert torch.equal(out.ids, q(z.bfloat16().float()).ids)
    assert out.z_q.dtype == torch.float32
    assert (out.ids == ref).float().mean() > 0.8


def test_codebook_stats():
    usage, perplexity = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert usage == 0.5 and abs(perplexity - 2.0) < 1e-5
    _, p = codebook_stats(torch.ones(16))
    assert abs(p - 16) < 1e-3
