"""`vqdiff edit` and `vqdiff evaluate --edits` on a tiny `shapes` run (issue 23)."""

import json

import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error, sets

from vqdiff.checkpoint import load_model
from vqdiff.data import from_uint8, load_tokens, make_shapes, to_uint8

SIZE, GRID, PATCH = 32, 8, 4  # the shapes recipe: 32x32 images, downsample 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("VQDIFF_CACHE", str(cache))
    path = tmp_path_factory.mktemp("runs") / "shapes"
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", path, *sets(TINY)))
    ok(invoke("train", "ar", "shapes", "--run-dir", path, *sets(TINY)))
    ok(invoke("train", "diffusion", "shapes", "--run-dir", path, *sets(TINY)))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Two shapes images as PNGs at the run's image size: uint8 [2 3 32 32] and their paths."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("inputs")
    images = make_shapes(2, SIZE, seed=5).images_uint8(torch.arange(2))
    paths = []
    for i, a in enumerate(images.permute(0, 2, 3, 1).numpy()):
        paths.append(folder / f"in{i}.png")
        Image.fromarray(a).save(paths[-1])
    return images, paths


def read_png(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def kept_tokens(folder):
    return torch.tensor(json.loads((folder / "edit.json").read_text())["kept_tokens"], dtype=torch.bool)


def test_edit_round_trips_pngs_and_keeps_the_kept_tokens(run, pngs, tmp_path):
    images, paths = pngs
    folder = tmp_path / "pasted"
    ok(invoke("edit", run, *paths, "--region", "8,8,20,16", "--steps", 3, "--seed", 1, "--out", folder, "--paste-back", "--gif"))
    outputs = torch.stack([read_png(folder / f"{i:06d}.png") for i in range(2)])
    assert outputs.shape == images.shape  # [2 3 32 32]
    keep = kept_tokens(folder)
    expected = torch.ones(GRID, GRID, dtype=torch.bool)
    expected[2:4, 2:5] = False  # x 8..19 -> token columns 2..4, y 8..15 -> rows 2..3
    assert torch.equal(keep, expected)
    tokenizer = load_model(run / "tokenizer", device="cpu")
    known = tokenizer.encode(from_uint8(images))
    ids, _ = load_tokens(folder / "ids.safetensors")
    assert torch.equal(ids[:, keep], known[:, keep])  # the kept token ids are the input's
    pixels = torch.ones(SIZE, SIZE, dtype=torch.bool)
    pixels[8:16, 8:20] = False
    assert torch.equal(outputs[:, :, pixels], images[:, :, pixels])  # paste-back: the kept pixels are the input's
    record = json.loads((folder / "edit.json").read_text())
    assert record["inputs"] == [str(p) for p in paths] and record["region"] == "8,8,20,16" and record["paste_back"]
    with __import__("PIL").Image.open(folder / "before_after.png") as im:
        assert im.width >= 512 and im.height >= 512  # two rows of two 32-pixel images, upscaled to be seen
    with __import__("PIL").Image.open(folder / "trajectory.gif") as gif:
        assert gif.n_frames == 3

    # without paste-back the output is the decoder's rendering of the ids: the kept ids as they are, the
    # regenerated ones new. The tokenizer's decoder has GroupNorm layers, whose statistics are taken over
    # the whole image, so every pixel depends on every token: the kept pixels are not bit-equal to the
    # reconstruction of the input anywhere, and no region is far enough for that. What holds exactly is
    # that the kept tokens are the input's (above) and the output is decode(ids).
    plain = tmp_path / "plain"
    ok(invoke("edit", run, *paths, "--region", "8,8,20,16", "--steps", 3, "--seed", 1, "--out", plain))
    ids2, _ = load_tokens(plain / "ids.safetensors")
    assert torch.equal(ids2, ids)  # the same seed, the same tokens
    decoded = to_uint8(tokenizer.decode(ids2).detach())
    assert torch.equal(torch.stack([read_png(plain / f"{i:06d}.png") for i in range(2)]), decoded)


def test_edit_outpaints_and_class_edits(run, pngs, tmp_path):
    _, paths = pngs
    # a class edit: keep the centre, regenerate a 2-token border under another class
    ok(invoke("edit", run, paths[0], "--outpaint", "border", "--class", 1, "--cfg", 2, "--steps", 2, "--out", tmp_path / "border"))
    assert json.loads((tmp_path / "border" / "edit.json").read_text())["class"] == 1
    keep = kept_tokens(tmp_path / "border")
    assert not keep[:2].any() and not keep[:, -2:].any() and keep[2:6, 2:6].all()
    # ar: the bottom half is a raster suffix
    ok(invoke("edit", run, paths[0], "--outpaint", "bottom", "-g", "ar", "--out", tmp_path / "ar"))
    assert kept_tokens(tmp_path / "ar")[:4].all() and not kept_tokens(tmp_path / "ar")[4:].any()
    # a block in the middle of the grid is no raster suffix: the ar generator refuses it in one line
    one_line_error(invoke("edit", run, paths[0], "--region", "8,8,20,16", "-g", "ar", "--out", tmp_path / "x"), "suffix in raster order")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--region", "8,8,8,16"), "empty or outside"),
        (("--region", "8,8,40,16"), "empty or outside"),
        (("--region", "-1,0,4,4"), "empty or outside"),
        (("--region", "1,2,3"), "x0,y0,x1,y1"),
        (("--region", "0,0,32,32"), "nothing is kept"),
        (("--outpaint", "left", "--outpaint-size", "8"), "outpaint-size"),
        (("--outpaint", "middle"), "--outpaint must be"),
        ((), "exactly one"),
        (("--region", "0,0,4,4", "--outpaint", "left"), "exactly one"),
        (("--region", "0,0,4,4", "--class", "99"), "--class must be in"),
    ],
)
def test_bad_regions_give_one_line(run, pngs, tmp_path, args, needle):
    one_line_error(invoke("edit", run, pngs[1][0], *args, "--out", tmp_path / "bad"), needle)
    assert not (tmp_path / "bad" / "edit.json").exists()


