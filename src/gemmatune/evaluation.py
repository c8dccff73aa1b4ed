"""`gemmatune eval`: a base model and adapters on one dataset, side by side.

Each run (the base alone, "none", or the base with one adapter) gets
  - the loss over the trained tokens, with the training's eval step on the data read, formatted and masked exactly
    as training reads it: the mean over all trained tokens of the evaluated examples (sum / count, as validation
    during training), and its perplexity exp(loss);
  - with generation, answers to each example's prompt scored against its reference (gemmatune.scoring).

An example's prompt is its tokens before its last trained span (for chat and instruction rows: everything up to
and including the last `<start_of_turn>model\\n`, earlier model turns as the data writes them), and its reference
that span's text without the <end_of_turn> and <eos> that close it. Plain-text rows (or train_on all) train every
token after <bos>: they have no prompt. An example that max_seq_len cut keeps its start, so its reference is cut
too (the data line on stderr counts them): raise --max-seq-len to compare whole answers.

The same functions serve validation during training (`--eval-generate`, loop.evaluate): `generation_cases` and
`answer_and_score`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from gemmatune.atomic import refuse_to_replace, staged_dir
from gemmatune.config import (
    EVAL_BATCH,
    EVAL_MAX_NEW_TOKENS,
    EVAL_NEW_TOKENS_SLACK,
    NO_ADAPTER,
    DataConfig,
    LoraConfig,
    ModelConfig,
    Quantization,
    TrainConfig,
)
from gemmatune.data.loader import BatchIterator, ExampleStore
from gemmatune.data.pipeline import describe, prepare
from gemmatune.errors import GemmatuneError
from gemmatune.generate import generate
from gemmatune.layout import Params
from gemmatune.lora import make_bank
from gemmatune.model import unstack
from gemmatune.scoring import METRICS, score
from gemmatune.step import BATCH_KEYS, make_eval_step
from gemmatune.tokenizer import Tokenizer

Adapter = tuple[Params, LoraConfig]  # LoRA tensors (gemmatune's layout) and their config


# --- prompts and references --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One example to answer: `index` in the evaluated examples; `prompt` token ids (<bos> first); `reference`
    the ids of its expected answer (no stop tokens)."""

    index: int
    prompt: list[int]
    reference: list[int]


def split_prompt(tokens: np.ndarray, mask: np.ndarray, stop_ids: Sequence[int]) -> tuple[int, int] | None:
    """(start, end) of an example's last trained span, without the stop tokens that close it: the prompt is
    tokens[:start], the reference tokens[start:end] (stop ids inside it removed). None when nothing but stop
    tokens is trained. tokens, mask: [n]."""
    stops = np.isin(tokens, np.asarray(stop_ids))
    content = np.flatnonzero(mask & ~stops)  # trained tokens that are not <end_of_turn>/<eos>
    if not content.size:
        return None
    end = int(content[-1]) + 1
    untrained = np.flatnonzero(~mask[:end])
    start = int(untrained[-1]) + 1 if untrained.size else 0
    return start, end


def generation_cases(store: ExampleStore, indices: Sequence[int] | np.ndarray, tokenizer: Tokenizer) -> list[Case]:
    """The prompt and reference of each example at `indices` (numbered 0.. in that order); a GemmatuneError for an
    example that has no prompt (every token after <bos> trained: plain-text rows, or train_on all)."""
    stop_ids = (tokenizer.eos_id, tokenizer.end_of_turn_id)
    cases = []
    for k, example in enumerate(store.get_many(indices)):
        span = split_prompt(example.tokens, example.mask, stop_ids)
        if span is None or span[0] <= 1:  # a prompt of <bos> alone asks nothing
            why = "trains only its end tokens" if span is None else "trains every token after <bos>"
            raise GemmatuneError(
                f"example {k + 1} of the evaluated data {why}, so it has no prompt to answer and no reference to "
                "compare with: --generate needs instruction or chat rows (plain-text rows, and data.train_on all, "
                "train every token). Leave out --generate to measure only the loss.")
        start, end = span
        reference = [int(t) for t in example.tokens[start:end] if t not in stop_ids]
        cases.append(Case(k, example.tokens[:start].tolist(), reference))
    return cases


def default_max_new_tokens(cases: Sequence[Case]) -> int:
    return min(max(len(c.reference) for c in cases) + EVAL_NEW_TOKENS_SLACK, EVAL_MAX_NEW_TOKENS)


# --- answers ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How answers are generated: greedy (temperature 0) or sampled; max_new_tokens None: default_max_new_tokens."""

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0
    batch_size: int = EVAL_BATCH


