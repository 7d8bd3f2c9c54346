"""The training stages of a run, as plain functions over a `Run`: the tokenizer, then the generators
on the run's token cache (`recipes.run.ensure_tokens`). The CLI's `train` and `run` commands call these."""

from __future__ import annotations

import time
from typing import Any

import torch

from recipes.images import save_grid
from recipes.recipe import REFINED_FIELDS, Recipe, check_generator
from recipes.run import BASE_FILE, Run, StageError, ensure_tokens, software_versions
from vqdiff.checkpoint import CONFIG_FILE, is_complete, read_config, save_model
from vqdiff.data import ImageSet, load_tokens
from vqdiff.distributed import barrier, is_distributed, is_main, seeded
from vqdiff.io import read_json, write_json
from vqdiff.memory import MemoryEstimate, available_bytes, estimate_step_memory, gib
from vqdiff.perceptual import PerceptualRecipe, train_perceptual
from vqdiff.pipeline import decode, encode, measure_tokenizer
from vqdiff.precision import autocast_dtype, model_autocast
from vqdiff.pretrained import DiffusersTokenizer
from vqdiff.registry import model_class
from vqdiff.steps import TensorSource
from vqdiff.train import is_trained, train


# ------------------------------------------------------------------ tokenizer


def train_tokenizer(recipe: Recipe, run: Run, on_log=None, on_eval=None) -> dict[str, Any]:
    """Train (or resume) the tokenizer, then measure it on the test split. Returns metrics.json.

    With `tokenizer.kind = "diffusers"` nothing is trained: the pretrained VQModel is copied into
    RUN/tokenizer/ (so the run folder alone rebuilds it) and measured like a trained one.
    """
    folder = run.model_dir("tokenizer")
    tcfg = recipe.train_config("tokenizer")
    extras = recipe["tokenizer"]
    pretrained = extras["kind"] == "diffusers"
    done = is_complete(folder) if pretrained else is_trained(folder, tcfg.steps)
    if not (done and run.metrics_path("tokenizer").exists()):
        train_set = run.load_split(recipe, "train")
        t0 = time.perf_counter()
        if pretrained:
            try:
                model = DiffusersTokenizer.from_pretrained(
                    extras["pretrained"], channels=train_set.channels, image_size=train_set.image_size
                )
            except ValueError as e:
                raise StageError(f"[tokenizer] {e}") from None
            save_model(model, folder, extra={"trained_steps": 0})
            step, resumed_from = 0, 0
        else:
            cfg = recipe.model_config("tokenizer", channels=train_set.channels, image_size=train_set.image_size)
            with seeded(tcfg.seed):
                model = model_class("tokenizer")(cfg)
            check_memory("tokenizer", model, tcfg, run.torch_device)
            prepare_perceptual(model, train_set, folder, run.torch_device)
            result = train(model, train_set, tcfg, folder, device=run.torch_device, on_log=on_log)
            model, step, resumed_from = result.model, result.step, result.resumed_from
        seconds = time.perf_counter() - t0
        if is_main():  # under torchrun the other ranks wait at the barrier
            _measure_tokenizer(model, "tokenizer", recipe, run, tcfg, on_eval, train_seconds_this_call=round(seconds, 1), steps=step, resumed_from=resumed_from)
        barrier()
    return read_json(run.metrics_path("tokenizer"))


# ------------------------------------------------------------------ decoder refinement


