"""evaluation: FID/KID/PR/IS through torch-fidelity, the dataset classifier extractor and its caches.

Tiny and offline: `shapes` images, a classifier trained for a few dozen steps, no Inception download.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch_fidelity
from helpers import cpu_flags, save_random_inception_weights

import evaluation
import evaluation.classifier
import evaluation.extractors
import vqdiff.precision
from evaluation import (
    ClassifierRecipe,
    EvaluationError,
    class_accuracy,
    compute_metrics,
    extract_features,
    get_extractor,
    reference_cache_name,
)
from vqdiff.data import ImageSet, from_uint8, load_dataset, to_uint8

# a few steps: these tests check plumbing and invariants, not accuracy
RECIPE = ClassifierRecipe(width=8, feature_dim=32, steps=40, batch_size=32)
N = 256


@pytest.fixture(scope="module")
def train_set() -> ImageSet:
    return load_dataset("shapes", "train", limit=512)


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return load_dataset("shapes", "test", limit=N)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(train_set, test_set, cache):
    return get_extractor(
        "classifier",
        dataset="shapes",
        train_set=train_set,
        test_set=test_set,
        cache_dir=cache,
        recipe=RECIPE,
        device="cpu",
    )


@pytest.fixture(autouse=True)
def _offline_inception(monkeypatch, tmp_path):
    # no test may find real Inception weights or reach the network: empty hub cache, no env var,
    # and a download URL that refuses at once (port 9 on localhost)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("VQDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(
        evaluation.extractors, "URL_INCEPTION_V3", "https://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"
    )


class Items(torch.utils.data.Dataset):
    """A plain Dataset of uint8 [c h w] items, independent of evaluation.UInt8Images."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def noised(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """uint8 [n c h w] plus Gaussian noise of std `sigma` in [-1, 1] units."""
    g = torch.Generator().manual_seed(seed)
    x = from_uint8(images)
    return to_uint8(x + sigma * torch.randn(x.shape, generator=g))


def fid_only(fake, real, extractor, **kw):
    return compute_metrics(fake, real, extractor, kid=False, prc=False, isc=False, **kw)["fid"]


# ------------------------------------------------------------------ metrics


def test_metrics_match_direct_torch_fidelity_call(classifier, train_set, test_set, tmp_path):
    fake, real = train_set.uint8[:N], test_set.uint8
    ours = compute_metrics(fake, real, classifier, cache_dir=tmp_path)
    direct = torch_fidelity.calculate_metrics(
        input1=Items(fake),
        input2=Items(real),
        fid=True,
        kid=True,
        prc=True,
        isc=True,
        feature_extractor=classifier.fidelity_name,
        kid_subset_size=N,
        kid_subsets=1,  # all subsets of N from N are the same set (the order changes the float sums only)
        isc_splits=2,
        save_cpu_ram=True,  # no loader workers
        cuda=False,
        batch_size=classifier.batch_size,
        cache=False,
        verbose=False,
    )
    assert ours["fid"] > 0.01
    assert ours["fid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["kid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-6, abs=1e-9)
    assert ours["precision"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_PRECISION], rel=1e-6)
    assert ours["recall"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_RECALL], rel=1e-6)
    assert ours["isc"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert ours["extractor"] == "classifier" and ours["extractor_hash"] == classifier.hash
    assert ours["num_fake"] == ours["num_real"] == N


def test_fid_is_zero_against_itself_and_grows_with_noise(classifier, test_set, tmp_path):
    real = test_set.uint8
    assert abs(fid_only(real, real, classifier, cache_dir=tmp_path)) < 1e-6
    fids = [fid_only(noised(real, s), real, classifier, cache_dir=tmp_path) for s in (0.05, 0.2, 0.5)]
    assert 1e-3 < fids[0] < fids[1] < fids[2], fids


def test_small_sets_and_progress(classifier, test_set, tmp_path):
    calls = []
    fake, real = test_set.uint8[:5], test_set.uint8[5:12]
    m = compute_metrics(fake, real, classifier, cache_dir=tmp_path, progress=lambda d, t: calls.append((d, t)))
    for key in ("fid", "kid", "precision", "recall", "isc"):
        assert torch.isfinite(torch.tensor(m[key])), key
    assert m["kid_subset_size"] == 5 and m["prc_neighborhood"] == 3
    assert calls[-1] == (12, 12)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_bad_inputs_give_one_line_errors(classifier, test_set):
    real = test_set.uint8
    for fake in (from_uint8(real), real[:1], real[:, :2], real[0]):
        with pytest.raises(EvaluationError) as e:
            compute_metrics(fake, real, classifier)
        assert "\n" not in str(e.value)


def test_extract_features_shape_and_agreement(classifier, test_set):
    x = test_set.uint8[:40]
    f16 = extract_features(x, classifier, batch_size=16)
    f64 = extract_features(x, classifier, batch_size=64)
    assert f16.shape == (40, RECIPE.feature_dim) and f16.dtype == torch.float32
    torch.testing.assert_close(f16, f64, rtol=1e-4, atol=1e-5)
    logits = extract_features(x, classifier, layer="logits")
    assert logits.shape == (40, 3)


# ------------------------------------------------------------------ the classifier extractor


def test_classifier_is_deterministic_given_its_seed(classifier, train_set, test_set, tmp_path):
    kw = dict(dataset="shapes", train_set=train_set, test_set=test_set, recipe=RECIPE, device="cpu")
    a = get_extractor("classifier", cache_dir=tmp_path / "a", **kw)
    b = get_extractor("classifier", cache_dir=tmp_path / "b", **kw)
    assert not a.info["cached"] and not b.info["cached"]
    assert a.hash == b.hash == classifier.hash
    with open(a.weights_path, "rb") as fa, open(b.weights_path, "rb") as fb:
        assert fa.read() == fb.read()
    kw["recipe"] = dataclasses.replace(RECIPE, seed=1)
    other = get_extractor("classifier", cache_dir=tmp_path / "c", **kw)
    assert other.hash != a.hash and other.fidelity_name != a.fidelity_name


def test_classifier_cache_is_reused_and_keyed_by_recipe(classifier, train_set, test_set, cache, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    kw = dict(dataset="shapes", train_set=train_set, test_set=test_set, cache_dir=cache, device="cpu")
    monkeypatch.setattr(evaluation.classifier, "train_classifier", no_training)
    again = get_extractor("classifier", recipe=RECIPE, **kw)
    assert again.info["cached"] and again.hash == classifier.hash
    assert again.info["test_accuracy"] == classifier.info["test_accuracy"]
    assert "test_accuracy" in again.info and "train_seconds" in again.info
    # a changed recipe is a new cache entry: it has to train
    with pytest.raises(AssertionError, match="retrained"):
        get_extractor("classifier", recipe=dataclasses.replace(RECIPE, lr=1e-3), **kw)


def test_corrupt_cached_classifier_is_retrained(train_set, test_set, tmp_path):
    kw = dict(dataset="shapes", train_set=train_set, test_set=test_set, cache_dir=tmp_path, recipe=RECIPE, device="cpu")
    first = get_extractor("classifier", **kw)
    with open(first.weights_path, "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(2000)
        f.write(b"\xff" * 64)
    second = get_extractor("classifier", **kw)
    assert not second.info["cached"] and second.hash == first.hash


def test_auto_picks_classifier_offline_with_labels(classifier, train_set, test_set, cache):
    ex = get_extractor("auto", dataset="shapes", train_set=train_set, test_set=test_set, cache_dir=cache, recipe=RECIPE)
    assert ex.name == "classifier" and ex.hash == classifier.hash


def test_auto_without_labels_offline_is_one_line(tmp_path):
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    unlabelled = ImageSet("folder", "train", 32, 3, 0, torch.zeros(4, dtype=torch.long), uint8=images)
    with pytest.raises(EvaluationError) as e:
        get_extractor("auto", dataset="folder", train_set=unlabelled, cache_dir=tmp_path)
    assert "--inception-weights" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EvaluationError, match="no class labels"):
        get_extractor("classifier", dataset="folder", train_set=unlabelled, cache_dir=tmp_path)


def test_class_accuracy_counts_the_conditioning_labels(classifier, test_set):
    images = test_set.uint8[:64]
    predicted = extract_features(images, classifier, layer="logits").argmax(1)
    assert class_accuracy(images, predicted, classifier) == 1.0  # a perfect predictor of its own labels
    wrong = (predicted + 1) % test_set.num_classes
    assert class_accuracy(images, wrong, classifier) == 0.0
    half = torch.where(torch.arange(64) < 32, predicted, wrong)
    assert class_accuracy(images, half, classifier) == 0.5
    # on real images with their true labels: the classifier's accuracy, as the training-time check counts it
    real = ImageSet("shapes", "test", 32, 3, test_set.num_classes, test_set.labels[:64], uint8=images)
    assert class_accuracy(images, test_set.labels[:64], classifier) == pytest.approx(evaluation.accuracy(classifier_model(classifier), real))
    shuffled = test_set.labels[:64][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, shuffled, classifier) < class_accuracy(images, test_set.labels[:64], classifier)
    with pytest.raises(EvaluationError, match="one label per image"):
        class_accuracy(images, predicted[:10], classifier)


def classifier_model(extractor):
    """The `Classifier` module behind a classifier extractor, as `evaluation.accuracy` takes it."""
    cfg = evaluation.extractors.FEATURE_EXTRACTORS_REGISTRY[extractor.fidelity_name].cfg
    model = evaluation.Classifier(cfg)
    model.load_state_dict(evaluation.extractors.FEATURE_EXTRACTORS_REGISTRY[extractor.fidelity_name].state, strict=True)
    return model.eval()


# ------------------------------------------------------------------ the reference statistics cache


def fidelity_files(cache_dir):
    return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "fidelity").glob("*.pt")}


def test_reference_cache_reused_and_invalidated_by_weights(classifier, train_set, test_set, tmp_path):
    fake, real = train_set.uint8[:N], test_set.uint8
    first = compute_metrics(fake, real, classifier, real_key="shapes-test", cache_dir=tmp_path)
    files = fidelity_files(tmp_path)
    name = reference_cache_name(real, "shapes-test", classifier)
    assert not first["real_cached"]
    assert files and all(f.startswith(name) and classifier.hash in f for f in files)

    # unchanged extractor: the same files are read, not rewritten
    second = compute_metrics(fake, real, classifier, real_key="shapes-test", cache_dir=tmp_path)
    assert second["real_cached"] and second["fid"] == first["fid"]
    assert fidelity_files(tmp_path) == files
    # ... and really read: doctored cached statistics change the FID
    stat = next(tmp_path.glob("fidelity/*-stat-fid-*.pt"))
    s = torch.load(stat, weights_only=False)
    torch.save({"mu": s["mu"] + 1.0, "sigma": s["sigma"]}, stat)
    assert fid_only(fake, real, classifier, real_key="shapes-test", cache_dir=tmp_path) > first["fid"] + 1.0

    # other weights (another seed, so another hash): new cache entries, a different FID
    other = get_extractor(
        "classifier",
        dataset="shapes",
        train_set=train_set,
        test_set=test_set,
        cache_dir=tmp_path,
        recipe=dataclasses.replace(RECIPE, seed=1),
        device="cpu",
    )
    assert other.hash != classifier.hash
    third = compute_metrics(fake, real, other, real_key="shapes-test", cache_dir=tmp_path)
    assert not third["real_cached"] and third["extractor_hash"] == other.hash
    new = set(fidelity_files(tmp_path)) - set(files)
    assert new and all(other.hash in f for f in new)
    assert third["fid"] != pytest.approx(first["fid"], rel=1e-3)

    # other real images under the same key do not meet the old statistics either
    fourth = compute_metrics(fake, noised(real, 0.1), classifier, real_key="shapes-test", cache_dir=tmp_path)
    assert not fourth["real_cached"]


# ------------------------------------------------------------------ inception


def test_missing_inception_weights_offline_is_one_clear_line(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(EvaluationError) as e:
        get_extractor("inception", dataset="shapes", cache_dir=tmp_path)
    msg = str(e.value)
    assert "--inception-weights" in msg and "VQDIFF_INCEPTION_WEIGHTS" in msg
    assert "\n" not in msg
    assert time.perf_counter() - t0 < 10  # no hanging on the network


def test_given_inception_weights_that_do_not_exist(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(EvaluationError) as e:
        get_extractor("inception", dataset="mnist", inception_weights=str(missing))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setenv("VQDIFF_INCEPTION_WEIGHTS", str(missing))
    for kind in ("inception", "auto"):  # an env var that names a file means inception, even for auto
        with pytest.raises(EvaluationError) as e:
            get_extractor(kind, dataset="mnist")
        assert "$VQDIFF_INCEPTION_WEIGHTS" in str(e.value) and "\n" not in str(e.value)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError) as e:
        get_extractor("inception", dataset="mnist", inception_weights=junk)
    assert str(junk) in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised Inception state dict in torch-fidelity's format (the real one needs a download)."""
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


