"""The speed rules of `vqdiff.precision` under every capability answer, and the attention paths
agreeing with each other: in training (outputs and gradients) and in KV-cache sampling."""

import pytest
import torch

import vqdiff.precision as precision_mod
from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.options import SampleOptions
from vqdiff.precision import attention_path, autocast_dtype, model_autocast, sample_dtype, use_attention, use_sample_precision
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.distributed import seeded
from vqdiff.trunk import KVCache

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PATHS = ("sdpa", "math")


@pytest.mark.parametrize(
    "amx, avx512_bf16, transformer, convolutional",
    [
        (True, True, torch.bfloat16, torch.bfloat16),  # AMX: bf16 for both
        (False, True, torch.bfloat16, None),  # AVX512-BF16 alone: bf16 matmuls, fp32 convolutions
        (False, False, None, None),  # neither: bf16 is emulated, fp32 for both
    ],
)
def test_fast_precision_under_each_cpu_capability(monkeypatch, amx, avx512_bf16, transformer, convolutional):
    answers = {"amx_bf16": amx, "avx512_bf16": avx512_bf16}
    monkeypatch.setattr(precision_mod, "_cpu_has", lambda flags, probes: any(answers.get(f, False) for f in flags))
    assert autocast_dtype("fast", CPU) is transformer
    assert autocast_dtype("fast", CPU, convolutional=True) is convolutional
    with seeded(0):
        tok = VQTokenizer(TokenizerConfig(channels=1, image_size=8, width=4, max_width=4, codebook_size=8, codebook_dim=2))
        ar = ARTransformer(ARConfig(codebook_size=8, grid_h=2, grid_w=2, dim=8, depth=1, heads=2))
    assert model_autocast(tok, "fast", CPU) is convolutional
    assert model_autocast(ar, "fast", CPU) is transformer
    for precision, conv in (("auto", True), ("auto", False), ("fp32", True), ("fp32", False)):
        assert autocast_dtype(precision, CPU, convolutional=conv) is None  # only "fast" reads the capabilities
    assert autocast_dtype("bf16", CPU, convolutional=True) is torch.bfloat16  # an explicit bf16 is honoured


def test_fast_precision_on_cuda_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: True)
    assert autocast_dtype("fast", CUDA) is autocast_dtype("fast", CUDA, convolutional=True) is torch.bfloat16
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    assert autocast_dtype("fast", CUDA, convolutional=True) is None
    assert autocast_dtype("auto", CUDA) is torch.bfloat16


def test_attention_rule_by_device_dtype_and_length(monkeypatch):
    monkeypatch.delenv("VQDIFF_ATTENTION", raising=False)
    bf16, fp32 = torch.bfloat16, torch.float32
    short, long_ = precision_mod.CPU_BF16_MATH_KEYS, precision_mod.CPU_BF16_MATH_KEYS + 1
    assert attention_path(CPU, bf16, 65) == attention_path(CPU, bf16, short) == "math"
    assert attention_path(CPU, bf16, long_) == attention_path(CPU, bf16, 257) == "sdpa"
    assert attention_path(CPU, fp32, 65) == attention_path(CPU, fp32, 257) == "sdpa"
    assert attention_path(CUDA, bf16, 65) == attention_path(CUDA, fp32, 257) == "sdpa"
    # without a backward (sampling) SDPA's flash kernel is the faster one at every length
    with torch.no_grad():
        assert attention_path(CPU, bf16, 65) == attention_path(CPU, bf16, 257) == "sdpa"
    with use_attention("math"):
        assert attention_path(CPU, fp32, 65) == "math"
        with use_attention("auto"):  # the innermost wins, and "auto" is the rule again
            assert attention_path(CPU, fp32, 65) == "sdpa"
    monkeypatch.setenv("VQDIFF_ATTENTION", "sdpa")  # the setting that restores SDPA's own choice
    assert attention_path(CPU, bf16, 65) == "sdpa"
    monkeypatch.setenv("VQDIFF_ATTENTION", "flashy")
    with pytest.raises(ValueError, match="VQDIFF_ATTENTION must be one of"):
        attention_path(CPU, bf16, 65)
    with pytest.raises(ValueError, match="attention must be one of"):
        with use_attention("fast"):
            pass


def test_the_trunk_takes_the_path_the_rule_gives(monkeypatch):
    import vqdiff.trunk as trunk_mod

    seen = []
    monkeypatch.setattr(trunk_mod, "attention_path", lambda device, dtype, keys: seen.append((dtype, keys)) or "sdpa")
    ar, _ = _models()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ar(torch.zeros(2, 4, 4, dtype=torch.long))
    assert seen and all(s == (torch.bfloat16, 17) for s in seen)  # the class token + 16 cells, in bf16


def _models():
    common = dict(codebook_size=16, grid_h=4, grid_w=4, num_classes=3, dim=32, depth=2, heads=4)
    with seeded(0):
        return ARTransformer(ARConfig(**common)), DiffusionTransformer(DiffusionConfig(**common))


def _loss_and_grads(model, batch, path, amp):
    model.zero_grad(set_to_none=True)
    with use_attention(path), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        torch.manual_seed(1)  # the diffusion loss draws t and the mask: the same for every path
        loss, _ = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("amp, tol", [(None, 1e-5), (torch.bfloat16, 3e-2)])