def refine_decoder(recipe: Recipe, run: Run, on_log=None, on_eval=None) -> dict[str, Any] | None:
    """Refine the tokenizer's decoder into RUN/decoder/ (or resume), then measure it on the test split;
    None when the recipe has no refinement (decoder.steps = 0). Returns its metrics.json.

    The model is the run's tokenizer with frozen codes (`Recipe.refined_config`): its encoder and
    codebook are copied and never change, so RUN/tokens and the generators stay valid, and from then
    on `Run.load_tokenizer` decodes with the refined decoder."""
    if recipe["decoder"]["steps"] <= 0:
        return None
    folder = run.model_dir("decoder")
    tcfg = recipe.train_config("decoder")
    base = run.load_tokenizer(refined=False)
    if not isinstance(base, model_class("tokenizer")):
        raise StageError("[decoder] the refinement is for a tokenizer trained here (tokenizer.kind = vqvae); set decoder.steps = 0")
    if (folder / BASE_FILE).exists() and read_json(folder / BASE_FILE).get("tokenizer_hash") != run.tokenizer_hash:
        raise StageError(f"{folder} refines another tokenizer (retrained since); delete {folder} to refine this one")
    if run.refined() and is_trained(folder, tcfg.steps):
        return read_json(run.metrics_path("decoder"))
    if is_main():
        write_json(folder / BASE_FILE, {"tokenizer_hash": run.tokenizer_hash})
    train_set = run.load_split(recipe, "train")
    with seeded(tcfg.seed):
        model = model_class("tokenizer")(recipe.refined_config(base.cfg))
    state = {k: v for k, v in base.state_dict().items() if k != "train_step"}  # disc_start counts refinement steps
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("discriminator.", "perceptual.", "lecam_ema", "train_step")) for k in missing), missing
    check_memory("decoder", model, tcfg, run.torch_device)
    prepare_perceptual(model, train_set, folder, run.torch_device)
    t0 = time.perf_counter()
    result = train(model, train_set, tcfg, folder, device=run.torch_device, on_log=on_log)
    seconds = time.perf_counter() - t0
    if is_main():
        _measure_tokenizer(
            result.model, "decoder", recipe, run, tcfg, on_eval, train_seconds_this_call=round(seconds, 1), steps=result.step,
            resumed_from=result.resumed_from, refined_from=run.tokenizer_hash, losses={k: recipe["decoder"][k] for k in REFINED_FIELDS},
        )  # fmt: skip
    barrier()
    return read_json(run.metrics_path("decoder"))


def _measure_tokenizer(model: torch.nn.Module, kind: str, recipe: Recipe, run: Run, tcfg: Any, on_eval, **facts: Any) -> None:
    """Measure a trained tokenizer (`kind`: tokenizer, or its refined decoder) on the test split and
    write RUN/kind/metrics.json (with `facts`, the software, the autocast and the perceptual network)
    and reconstructions.png."""
    folder = run.model_dir(kind)
    model = model.to(run.torch_device).eval()
    test_set = run.load_split(recipe, "test")
    metrics = evaluate_tokenizer(model, test_set, on_eval)
    metrics.update(**facts, software=software_versions(), autocast=autocast_name("tokenizer", tcfg, run))
    if (folder / "perceptual.json").exists():
        metrics["perceptual"] = read_json(folder / "perceptual.json")
    write_json(run.metrics_path(kind), metrics)
    save_reconstructions(model, test_set, folder / "reconstructions.png")


def prepare_perceptual(model: torch.nn.Module, train_set: ImageSet, folder, device) -> None:
    """Train the tokenizer's perceptual network (vqdiff.perceptual) on the train split before its first
    step, and say which network it is in RUN/tokenizer/perceptual.json. A resume loads it from the
    checkpoint instead, with the rest of the tokenizer."""
    net = getattr(model, "perceptual", None)
    if net is None or (folder / "train_state.pt").exists():
        return
    if model.cfg.perceptual_net == "random":  # seeded with the model, never trained
        if is_main():
            write_json(folder / "perceptual.json", {"network": "PerceptualNet with seeded random weights, untrained (not Inception)", "parameters": sum(p.numel() for p in net.parameters())})
        return
    try:
        info = train_perceptual(net, train_set, PerceptualRecipe(steps=model.cfg.perceptual_steps, seed=0), device)
    except ValueError as e:
        raise StageError(f"[tokenizer] {e}") from None
    if is_main():
        write_json(folder / "perceptual.json", info)