def test_inception_with_local_weights_takes_grey_images(random_inception_weights, test_set, tmp_path, monkeypatch):
    ex = get_extractor("inception", dataset="shapes", inception_weights=random_inception_weights, device="cpu")
    assert ex.weights_path == str(random_inception_weights)
    mode = evaluation.extractors.default_inception_mode(torch.device("cpu"))  # bf16-channels-last with AMX
    assert mode in ("channels-last", "bf16-channels-last") and ex.mode == mode
    assert ex.fidelity_name == f"inception-v3-compat-{mode}"
    assert len(ex.hash) == 12 and ex.hash != "torch-fidelity-default"
    grey = test_set.uint8[:8].float().mean(1, keepdim=True).round().to(torch.uint8)  # [n 1 h w]
    m = compute_metrics(grey[:4], grey[4:], ex, real_key="grey", cache_dir=tmp_path)
    assert m["extractor"] == "inception" and m["extractor_hash"] == ex.hash
    assert torch.isfinite(torch.tensor([m["fid"], m["kid"], m["precision"], m["isc"]])).all()
    assert all(ex.hash in f for f in fidelity_files(tmp_path))
    assert extract_features(grey[:2], ex).shape == (2, 2048)

    # the env var is the same as the option, and with weights here auto means inception
    monkeypatch.setenv("VQDIFF_INCEPTION_WEIGHTS", str(random_inception_weights))
    assert get_extractor("auto", dataset="shapes").hash == ex.hash


