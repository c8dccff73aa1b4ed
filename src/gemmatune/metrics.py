"""What the user sees while and after training: metrics files (JSON lines, mirrored to experiment trackers), a
loss plot, a live progress bar (plain lines when stderr is not a terminal) and the end-of-run summary.

Run directory layout written here:
    RUN/metrics.jsonl   one {"step": ..., name: value, ...} object per `MetricsLog.log` call
    RUN/samples.jsonl   one {"step": ..., "tag": ..., "text": ...} object per `MetricsLog.log_text` call
    RUN/tensorboard/, RUN/wandb/, RUN/mlflow/   the same scalars and texts in the trackers of `report_to`
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmatune.atomic import staged_file, write_text
from gemmatune.trackers import open_trackers

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
# Updates (steps) the ETA and tokens/s are averaged over: recent enough to follow slowdowns, long enough to be steady.
RATE_WINDOW = 20


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf (json.dumps would write the invalid token NaN), so a diverged value becomes null."""
    value = float(value)  # also accepts numpy and JAX scalars
    return value if math.isfinite(value) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, skipping a line that does not parse: a run killed mid-write can leave a
    partial last line, and neither a resume nor a plot should fail on it."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends scalars to RUN/metrics.jsonl and generations to RUN/samples.jsonl, mirrored to the experiment
    trackers `report_to` names (tensorboard, wandb, mlflow; see trackers.py), which also get `config` (the run's
    settings, nested) as hyper-parameters.

    `start_step` is the step the run resumes after (0 for a fresh run): lines logged after it by the interrupted
    run are dropped, so the files read as one run; a fresh run starts with empty files. Trackers that can continue
    a run (wandb, mlflow) continue the interrupted run's.
    """

    def __init__(self, run_dir: str | os.PathLike, *, start_step: int = 0,
                 report_to: Sequence[str] = ("tensorboard",), config: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Steps count from 0, so keeping nothing on a fresh run is "keep steps <= -1".
        keep_through = start_step if start_step > 0 else -1
        self._files: dict[str, Any] = {}
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.run_dir / name
            if path.exists():
                kept = [row for row in _read_jsonl(path) if row.get("step", math.inf) <= keep_through]
                write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
            self._files[name] = path.open("a")
        try:
            self._trackers = open_trackers(tuple(report_to), self.run_dir, start_step=start_step, config=config)
        except BaseException:
            for f in self._files.values():
                f.close()
            raise
        # What the end-of-run summary lists, {tracker name: where its records are}; kept after a tracker fails.
        self.where = {t.name: t.where for t in self._trackers}

    def _append(self, name: str, row: dict[str, Any]) -> None:
        f = self._files[name]
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()  # a killed process keeps every line written so far

    def _report(self, call: str, step: int, *args: Any) -> None:
        """Passes a record to every tracker. One that fails mid-run (a tracking server gone away) is named once on
        stderr and dropped, so training goes on: the JSON-lines files still get every record."""
        for tracker in list(self._trackers):
            try:
                getattr(tracker, call)(step, *args)
            except Exception as e:
                self._trackers.remove(tracker)
                print(f"warning: {tracker.name} failed at step {step} ({e}); the rest of this run is not reported "
                      f"to it ({self.run_dir / METRICS_FILE} and {SAMPLES_FILE} have every record).",
                      file=sys.stderr)

    def log(self, step: int, **values: float) -> None:
        self._append(METRICS_FILE, {"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}})
        self._report("scalars", int(step), {k: float(v) for k, v in values.items()})

    def log_text(self, step: int, tag: str, text: str) -> None:
        self._append(SAMPLES_FILE, {"step": int(step), "tag": tag, "text": text})
        self._report("text", int(step), tag, text)

    def close(self, failed: bool = False) -> None:
        """Closes the files and ends the trackers' runs (as failed when `failed`: wandb's exit code, mlflow's
        status)."""
        for f in self._files.values():
            f.close()
        for tracker in self._trackers:
            try:
                tracker.close(failed)
            except Exception as e:  # the run's own files are complete; one tracker must not stop the others closing
                print(f"warning: {tracker.name} failed to close ({e}).", file=sys.stderr)
        self._trackers = []

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def plot_losses(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plots training loss per step and validation loss where it was logged (plus the learning rate in a second
    panel when logged) from a metrics.jsonl; null values leave gaps. Returns the PNG's path."""
    # Figure without pyplot: no global backend switch and no display needed; savefig renders with Agg.
    from matplotlib.figure import Figure

    metrics_path, out_png = Path(metrics_path), Path(out_png)
    rows = _read_jsonl(metrics_path)

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(row["step"], math.nan if row[key] is None else row[key]) for row in rows if key in row]
        return [s for s, _ in points], [v for _, v in points]

    has_lr = any("lr" in row for row in rows)
    fig = Figure(figsize=(8, 6.5 if has_lr else 4.5), layout="constrained")
    axes = fig.subplots(2 if has_lr else 1, 1, sharex=True, squeeze=False,
                        height_ratios=[3, 1] if has_lr else None)[:, 0]
    loss_ax = axes[0]
    steps, values = series("loss")
    if steps:
        loss_ax.plot(steps, values, lw=1, label="train loss")
    steps, values = series("val_loss")
    if steps:
        # Markers: validation is logged every few hundred steps, and a single evaluation must still show.
        loss_ax.plot(steps, values, "o-", ms=4, label="validation loss")
    if loss_ax.lines:
        loss_ax.legend()
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.set_title(f"Loss: {metrics_path.parent.name or metrics_path.name}")
    if has_lr:
        axes[1].plot(*series("lr"), lw=1, color="tab:green")
        axes[1].set_ylabel("learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")

    out_png.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(out_png, force=True) as tmp:  # written aside and renamed: a viewer never sees half a PNG
        fig.savefig(tmp, format="png", dpi=110)
    return out_png


