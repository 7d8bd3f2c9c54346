"""The GPU code paths that can be checked on a CPU: TF32, fused AdamW, bf16 autocast with an fp32
quantizer, and noise drawn on the generator's device (the same seed, the same ids on any device)."""

import pytest
import torch
from helpers import cpu_flags

from vqdiff.data import make_shapes
from vqdiff.precision import enable_tf32
from vqdiff.sampling_ops import rand, randint
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.distributed import seeded
from vqdiff.train import TrainConfig, make_optimizer, train


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


def test_fast_precision_uses_bf16_only_where_the_cpu_has_it(monkeypatch, tmp_path):
    import warnings

    import vqdiff.precision as precision_mod

    cpu = torch.device("cpu")
    flags = cpu_flags()
    if flags is not None:  # the probe against an independent reading: the kernel's CPU flags
        assert precision_mod.native_bf16(cpu) == ("amx_bf16" in flags or "avx512_bf16" in flags)
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    assert precision_mod.autocast_dtype("fast", cpu) is None
    assert precision_mod.autocast_dtype("bf16", cpu) is torch.bfloat16  # an explicit bf16 is honoured
    assert precision_mod.autocast_dtype("auto", cpu) is None
    with seeded(0):
        tok = VQTokenizer(TokenizerConfig(channels=3, image_size=16, width=8, max_width=16, codebook_size=16, codebook_dim=4))
    with pytest.warns(UserWarning, match="precision = fast"):
        train(tok, make_shapes(16, 16), TrainConfig(steps=1, batch_size=8, warmup_steps=0, precision="bf16"), tmp_path, device="cpu")
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: True)
    assert precision_mod.autocast_dtype("fast", cpu) is torch.bfloat16
    assert precision_mod.autocast_dtype("auto", cpu) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tok, make_shapes(16, 16), TrainConfig(steps=2, batch_size=8, warmup_steps=0, precision="bf16"), tmp_path / "b", device="cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, fast, fp32, bf16"):
        TrainConfig(precision="fp16")