def evaluate_tokenizer(model: torch.nn.Module, test_set: ImageSet, on_batch=None) -> dict[str, Any]:
    """PSNR, MSE, codebook usage and perplexity on the test split (vqdiff.pipeline.measure_tokenizer)."""
    return {**measure_tokenizer(model, test_set, on_batch=on_batch), "split": "test"}


def save_reconstructions(model: torch.nn.Module, test_set: ImageSet, path, n: int = 16) -> None:
    """Originals (top row) above their reconstructions (bottom row)."""
    x = test_set.batch(torch.arange(min(n, len(test_set))))["images"]
    save_grid(torch.cat([x, decode(model, encode(model, x))]), path, nrow=len(x))


# ------------------------------------------------------------------ generators


def generator_config(kind: str, recipe: Recipe, meta: dict[str, Any]) -> Any:
    section = recipe[kind]
    num_classes = meta.get("num_classes", 0) if section["conditional"] else 0
    return recipe.model_config(
        kind,
        codebook_size=meta["codebook_size"],
        grid_h=meta["grid"][0],
        grid_w=meta["grid"][1],
        num_classes=num_classes,
    )


def train_generator(kind: str, recipe: Recipe, run: Run, on_log=None, on_batch=None) -> dict[str, Any]:
    """Train (or resume) the `kind` generator on RUN/tokens, then measure bits per token on the test split."""
    folder = run.model_dir(kind)
    model_cls = check_generator(kind)
    tcfg = recipe.train_config(kind)
    check_generator_memory(kind, recipe, run)  # before the tokens: a step that cannot fit stops here
    tok = run.tokenizer_meta()
    # refuse a mismatch the recipe states before spending time on encoding
    recipe.check_derived(kind, codebook_size=tok["codebook_size"], grid_h=tok["grid"][0], grid_w=tok["grid"][1])
    meta = ensure_tokens(run, on_batch)
    if (folder / "config.json").exists():
        run.check_fits_tokenizer(kind, read_config(folder, kind)[1], meta)
    run.check_same_tokens(kind)
    cfg = generator_config(kind, recipe, meta)
    if is_trained(folder, tcfg.steps) and run.metrics_path(kind).exists():
        return read_json(run.metrics_path(kind))
    if is_main():
        write_json(folder / "tokens.json", {"tokenizer_hash": meta["tokenizer_hash"], "flip": meta.get("flip", False)})
    ids, labels = load_tokens(run.tokens_file("train"))
    t0 = time.perf_counter()
    with seeded(tcfg.seed):
        model = model_cls(cfg)
    result = train(model, TensorSource(ids=ids, labels=labels), tcfg, folder, device=run.torch_device, on_log=on_log)
    seconds = time.perf_counter() - t0
    if is_main():  # under torchrun the other ranks wait at the barrier
        metrics = test_bits_per_token(result.model, run, recipe[kind]["eval_grids"])
        n_params = sum(p.numel() for p in result.model.parameters())
        metrics.update(train_seconds_this_call=round(seconds, 1), steps=result.step, parameters=n_params, software=software_versions(), autocast=autocast_name(kind, tcfg, run))
        write_json(run.metrics_path(kind), metrics)
    barrier()
    return read_json(run.metrics_path(kind))


def recipe_meta(recipe: Recipe, run: Run) -> dict[str, Any]:
    """codebook_size, grid and num_classes for a generator: the run's tokenizer's when it has one,
    else the recipe's tokenizer section's (the grid and the codebook do not depend on the channels)."""
    if (run.model_dir("tokenizer") / CONFIG_FILE).exists():
        return {**run.tokenizer_meta(), "num_classes": 10}
    tcfg = recipe.model_config("tokenizer", channels=3, image_size=recipe["data"]["image_size"])
    return {"codebook_size": tcfg.codebook_size, "grid": list(tcfg.grid), "num_classes": 10}


