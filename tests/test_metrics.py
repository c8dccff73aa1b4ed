"""Metrics files (JSON lines and TensorBoard events, read back from the TFRecord framing), truncation on resume,
the loss plot, the progress line and the end-of-run summary."""

from __future__ import annotations

import json
import math
import struct
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
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(1, loss=2.5, lr=np.float32(1e-4), tokens_per_s=1234.0)
        log.log(2, loss=math.nan, grad_norm=math.inf)
        log.log_text(2, "eval/0", 'a "quoted"\nline')
        # Read while the log is still open: a killed run must already have every line on disk.
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        assert rows == [{"step": 1, "loss": 2.5, "lr": pytest.approx(1e-4), "tokens_per_s": 1234.0},
                        {"step": 2, "loss": None, "grad_norm": None}]
        assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 2, "tag": "eval/0", "text": 'a "quoted"\nline'}]


def test_resume_drops_later_lines_and_fresh_run_starts_empty(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for step in range(1, 7):
            log.log(step, loss=float(step))
            log.log_text(step, "eval", f"text {step}")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # the partial line of a run killed mid-write

    with MetricsLog(tmp_path, start_step=4, tensorboard=False) as log:
        log.log(5, loss=50.0)
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))

    MetricsLog(tmp_path, tensorboard=False).close()
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


def test_progress_disabled_prints_fields_and_eta_from_recent_rate(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    with Progress(100, enabled=False) as p:
        now[0] += 60.0  # the first 10 steps include a minute of compilation
        p.update(10, loss=2.34567, lr=2e-4, tokens_per_s=12345.6)
        assert p.eta_s() is None
        now[0] += 20.0  # then 1 s per step
        p.update(30, loss=1.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 10/100 | loss 2.3457 | lr 2.00e-04 | 12,346 tok/s | elapsed 0:01:00 | eta -",
                     "step 30/100 | loss 1.5000 | elapsed 0:01:20 | eta 0:01:10"]  # 70 steps left at 1 step/s


def test_progress_eta_uses_recent_window(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    p = Progress(1000, enabled=False)
    for step in range(1, metrics.RATE_WINDOW + 1):  # a slow start: 10 s per step
        now[0] += 10.0
        p.update(step)
    for step in range(metrics.RATE_WINDOW + 1, 2 * metrics.RATE_WINDOW + 1):  # then 1 s per step
        now[0] += 1.0
        p.update(step)
    assert p.eta_s() == pytest.approx(1000 - 2 * metrics.RATE_WINDOW)


def test_progress_enabled_renders_rich_bar(capsys):
    with Progress(50, start_step=5, enabled=True) as p:
        p.update(25, loss=0.75, lr=1e-3, tokens_per_s=999.0)
    err = capsys.readouterr().err
    assert "25/50" in err and "loss 0.7500" in err and "999 tok/s" in err


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
    with pytest.raises(ValueError, match="val_ppl"):
        format_summary({"val_ppl": 3.0})
