"""CliRunner runs of train ar/diffusion, sample, evaluate, run and bench on a tiny `shapes` run."""

import json
import shutil

import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error, sets

from recipes import stages
from recipes.curves import snapshots
from vqdiff.io import load_tensors

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VQDIFF_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "shapes"
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", path, *sets(TINY)))
    # no `encode` first: training a generator encodes the dataset when tokens are missing
    ok(invoke("train", "ar", "shapes", "--run-dir", path, *sets(TINY)))
    ok(invoke("train", "diffusion", "shapes", "--run-dir", path, *sets(TINY)))
    return path


def test_train_generators_write_bits_per_token(run):
    assert (run / "tokens" / "train.safetensors").exists()
    ar = json.loads((run / "ar" / "metrics.json").read_text())
    diff = json.loads((run / "diffusion" / "metrics.json").read_text())
    assert ar["kind"] == "exact" and diff["kind"] == "elbo"
    assert ar["split"] == diff["split"] == "test"
    assert 0 < ar["bits_per_token"] < 20 and 0 < diff["bits_per_token"] < 40
    assert ar["software"]["torch"] == diff["software"]["torch"] == torch.__version__  # what trained them
    assert ar["autocast"] == diff["autocast"] == "float32"  # shapes trains with precision = auto: fp32 on a CPU
    for kind in ("ar", "diffusion"):
        for f in ("config.json", "model.safetensors", "train_state.pt", "log.jsonl"):
            assert (run / kind / f).exists()


def test_sample_diffusion_with_gif_and_seed(run, tmp_path):
    ok(invoke("sample", run, "--generator", "diffusion", "--num", 6, "--temperature", 1.0, "--steps", 3, "--seed", 1, "--gif"))
    folder = run / "samples" / "diffusion-t1-s3"
    assert (folder / "grid.png").exists() and (folder / "trajectory.gif").exists()
    assert len(list(folder.glob("0*.png"))) == 6
    from PIL import Image

    with Image.open(folder / "trajectory.gif") as gif:
        assert gif.n_frames == 3
    # the same seed gives the same images; another seed other images
    ok(invoke("sample", run, "-g", "diffusion", "-n", 6, "-s", 3, "--seed", 1, "--out", tmp_path / "again"))
    ok(invoke("sample", run, "-g", "diffusion", "-n", 6, "-s", 3, "--seed", 2, "--out", tmp_path / "other"))
    from vqdiff.data import load_tokens

    a, _ = load_tokens(folder / "ids.safetensors")
    b, _ = load_tokens(tmp_path / "again" / "ids.safetensors")
    c, _ = load_tokens(tmp_path / "other" / "ids.safetensors")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_folder_holds_exactly_its_samples(run, tmp_path):
    """`sample --num 3` after `--num 8` into the same folder (as `sample` after `evaluate`): the folder
    names leave out num, so the first call's extra PNGs must not stay beside the new ones."""
    folder = tmp_path / "samples"
    ok(invoke("sample", run, "-g", "diffusion", "-n", 8, "-s", 2, "--out", folder))
    (folder / "metrics.json").write_text('{"key": "the FID of the 8 images", "value": {}}')
    ok(invoke("sample", run, "-g", "diffusion", "-n", 3, "-s", 2, "--out", folder, "--seed", 4))
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    assert not (folder / "metrics.json").exists()  # a cache of other images
    record = json.loads((folder / "sample.json").read_text())
    assert record["key"]["spec"]["num"] == 3 and record["key"]["spec"]["seed"] == 4
    from vqdiff.data import load_tokens

    assert len(load_tokens(folder / "ids.safetensors")[0]) == 3


