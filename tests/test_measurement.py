"""Measurement that others can compare (issue 21, part 4): the reference set apart from the number of
samples, FID in two feature spaces, class accuracy of conditional samples. A tiny `shapes` run."""

import json
import shutil

import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error, save_random_inception_weights, sets

from recipes.report import markdown, results_table, spaces_sentence
from recipes.run import Run
from recipes.sampling import SampleSpec, generate
from vqdiff.data import load_tokens
from vqdiff.options import SampleOptions
from vqdiff.pipeline import draw_labels

LIMIT_TEST = 48  # TINY's data.limit_test: the whole test split


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VQDIFF_CACHE", str(path))
    mp.setenv("TORCH_HOME", str(path / "torch-home"))  # no Inception weights but the ones a test gives
    mp.delenv("VQDIFF_INCEPTION_WEIGHTS", raising=False)
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    path = tmp_path_factory.mktemp("runs") / "shapes"
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", path, *sets(TINY)))
    ok(invoke("train", "ar", "shapes", "--run-dir", path, *sets(TINY)))  # conditional: shapes has classes
    ok(invoke("train", "diffusion", "shapes", "--run-dir", path, *sets(TINY), "--set", "diffusion.conditional=false"))
    return path


def report_of(run):
    return json.loads((run / "report" / "report.json").read_text())


def test_samples_keep_the_labels_they_were_conditioned_on(run):
    r = Run(run)
    spec = SampleSpec(generator="ar", options=SampleOptions(), num=6, seed=3)
    first = generate(r, spec)
    expected = draw_labels(3, 6, 3)  # shapes: 3 classes
    assert torch.equal(first.labels, expected)
    assert torch.equal(load_tokens(first.folder / "ids.safetensors")[1], expected)
    again = generate(r, spec)  # reused from the folder: the labels are read back with the ids
    assert again.folder == first.folder and torch.equal(again.labels, expected) and torch.equal(again.ids, first.ids)
    fixed = generate(r, SampleSpec(generator="ar", options=SampleOptions(), num=4, seed=3, class_=2))
    assert fixed.labels.tolist() == [2, 2, 2, 2]
    assert generate(r, SampleSpec(generator="diffusion", options=SampleOptions(steps=2), num=4)).labels is None


def test_reference_size_is_apart_from_the_number_of_samples(run, cache):
    ok(invoke("evaluate", run, "--num", 20, "--steps", "2", "--extractor", "classifier"))
    before = report_of(run)
    assert before["num_samples"] == 20 and before["reference_set"]["size"] == 20  # the default: as before
    assert before["reference"] == f"shapes test split, first 20 of {LIMIT_TEST} images"
    assert "not FID-50k" in before["reference_note"] and "20 samples against 20 test images" in before["reference_note"]
    ok(invoke("evaluate", run, "--num", 20, "--steps", "2", "--extractor", "classifier", "--reference-num", 0))
    whole = report_of(run)
    assert whole["num_samples"] == 20 and whole["reference_set"]["size"] == LIMIT_TEST
    assert whole["reference"] == f"shapes test split, all {LIMIT_TEST} images"
    assert [r["samples"] for r in whole["results"]] == [r["samples"] for r in before["results"]]  # the same samples,
    assert all(a["fid"] != b["fid"] for a, b in zip(whole["results"], before["results"]))  # another reference
    assert whole["floor_fid"] != before["floor_fid"] and whole["tokenizer"]["rfid"] != before["tokenizer"]["rfid"]
    md = (run / "report" / "report.md").read_text()
    assert f"all {LIMIT_TEST} images" in md and "Not comparable with published FID-50k" in md
    ok(invoke("evaluate", run, "--num", 20, "--steps", "2", "--extractor", "classifier", "--reference-num", 30))
    assert report_of(run)["reference_set"]["size"] == 30
    one_line_error(invoke("evaluate", run, "--reference-num", 1), "reference_num must be 0")
    one_line_error(invoke("evaluate", run, "--inception-mode", "fp8"), "unknown inception mode 'fp8'")


