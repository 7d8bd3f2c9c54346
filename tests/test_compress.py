"""The .vqd codec: exact round trips, the checks on the header, and the CLI commands on a tiny run."""

import json
import math
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import TINY, invoke, ok, one_line_error, sets

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.compress import (
    TOTAL,
    CompressError,
    compress_ids,
    decompress_ids,
    encode_grid,
    frequencies,
    read_header,
    weights_hash,
)


def tiny_ar(seed=0, num_classes=3, k=16, grid=(4, 5), sharpen=1.0):
    torch.manual_seed(seed)
    cfg = ARConfig(codebook_size=k, grid_h=grid[0], grid_w=grid[1], num_classes=num_classes, dim=32, depth=2, heads=2)
    ar = ARTransformer(cfg).eval()
    with torch.no_grad():  # random init predicts nearly uniform ids; a sharper head gives a real prior
        ar.trunk.head.weight.mul_(sharpen)
    return ar


def grids(ar, n, seed=0):
    """Half sampled from the model (likely ids), half uniform (unlikely ids): long [n h w]."""
    g = torch.Generator().manual_seed(seed)
    cfg = ar.cfg
    sampled = ar.sample(n - n // 2, generator=g)
    uniform = torch.randint(cfg.codebook_size, (n // 2, cfg.grid_h, cfg.grid_w), generator=g)
    return torch.cat([sampled, uniform])


# ------------------------------------------------------------------ library


@pytest.mark.parametrize("num_classes,k,grid", [(3, 16, (4, 5)), (0, 300, (3, 3))])
def test_round_trip_is_exact(num_classes, k, grid):
    ar = tiny_ar(num_classes=num_classes, k=k, grid=grid, sharpen=20.0)
    ids = grids(ar, 12)
    ids[0] = 0  # the lowest ids everywhere: the coder may need no payload bytes at all
    ids[1] = k - 1
    for i, grid_ids in enumerate(ids):
        label = (i % num_classes if i % 2 else None) if num_classes else None
        data = compress_ids(ar, grid_ids, label)
        back, back_label = decompress_ids(ar, data)
        assert back.dtype == torch.long and torch.equal(back, grid_ids), i
        assert back_label == label
        assert read_header(data).label == label


def test_frequencies_are_integers_that_keep_every_id():
    logits = torch.tensor([0.0, 1.0, -80.0, 50.0, 2.0, 2.0])  # one id near certain, one near impossible
    freq = frequencies(logits)
    assert freq.dtype == np.int64 and freq.sum() == TOTAL
    assert freq.min() >= 1 and int(np.argmax(freq)) == 3
    flat = frequencies(torch.zeros(8))
    assert flat.sum() == TOTAL and flat.max() - flat.min() <= 8  # uniform stays near uniform


def test_same_grid_gives_the_same_bytes_whatever_the_thread_count():
    ar = tiny_ar(sharpen=20.0)
    ids = grids(ar, 2)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = compress_ids(ar, ids, 1)
        assert torch.get_num_threads() == 2  # the coder restores the caller's setting
    finally:
        torch.set_num_threads(before)
    b = compress_ids(ar, ids, 1)
    assert a == b
    assert compress_ids(ar, ids, 2) != a  # the class is part of the model, so of the bytes


def test_real_bits_track_the_model_bits():
    # on ids the sharp model finds likely, the payload is -log2 p(ids) plus under a byte per file
    ar = tiny_ar(sharpen=50.0)
    g = torch.Generator().manual_seed(1)
    ids = ar.sample(16, generator=g)
    model_bits = ar.bits_per_token({"ids": ids})["bits_per_token"] * ids.numel()
    encoded = [encode_grid(ar, x) for x in ids]
    assert all(e.data == compress_ids(ar, x) for e, x in zip(encoded, ids))
    ideal_bits = sum(e.ideal_bits for e in encoded)
    payload_bits = sum(8 * len(read_header(e.data).payload) for e in encoded)
    assert model_bits < 0.5 * math.log2(ar.cfg.codebook_size) * ids.numel()  # the prior is informative
    assert ideal_bits == pytest.approx(model_bits, rel=0.01)  # quantising the probabilities costs little
    assert ideal_bits - 8 * len(ids) <= payload_bits <= ideal_bits + 16 * len(ids)  # termination: ~ a byte per file


def test_other_weights_are_refused():
    ar, other = tiny_ar(seed=0), tiny_ar(seed=1)
    data = compress_ids(ar, grids(ar, 2)[0], tokenizer_hash=b"toka")
    with pytest.raises(CompressError, match="other AR weights"):
        decompress_ids(other, data, tokenizer_hash=b"toka")
    with pytest.raises(CompressError, match="another tokenizer"):
        decompress_ids(ar, data, tokenizer_hash=b"tokb")
    assert weights_hash(ar) == weights_hash(tiny_ar(seed=0)) != weights_hash(other)


def test_a_model_computing_other_probabilities_is_caught_by_the_ids_checksum():
    # what a machine with other float kernels would do: same hash, other probabilities
    ar, other = tiny_ar(seed=0, sharpen=20.0), tiny_ar(seed=1, sharpen=20.0)
    data = compress_ids(ar, grids(ar, 2)[0])
    with pytest.raises(CompressError, match="computes the AR model's probabilities differently"):
        decompress_ids(other, data, ar_hash=weights_hash(ar))


def test_header_is_small_and_round_trips():
    ar = tiny_ar()
    data = compress_ids(ar, grids(ar, 2)[0], 2, tokenizer_hash=b"toka")
    header = read_header(data)
    assert header.grid == (4, 5) and header.codebook_size == 16 and header.label == 2
    assert header.tokenizer_hash == b"toka" and header.ar_hash == weights_hash(ar)
    assert header.overhead == len(data) - len(header.payload) == 17 + 6  # 1-byte varints (k = 16) here
    big = tiny_ar(num_classes=0, k=300, grid=(3, 3))  # k = 300 takes a 2-byte varint
    assert read_header(compress_ids(big, torch.zeros(3, 3, dtype=torch.long))).codebook_size == 300


def test_truncated_or_corrupt_files_give_one_line_errors():
    ar = tiny_ar(sharpen=20.0)
    data = compress_ids(ar, grids(ar, 2, seed=3)[1])  # uniform ids: a payload of several bytes
    start = read_header(data).overhead - 6
    assert len(data) > start + 6 + 4
    cases = {data[:cut]: "truncated" for cut in (1, 2, 3, 4, 8, 12, start - 1, start, len(data) - 1)}
    cases.update({
        b"PK\x03\x04" + data[4:]: "not a .vqd file",
        b"": "not a .vqd file",
        data + b"\0": "corrupt",
        data[:3] + bytes([9]) + data[4:]: "format version 9",
    })  # fmt: skip
    for i in (5, start + 1, len(data) - 3):  # a header field, the payload, the ids' checksum
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        cases[bytes(flipped)] = "corrupt|other AR weights"
    payload_only = bytearray(data)
    payload_only[start + 1] ^= 0x10  # the payload, with the frame check made to match: the ids' check catches it
    payload_only[-2:] = struct.pack("<H", zlib.crc32(bytes(payload_only[:-2])) & 0xFFFF)
    cases[bytes(payload_only)] = "fail their checksum|corrupt"
    for bad, needle in cases.items():
        with pytest.raises(CompressError, match=needle) as e:
            decompress_ids(ar, bad)
        assert "\n" not in str(e.value)


def test_a_payload_the_coder_cannot_read_is_an_error_not_a_crash():
    ar = tiny_ar(sharpen=20.0)
    data = compress_ids(ar, grids(ar, 2)[0])
    start = read_header(data).overhead - 6
    payload = b"\xff" * 12  # all-ones words: no valid range-coder state, constriction asserts
    body = data[: start - 1] + bytes([len(payload)]) + payload + data[-6:-2]  # the ids' checksum, kept
    with pytest.raises(CompressError, match="corrupt|fail their checksum") as e:
        decompress_ids(ar, body + struct.pack("<H", zlib.crc32(body) & 0xFFFF))
    assert "\n" not in str(e.value)


def test_bad_arguments_are_refused():
    ar = tiny_ar()
    ids = torch.zeros(4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="ids must be"):
        compress_ids(ar, ids[:3])
    with pytest.raises(ValueError, match="ids must be in"):
        compress_ids(ar, ids + 16)
    with pytest.raises(ValueError, match="class must be in"):
        compress_ids(ar, ids, 3)
    with pytest.raises(ValueError, match="unconditional"):
        compress_ids(tiny_ar(num_classes=0), ids, 0)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        compress_ids(tiny_ar().to(torch.bfloat16), ids)


# ------------------------------------------------------------------ CLI on a tiny shapes run

TINY_AR = [s for s in TINY if s.startswith(("data.", "tokenizer.", "ar."))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "shapes"
    mp = pytest.MonkeyPatch()
    mp.setenv("VQDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
    ok(invoke("train", "tokenizer", "shapes", "--run-dir", path, *sets(TINY_AR)))
    ok(invoke("train", "ar", "shapes", "--run-dir", path, *sets(TINY_AR)))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def pngs(run, tmp_path_factory):
    from recipes.codec import png_bytes
    from vqdiff.data import make_shapes

    folder = tmp_path_factory.mktemp("pngs")
    images = make_shapes(3, 32, seed=5).uint8
    for i, im in enumerate(images):
        (folder / f"img{i}.png").write_bytes(png_bytes(im))
    return sorted(folder.glob("*.png")), images


def test_cli_round_trip_gives_the_tokenizer_reconstruction(run, pngs, tmp_path, monkeypatch):
    from recipes.run import Run
    from recipes.codec import pil_load
    from vqdiff.data import from_uint8, to_uint8

    files, images = pngs
    result = ok(invoke("compress", run, *files, "--out", tmp_path / "vqd", "--class", 1))
    assert "bits per token" in result.output
    vqd = sorted((tmp_path / "vqd").glob("*.vqd"))
    assert [p.stem for p in vqd] == [p.stem for p in files]
    assert all(read_header(p.read_bytes()).label == 1 for p in vqd)
    ok(invoke("decompress", run, *vqd, "--out", tmp_path / "png"))
    # the form, FILES... --out DIR: --run names the run, or the run under runs/ whose weights match
    ok(invoke("decompress", *vqd, "--out", tmp_path / "png-run", "--run", run))
    cwd = tmp_path / "cwd"
    (cwd / "runs").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    one_line_error(invoke("decompress", *vqd, "--out", tmp_path / "x"), "--run RUN")
    (cwd / "runs" / "found").symlink_to(run)
    ok(invoke("decompress", *vqd, "--out", tmp_path / "png-found"))
    for name in ("png-run", "png-found"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in (tmp_path / "png").iterdir())
        for p in (tmp_path / name).iterdir():
            assert p.read_bytes() == (tmp_path / "png" / p.name).read_bytes()
    tokenizer = Run(run).load_tokenizer("cpu")
    expected = to_uint8(tokenizer.decode(tokenizer.encode(from_uint8(images))))
    for i, f in enumerate(files):
        got = pil_load((tmp_path / "png" / f"{f.stem}.png").read_bytes(), channels=3)
        assert torch.equal(got, expected[i])


def test_cli_same_image_twice_gives_the_same_bytes(run, pngs, tmp_path):
    files, _ = pngs
    ok(invoke("compress", run, files[0], "--out", tmp_path / "a"))
    ok(invoke("compress", run, files[0], "--out", tmp_path / "b"))
    a, b = (tmp_path / d / f"{files[0].stem}.vqd" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    assert read_header(a.read_bytes()).label is None  # no --class: the null class


def test_cli_refuses_other_weights_and_broken_files(run, pngs, tmp_path):
    from vqdiff.checkpoint import load_model, save_model

    files, _ = pngs
    ok(invoke("compress", run, files[0], "--out", tmp_path))
    vqd = tmp_path / f"{files[0].stem}.vqd"
    other = tmp_path / "other"
    shutil.copytree(run, other)
    ar = load_model(other / "ar", "ar")
    with torch.no_grad():
        ar.trunk.head.bias.add_(0.01)
    save_model(ar, other / "ar")
    one_line_error(invoke("decompress", other, vqd, "--out", tmp_path / "x"), "other AR weights")
    cut = tmp_path / "cut.vqd"
    cut.write_bytes(vqd.read_bytes()[:-3])
    one_line_error(invoke("decompress", run, cut, "--out", tmp_path / "x"), "cut.vqd", "truncated")
    one_line_error(invoke("decompress", run, tmp_path / "missing.vqd", "--out", tmp_path / "x"), "no such file")
    one_line_error(invoke("compress", run, files[0], "--out", tmp_path, "--class", 99), "--class must be in")


def test_bench_compress_quick(run, tmp_path):
    path = tmp_path / "bench.json"
    result = ok(invoke("bench", "compress", run, "--quick", "--out", path))
    assert "WebP" in result.output and "JPEG" in result.output
    report = json.loads(path.read_text())
    n = report["num_images"]
    assert n == 16 and [r["conditioning"] for r in report["vqdiff"]] == ["class", "null class"]
    for r in report["vqdiff"]:
        assert r["round_trip_exact"] == n
        assert r["bytes_per_image"] == pytest.approx(r["payload_bytes_per_image"] + r["header_bytes"])
        assert r["bits_per_token"] > 0 and r["model_bits_per_token"] > 0
    assert 1 <= report["jpeg"]["quality"] <= 100 and report["png"]["psnr"] is None
    # a real sub-command: Typer's usage errors (exit 2) name what is missing or extra
    missing = invoke("bench", "compress")
    assert missing.exit_code == 2 and "Missing argument" in missing.output
    extra = invoke("bench", "quickstart", run)
    assert extra.exit_code == 2 and "unexpected extra argument" in extra.output
    assert "compress" in invoke("bench", "--help").output
