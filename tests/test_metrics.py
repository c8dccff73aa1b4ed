"""Metrics files (JSON lines and TensorBoard events, read back from the TFRecord framing), truncation on resume,
the loss plot, the progress bar (in a pseudo-terminal) and its plain lines (through a pipe), and the end-of-run
summary."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gemmatune import metrics
from gemmatune.metrics import MetricsLog, Progress, format_summary, plot_losses


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # strict: every line must be valid JSON


def read_events(run_dir: Path) -> list:
    """All events of the run's TensorBoard files, checking each record's length and data CRCs."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    events = []
    for f in files:
        buf = f.read_bytes()
        pos = 0
        while pos < len(buf):
            header = buf[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
            data = buf[pos + 12:pos + 12 + length]
            (data_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
            assert header_crc == masked_crc32c(header) and data_crc == masked_crc32c(data)
            events.append(event_pb2.Event.FromString(data))
            pos += 16 + length
    return events


def scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in read_events(run_dir) for v in e.summary.value
            if v.HasField("simple_value")}


def test_jsonl_values_and_nan_as_null(tmp_path):
    with MetricsLog(tmp_path, report_to=()) as log:
        log.log(1, loss=2.5, lr=np.float32(1e-4), tokens_per_s=1234.0)
        log.log(2, loss=math.nan, grad_norm=math.inf)
        log.log_text(2, "eval/0", 'a "quoted"\nline')
        # Read while the log is still open: a killed run must already have every line on disk.
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        assert rows == [{"step": 1, "loss": 2.5, "lr": pytest.approx(1e-4), "tokens_per_s": 1234.0},
                        {"step": 2, "loss": None, "grad_norm": None}]
        assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 2, "tag": "eval/0", "text": 'a "quoted"\nline'}]


