"""`vqdiff run` under torchrun (2 CPU processes, gloo) writes what one process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, invoke, ok, sets

TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_run_under_torchrun_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VQDIFF_CACHE": str(tmp_path / "cache")}
    ddp = tmp_path / "ddp"
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "-m", "recipes", "run", "shapes", "--run-dir", str(ddp), *sets(TINY)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run shapes finished") == 1  # rank 0 alone prints
    one = tmp_path / "one"
    ok(invoke("run", "shapes", "--run-dir", one, *sets(TINY)))
    for stage in ("tokenizer", "ar", "diffusion"):
        a = [json.loads(line) for line in (ddp / stage / "log.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (one / stage / "log.jsonl").read_text().splitlines()]
        assert [e["step"] for e in a] == [e["step"] for e in b]  # one writer: no line twice
        assert [e["loss"] for e in a] == pytest.approx([e["loss"] for e in b], rel=1e-4), stage
    ra, rb = (json.loads((r / "report" / "report.json").read_text()) for r in (ddp, one))
    assert [r["fid"] for r in ra["results"]] == pytest.approx([r["fid"] for r in rb["results"]], rel=1e-4)