def _answers(base: Params, cfg: ModelConfig, adapter: Adapter | None, prompts: Sequence[list[int]], *,
             sampling: Sampling, max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """The generated ids for each prompt, in the order given, from the (stacked) base with the adapter (None: the
    base alone). Prompts are answered sorted by length, `sampling.batch_size` at a time, so each left-padded batch
    is about as wide as its longest prompt; batch b samples with seed `sampling.seed + b`."""
    # The adapter applied unmerged, as `generate` and `serve` apply it: no merged copy of the weights.
    params = unstack(base)  # unstacked once, not per batch
    bank = make_bank([adapter]) if adapter is not None else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for b, first in enumerate(range(0, len(order), sampling.batch_size)):
        batch = order[first:first + sampling.batch_size]
        # Never past the model's context: the batch's longest prompt leaves this much room.
        room = cfg.max_position_embeddings - max(len(prompts[i]) for i in batch)
        got = generate(params, cfg, [prompts[i] for i in batch], max_new_tokens=min(max_new_tokens, max(room, 1)),
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed + b,
                       stop_ids=stop_ids, bank=bank)
        for i, ids in zip(batch, got):
            out[i] = ids
    return out


@dataclasses.dataclass
class Answers:
    """One run's answers: predictions[k] and scores[k] belong to cases[k]; means per metric."""

    predictions: list[str]
    scores: list[dict[str, float]]
    means: dict[str, float]
    seconds: float


def answer_and_score(params: Params, cfg: ModelConfig, adapter: Adapter | None, cases: Sequence[Case],
                     tokenizer: Tokenizer, sampling: Sampling = Sampling(),
                     metrics: Sequence[str] = tuple(METRICS)) -> Answers:
    """Answer every case with the base `params` (stacked) plus `adapter`, and score the answers."""
    t0 = time.perf_counter()
    max_new = sampling.max_new_tokens or default_max_new_tokens(cases)
    stop_ids = (tokenizer.eos_id, tokenizer.end_of_turn_id)
    ids = _answers(params, cfg, adapter, [c.prompt for c in cases], sampling=sampling, max_new_tokens=max_new,
                   stop_ids=stop_ids)
    seconds = time.perf_counter() - t0
    predictions = [tokenizer.decode(i) for i in ids]
    scores = [score(p, tokenizer.decode(c.reference), metrics) for p, c in zip(predictions, cases)]
    means = {m: float(np.mean([s[m] for s in scores])) for m in metrics}
    return Answers(predictions, scores, means, seconds)


# --- loss ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _eval_step(cfg: ModelConfig, tcfg: TrainConfig) -> Any:
    """One compiled eval step per model and adapter configuration (runs with equal configs share it)."""
    return make_eval_step(cfg, tcfg)


def loss_of(params: Params, cfg: ModelConfig, adapter: Adapter | None, store: ExampleStore, indices: np.ndarray,
            dcfg: DataConfig, pad_id: int, batch_size: int) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) of the examples at `indices`, with the training's eval step
    (the adapter attached unmerged, as in training). Rows are packed as training packs them (data.packing)."""
    dtype = jnp.dtype(params["embed"].dtype).name
    if adapter is None:  # the base's weights as the "trained" tree, nothing frozen: no LoRA in the forward pass
        tcfg = TrainConfig(tune="full", dtype=dtype)
        trainable, frozen = params, {}
    else:
        tcfg = TrainConfig(tune="lora", lora=adapter[1], dtype=dtype)
        trainable, frozen = jax.tree.map(jnp.asarray, adapter[0]), params
    step = _eval_step(cfg, tcfg)
    rows = BatchIterator(store, indices, seq_len=dcfg.max_seq_len, batch_size=batch_size, pad_id=pad_id,
                         packing=dcfg.packing, shuffle_buffer=dcfg.shuffle_buffer, seed=dcfg.seed, shuffle=False)
    total = count = 0.0
    for batch in rows:  # [batch_size, max_seq_len] each; the last topped up with weightless padding rows
        s, c, _ = step(trainable, frozen, {k: jnp.asarray(batch[k]) for k in BATCH_KEYS})
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0), int(count)


# --- the command ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalOptions:
    generate: bool = False
    metrics: tuple[str, ...] = tuple(METRICS)
    sampling: Sampling = Sampling()
    limit: int | None = None  # at most this many examples, the first ones

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise GemmatuneError(f"--metric {', '.join(unknown) or '(none)'}: unknown metric; choose among "
                                 f"{', '.join(METRICS)}.")
        s = self.sampling
        for name, value in (("--batch-size", s.batch_size), ("--limit", self.limit)):
            if value is not None and value < 1:
                raise GemmatuneError(f"{name} is {value}; it must be at least 1.")
        if s.max_new_tokens is not None and s.max_new_tokens < 1:
            raise GemmatuneError(f"--max-new-tokens is {s.max_new_tokens}; it must be at least 1.")
        # Checked here too (generate checks them), so that a typo fails before the weights are read.
        if s.temperature < 0:
            raise GemmatuneError(f"--temperature is {s.temperature}; use 0 for greedy decoding or a positive value "
                                 "to sample.")
        if s.top_p is not None and not 0 < s.top_p <= 1:
            raise GemmatuneError(f"--top-p is {s.top_p}; it must be in (0, 1].")


@dataclasses.dataclass
class Evaluation:
    """What `evaluate` found: one result per run, and with generation the cases and each run's answers."""

    runs: list[dict[str, Any]]
    prompts: list[str] = dataclasses.field(default_factory=list)  # per case: the prompt as text (special tokens kept)
    references: list[str] = dataclasses.field(default_factory=list)
    answers: list[Answers] = dataclasses.field(default_factory=list)  # per run

    def predictions(self) -> list[dict[str, Any]]:
        """One record per run and example: the predictions.jsonl lines."""
        return [{"run": r, "adapter": run["adapter"], "index": k, "prompt": self.prompts[k],
                 "reference": self.references[k], "prediction": a.predictions[k], **a.scores[k]}
                for r, (run, a) in enumerate(zip(self.runs, self.answers)) for k in range(len(self.prompts))]


