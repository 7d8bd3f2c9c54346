"""torchrun's DDP on the CPU (gloo, two processes): the same training as one process.

The global batch of 7 splits 3 + 4, so the weighting of uneven slices is tested too.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.checkpoint import load_model
from vqdiff.data import make_shapes
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.steps import TensorSource
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.distributed import seeded
from vqdiff.train import TrainConfig, train

STEPS = 4
GRID = dict(codebook_size=16, grid_h=4, grid_w=4, num_classes=3, dim=32, depth=1, heads=2, class_dropout=0.3)


def _cfg(**kw):
    return TrainConfig(steps=STEPS, batch_size=7, warmup_steps=1, log_every=1, checkpoint_every=2, **kw)


def _models():
    """(name, model, data, train config) of the three stages, built the same in every process."""
    images = make_shapes(24, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = TensorSource(ids=torch.randint(0, 16, (24, 4, 4), generator=g), labels=torch.randint(0, 3, (24,), generator=g))
    with seeded(0):
        # dead_threshold high enough that codes are restarted from encoder outputs during the run
        tok = VQTokenizer(TokenizerConfig(channels=3, image_size=16, width=8, max_width=16, codebook_size=16,
                                          codebook_dim=4, dead_threshold=3.0))  # fmt: skip
    with seeded(1):
        ar = ARTransformer(ARConfig(**GRID))
    with seeded(2):
        diff = DiffusionTransformer(DiffusionConfig(**GRID))
    return [("tokenizer", tok, images, _cfg()), ("ar", ar, tokens, _cfg(ema=0.9)), ("diffusion", diff, tokens, _cfg())]


def _losses(logs):
    return [(e["step"], e["loss"]) for e in logs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, stop_after) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for name, model, data, cfg in _models():
            r = train(model, data, cfg, os.path.join(out, name), device="cpu", stop_after=stop_after)
            result[name] = _losses(r.logs)
        with open(os.path.join(out, f"losses-rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _single(out, stop_after=None):
    return {
        name: (_losses(train(model, data, cfg, out / name, device="cpu", stop_after=stop_after).logs))
        for name, model, data, cfg in _models()
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_as_one(tmp_path):
    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, _free_port(), str(ddp), None), nprocs=2, join=True)
    one = _single(tmp_path / "one")
    ranks = [json.loads((ddp / f"losses-rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("tokenizer", "ar", "diffusion"):
        assert [s for s, _ in one[name]] == list(range(1, STEPS + 1))
        for r in ranks:  # every rank logs the global loss, which is the 1-process loss
            assert torch.allclose(torch.tensor(r[name]), torch.tensor(one[name]), rtol=1e-4, atol=1e-5), name
        # rank 0 alone wrote the log, and the checkpoint it wrote loads in a single process
        log = [json.loads(line) for line in (ddp / name / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in log] == list(range(1, STEPS + 1))
        a, b = load_model(ddp / name, name), load_model(tmp_path / "one" / name, name)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-5), (name, k)
    # the losses really depend on the data and noise: the stages do not all log the same numbers
    assert one["ar"] != one["diffusion"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_run_started_on_two_processes_resumes_on_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run"), 2), nprocs=2, join=True)
    resumed = _single(tmp_path / "run")  # steps 3 and 4, in one process, from rank 0's train_state.pt
    straight = _single(tmp_path / "straight")
    for name in ("ar", "diffusion", "tokenizer"):
        assert [s for s, _ in resumed[name]] == [3, 4]
        assert torch.allclose(torch.tensor(resumed[name]), torch.tensor(straight[name][2:]), rtol=1e-4, atol=1e-5), name


# ------------------------------------------------------------------ sharded feature extraction

CLASSIFIER = dict(width=8, feature_dim=32, steps=20, batch_size=32)


def _classifier(cache):
    from evaluation import ClassifierRecipe, get_extractor

    train_set = make_shapes(128, 32, seed=0)
    return get_extractor("classifier", dataset="shapes", train_set=train_set, test_set=train_set,
                         cache_dir=cache, recipe=ClassifierRecipe(**CLASSIFIER), device="cpu")  # fmt: skip


def _images():
    return make_shapes(70, 32, seed=5).uint8, make_shapes(50, 32, seed=6).uint8


def _metrics_worker(rank: int, world: int, port: int, out: str) -> None:
    from evaluation import compute_metrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ex = _classifier(os.path.join(out, "cache"))  # trained by the parent: read from the cache
        fake, real = _images()
        # batch 16: 70 fake images are 5 batches, dealt 3 + 2, the last one short
        m = compute_metrics(fake, real, ex, real_key="shapes-ddp", cache_dir=os.path.join(out, f"fid{rank}"), batch_size=16)
        with open(os.path.join(out, f"metrics-rank{rank}.json"), "w") as f:
            json.dump(m, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_feature_extraction_gives_the_metrics_of_one_process(tmp_path):
    from evaluation import compute_metrics

    ex = _classifier(tmp_path / "cache")
    fake, real = _images()
    one = compute_metrics(fake, real, ex, real_key="shapes-ddp", cache_dir=tmp_path / "one", batch_size=16)
    mp.spawn(_metrics_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # every rank gets the numbers
        m = json.loads((tmp_path / f"metrics-rank{rank}.json").read_text())
        for key in ("fid", "kid", "precision", "recall", "isc"):
            assert m[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    # rank 0 left the reference features where torch-fidelity caches them, and nothing of the fake set
    left = sorted(p.name for p in (tmp_path / "fid0" / "fidelity").glob("*.pt"))
    assert left and all(name.startswith("shapes-ddp") for name in left)
    again = compute_metrics(fake, real, ex, real_key="shapes-ddp", cache_dir=tmp_path / "fid0", batch_size=16)
    assert again["real_cached"] and again["fid"] == pytest.approx(one["fid"], rel=1e-5)


# ------------------------------------------------------------------ sharded sampling


def _generators():
    with seeded(1):
        ar = ARTransformer(ARConfig(**GRID)).eval()
    with seeded(2):
        diff = DiffusionTransformer(DiffusionConfig(**GRID)).eval()
    return {"ar": (ar, {}), "diffusion": (diff, {"steps": 3})}  # the options each one is sampled with


def _sample_worker(rank: int, world: int, port: int, out: str) -> None:
    from vqdiff.pipeline import sample_ids

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, (model, options) in _generators().items():
            # 10 samples in batches of 3: 4 batches dealt 2 + 2, the last one short
            ids = sample_ids(model, 10, seed=5, batch_size=3, **options)
            torch.save(ids, os.path.join(out, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_sampling_gives_the_ids_of_one_process(tmp_path):
    from vqdiff.pipeline import sample_ids

    mp.spawn(_sample_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, (model, options) in _generators().items():
        one = sample_ids(model, 10, seed=5, batch_size=3, **options)
        assert one.shape == (10, 4, 4)
        for rank in (0, 1):  # every rank gets all the ids, in order
            assert torch.equal(torch.load(tmp_path / f"{name}-rank{rank}.pt"), one), (name, rank)
        assert not torch.equal(one, sample_ids(model, 10, seed=6, batch_size=3, **options))