def test_attention_paths_agree_in_training(amp, tol):
    batch = {"ids": torch.randint(0, 16, (6, 4, 4), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 2] * 2)}
    for model in _models():
        model.train()
        ref_loss, ref_grads = _loss_and_grads(model, batch, "sdpa", amp)
        for path in PATHS[1:]:
            loss, grads = _loss_and_grads(model, batch, path, amp)
            assert torch.allclose(loss, ref_loss, rtol=tol, atol=tol), (model.kind, path)
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                scale = ref_grads[name].abs().max().clamp_min(1e-6)
                assert (g - ref_grads[name]).abs().max() / scale < 10 * tol, (model.kind, path, name)


@pytest.mark.parametrize("amp, tol", [(None, 1e-5), (torch.bfloat16, 5e-2)])
def test_attention_paths_agree_in_kv_cache_sampling(amp, tol):
    ar, _ = _models()
    ar.eval()
    ids = torch.randint(0, 16, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        with use_attention("sdpa"):
            full = ar(ids, labels).float()  # [b n k], no cache
        for path in PATHS:
            with use_attention(path):
                cache = KVCache(ar.trunk.seq_len)
                seq = ids.flatten(1)
                first = ar.next_logits(seq[:, :0], labels, cache)[:, None]  # the class token alone: predicts cell 0
                block = ar.trunk(seq[:, :5], labels, cache=cache)  # 5 tokens at once, a masked block: cells 1..5
                rest = [ar.next_logits(seq[:, i - 1 : i], labels, cache)[:, None] for i in range(6, 16)]  # cells 6..15
                got = torch.cat([first, block, *rest], dim=1).float()
            assert got.shape == full.shape
            assert torch.allclose(got, full, rtol=tol, atol=tol), path
    # and whole sampling: the same seed gives the same ids on every path in fp32
    if amp is None:
        outs = []
        for path in PATHS:
            with use_attention(path):
                outs.append(ar.sample(3, SampleOptions(cfg=2.0), labels=1, generator=torch.Generator().manual_seed(5)))
        assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_sampling_precision_rule_and_its_override(monkeypatch, native, expected):
    """Both sampling loops run their trunk in the rule's dtype (bf16 only where the device multiplies
    bf16 natively), `use_sample_precision("fp32")` restores fp32, and the samplers get fp32 logits."""
    import vqdiff.sampling_ops as ops_mod
    import vqdiff.diffusion as diffusion_mod
    import vqdiff.ar as ar_mod

    monkeypatch.setattr(precision_mod, "_cpu_has", lambda flags, probes: native)
    assert sample_dtype(CPU) is expected
    with use_sample_precision("fp32"):
        assert sample_dtype(CPU) is None
    with pytest.raises(ValueError, match="precision must be one of"):
        with use_sample_precision("fp16"):
            pass
    real = ops_mod.sample_logits
    for model in _models():
        model.eval()
        seen_in, seen_logits = [], []
        hook = model.trunk.head.register_forward_hook(lambda mod, args, out: seen_in.append(out.dtype))

        def spy(logits, **kw):
            seen_logits.append(logits.dtype)
            return real(logits, **kw)

        mod = ar_mod if model.kind == "ar" else diffusion_mod
        monkeypatch.setattr(mod, "sample_logits", spy)
        options = SampleOptions(cfg=2.0, steps=4)
        model.sample(2, options, labels=1, generator=torch.Generator().manual_seed(0))
        assert set(seen_in) == {expected or torch.float32}, model.kind
        assert seen_logits and set(seen_logits) == {torch.float32}, model.kind
        seen_in.clear()
        with use_sample_precision("fp32"):
            model.sample(2, options, labels=1, generator=torch.Generator().manual_seed(0))
        assert set(seen_in) == {torch.float32}, model.kind
        hook.remove()


def test_a_compiled_loss_trains_as_the_eager_one_and_saves_plain_weights(tmp_path):
    """`compile = true` (the cifar10 recipe's generators) compiles `model.loss` only: the same steps as
    eager up to float rounding, checkpoints with the plain module's keys that load strictly, and a
    compiled run stopped half-way resumes to the weights of one that was not."""
    from safetensors.torch import load_file

    from vqdiff.checkpoint import load_model
    from vqdiff.steps import TensorSource
    from vqdiff.train import TrainConfig, train

    cfg = ARConfig(codebook_size=16, grid_h=4, grid_w=4, dim=16, depth=1, heads=2, group=2, depth_head=1)  # unconditional: no draws
    data = TensorSource(ids=torch.randint(0, 16, (32, 4, 4), generator=torch.Generator().manual_seed(0)))

    def run(folder: str, compiled: bool, stop_after: int | None = None) -> dict[str, torch.Tensor]:
        with seeded(0):
            model = ARTransformer(cfg)
        tc = TrainConfig(steps=4, batch_size=8, warmup_steps=1, precision="fp32", compile=compiled, checkpoint_every=2)
        train(model, data, tc, tmp_path / folder, device="cpu", stop_after=stop_after)
        return load_file(tmp_path / folder / "model.safetensors")

    eager, compiled = run("eager", False), run("compiled", True)
    assert compiled.keys() == eager.keys()  # no `_orig_mod.` prefix
    for k, v in eager.items():
        assert torch.allclose(compiled[k], v, atol=1e-4), k
    load_model(tmp_path / "compiled")  # a strict load of the compiled run's folder
    half = run("resumed", True, stop_after=2)
    assert not all(torch.equal(half[k], compiled[k]) for k in compiled)  # stopped after 2 of the 4 steps
    resumed = run("resumed", True)
    assert all(torch.equal(resumed[k], compiled[k]) for k in compiled)