def test_readme_notebook_block_runs(run, tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- notebook -->")[1].split("<!-- /notebook -->")[0]
    code = block.split("```python")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 6
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(run)
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (8 * 32 + 9 * 2, 8 * 32 + 9 * 2)  # 64 images of 32 px, 2 px padding


def test_sample_ar_options(run):
    result = ok(invoke("sample", run, "-g", "ar", "-n", 4, "--steps", 5, "--top-k", 3, "--class", 1, "--cfg", 2.0))
    assert "ignores --steps" in result.output
    assert (run / "samples" / "ar-t1-s64-k3-c1-g2" / "grid.png").exists()
    ok(invoke("sample", run, "-g", "ar", "-n", 4, "--prefix-rows", 3, "--out", run / "prefix"))
    from vqdiff.data import load_tokens

    ids, _ = load_tokens(run / "prefix" / "ids.safetensors")
    test_ids, _ = load_tokens(run / "tokens" / "test.safetensors")
    assert torch.equal(ids[:, :3], test_ids[:4, :3])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--temperature", "-1"], "temperature must be finite and >= 0 (0 = argmax), got -1.0"),
        (["--steps", "0"], "steps must be in [1, 1024]"),
        (["--generator", "gan"], "unknown generator"),
        (["--class", "7"], "--class must be in [0, 3)"),
        (["--cfg", "inf"], "cfg must be finite and >= 0"),
        (["--temperature", "inf"], "temperature must be finite and >= 0"),
        (["--choice-temperature", "nan"], "choice temperature must be finite and >= 0"),
        (["--steps", "100000"], "steps must be in [1, 1024]"),
        (["--device", "foo"], "--device 'foo'"),
        (["-g", "ar", "--top-p", "nan"], "top-p must be in (0, 1]"),
    ],
)
def test_sample_bad_input(run, args, needle):
    one_line_error(invoke("sample", run, "-n", 2, *args), needle)