def test_two_spaces_and_class_accuracy(run, cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = save_random_inception_weights(tmp_path / "random-inception.pth")
    args = ("--num", 4, "--steps", "2", "--extractor", "classifier", "--inception-weights", weights)
    ok(invoke("evaluate", copy, *args, "--one-space"))
    one = report_of(copy)
    assert [s["extractor"] for s in one["spaces"]] == ["classifier"] and all(list(r["fids"]) == ["classifier"] for r in one["results"])
    ok(invoke("evaluate", copy, *args, "--inception-mode", "fp32"))
    report = report_of(copy)
    assert report["spaces"] == [
        {"extractor": "classifier", "hash": report["extractor_hash"], "mode": "fp32", "primary": True},
        {"extractor": "inception", "hash": report["spaces"][1]["hash"], "mode": "fp32", "primary": False},
    ]
    for r in report["results"]:
        assert list(r["fids"]) == ["classifier", "inception"] and r["fids"]["classifier"] == r["fid"]
        assert r["fids"]["inception"] >= 0 and r["fids"]["inception"] != r["fid"]
    assert [r["fid"] for r in report["results"]] == [r["fid"] for r in one["results"]]  # the configured space is unchanged
    assert set(report["floor_fids"]) == set(report["tokenizer"]["rfids"]) == {"classifier", "inception"}
    assert report["floor_fids"]["classifier"] == report["floor_fid"] and report["tokenizer"]["rfids"]["classifier"] == report["tokenizer"]["rfid"]
    # class accuracy: conditional AR in [0, 1], unconditional diffusion null; the yardstick on the real test images
    acc = {r["generator"]: r["class_accuracy"] for r in report["results"]}
    assert 0 <= acc["ar"] <= 1 and acc["diffusion"] is None
    assert 0 < report["classifier_test_accuracy"] <= 1 and report["classifier_hash"] == report["extractor_hash"]
    folder = copy / report["results"][0]["samples"]
    assert {"metrics.json", "metrics-inception.json", "class_accuracy.json"} <= {p.name for p in folder.iterdir()}
    md = (copy / "report" / "report.md").read_text()
    assert "| FID inception |" in md and "| class accuracy |" in md and "feature space" in md.split("\n")[2]
    # inception as the configured space: the classifier comes second, and still counts the classes
    ok(invoke("evaluate", copy, *args[:4], "--extractor", "inception", "--inception-weights", weights, "--inception-mode", "fp32"))
    swapped = report_of(copy)
    assert [s["extractor"] for s in swapped["spaces"]] == ["inception", "classifier"]
    for a, b in zip(swapped["results"], report["results"]):
        assert a["fids"] == pytest.approx({"inception": b["fids"]["inception"], "classifier": b["fids"]["classifier"]})
        assert a["class_accuracy"] == b["class_accuracy"]


def row(generator, sampler, fid, other):
    return {"generator": generator, "sampler": sampler, "temperature": 1.0, "steps": None if generator == "ar" else 8,
            "forward_passes": 64, "fid": fid, "fids": {"inception": fid, "classifier": other}, "kid": None,
            "precision": 0.5, "recall": 0.5, "isc": None, "class_accuracy": 0.9 if generator == "ar" else None,
            "images_per_second": 10.0, "samples": f"samples/{generator}"}  # fmt: skip


def test_disagreement_sentence_names_the_best_row_of_each_generator_in_each_space(tmp_path):
    # inception: diffusion's best (20) beats AR (30); classifier: AR (1.0) beats diffusion's best (2.0 on ancestral)
    results = [row("ar", None, 30.0, 1.0), row("diffusion", "maskgit", 20.0, 3.0), row("diffusion", "ancestral", 25.0, 2.0)]
    text = spaces_sentence(results)[0]
    assert text.startswith("**The feature spaces disagree on which generator is better**")
    assert "by inception FID diffusion is better (diffusion maskgit t=1 s=8 20.00, ar t=1 30.00)" in text
    assert "by classifier FID ar is better (ar t=1 1.00, diffusion ancestral t=1 s=8 2.00)" in text
    results[0]["fids"]["classifier"] = 5.0  # now both say diffusion
    assert spaces_sentence(results)[0].startswith("Both feature spaces (inception, classifier) agree that diffusion is better")
    assert spaces_sentence([{**r, "fids": {"inception": r["fid"]}} for r in results]) == []  # one space: nothing to compare
    assert spaces_sentence([r for r in results if r["generator"] == "diffusion"]) == []  # one generator
    report = {
        "run": str(tmp_path), "recipe": "cifar10", "dataset": "cifar10", "extractor": "inception", "extractor_hash": "abc",
        "num_samples": 5000, "reference": "cifar10 test split, all 10000 images", "floor_fid": 3.0, "device": "cpu", "cfg": 1.0,
        "floor_fids": {"inception": 3.0, "classifier": 0.1}, "classifier_test_accuracy": 0.8, "classifier_hash": "def",
        "spaces": [{"extractor": "inception", "hash": "abc", "mode": "fp32", "primary": True},
                   {"extractor": "classifier", "hash": "def", "mode": "fp32", "primary": False}],
        "tokenizer": {"rfid": 9.0, "rfids": {"inception": 9.0, "classifier": 0.5}, "psnr": 22.0, "codebook_usage": 0.9},
        "results": [row("ar", None, 30.0, 1.0), row("diffusion", "maskgit", 20.0, 3.0)],
    }  # fmt: skip
    lines = markdown(report, tmp_path / "report").splitlines()
    assert lines[2].startswith("**The feature spaces disagree")  # the top sentence
    assert any("rFID **9.00** (classifier 0.50)" in line for line in lines)
    assert any("FID **3.00** (classifier 0.10)" in line for line in lines)
    assert any(line.startswith("| ar | – | 1 | 1 | – | 64 | 30.00 | 1.00 |") and "| 0.900 |" in line for line in lines)  # the CFG column: the report's, from before rows named it
    assert results_table(report).columns[2].header == "FID classifier"
