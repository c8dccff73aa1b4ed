"""`gemmatune` command line. Generated text goes to stdout; everything else (progress, timings) to stderr.
A GemmatuneError ends the command with its message and status 2, never a stack trace."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gemmatune.config import DEFAULT_MODEL, FORMATS, PLAIN_TEMPLATE, DataConfig
from gemmatune.errors import GemmatuneError


def _generate(args: argparse.Namespace) -> None:
    import numpy as np

    from gemmatune.convert.hf import load_hf
    from gemmatune.generate import generate
    from gemmatune.tokenizer import StreamDecoder, load_tokenizer

    if not Path(args.model).is_dir():
        raise GemmatuneError(f"--model {args.model}: no such directory. Pass a Gemma 2 checkpoint directory in "
                             "Hugging Face layout (config.json, *.safetensors, tokenizer files), or leave --model "
                             "out to use the embedded tiny model.")
    t0 = time.perf_counter()
    tok = load_tokenizer(args.model)
    cfg, params = load_hf(args.model, dtype=args.dtype, stacked=False)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.chat:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    stream = StreamDecoder(tok)
    first: list[float] = []

    def show(new: np.ndarray) -> None:  # new: [1] token id of this step, -1 once the row has stopped
        first or first.append(time.perf_counter())
        if new[0] >= 0:
            sys.stdout.write(stream.feed(int(new[0])))
            sys.stdout.flush()

    t0 = time.perf_counter()
    [out] = generate(params, cfg, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     stop_ids=(tok.eos_id, tok.end_of_turn_id), on_tokens=show)
    sys.stdout.write(stream.flush() + "\n")
    end = time.perf_counter()
    # The first token's time includes compilation; the rate after it is the decoding speed.
    rate = f", then {(len(out) - 1) / (end - first[0]):.1f} tokens/s" if len(out) > 1 else ""
    print(f"{len(out)} tokens; first after {first[0] - t0:.2f}s{rate}", file=sys.stderr)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data options, shared by every command that reads a dataset."""
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="JSONL/JSON/CSV/TSV/Parquet files, globs, a datasets save_to_disk directory or a Hub name")
    p.add_argument("--val-data", nargs="+", default=[], metavar="PATH", help="validation files (else --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction for validation")
    p.add_argument("--format", choices=FORMATS, default="auto", help="default: detected from the columns")
    p.add_argument("--columns", default="", metavar="FIELD=COLUMN,...",
                   help="instruction columns, e.g. instruction=question,input=context,response=answer")
    p.add_argument("--template", default="chat",
                   help="instruction rows: 'chat' (Gemma chat template), 'plain' (Instruction:/Response:) or a "
                        "template string with {instruction} and {response}")
    p.add_argument("--train-on", choices=["model", "all"], default="model",
                   help="model: only model turns (with <end_of_turn>) and the final <eos>; all: every token")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--overflow", choices=["truncate", "drop"], default="truncate",
                   help="too-long examples: keep their start, or drop them")
    p.add_argument("--packing", choices=["pack", "pad"], default="pack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")


def data_config(args: argparse.Namespace) -> DataConfig:
    columns = []
    for pair in filter(None, args.columns.split(",")):
        field, eq, column = pair.partition("=")
        if not eq or not field.strip() or not column.strip():
            raise GemmatuneError(f"--columns: {pair!r} is not FIELD=COLUMN (e.g. instruction=question).")
        columns.append((field.strip(), column.strip()))
    return DataConfig(paths=tuple(args.data), val_paths=tuple(args.val_data), val_fraction=args.val_fraction,
                      format=args.format, columns=tuple(columns),
                      template=PLAIN_TEMPLATE if args.template == "plain" else args.template,
                      train_on=args.train_on, max_seq_len=args.max_seq_len, overflow=args.overflow,
                      packing=args.packing, seed=args.seed, skip_bad_rows=args.skip_bad_rows)


def _inspect(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from gemmatune.data.inspect import TRAINED_CLOSE, TRAINED_OPEN, summarize
    from gemmatune.data.pipeline import describe, prepare
    from gemmatune.tokenizer import load_tokenizer

    cfg = data_config(args)
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(cfg, tok, tmp)
        s = summarize(prepared, cfg, tok)
    if args.json:
        print(json.dumps(s, indent=2))
        return
    t, p, h = s["tokens"], s["packing"], s["histogram"]
    layout = ", ".join(f"{k}={v}" for k, v in s["format"].items() if v)
    print(f"format: {layout}")
    print(f"rows: {describe(prepared.train.report)}")
    for reason, where in s["rows"]["first_bad"].items():
        print(f"  first {reason}: {where}")
    if s["validation_examples"]:
        print(f"validation: {s['validation_examples']} examples")
    print(f"tokens: {t['total']} in {t['examples']} examples, {t['trained']} trained; per example min {t['min']}, "
          f"mean {t['mean']:.1f}, median {t['median']:.0f}, p95 {t['p95']:.0f}, max {t['max']}")
    print("length histogram (tokens):")
    top = max(h["counts"]) or 1
    for lo, hi, n in zip(h["edges"], h["edges"][1:], h["counts"]):
        print(f"  {lo:>6}-{hi:<6} {n:>8}  {'#' * round(40 * n / top)}")
    print(f"packing at max_seq_len {p['max_seq_len']}: packed rows {100 * p['packed_fill']:.1f}% full, one example "
          f"per padded row {100 * p['padded_fill']:.1f}% (training uses: {p['mode']})")
    print(f"example (trained tokens between {TRAINED_OPEN} and {TRAINED_CLOSE}):")
    print(s["example"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmatune", description="LoRA fine-tuning of Gemma 2 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)",
                       description="Generate text; only the generated text is written to stdout, streamed.")
    g.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="Gemma 2 checkpoint directory in Hugging Face layout (default: the embedded tiny model)")
    g.add_argument("--prompt", default="The quick brown fox", help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype; auto means the checkpoint's")
    g.set_defaults(run=_generate)

    data = sub.add_parser("data", help="check a dataset before training").add_subparsers(dest="data_command",
                                                                                         required=True)
    i = data.add_parser("inspect", help="formats, counts, lengths, packing and a rendered example",
                        description="Read, format and pack a dataset exactly as training would, and report on it.")
    add_data_args(i)
    i.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory whose tokenizer to use")
    i.add_argument("--json", action="store_true", help="the same figures as JSON")
    i.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GemmatuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission, a vanished file: the system's words and the path
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}. Free disk space or fix the permissions, then run again.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