def random_batch(kind: str, model: torch.nn.Module, b: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of b random items in the form `model.loss` takes (speed and memory do not depend on the values)."""
    cfg = model.cfg
    if kind in ("tokenizer", "decoder"):
        return {"images": torch.rand(b, cfg.channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1}
    return {
        "ids": torch.randint(0, cfg.codebook_size, (b, cfg.grid_h, cfg.grid_w), device=device),
        "labels": torch.randint(0, max(cfg.num_classes, 1), (b,), device=device),
    }


def memory_estimate(kind: str, model: torch.nn.Module, tcfg: Any, device: torch.device) -> MemoryEstimate:
    """The peak-memory estimate of one training step of `model` at the recipe's batch (vqdiff.memory)."""
    amp = model_autocast(model, tcfg.precision, device)
    return estimate_step_memory(model, lambda b: random_batch(kind, model, b, device), tcfg.batch_size, amp=amp, device=device)


def check_generator_memory(kind: str, recipe: Recipe, run: Run) -> None:
    """`check_memory` for the `kind` generator as the recipe configures it, unless it is trained already;
    it needs no tokens and no tokenizer (`recipe_meta`)."""
    tcfg = recipe.train_config(kind)
    if is_trained(run.model_dir(kind), tcfg.steps):
        return
    with seeded(tcfg.seed):
        probe = check_generator(kind)(generator_config(kind, recipe, recipe_meta(recipe, run)))
    check_memory(kind, probe, tcfg, run.torch_device)


def check_memory(kind: str, model: torch.nn.Module, tcfg: Any, device: torch.device) -> None:
    """Refuse, in one line, a stage whose training step would not fit in this machine's free memory
    (the kernel's OOM killer would end it mid-run without a word). Skipped under torchrun and on
    devices other than the CPU and CUDA."""
    if is_distributed() or device.type not in ("cpu", "cuda"):
        return
    est = memory_estimate(kind, model, tcfg, device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_bytes()
    if est.peak() > free:
        fit = est.largest_batch(free)
        hint = f"batch_size = {fit} would fit (--set {kind}.batch_size={fit})" if fit else "no batch size fits: use a smaller model"
        raise StageError(
            f"[{kind}] a training step at batch {tcfg.batch_size} needs about {gib(est.peak())}, and this "
            f"machine has {gib(free)} free; {hint}"
        )


def autocast_name(kind: str, tcfg: Any, run: Run) -> str:
    """The dtype the matmuls trained in (`precision = fast` picks it from the hardware and the model)."""
    amp = autocast_dtype(tcfg.precision, run.torch_device, convolutional=getattr(model_class(kind), "convolutional", False))
    return str(amp or torch.float32).removeprefix("torch.")


@torch.no_grad()
def test_bits_per_token(model: Any, run: Run, max_grids: int, batch_size: int = 250, split: str = "test") -> dict[str, Any]:
    """Bits per token of the first `max_grids` (0 = all) grids of `split` in RUN/tokens."""
    ids, labels = load_tokens(run.tokens_file(split))
    if max_grids:
        ids, labels = ids[:max_grids], labels[:max_grids]
    gen = torch.Generator().manual_seed(0)  # on the CPU: the same estimate on every device
    total, info = 0.0, {}
    for start in range(0, len(ids), batch_size):
        batch = {"ids": ids[start : start + batch_size], "labels": labels[start : start + batch_size]}
        info = model.bits_per_token(batch, generator=gen)
        total += info["bits_per_token"] * len(batch["ids"])
    return {
        "bits_per_token": total / len(ids),
        "kind": info.get("kind"),  # exact (AR) or elbo (diffusion: an upper bound)
        "estimator": info.get("estimator"),
        "split": split,
        "num_grids": len(ids),
        "conditional": model.cfg.num_classes > 0,
    }