def test_an_all_black_mask_keeps_everything_and_is_refused(run, pngs, tmp_path):
    from PIL import Image

    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    one_line_error(invoke("edit", run, pngs[1][0], "--mask", tmp_path / "black.png"), "edits no pixel")
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (0, 0, 16, 64))  # the left quarter at 64 px: the left 2 token columns at 32 px
    white.save(tmp_path / "left.png")
    ok(invoke("edit", run, pngs[1][0], "--mask", tmp_path / "left.png", "-s", 2, "--out", tmp_path / "m"))
    keep = kept_tokens(tmp_path / "m")
    assert not keep[:, :2].any() and keep[:, 2:].all()


def test_evaluate_edits(run):
    ok(invoke("evaluate", run, "--edits", "--num", 8, "--steps", 2))
    report = json.loads((run / "report" / "edits.json").read_text())
    got = {(r["generator"], r["task"]) for r in report["results"]}
    assert got == {("ar", "bottom"), ("diffusion", "centre"), ("diffusion", "bottom"), ("diffusion", "border")}
    for r in report["results"]:
        assert r["kept_token_exactness"] == 1.0 and r["num"] == 8
        assert r["fid"] >= 0 and r["psnr_kept_vs_input"] > 0 and r["psnr_kept_vs_reconstruction"] > 0
    md = (run / "report" / "edits.md").read_text()
    assert "| diffusion | border |" in md
    assert report["extractor"] and f"hash `{report['extractor_hash']}`" in md  # the feature space the FIDs are in
    before = (run / "report" / "edits" / "diffusion-centre.json").stat().st_mtime_ns
    ok(invoke("evaluate", run, "--edits", "--num", 8, "--steps", 2))  # cached: nothing measured again
    assert (run / "report" / "edits" / "diffusion-centre.json").stat().st_mtime_ns == before
