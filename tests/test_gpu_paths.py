"""The GPU code paths that can be checked on a CPU: TF32, fused AdamW, bf16 autocast with an fp32
quantizer, and noise drawn on the generator's device (the same seed, the same ids on any device)."""

import torch

from vqdiff.data import make_shapes
from vqdiff.nn import rand, randint
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import TrainConfig, enable_tf32, make_optimizer, seeded, train


def test_tf32_is_switched_on_for_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        enable_tf32(torch.device("cuda"))  # only sets flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_adamw_is_fused_on_cuda():
    model = torch.nn.Linear(4, 4)
    assert make_optimizer(model, TrainConfig(), torch.device("cuda")).defaults["fused"] is True
    assert not make_optimizer(model, TrainConfig(), torch.device("cpu")).defaults["fused"]


def test_bf16_training_keeps_fp32_weights_and_codebook(tmp_path):
    with seeded(0):
        tok = VQTokenizer(TokenizerConfig(channels=3, image_size=16, width=8, max_width=16, codebook_size=16, codebook_dim=4))
    cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1, log_every=1, precision="bf16")
    result = train(tok, make_shapes(16, 16), cfg, tmp_path, device="cpu")
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result.logs)
    assert result.model.quantizer.codebook.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_noise_follows_the_generator_not_the_model_device():
    # a CPU generator drives a model on any device: the numbers are drawn on the CPU, then moved
    a = rand((3, 5), device="cpu", generator=torch.Generator().manual_seed(7))
    b = torch.rand((3, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    ids = randint(10, (4,), device="meta", generator=torch.Generator().manual_seed(7))
    assert ids.device.type == "meta"  # moved to the model's device after drawing on the CPU