class Progress:
    """Training progress on stderr. On a terminal, a live rich bar redrawn in place after every step (step/total,
    loss, lr, tokens/s, elapsed, ETA); anything printed to stderr or stdout meanwhile appears above the bar. Not on
    a terminal (a log file, a pipe, CI): one plain line every `every` steps and at the last step."""

    def __init__(self, total_steps: int, *, start_step: int = 0, every: int = 1, enabled: bool | None = None) -> None:
        self.total_steps, self.every = total_steps, every
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._t0 = time.monotonic()
        # (time, step, tokens seen) of recent updates. The first update's interval includes compilation, so rates
        # are only measured from the first update on: no ETA or tokens/s until the second one.
        self._recent: deque[tuple[float, int, int | None]] = deque(maxlen=RATE_WINDOW)
        self._bar = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            # Redirecting stdout and stderr (rich's default, made explicit) is what keeps other output above the bar.
            self._bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                     TextColumn("eta {task.fields[eta]}"), console=Console(stderr=True),
                                     redirect_stdout=True, redirect_stderr=True)
            # Until the first update: its step compiles first, which takes from seconds to minutes.
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            stats="compiling the train step", eta="-")
            self._bar.start()

    def eta_s(self) -> float | None:
        """Seconds left at the recent rate; None before there are two updates to measure it from."""
        if len(self._recent) < 2:
            return None
        (t0, s0, _), (t1, s1, _) = self._recent[0], self._recent[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (self.total_steps - s1) * (t1 - t0) / (s1 - s0)

    def tokens_per_s(self) -> float | None:
        """Input tokens per second over the recent updates; None before there are two updates with token counts."""
        if len(self._recent) < 2:
            return None
        (t0, _, n0), (t1, _, n1) = self._recent[0], self._recent[-1]
        if n0 is None or n1 is None or t1 <= t0:
            return None
        return (n1 - n0) / (t1 - t0)

    def update(self, step: int, *, loss: float | None = None, lr: float | None = None,
               tokens: int | None = None, shown: dict[str, float] | None = None) -> None:
        """Called after every step; `tokens`: input tokens seen so far in the run (what tokens/s counts); `shown`:
        the objective's own metrics worth a glance (DPO's reward accuracy), printed after the loss."""
        now = time.monotonic()
        self._recent.append((now, step, tokens))
        if self._bar is None and step % self.every != 0 and step != self.total_steps:
            return
        stats = []
        if loss is not None:
            stats.append(f"loss {loss:.4f}")
        stats += [f"{name.replace('_', ' ')} {value:.4f}" for name, value in (shown or {}).items()]
        if lr is not None:
            stats.append(f"lr {lr:.2e}")
        if (rate := self.tokens_per_s()) is not None:
            stats.append(f"{rate:,.0f} tok/s")
        eta = self.eta_s()
        eta_text = "-" if eta is None else _hms(eta)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats="  ".join(stats), eta=eta_text)
        else:
            fields = [f"step {step}/{self.total_steps}", *stats, f"elapsed {_hms(now - self._t0)}", f"eta {eta_text}"]
            print(" | ".join(fields), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# format_summary's keys, in display order: (key, label, how to show the value).
_SUMMARY_ITEMS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("method", "method", str),
    ("tokens_seen", "tokens seen", "{:,}".format),
    ("trained_tokens", "trained tokens", "{:,}".format),
    ("steps", "steps", "{:,}".format),
    ("wall_time_s", "wall time", _hms),
    ("tokens_per_s", "tokens/s", "{:,.0f}".format),
    ("train_loss", "final train loss", "{:.4f}".format),
    ("val_loss", "final validation loss", "{:.4f}".format),
    ("val_perplexity", "validation perplexity", "{:.3f}".format),
    ("skipped_steps", "skipped non-finite steps", "{:,}".format),
    ("adapter", "adapter", str),
    ("metrics", "metrics", str),
    ("tensorboard", "TensorBoard logs", str),
    ("wandb", "wandb run", str),
    ("mlflow", "MLflow run", str),
    ("plot", "loss plot", str),
]


def format_summary(d: dict[str, Any]) -> str:
    """End-of-run summary, one aligned `label  value` line per key present in `d` (keys: see _SUMMARY_ITEMS; the
    validation perplexity is derived from val_loss, when that is a next-token loss: method sft, the default). Unknown
    keys raise, so a misspelt key is not silently lost."""
    known = {key for key, _, _ in _SUMMARY_ITEMS}
    if unknown := d.keys() - known:
        raise ValueError(f"format_summary: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    d = dict(d)
    if d.get("val_loss") is not None and d.get("method", "sft") == "sft":
        d["val_perplexity"] = math.exp(min(d["val_loss"], 709.0))  # 709: largest exp() that fits a float
    items = [(label, fmt(d[key])) for key, label, fmt in _SUMMARY_ITEMS if d.get(key) is not None]
    width = max((len(label) for label, _ in items), default=0)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in items)