def test_truncated_tokenizer_is_named(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = copy / "tokenizer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    result = invoke("sample", copy, "-n", 2)
    one_line_error(result, "tokenizer/model.safetensors", "truncated")
    assert "diffusion" not in result.output  # the good generator is not blamed


def test_sample_while_another_process_writes(run, tmp_path):
    from recipes.lock import run_lock

    with run_lock(run):
        # a reader that writes elsewhere is not blocked; one that writes into the run folder is
        ok(invoke("sample", run, "-n", 2, "--steps", 2, "--out", tmp_path / "elsewhere"))
        assert (tmp_path / "elsewhere" / "grid.png").exists()
        one_line_error(invoke("sample", run, "-n", 2, "--steps", 2), "in use by process")
        one_line_error(invoke("evaluate", run, "--num", 40), "in use by process")
        one_line_error(invoke("encode", run), "in use by process")
        one_line_error(invoke("run", "shapes", "--run-dir", run, *sets(TINY)), "in use by process")


def test_sample_out_is_a_file(run, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(invoke("sample", run, "-n", 2, "--out", f), "is a file")


def test_mismatched_tokenizer_is_refused(run, tmp_path):
    other = tmp_path / "other"
    tiny32 = [s for s in TINY if not s.startswith("tokenizer.codebook_size")] + ["tokenizer.codebook_size=32"]
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", other, *sets(tiny32)))
    shutil.copytree(run / "ar", other / "ar")
    one_line_error(invoke("sample", other, "-g", "ar", "-n", 2), "16-code book", "32 codes")
    # a recipe that states another codebook than the tokenizer's
    one_line_error(
        invoke("train", "diffusion", "shapes", "--run-dir", other, *sets(tiny32), "--set", "diffusion.codebook_size=16"),
        "does not match",
    )


def test_generator_of_a_retrained_tokenizer_is_refused(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "ar" / "tokens.json").write_text('{"tokenizer_hash": "0123456789ab"}')
    one_line_error(invoke("sample", copy, "-g", "ar", "-n", 2), "another tokenizer")
    one_line_error(invoke("train", "ar", "shapes", "--run-dir", copy, *sets(TINY)), "another tokenizer")


def test_evaluate_writes_report_and_reuses_work(run, cache):
    result = ok(invoke("evaluate", run, "--num", 40, "--steps", "2,4", "--extractor", "classifier"))
    report = json.loads((run / "report" / "report.json").read_text())
    for key in ("dataset", "extractor", "num_samples", "floor_fid", "tokenizer", "results"):
        assert key in report
    for key in ("rfid", "psnr", "codebook_usage"):
        assert key in report["tokenizer"]
    assert report["extractor"] == "classifier" and report["extractor_hash"]
    settings = {(r["generator"], r["steps"]) for r in report["results"]}
    assert settings == {("ar", None), ("diffusion", 2), ("diffusion", 4)}
    for r in report["results"]:
        for key in ("generator", "temperature", "steps", "fid", "kid", "precision", "recall", "images_per_second", "forward_passes"):
            assert key in r
        assert r["fid"] >= 0 and r["images_per_second"] > 0
    assert {r["forward_passes"] for r in report["results"] if r["generator"] == "diffusion"} == {2, 4}
    md = (run / "report" / "report.md").read_text()
    assert "classifier" in md and "trajectory.gif" in md
    for f in ("fid_vs_steps.png", "fid_vs_speed.png"):
        assert (run / "report" / f).stat().st_size > 0
    assert "FID" in result.output
    # a re-run reuses the samples and metrics
    stamp = (run / "samples" / "diffusion-t1-s2" / "sample.json").stat().st_mtime_ns
    ok(invoke("evaluate", run, "--num", 40, "--steps", "2,4", "--extractor", "classifier"))
    assert (run / "samples" / "diffusion-t1-s2" / "sample.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "report" / "report.json").read_text())["results"] == report["results"]


def test_sample_and_evaluate_with_samplers(run, cache, tmp_path):
    ok(invoke("sample", run, "-g", "diffusion", "-n", 4, "-s", 3, "--sampler", "ancestral", "--eta", 0.2, "--top-k", 5))
    assert (run / "samples" / "diffusion-t1-s3-k5-ancestral-eta0.2" / "grid.png").exists()
    ok(invoke("sample", run, "-g", "diffusion", "-n", 4, "-s", 3, "--sampler", "halton"))
    assert (run / "samples" / "diffusion-t1-s3-halton" / "grid.png").exists()
    one_line_error(invoke("sample", run, "-g", "diffusion", "-n", 2, "--sampler", "greedy"), "unknown sampler")
    one_line_error(invoke("sample", run, "-g", "diffusion", "-n", 2, "--sampler", "maskgit", "--eta", 0.5), "eta (remasking) is for the ancestral sampler")
    # --sample-schedule: its own folder; naming the trained schedule gives the trained schedule's ids
    ok(invoke("sample", run, "-g", "diffusion", "-n", 4, "-s", 3, "--sample-schedule", "linear"))
    ok(invoke("sample", run, "-g", "diffusion", "-n", 4, "-s", 3, "--sample-schedule", "cosine"))
    ok(invoke("sample", run, "-g", "diffusion", "-n", 4, "-s", 3))
    ids = {f: load_tensors(run / "samples" / f / "ids.safetensors")["ids"] for f in ("diffusion-t1-s3", "diffusion-t1-s3-schedlinear", "diffusion-t1-s3-schedcosine")}
    assert torch.equal(ids["diffusion-t1-s3"], ids["diffusion-t1-s3-schedcosine"])  # shapes trains on cosine
    assert not torch.equal(ids["diffusion-t1-s3"], ids["diffusion-t1-s3-schedlinear"])
    # without a sample schedule the folder's key is the one written before the option existed (reused)
    spec = lambda f: json.loads((run / "samples" / f / "sample.json").read_text())["key"]["spec"]  # noqa: E731
    assert "sample_schedule" not in spec("diffusion-t1-s3") and spec("diffusion-t1-s3-schedlinear")["sample_schedule"] == "linear"
    one_line_error(invoke("sample", run, "-g", "diffusion", "-n", 2, "--sample-schedule", "exp"), "unknown sample schedule")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ok(invoke("evaluate", copy, "--num", 20, "--steps", "2,4", "--sampler", "maskgit,ancestral", "--extractor", "classifier"))
    report = json.loads((copy / "report" / "report.json").read_text())
    settings = {(r["generator"], r["sampler"], r["steps"]) for r in report["results"]}
    assert settings == {("ar", None, None)} | {("diffusion", s, n) for s in ("maskgit", "ancestral") for n in (2, 4)}
    md = (copy / "report" / "report.md").read_text()
    assert "Best diffusion setting: diffusion" in md
    one_line_error(invoke("evaluate", copy, "--sampler", "greedy"), "unknown sampler 'greedy'")
    # top-k / top-p reach both generators' samples, and the report says which were used
    ok(invoke("evaluate", copy, "--num", 20, "--steps", "2", "--sampler", "ancestral", "--top-k", 5, "--top-p", 0.9, "--extractor", "classifier"))
    report = json.loads((copy / "report" / "report.json").read_text())
    assert (report["top_k"], report["top_p"]) == (5, 0.9)
    assert {r["samples"] for r in report["results"]} == {"samples/ar-t1-s64-k5-p0.9", "samples/diffusion-t1-s2-k5-p0.9-ancestral"}
    assert "top-k 5; top-p 0.9" in (copy / "report" / "report.md").read_text()
    assert report["software"]["torch"] == torch.__version__
    assert f"torch {torch.__version__}" in (copy / "report" / "report.md").read_text()
    one_line_error(invoke("evaluate", copy, "--top-p", 0), "top-p must be in (0, 1]")
    one_line_error(invoke("evaluate", copy, "--top-k", -1), "top-k must be >= 1")
    ok(invoke("evaluate", copy, "--num", 20, "--steps", "2", "--generators", "diffusion", "--sample-schedule", "linear", "--extractor", "classifier"))
    report = json.loads((copy / "report" / "report.json").read_text())
    assert [(r["sample_schedule"], r["samples"]) for r in report["results"]] == [("linear", "samples/diffusion-t1-s2-schedlinear")]
    assert "s=2 on linear" in (copy / "report" / "report.md").read_text()
    one_line_error(invoke("evaluate", copy, "--sample-schedule", "exp"), "unknown sample schedule")


def test_learning_curves_from_kept_weights(run, cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    one_line_error(invoke("evaluate", copy, "--num", 20, "--checkpoints"), "keep_every")
    for g in ("ar", "diffusion"):  # retrain both, keeping the weights every 2 steps
        shutil.rmtree(copy / g)
        ok(invoke("train", g, "shapes", "--run-dir", copy, *sets(TINY), "--set", f"{g}.keep_every=2"))
    kept = snapshots(copy, "diffusion")
    assert [s for s, _, _ in kept] == [2, 4, 6] and all(sec > 0 for _, sec, _ in kept)
    assert [s for s, _, _ in snapshots(copy, "ar")] == [2, 4]
    # the last kept weights are the final weights
    final = load_tensors(copy / "diffusion" / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in load_tensors(kept[-1][2]).items())
    ok(invoke("evaluate", copy, "--num", 20, "--steps", "2", "--extractor", "classifier", "--checkpoints"))
    curve = json.loads((copy / "report" / "curve.json").read_text())
    assert {(p["generator"], p["step"]) for p in curve["points"]} == {("ar", 2), ("ar", 4), ("diffusion", 2), ("diffusion", 4), ("diffusion", 6)}
    assert all(p["fid"] >= 0 and 0 <= p["recall"] <= 1 for p in curve["points"])
    # held-out and train bits per token of each snapshot; the last AR one is the final model's
    assert all(p["test_bits_per_token"] > 0 and p["train_bits_per_token"] > 0 for p in curve["points"])
    ar_last = max((p for p in curve["points"] if p["generator"] == "ar"), key=lambda p: p["step"])
    ar_metrics = json.loads((copy / "ar" / "metrics.json").read_text())
    assert ar_last["test_bits_per_token"] == pytest.approx(ar_metrics["bits_per_token"], rel=1e-5)
    assert curve["diffusion_sample_schedule"] is None  # shapes decodes on its trained schedule
    # the guidance each point sampled with is recorded (the plot's title names it): shapes' generators' own, 1
    assert curve["cfg"] is None and {p["cfg"] for p in curve["points"]} == {1.0}
    assert (copy / "report" / "learning_curve.png").stat().st_size > 0
    assert "learning_curve.png" in (copy / "report" / "report.md").read_text()
    # snapshots give other samples than the final weights: the curve is not one point repeated
    fids = [p["fid"] for p in curve["points"] if p["generator"] == "diffusion"]
    assert len(set(fids)) > 1
    # the curves may take fewer samples than the report (evaluate.curve_num)
    toml = copy / "recipe.toml"
    toml.write_text(toml.read_text().replace("curve_num = 0\n", "curve_num = 12\n"))
    ok(invoke("evaluate", copy, "--num", 20, "--steps", "2", "--extractor", "classifier", "--checkpoints"))
    assert json.loads((copy / "report" / "curve.json").read_text())["num_samples"] == 12
    assert json.loads((copy / "report" / "report.json").read_text())["num_samples"] == 20


def test_recipe_sampler_keys_are_checked(tmp_path):
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "x", "--set", "diffusion.sampler=greedy"), "unknown sampler 'greedy'")
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "x", "--set", "evaluate.samplers=['x']"), "unknown sampler 'x'")
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "x", "--set", "diffusion.sample_schedule=exp"), "unknown sample schedule 'exp'")


