"""Bad input, crashes and shared run folders (issue 10; the table is docs/reliability.md)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TOKENIZER, invoke, one_line_error, sets

from recipes import stages
from recipes.run import Run
from recipes.lock import LOCK_FILE, RunFolderError, run_lock
from recipes.recipe import load_recipe
from vqdiff.checkpoint import STATE_FILE, CheckpointError, load_train_state
from vqdiff.data import load_dataset
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer
from vqdiff.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    cfg = TokenizerConfig(channels=3, width=8, max_width=16, codebook_size=16, codebook_dim=4, kmeans_init=False)
    return VQTokenizer(cfg)


# ------------------------------------------------------------------ no code runs from a run folder


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_crafted_train_state_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "MARKER"
    state = {"step": 1, "model": _Evil(marker)}
    if writer == "torch.save":
        torch.save(state, tmp_path / STATE_FILE)
    else:
        with open(tmp_path / STATE_FILE, "wb") as f:
            pickle.dump(state, f)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_train_state(tmp_path)
    assert "\n" not in str(e.value) and STATE_FILE in str(e.value)
    # the resume path of the training loop refuses it too
    with pytest.raises(CheckpointError, match="refused"):
        train(tiny_tokenizer(), load_dataset("shapes", limit=8), TrainConfig(steps=1, batch_size=4), tmp_path)
    assert not marker.exists()


def test_crafted_train_state_is_one_line_in_the_cli(tmp_path):
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    marker = tmp_path / "MARKER"
    torch.save({"step": 1, "model": _Evil(marker)}, run / "tokenizer" / STATE_FILE)
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", run, *sets(TINY_TOKENIZER)), "refused")
    assert not marker.exists()


def test_truncated_train_state_and_corrupt_config_are_one_line(tmp_path):
    from vqdiff.checkpoint import load_model

    data = load_dataset("shapes", limit=8)
    train(tiny_tokenizer(), data, TrainConfig(steps=2, batch_size=4, warmup_steps=1), tmp_path)
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_train_state(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_model(tmp_path)


def test_a_real_train_state_loads_with_weights_only(tmp_path):
    data = load_dataset("shapes", limit=8)
    train(tiny_tokenizer(), data, TrainConfig(steps=2, batch_size=4, warmup_steps=1, ema=0.5), tmp_path)
    state = load_train_state(tmp_path)
    assert state["step"] == 2 and state["optimizer"]["state"] and state["ema"] is not None


# ------------------------------------------------------------------ one process per run folder


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        result = invoke("train", "tokenizer", "shapes", "--run-dir", run, *sets(TINY_TOKENIZER))
        one_line_error(result, str(run), f"process {os.getpid()}")
        assert not (run / "tokenizer").exists() and not (run / "recipe.toml").exists()
    # released: the next writer gets it
    with run_lock(run):
        pass


def test_lock_held_by_another_process(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = "import sys, time; from pathlib import Path; from recipes.lock import run_lock\n"
    code += "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):  # the kernel dropped the lock with the killed process: no stale lock
        pass


def test_concurrent_write_recipe_and_stale_temp_files(tmp_path):
    recipe = load_recipe("shapes")
    errors = []

    def write() -> None:
        try:
            for _ in range(30):
                Run(tmp_path).write_recipe(recipe)
        except Exception as e:  # the shared `recipe.toml.tmp` raised FileNotFoundError here
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert load_recipe(str(tmp_path / "recipe.toml")).sections == recipe.sections
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # temp files of a killed writer are removed when the next writer takes the lock
    (tmp_path / "tokenizer").mkdir()
    stale = [tmp_path / ".recipe.toml.abc123.tmp", tmp_path / "tokenizer" / ".model.safetensors.x1.tmp"]
    for p in stale:
        p.write_text("half")
    with run_lock(tmp_path):
        assert not any(p.exists() for p in stale)
    assert (tmp_path / "recipe.toml").exists()


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the file a user gets must have open()'s mode."""
    from vqdiff.io import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    Run(tmp_path).write_recipe(load_recipe("shapes"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    expected = plain.stat().st_mode & 0o777
    assert expected != 0o600 or os.umask(os.umask(0)) == 0o177  # the check means something here
    for name in ("a.json", "recipe.toml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# ------------------------------------------------------------------ check everything before any work


@pytest.mark.parametrize(
    "item,needle",
    [
        ("diffusion.corruption=foo", "[diffusion] corruption"),
        ("ar.dim=33", "[ar] dim (33) must be divisible by heads"),
        ("tokenizer.steps=0", "[tokenizer] steps must be >= 1"),
        ("diffusion.steps=0", "[diffusion] steps must be >= 1"),
        ("ar.checkpoint_every=0", "[ar] checkpoint_every must be >= 1"),
        ("tokenizer.log_every=0", "[tokenizer] log_every must be >= 1"),
        ("data.image_size=0", "[data] image_size must be >= 1"),
        ("data.image_size=30", "not divisible by downsample"),
        ("data.limit_train=-1", "[data] limit_train must be >= 0"),
        ("data.dataset=foo", "unknown dataset 'foo'"),
    ],
)
def test_bad_recipe_fails_before_any_stage(tmp_path, item, needle):
    run = tmp_path / "run"
    one_line_error(invoke("run", "shapes", "--run-dir", run, "--set", item), needle)
    assert not run.exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ one line, never a traceback


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", f), "is a file")
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", f / "below"), "cannot create run folder")
    one_line_error(invoke("encode", f), "is a file")


def test_read_only_run_folder(tmp_path, monkeypatch):
    import recipes.lock

    run = tmp_path / "run"
    run.mkdir()

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(recipes.lock.os, "open", denied)  # root ignores chmod: refuse the way a read-only folder does
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", run), "not writable", "Permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_for_real(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", run), "not writable")
    finally:
        run.chmod(0o755)


def test_write_error_mid_stage_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "somewhere/model.safetensors")

    monkeypatch.setattr(stages, "train_tokenizer", full)
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "run"), "No space left")


@pytest.mark.parametrize("command", [["train", "tokenizer", "shapes"], ["bench", "shapes", "--quick"]])
def test_bad_device(tmp_path, monkeypatch, command):
    extra = ["--run-dir", tmp_path / "run"] if command[0] == "train" else ["--out", tmp_path / "b.json"]
    one_line_error(invoke(*command, *extra, "--device", "foo"), "--device 'foo'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(invoke(*command, *extra, "--device", "cuda"), "no CUDA GPU")


def test_nan_stop_says_which_step_was_kept(tmp_path):
    model = tiny_tokenizer()
    real_loss, calls = model.loss, []

    def nan_from_step_5(batch):
        calls.append(1)
        loss, logs = real_loss(batch)
        return (loss * float("nan") if len(calls) >= 5 else loss), logs

    model.loss = nan_from_step_5
    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=1, checkpoint_every=3, log_every=1)
    with pytest.raises(TrainingDiverged, match="nan at step 5; step 3 is kept in") as e:
        train(model, load_dataset("shapes", limit=8), cfg, tmp_path)
    assert isinstance(e.value, FloatingPointError) and "\n" not in str(e.value)
    assert load_train_state(tmp_path)["step"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["trained_steps"] == 3


def test_nan_stop_before_any_checkpoint_in_the_cli(tmp_path):
    run = tmp_path / "run"
    nan = ["tokenizer.lr=1e30", "tokenizer.grad_clip=0.0", "tokenizer.warmup_steps=0", "tokenizer.steps=30"]
    one_line_error(invoke("train", "tokenizer", "shapes", "--run-dir", run, *sets(TINY_TOKENIZER + nan)), "no step was kept")


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("inside_step", [False, True])
def test_signal_keeps_the_last_finished_step(tmp_path, signum, inside_step):
    model = tiny_tokenizer()
    real_loss, calls = model.loss, []

    def loss(batch):
        calls.append(1)
        if inside_step and len(calls) == 4:
            os.kill(os.getpid(), signum)  # arrives mid-step: step 4 still finishes
        return real_loss(batch)

    model.loss = loss

    def on_log(step, logs):
        if not inside_step and step == 2:
            os.kill(os.getpid(), signum)

    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=1, checkpoint_every=100, log_every=1)
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as e:
        train(model, load_dataset("shapes", limit=8), cfg, tmp_path, on_log=on_log)
    kept = 4 if inside_step else 2
    assert e.value.signum == signum and e.value.step == kept
    assert load_train_state(tmp_path)["step"] == kept
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == kept
    assert signal.getsignal(signum) is before  # the loop gives the handlers back


def test_sigterm_in_the_cli_prints_the_resume_line(tmp_path, monkeypatch):
    def terminated_in_training(recipe, ctx, **kw):
        raise TrainingInterrupted(signal.SIGTERM, 4, ctx.run_dir / "tokenizer")

    monkeypatch.setattr(stages, "train_tokenizer", terminated_in_training)
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "run")
    assert result.exit_code == 128 + signal.SIGTERM and "Traceback" not in result.output
    assert "SIGTERM" in result.output and "step 4 is kept" in result.output and "resume" in result.output

    def terminated_elsewhere(recipe, ctx, **kw):  # e.g. while encoding: SIGTERM is handled like Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(stages, "train_tokenizer", terminated_elsewhere)
    result = invoke("train", "tokenizer", "shapes", "--run-dir", tmp_path / "run")
    assert result.exit_code == 128 + signal.SIGTERM and "resume" in result.output, result.output