def test_resume_drops_later_lines_and_fresh_run_starts_empty(tmp_path):
    with MetricsLog(tmp_path, report_to=()) as log:
        for step in range(1, 7):
            log.log(step, loss=float(step))
            log.log_text(step, "eval", f"text {step}")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # the partial line of a run killed mid-write

    with MetricsLog(tmp_path, start_step=4, report_to=()) as log:
        log.log(5, loss=50.0)
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))

    MetricsLog(tmp_path, report_to=()).close()
    assert (tmp_path / "metrics.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text() == ""


def test_tensorboard_scalars_and_text(tmp_path):
    with MetricsLog(tmp_path) as log:
        log.log(10, loss=1.5, lr=3e-4)
        log.log(20, loss=1.25, val_loss=1.75)
        log.log(30, loss=math.nan)
        log.log_text(20, "sample", "hello")
    values = scalars(tmp_path)
    nan = values.pop(("loss", 30))
    assert math.isnan(nan)
    assert values == {("loss", 10): 1.5, ("lr", 10): pytest.approx(3e-4), ("loss", 20): 1.25,
                      ("val_loss", 20): 1.75}
    texts = [(v.tag, e.step, v.tensor.string_val) for e in read_events(tmp_path) for v in e.summary.value
             if v.HasField("tensor")]
    assert len(texts) == 1 and texts[0][1] == 20 and texts[0][0].startswith("sample") and texts[0][2] == [b"hello"]


def test_tensorboard_resume_writes_purge_marker(tmp_path):
    # TensorBoard hides events at or after a SessionLog.START's step that were written before it.
    MetricsLog(tmp_path, start_step=40).close()
    starts = [e.step for e in read_events(tmp_path) if e.HasField("session_log")]
    assert starts == [41]


def pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_with_validation_lr_and_nan_gap(tmp_path):
    rows = [{"step": s, "loss": None if s == 7 else 3 / s, "lr": 1e-4 * min(1, s / 5)} for s in range(1, 30)]
    rows += [{"step": s, "val_loss": 2 / s} for s in (10, 20)]
    write_metrics(tmp_path / "metrics.jsonl", rows)
    out = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    img = pixels(out)
    assert img.ndim == 3 and img.var() > 0
    # The learning-rate panel makes the figure taller than the loss-only one below.
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    write_metrics(no_val / "metrics.jsonl", [{"step": s, "loss": 3 / s} for s in range(1, 30)])
    img2 = pixels(plot_losses(no_val / "metrics.jsonl", no_val / "loss.png"))
    assert img2.var() > 0 and img2.shape[0] < img.shape[0]


def test_plot_of_empty_run_still_writes_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert pixels(plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")).var() > 0


def test_progress_plain_lines_every_log_step_with_recent_rates(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    with Progress(25, every=10, enabled=False) as p:
        now[0] += 60.0  # the first step includes a minute of compilation
        p.update(1, loss=9.0, tokens=1000)
        assert p.eta_s() is None and p.tokens_per_s() is None
        for step in range(2, 26):  # then 2 s and 500 tokens per step
            now[0] += 2.0
            p.update(step, loss=2.34567 if step < 25 else 1.5, lr=2e-4, tokens=1000 + 500 * (step - 1))
    lines = capsys.readouterr().err.splitlines()
    # Only every 10th step and the last: the rates come from the updates in between, compilation left out.
    assert lines == ["step 10/25 | loss 2.3457 | lr 2.00e-04 | 250 tok/s | elapsed 0:01:18 | eta 0:00:30",
                     "step 20/25 | loss 2.3457 | lr 2.00e-04 | 250 tok/s | elapsed 0:01:38 | eta 0:00:10",
                     "step 25/25 | loss 1.5000 | lr 2.00e-04 | 250 tok/s | elapsed 0:01:48 | eta 0:00:00"]


def test_progress_eta_uses_recent_window(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    p = Progress(1000, enabled=False, every=1000)
    for step in range(1, metrics.RATE_WINDOW + 1):  # a slow start: 10 s per step
        now[0] += 10.0
        p.update(step)
    for step in range(metrics.RATE_WINDOW + 1, 2 * metrics.RATE_WINDOW + 1):  # then 1 s per step
        now[0] += 1.0
        p.update(step)
    assert p.eta_s() == pytest.approx(1000 - 2 * metrics.RATE_WINDOW)


def test_progress_enabled_renders_rich_bar(capsys):
    with Progress(50, start_step=5, enabled=True) as p:
        p.update(24, loss=0.5, tokens=0)
        p.update(25, loss=0.75, lr=1e-3, tokens=999)
    err = capsys.readouterr().err
    assert "25/50" in err and "loss 0.7500" in err and " tok/s" in err


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`, for what rich writes: text, carriage return and newline, erase line
    (ESC[2K) and cursor up (ESC[nA); colours and other sequences are dropped."""
    rows, r, col = [""], 0, 0
    for part in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n)", raw):
        if part == "\r":
            col = 0
        elif part == "\n":
            r, col = r + 1, 0
            rows += [""] * (r + 1 - len(rows))
        elif part == "\x1b[2K":
            rows[r] = ""
        elif m := re.fullmatch(r"\x1b\[(\d*)A", part):
            r -= int(m[1] or 1)
        elif part and not part.startswith("\x1b"):
            rows[r] = rows[r][:col].ljust(col) + part + rows[r][col + len(part):]
            col += len(part)
    return [row.rstrip() for row in rows]


def run_in_terminal(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """(exit status, everything written) of `args` run with stdin, stdout and stderr on a pseudo-terminal, 160
    columns wide. (subprocess, not pty.fork: forking a process that runs JAX's threads is unsafe.)"""
    main, child = pty.openpty()
    env = {**(env or os.environ), "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, start_new_session=True)
    os.close(child)  # the child holds the only other end: reading ends (EIO) when it exits
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([main], [], [], 1.0)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
        else:
            proc.kill()
    finally:
        rc = proc.wait()
        os.close(main)
    return rc, out.decode(errors="replace")


BAR = re.compile(r"^step +(\d+)/(\d+) ━")  # the bar's line, as the terminal shows it


def test_progress_bar_in_a_terminal_updates_in_place_with_messages_above():
    code = textwrap.dedent("""
        import sys, time
        from gemmatune.metrics import Progress
        with Progress(6, every=3) as p:
            for step in range(1, 7):
                p.update(step, loss=1.0 / step, lr=1e-3, tokens=100 * step)
                time.sleep(0.3)  # rich redraws 10 times a second
                if step == 4:
                    print("step 4: validation loss 0.25", file=sys.stderr)
        """)
    rc, raw = run_in_terminal([sys.executable, "-c", code])
    assert rc == 0, raw
    # Every step is drawn, not only every 3rd, each over the last frame (carriage return, erase line).
    frames = [m[1] for frame in raw.split("\r") if (m := re.match(r"(?:\x1b\[2K)?" + BAR.pattern[1:],
                                                                  re.sub(r"\x1b\[[0-9;]*m", "", frame)))]
    drawn = sorted({int(s) for s in frames} - {0})
    assert len(drawn) >= 5 and drawn[-1] == 6, frames
    assert raw.count("\r\x1b[2K") >= len(drawn)
    lines = [line for line in screen(raw) if line]
    # The message stays above the bar; the bar's last frame is the only bar line left, completed.
    assert lines[0] == "step 4: validation loss 0.25", lines
    assert len(lines) == 2 and BAR.match(lines[1]).groups() == ("6", "6"), lines
    assert "loss 0.1667" in lines[1] and "tok/s" in lines[1] and "eta 0:00:00" in lines[1], lines


# `gemmatune train` on the embedded tiny model, 6 steps, logged every 3; the two runs share compiled code.
TRAIN = ["-m", "gemmatune.cli", "train", "--max-steps", "6", "--log-every", "3", "--eval-prompts",
         "--report-to", "none"]


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.slow
def test_train_in_a_terminal_draws_the_bar(tmp_path, train_env):
    rc, raw = run_in_terminal([sys.executable, *TRAIN, "--output", str(tmp_path / "run")], env=train_env)
    assert rc == 0, raw[-3000:]
    assert "\r\x1b[2K" in raw and "step 3/6 |" not in raw  # rich's frames, not the plain lines
    lines = [line for line in screen(raw) if line]
    bars = [line for line in lines if BAR.match(line)]
    assert len(bars) == 1 and BAR.match(bars[0]).groups() == ("6", "6") and "tok/s" in bars[0], lines
    assert lines.index(bars[0]) < next(i for i, line in enumerate(lines) if line.startswith("final train loss"))


@pytest.mark.slow
def test_train_through_a_pipe_prints_plain_lines(tmp_path, train_env):
    r = subprocess.run([sys.executable, *TRAIN, "--output", str(tmp_path / "run")], env=train_env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\x1b" not in r.stderr and "\r" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 3/6 | loss ") and lines[1].startswith("step 6/6 | loss ")
    assert all(re.search(r" \| [\d,]+ tok/s \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", line) for line in lines)


def test_format_summary():
    text = format_summary({"tokens_seen": 1234567, "trained_tokens": 456789, "steps": 1000, "wall_time_s": 3725.4,
                           "tokens_per_s": 331.6, "train_loss": 1.23456, "val_loss": math.log(8.0),
                           "skipped_steps": 2, "adapter": "runs/a/adapter", "metrics": "runs/a/metrics.jsonl",
                           "tensorboard": "runs/a/tensorboard", "plot": "runs/a/loss.png"})
    lines = text.splitlines()
    assert lines[0].split() == ["tokens", "seen", "1,234,567"]
    assert "1:02:05" in text and "332" in text and "1.2346" in text and "2.0794" in text and "8.000" in text
    assert "skipped non-finite steps  2" in text and "runs/a/adapter" in text and "runs/a/loss.png" in text
    # Aligned: every value starts in the same column.
    assert len({len(line) - len(line[line.rindex("  ") + 2:]) for line in lines}) == 1
    assert "perplexity" not in format_summary({"steps": 3, "train_loss": 1.0})
    # DPO's and distillation's losses are no next-token loss: no perplexity from them
    assert "validation perplexity  2.718" in format_summary({"method": "sft", "val_loss": 1.0})
    assert "perplexity" not in format_summary({"method": "dpo", "val_loss": 1.0})
    with pytest.raises(ValueError, match="val_ppl"):
        format_summary({"val_ppl": 3.0})