def test_evaluate_bad_input(run):
    one_line_error(invoke("evaluate", run, "--temperatures", "-1"), "temperature must be finite and >= 0 (0 = argmax), got -1.0")
    one_line_error(invoke("evaluate", run, "--generators", "gan"), "unknown generator")
    one_line_error(invoke("evaluate", run, "--extractor", "vgg"), "unknown extractor")
    one_line_error(invoke("evaluate", run, "--steps", "5000"), "steps must be in [1, 1024]")
    one_line_error(invoke("evaluate", run, "--temperatures", "inf"), "temperature must be finite and >= 0")


def test_run_resumes_after_interruption(tmp_path, cache, monkeypatch):
    path = tmp_path / "run"
    real_train = stages.train

    def killed_in_diffusion(model, data, cfg, out_dir, **kw):
        if "diffusion" in str(out_dir):
            real_train(model, data, cfg, out_dir, stop_after=3, **kw)
            raise KeyboardInterrupt
        return real_train(model, data, cfg, out_dir, **kw)

    monkeypatch.setattr(stages, "train", killed_in_diffusion)
    result = invoke("run", "shapes", "--run-dir", path, *sets(TINY))
    assert result.exit_code == 130 and "resume" in result.output
    assert (path / "ar" / "metrics.json").exists() and not (path / "diffusion" / "metrics.json").exists()
    done = {k: (path / k / "model.safetensors").stat().st_mtime_ns for k in ("tokenizer", "ar")}
    tokens = (path / "tokens" / "train.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(stages, "train", real_train)
    ok(invoke("run", "shapes", "--run-dir", path, *sets(TINY)))
    assert {k: (path / k / "model.safetensors").stat().st_mtime_ns for k in ("tokenizer", "ar")} == done
    assert (path / "tokens" / "train.safetensors").stat().st_mtime_ns == tokens
    steps = [json.loads(line)["step"] for line in (path / "diffusion" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6 and len(steps) == len(set(steps))
    assert json.loads((path / "diffusion" / "config.json").read_text())["trained_steps"] == 6
    assert (path / "report" / "report.json").exists()


def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    tiny = sets([s for s in TINY if not s.startswith(("data", "evaluate"))])
    result = ok(invoke("bench", "shapes", "--quick", "--compare", "--out", out, *tiny))
    assert "new/today" in result.output and "% of peak" in result.output
    result = json.loads(out.read_text())
    rows = result["training"] + result["sampling"] + result["features"]
    stages = {(r["what"], r["path"], r.get("cfg")) for r in rows}
    for kind in ("tokenizer", "ar", "diffusion"):
        assert (kind, "today", None) in stages and (kind, "new", None) in stages
    for kind in ("sample-ar", "sample-diffusion"):
        assert {(kind, p, c) for p in ("today", "new") for c in (1.0, 3.0)} <= stages
    assert ("decode", "new", None) in stages and any(r["what"] == "features" for r in rows)
    # every stage: FLOPs, their rate and its share of the peak in the stage's own precision
    for r in rows:
        assert r["flop_per_call"] > 0 and r["achieved_flops"] > 0, r
        assert r["fraction_of_peak"] == r["achieved_flops"] / result["matmul_peak_flops"][r["dtype"]]
    assert all(r["memory_estimate_bytes"] > 0 for r in result["training"])
    ratios = {(r["what"], r["cfg"]) for r in result["speedups"]}
    assert ("ar", None) in ratios and ("sample-diffusion", 3.0) in ratios
    assert all(r["time_ratio"] == r["new_seconds"] / r["today_seconds"] for r in result["speedups"])


def test_bench_times_grouped_generators_with_a_depth_head(tmp_path):  # the cifar10 recipe's generators
    out = tmp_path / "bench.json"
    grouped = ["tokenizer.downsample=2", "ar.group=2", "ar.depth_head=1", "diffusion.group=2"]
    tiny = sets([s for s in TINY if not s.startswith(("data", "evaluate"))] + grouped)
    ok(invoke("bench", "shapes", "--quick", "--out", out, *tiny))
    result = json.loads(out.read_text())
    stages = {r["what"] for r in result["training"] + result["sampling"]}
    assert {"ar", "diffusion", "sample-ar", "sample-diffusion"} <= stages
    assert all(r["flop_per_call"] > 0 for r in result["training"] + result["sampling"])


def test_bench_profile_prints_the_top_operators():
    tiny = sets([s for s in TINY if not s.startswith(("data", "evaluate"))])
    result = ok(invoke("bench", "shapes", "--profile", "ar", *tiny))
    assert "Self CPU" in result.output and "aten::" in result.output
    bad = invoke("bench", "shapes", "--profile", "everything")
    assert bad.exit_code != 0 and "--profile must be one of" in " ".join(bad.output.split())


def test_evaluate_inception_offline_is_one_line(run, tmp_path, monkeypatch):
    import evaluation.extractors as extractors

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    monkeypatch.delenv("VQDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(extractors, "_reachable", lambda *args, **kwargs: False)  # offline, whatever the machine
    one_line_error(invoke("evaluate", run, "--extractor", "inception"), "--inception-weights", "VQDIFF_INCEPTION_WEIGHTS")
    one_line_error(
        invoke("evaluate", run, "--extractor", "inception", "--inception-weights", tmp_path / "nope.pth"), "nope.pth"
    )


def test_temperature_zero_is_argmax_and_one_message_in_every_layer(run):
    import re

    from recipes.run import Run
    from vqdiff.options import OptionError
    from vqdiff.pipeline import sample_ids

    # two samples of one class at temperature 0: the argmax path, so the same grid twice
    ok(invoke("sample", run, "-g", "ar", "-n", 2, "--temperature", 0, "--class", 1))
    ids = load_tensors(run / "samples" / "ar-t0-s64-c1" / "ids.safetensors")["ids"]
    assert torch.equal(ids[0], ids[1])
    message = "temperature must be finite and >= 0 (0 = argmax), got -1.0"
    one_line_error(invoke("sample", run, "-g", "ar", "-n", 2, "--temperature", -1), message)
    one_line_error(invoke("evaluate", run, "--temperatures", -1), message)
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", run.parent / "x", "--set", "evaluate.temperatures=[-1.0]"), message)
    for kind in ("ar", "diffusion"):
        with pytest.raises(OptionError, match=re.escape(message)):
            sample_ids(Run(run).load_generator(kind, "cpu"), 2, steps=2, temperature=-1.0)