def test_auto_inception_mode_is_bf16_channels_last_only_with_amx(monkeypatch):
    cpu = torch.device("cpu")
    flags = cpu_flags()
    if flags is not None:  # the probe against an independent reading: the kernel's CPU flags
        assert vqdiff.precision.amx_bf16(cpu) == ("amx_bf16" in flags)
    assert not vqdiff.precision.amx_bf16(torch.device("meta"))
    monkeypatch.setattr(evaluation.extractors, "amx_bf16", lambda device: True)
    assert evaluation.extractors.default_inception_mode(cpu) == "bf16-channels-last"
    assert evaluation.extractors.default_inception_mode(torch.device("cuda")) == "fp32"
    monkeypatch.setattr(evaluation.extractors, "amx_bf16", lambda device: False)
    assert evaluation.extractors.default_inception_mode(cpu) == "channels-last"


def test_inception_modes_are_registered_apart_and_agree_with_fp32(random_inception_weights, test_set, tmp_path):
    kw = dict(dataset="shapes", inception_weights=random_inception_weights, device="cpu")
    fp32 = get_extractor("inception", inception_mode="fp32", **kw)
    assert fp32.fidelity_name == "inception-v3-compat" and fp32.key == ["inception", fp32.hash]  # the keys before modes
    images = test_set.uint8[:4]
    reference = extract_features(images, fp32)
    for mode, tolerance in (("channels-last", 1e-4), ("bf16", 0.1), ("bf16-channels-last", 0.1)):
        ex = get_extractor("inception", inception_mode=mode, **kw)
        assert ex.fidelity_name == f"inception-v3-compat-{mode}" and ex.key == ["inception", fp32.hash, mode]
        features = extract_features(images, ex)
        assert features.dtype == torch.float32
        scale = reference.abs().max()
        assert (features - reference).abs().max() <= tolerance * scale, mode
    # a mode's reference statistics never share a cache file with fp32's
    compute_metrics(images[:2], images[2:], fp32, real_key="modes", cache_dir=tmp_path, kid=False, prc=False, isc=False)
    compute_metrics(images[:2], images[2:], ex, real_key="modes", cache_dir=tmp_path, kid=False, prc=False, isc=False)
    names = fidelity_files(tmp_path)
    assert any("compat-bf16-channels-last" in f for f in names) and any("compat-features" in f for f in names)
    assert get_extractor("inception", **kw).mode == evaluation.extractors.default_inception_mode(torch.device("cpu"))
    with pytest.raises(EvaluationError, match="unknown inception mode 'fp8'"):
        get_extractor("inception", inception_mode="fp8", **kw)