# ------------------------------------------------------------------ kill -9


KILLED_AFTER_CHECKPOINT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import vqdiff.train as vt
    sys.path.insert(0, sys.argv[2])
    from test_reliability import tiny_tokenizer, KILL_CFG
    from vqdiff.data import load_dataset

    torch.set_num_threads(1)
    real_save = vt.save_train_state

    def save_then_hang(folder, state):
        real_save(folder, state)
        if state["step"] == 3:
            Path(sys.argv[1], "checkpointed").write_text("3")
            time.sleep(600)  # killed here by the test

    vt.save_train_state = save_then_hang
    vt.train(tiny_tokenizer(), load_dataset("shapes", limit=32), KILL_CFG, sys.argv[1])
    """
)
KILL_CFG = TrainConfig(steps=7, batch_size=4, warmup_steps=1, checkpoint_every=3, log_every=1, ema=0.9)


def test_kill_9_after_a_checkpoint_resumes_byte_identical(tmp_path):
    data = load_dataset("shapes", limit=32)
    train(tiny_tokenizer(), data, KILL_CFG, tmp_path / "straight")
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_CHECKPOINT, str(killed), str(ROOT / "tests")], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpointed").exists():
            assert proc.poll() is None, "the training subprocess ended before its checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert load_train_state(killed)["step"] == 3
    torch.manual_seed(99)  # whatever the global RNG holds: the loop re-seeds per step
    resumed = train(tiny_tokenizer(), data, KILL_CFG, killed)
    assert resumed.resumed_from == 3 and resumed.step == 7
    assert (killed / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()

    def losses(folder):
        return [(e["step"], e["loss"]) for e in map(json.loads, (folder / "log.jsonl").read_text().splitlines())]

    assert losses(killed) == losses(tmp_path / "straight")
