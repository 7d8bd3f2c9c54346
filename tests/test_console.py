"""The CLI's progress off a terminal (nohup, CI, a cluster job): plain lines on a heartbeat, the same
tasks as the terminal's bars, also written to a log file."""

import io
import re
import time

from rich.console import Console

from recipes.console import batch_logger, plain_line, progress_bars, train_logger

LINE = re.compile(r"^\[\s*\d+m\d{2}s\] (\S.*?) (\d+)/(\d+) \(\d+%\)(?: (.*))? \| (eta \S+|done)$")


def test_plain_line_format():
    con = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(con) as p:
        on_log = train_logger(p, "tokenizer", 100, "img")
        on_log(10, {"loss": 0.25, "items_per_s": 812.4, "psnr": 20.1})
        time.sleep(0.05)
        on_log(20, {"loss": 0.2, "items_per_s": 800.0, "psnr": 21.0})
        task = p.tasks[0]
        line = plain_line(task, 125.0)
    m = LINE.match(line)
    assert m, line
    assert m.group(1) == "tokenizer" and (m.group(2), m.group(3)) == ("20", "100")
    assert "loss 0.2000 psnr 21.00 | 800 img/s" in m.group(4)
    assert line.startswith("[   2m05s]") and m.group(5).startswith("eta ")


def test_heartbeat_prints_off_a_terminal_and_to_the_log(tmp_path, monkeypatch):
    monkeypatch.setenv("VQDIFF_PROGRESS_INTERVAL", "0.05")
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False, width=200)
    log = tmp_path / "run" / "progress.log"
    with progress_bars(con, log_path=log) as p:
        on_batch = batch_logger(p, "sample diffusion")
        on_batch(1, 4)
        time.sleep(0.3)  # a slow batch: the heartbeat still prints, about every 0.05 s
        on_batch(4, 4)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) >= 3, lines
    assert all(LINE.match(line) for line in lines), lines
    assert lines[-1].endswith("4/4 (100%) | done")
    assert sum(line.endswith("| done") for line in lines) == 1  # a finished task prints its end once
    assert log.read_text().strip().splitlines() == lines


def test_a_terminal_gets_bars_not_lines(monkeypatch):
    monkeypatch.setenv("VQDIFF_PROGRESS_INTERVAL", "0.05")
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=200)
    with progress_bars(con) as p:
        batch_logger(p, "encode")(1, 2)
        time.sleep(0.2)
    assert not any(LINE.match(line) for line in buf.getvalue().splitlines())