def test_the_airbench_classifier_trains_deterministically_with_its_augmentation(train_set, test_set, tmp_path):
    recipe = dataclasses.replace(evaluation.CLASSIFIERS["airbench"], width=8, steps=6, batch_size=32)
    kw = dict(dataset="shapes", train_set=train_set, test_set=test_set, recipe=recipe, device="cpu")
    a = get_extractor("classifier", cache_dir=tmp_path / "a", **kw)
    b = get_extractor("classifier", cache_dir=tmp_path / "b", **kw)
    assert a.hash == b.hash and a.info["config"]["recipe"]["arch"] == "airbench"
    features = extract_features(to_uint8(test_set.batch(torch.arange(8))["images"]), a)
    assert features.shape == (8, 4 * 8) and torch.isfinite(features).all()  # the pooled last block: 4 x width
    # the augmentation keeps shapes, flips about half and moves the rest by at most 2 pixels
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).repeat(50, 1, 1, 1)
    y = evaluation.classifier._augment(x, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    moves = []
    for xi, yi in zip(x, y):  # every output is a window of the reflect-padded image or of its mirror
        found = [(f, dy, dx) for f in (0, 1) for dy in range(5) for dx in range(5)
                 if torch.equal(torch.nn.functional.pad((xi.flip(2) if f else xi)[None], (2,) * 4, mode="reflect")[0, :, dy : dy + 8, dx : dx + 8], yi)]  # fmt: skip
        assert found
        moves.append(found[0])
    flips = sum(f for f, _, _ in moves)
    assert 25 <= flips <= 75 and len({(dy, dx) for _, dy, dx in moves}) > 10
    with pytest.raises(EvaluationError, match="unknown classifier 'vgg'"):
        ClassifierRecipe(arch="vgg")