def _load_adapters(model_dir: Path, names: Sequence[str], cfg: ModelConfig) -> list[Adapter | None]:
    from gemmatune.convert.peft import load_adapter_for

    return [None if name == NO_ADAPTER else load_adapter_for(model_dir, name, cfg) for name in names]


def evaluate(model_dir: Path, adapters: Sequence[str], dcfg: DataConfig, opts: EvalOptions, dtype: str = "auto",
             log: TextIO | None = None, quant: Quantization | None = None) -> Evaluation:
    """Each of `adapters` (NO_ADAPTER: the model alone) on the data of `dcfg`: its validation split when it has one
    (data.val_fraction or data.val_paths, split as training splits it), otherwise every example. Progress goes to
    `log`, by default the sys.stderr of the call (not of the import: it may have been redirected since)."""
    from gemmatune.convert import load_model, model_config
    from gemmatune.tokenizer import load_tokenizer

    log = log or sys.stderr

    names = list(adapters) or [NO_ADAPTER]
    # Everything that can be refused is checked before the weights are read: the adapters fit, the data is usable.
    cfg = model_config(model_dir)
    loaded = _load_adapters(model_dir, names, cfg)
    tokenizer = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory(prefix="gemmatune-eval-") as tmp:
        data = prepare(dcfg, tokenizer, tmp)
        split = data.val if data.val is not None else data.train
        # Preference pairs are evaluated on their chosen responses (the even indices): what the model should say.
        indices = split.indices[::2] if split.pairs else split.indices
        indices = indices[:opts.limit] if opts.limit else indices
        cases = generation_cases(split.store, indices, tokenizer) if opts.generate else []  # may refuse the rows
        print(f"data: {describe(data.train.report)}; evaluating {len(indices)} "
              f"{'validation ' if data.val is not None else ''}"
              f"{'pairs (their chosen responses)' if split.pairs else 'examples'}", file=log)
        t0 = time.perf_counter()
        cfg, base = load_model(model_dir, dtype=dtype, quant=quant)  # once, for every run
        print(f"loaded {model_dir} in {time.perf_counter() - t0:.1f}s", file=log)
        result = Evaluation([])
        if cases:
            result.prompts = [tokenizer.decode(c.prompt[1:], skip_special_tokens=False) for c in cases]
            result.references = [tokenizer.decode(c.reference) for c in cases]
        for name, adapter in zip(names, loaded):
            loss, tokens = loss_of(base, cfg, adapter, split.store, indices, dcfg, tokenizer.pad_id,
                                   opts.sampling.batch_size)
            run: dict[str, Any] = {"adapter": name, "loss": loss, "perplexity": _exp(loss),
                                   "examples": len(indices), "trained_tokens": tokens}
            if cases:
                a = answer_and_score(base, cfg, adapter, cases, tokenizer, opts.sampling, opts.metrics)
                result.answers.append(a)
                run.update(a.means, generate_s=a.seconds, examples_per_s=len(cases) / a.seconds)
            print(f"{name}: " + ", ".join(f"{k} {_shown(v)}" for k, v in run.items() if k != "adapter"), file=log)
            result.runs.append(run)
    return result


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _shown(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --- output ----------------------------------------------------------------------------------------------------

COLUMNS = {"loss": "loss", "perplexity": "ppl", "exact_match": "exact", "contains": "contains", "f1": "f1",
           "rouge_l": "rouge_l", "examples_per_s": "ex/s"}


def table(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header and one row per run: adapter, examples, loss, perplexity and the metrics that were measured."""
    cols = [c for c in COLUMNS if c in runs[0]]
    rows = [["adapter", "examples", *(COLUMNS[c] for c in cols)]]
    for run in runs:
        rows.append([run["adapter"], str(run["examples"]),
                     *(_cell(c, run[c]) for c in cols)])
    return rows


def _cell(column: str, value: float) -> str:
    if column == "perplexity" and value >= 1e6:  # an untrained model's: digits beyond the fourth say nothing
        return f"{value:.3e}"
    return f"{value:.2f}" if column in ("perplexity", "examples_per_s") else f"{value:.4f}"


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    rows = table(runs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # The adapter column left-aligned (paths), the numbers right-aligned.
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows)


def _plot(runs: Sequence[dict[str, Any]]) -> bytes:
    """A PNG bar chart: the generation metrics per run (or, without them, the loss per run)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display

    metrics = [m for m in METRICS if m in runs[0]] or ["loss"]
    fig = Figure(figsize=(max(5.0, 1.3 * len(metrics) * len(runs) ** 0.5 + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    x = np.arange(len(metrics))
    for i, run in enumerate(runs):
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, [run[m] for m in metrics], width, label=run["adapter"])
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    ax.set_xticks(x, metrics)
    if metrics != ["loss"]:
        ax.set_ylim(0, 1.08)  # room for the labels of bars at 1
    ax.set_ylabel("mean over examples" if metrics != ["loss"] else "loss per trained token")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize="small")  # below: never over a bar
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _diff_sections(ev: Evaluation) -> list[str]:
    """Per run after the first: the examples whose answer differs from the first run's."""
    if not ev.answers:
        return []
    e = html.escape
    first, out = ev.answers[0], []
    for run, a in zip(ev.runs[1:], ev.answers[1:]):
        changed = [k for k in range(len(ev.prompts)) if a.predictions[k] != first.predictions[k]]
        out.append(f"<h2>{e(ev.runs[0]['adapter'])} &rarr; {e(run['adapter'])}: {len(changed)} of "
                   f"{len(ev.prompts)} answers changed</h2>")
        for k in changed:
            deltas = ", ".join(f"{m} {first.scores[k][m]:.2f} &rarr; {a.scores[k][m]:.2f}" for m in a.scores[k])
            out.append(f'<div class="case"><p><b>example {k + 1}</b> ({deltas})</p>'
                       f"<p>prompt</p><pre>{e(ev.prompts[k])}</pre>"
                       f"<p>reference</p><pre>{e(ev.references[k])}</pre>"
                       f'<p>{e(ev.runs[0]["adapter"])}</p><pre class="old">{e(first.predictions[k])}</pre>'
                       f'<p>{e(run["adapter"])}</p><pre class="new">{e(a.predictions[k])}</pre></div>')
    return out


def report_html(ev: Evaluation, about: str = "") -> str:
    """One self-contained HTML page: `about` (what was evaluated), the table, the plot (inline PNG) and the answers
    that changed."""
    e = html.escape
    head, *rows = table(ev.runs)
    cells = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    png = base64.b64encode(_plot(ev.runs)).decode("ascii")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
             "pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:.2em 0}pre.old{background:#fdecec}"
             "pre.new{background:#e9f7ec}.case{border-top:1px solid #ddd;margin-top:1em}p{margin:.3em 0}")
    return "\n".join(["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>gemmatune eval</title>',
                      f"<style>{style}</style></head><body>", "<h1>gemmatune eval</h1>",
                      f"<p>{e(about)}</p>" if about else "",
                      f"<table><tr>{cells}</tr>{body}</table>",
                      f'<p><img alt="metrics per run" src="data:image/png;base64,{png}"></p>',
                      *_diff_sections(ev), "</body></html>"])


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty --output without --force: before the evaluation, which may take long."""
    refuse_to_replace(out, force, "output")


def write_outputs(out: Path, ev: Evaluation, force: bool, about: str = "") -> None:
    """results.json, report.html and (with generation) predictions.jsonl into `out`, all at once or not at all."""
    check_output(out, force)
    with staged_dir(out) as staged:
        (staged / "results.json").write_text(json.dumps({"runs": ev.runs}, indent=2) + "\n", encoding="utf-8")
        if ev.answers:
            (staged / "predictions.jsonl").write_text(
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in ev.predictions()), encoding="utf-8")
        (staged / "report.html").write_text(report_html(ev, about), encoding="utf-8")
