"""`gemmatune` command line. Generated text goes to stdout; everything else (progress, timings) to stderr.
A GemmatuneError, or a mistake on the command line, ends the command with one message and status 2, never a stack
trace; a closed stdout (`| head`) ends it quietly, as it ends other Unix tools."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from gemmatune.config import ATTENTION, EMBEDDED_MODEL, METHODS, QUANT_KINDS, Quantization, TrainConfig
from gemmatune.errors import GemmatuneError
from gemmatune.hub import CONFIG_PRESETS, MODEL_HELP
from gemmatune.platforms import configure_jax
from gemmatune.settings import add_data_args, add_train_args, unknown_argument

if TYPE_CHECKING:
    from gemmatune.engine import Engine
    from gemmatune.plan import Plan

SAMPLE = Path(__file__).parent / "assets" / "sample"  # the embedded default job: train.yaml and its data


def _model_dir(spec: str) -> Path:
    """--model as a local directory: a path, `tiny`, a Hub id or a Kaggle handle (downloaded); once per command."""
    from gemmatune.hub import resolve_model

    return resolve_model(spec)


def _engine(args: argparse.Namespace, model: Path, adapters: dict[str, str], slots: int) -> Engine:
    """The decoding engine on --model's weights (as --dtype says) with each adapter (name -> directory) loaded."""
    from gemmatune.convert import load_model, model_config
    from gemmatune.convert.peft import load_adapter_for
    from gemmatune.engine import Engine
    from gemmatune.tokenizer import load_tokenizer

    loaded = {name: load_adapter_for(model, path, model_config(model)) for name, path in adapters.items()}
    cfg, params = load_model(model, dtype=args.dtype, stacked=False, quant=_quantization(args))  # no copy
    tok = load_tokenizer(model)
    engine = Engine(cfg, params, stop_ids=(tok.eos_id, tok.end_of_turn_id), slots=slots,
                    max_len=getattr(args, "max_len", None))
    for name, (ad, lora_cfg) in loaded.items():
        engine.add_adapter(name, ad, lora_cfg)
    return engine


def _generate(args: argparse.Namespace) -> None:
    from gemmatune.engine import Sampling
    from gemmatune.tokenizer import StreamDecoder, load_tokenizer

    t0 = time.perf_counter()
    model = _model_dir(args.model)
    tok = load_tokenizer(model)
    # The adapter is applied unmerged, as `serve` applies it: both commands give the same answers.
    engine = _engine(args, model, {"adapter": args.adapter} if args.adapter else {}, slots=1)
    print(f"loaded {args.model}{' + ' + args.adapter if args.adapter else ''} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if args.chat:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    stream = StreamDecoder(tok)
    sampling = Sampling(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        seed=args.seed)
    times: list[float] = []
    t0 = time.perf_counter()
    with engine:
        for token in engine.stream(prompt, sampling, "adapter" if args.adapter else None):
            times.append(time.perf_counter())
            sys.stdout.write(stream.feed(token))
            sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    # The first token's time includes compilation; the rate after it is the decoding speed.
    rate = f", then {(len(times) - 1) / (times[-1] - times[0]):.1f} tokens/s" if len(times) > 1 else ""
    first = f"; first after {times[0] - t0:.2f}s" if times else ""
    print(f"{len(times)} tokens{first}{rate}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from gemmatune.server import adapter_specs, serve

    serve(args.model, adapter_specs(args.adapter), host=args.host, port=args.port, api_key=args.api_key or None,
          dtype=args.dtype, slots=args.slots, max_len=args.max_len, quant=_quantization(args))


def _chat(args: argparse.Namespace) -> None:
    """A terminal chat through the serving engine (one decode path): history kept, answers streamed to stdout.
    Reads lines from stdin, a terminal or a pipe; `/reset` clears the history, `/exit` or end of input ends."""
    from gemmatune.engine import Sampling
    from gemmatune.tokenizer import StreamDecoder, load_tokenizer

    model = _model_dir(args.model)
    tok = load_tokenizer(model)
    adapter = "adapter" if args.adapter else None
    engine = _engine(args, model, {adapter: args.adapter} if adapter else {}, slots=1)
    # The sampling options are checked now, not at the first answer.
    engine.check([tok.bos_id], Sampling(min(args.max_new_tokens, engine.max_len - 1), temperature=args.temperature,
                                        top_p=args.top_p, top_k=args.top_k))
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform
            pass
    with engine:
        print(f"chatting with {args.model}{' + ' + args.adapter if args.adapter else ''} (context "
              f"{engine.max_len} tokens); /reset clears the history, /exit ends", file=sys.stderr)
        history: list[dict[str, str]] = []
        while True:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                break
            if line == "/exit":
                break
            if line == "/reset":
                history = []
                print("(history cleared)", file=sys.stderr)
                continue
            if not line:
                continue
            messages = [*history, {"role": "user", "content": line}]
            prompt = tok.encode_chat(messages, add_generation_prompt=True)
            room = engine.max_len - len(prompt)
            if room < 1:
                print(f"(the conversation is {len(prompt)} tokens, the context {engine.max_len}: /reset to start "
                      "over)", file=sys.stderr)
                continue
            sampling = Sampling(max_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
            tokens = engine.stream(prompt, sampling, adapter)
            stream, parts = StreamDecoder(tok), []
            try:
                for token in tokens:
                    parts.append(stream.feed(token))
                    sys.stdout.write(parts[-1])
                    sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
                tokens.close()  # cancels the request
                print("\n(interrupted; this turn is dropped)", file=sys.stderr)
                continue
            parts.append(stream.flush())
            sys.stdout.write(parts[-1])
            n = len(parts) - 1
            sys.stdout.write("\n")
            if n == sampling.max_tokens:
                print(f"(cut at {sampling.max_tokens} tokens: --max-new-tokens)", file=sys.stderr)
            history = [*messages, {"role": "assistant", "content": "".join(parts)}]


def _inspect(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from gemmatune.data.inspect import TRAINED_CLOSE, TRAINED_OPEN, summarize
    from gemmatune.data.pipeline import describe, prepare
    from gemmatune.settings import data_config_from_args
    from gemmatune.tokenizer import load_tokenizer

    cfg = data_config_from_args(args)
    tok = load_tokenizer(_model_dir(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(cfg, tok, tmp)
        s = summarize(prepared, cfg, tok)
    if args.json:
        print(json.dumps(s, indent=2))
        return
    t, p, h = s["tokens"], s["packing"], s["histogram"]
    layouts = [(f["split"], f["source"], ", ".join(f"{k}={v}" for k, v in f.items()
                                                    if v and k not in ("split", "source"))) for f in s["formats"]]
    if len(layouts) == 1:
        print(f"format: {layouts[0][2]}")
    else:  # each file is detected on its own
        print("formats:")
        for split, source, layout in layouts:
            print(f"  {source}{' (validation)' if split == 'validation' else ''}: {layout}")
    print(f"rows: {describe(prepared.train.report)}")
    for reason, where in s["rows"]["first_bad"].items():
        print(f"  first {reason}: {where}")
    pairs, unit = s["pairs"], 2 if s["pairs"] else 1  # preference data: a row is a pair of examples
    what = "pairs" if pairs else "examples"
    if s["validation_examples"]:
        print(f"validation: {s['validation_examples'] // unit} {what}")

    def stats(d: dict) -> str:
        return f"min {d['min']}, mean {d['mean']:.1f}, median {d['median']:.0f}, p95 {d['p95']:.0f}, max {d['max']}"

    if pairs:
        print(f"tokens: {t['total']} in {t['pairs']} pairs ({t['examples']} examples), {t['trained']} trained "
              "(replies only)")
        for part in ("prompt", "chosen", "rejected"):
            print(f"  {part + (' (shared)' if part == 'prompt' else ''):<16} {stats(t[part])}")
    else:
        print(f"tokens: {t['total']} in {t['examples']} examples, {t['trained']} trained; per example {stats(t)}")
    print("length histogram (tokens" + (" of chosen + rejected):" if pairs else "):"))
    top = max(h["counts"]) or 1
    for lo, hi, n in zip(h["edges"], h["edges"][1:], h["counts"]):
        print(f"  {lo:>6}-{hi:<6} {n:>8}  {'#' * round(40 * n / top)}")
    print(f"packing the {p['training_examples'] // unit} training {what} at max_seq_len {p['max_seq_len']} as "
          f"epoch 0 does: packed rows {100 * p['packed_fill']:.1f}% full, one {what[:-1]} per padded row "
          f"{100 * p['padded_fill']:.1f}% (training uses: {p['mode']})")
    if pairs:
        print(f"first pair (trained tokens between {TRAINED_OPEN} and {TRAINED_CLOSE}), chosen:")
        print(s["example"]["chosen"])
        print("rejected:")
        print(s["example"]["rejected"])
    else:
        print(f"example (trained tokens between {TRAINED_OPEN} and {TRAINED_CLOSE}):")
        print(s["example"])


def _eval(args: argparse.Namespace) -> None:
    import json

    from gemmatune.evaluation import EvalOptions, Sampling, check_output, evaluate, format_table, write_outputs
    from gemmatune.settings import data_config_from_args

    dcfg = data_config_from_args(args)
    metrics = tuple(m.strip() for given in args.metric or [] for m in given.split(",") if m.strip())
    opts = EvalOptions(generate=args.generate, limit=args.limit, **({"metrics": metrics} if metrics else {}),
                       sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, seed=args.seed, batch_size=args.batch_size))
    if args.output:
        check_output(Path(args.output), args.force)  # refused now, not after the evaluation
    result = evaluate(_model_dir(args.model), args.adapter or [], dcfg, opts, dtype=args.dtype,
                      quant=_quantization(args))
    if args.output:
        about = f"model {args.model}, data {', '.join(dcfg.val_paths or dcfg.paths)}" + \
            (", the validation examples" if dcfg.val_fraction and not dcfg.val_paths else "")
        write_outputs(Path(args.output), result, args.force, about)
        print(f"wrote {args.output}/report.html, results.json"
              f"{', predictions.jsonl' if result.answers else ''}", file=sys.stderr)
    print(json.dumps({"runs": result.runs}, indent=2) if args.json else format_table(result.runs))


def _train(args: argparse.Namespace) -> None:
    import dataclasses

    from gemmatune.loop import train  # imported here: the other commands and --help start without JAX
    from gemmatune.settings import given, train_config_from_args

    sample = args.config is None and not given(args, "data.paths")
    if sample:  # no config and no data: the embedded default job
        args.config = str(SAMPLE / "train.yaml")
    cfg = train_config_from_args(args)
    if sample:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, paths=tuple(str(SAMPLE / p) for p in cfg.data.paths)))
        print(f"no --data or --config given: fine-tuning the embedded tiny model on {SAMPLE / 'chat.jsonl'}",
              file=sys.stderr)
    result = train(cfg)
    for prompt, text in result.answers:  # what the model now answers: the point of the run
        print(f"> {prompt}\n{text}")


def _export(args: argparse.Namespace) -> None:
    from gemmatune.export import export

    fmt = getattr(args, "format", "hf")  # `merge` is `export --format hf`
    out = export(_model_dir(args.model), args.adapter, fmt, args.output, dtype=args.dtype, force=args.force)
    print(f"wrote {fmt} to {out}", file=sys.stderr)


def _plan(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from gemmatune.config import LoraConfig
    from gemmatune.hub import resolve_config
    from gemmatune.plan import DEVICES, GiB, plan

    cfg = resolve_config(args.model)  # a preset name, or any --model (of a Hub or Kaggle model, config.json only)
    base = TrainConfig()
    tcfg = dataclasses.replace(base, data=dataclasses.replace(base.data, max_seq_len=args.seq_len),
                               lora=LoraConfig(rank=args.lora_rank), batch_size=args.batch_size,
                               grad_accum=args.grad_accum, remat=args.remat, dtype=args.dtype, tune=args.tune,
                               loss_chunk=args.loss_chunk, attention=args.attention,
                               quantize=args.quantize, quantize_block=args.quantize_block,
                               double_quant=args.double_quant, method=args.method, teacher=args.teacher,
                               # any directory: the plan only needs to know the batches carry the cache's top-k
                               teacher_cache="(planned)" if args.teacher_cache else "", kd_topk=args.kd_topk)
    teacher = resolve_config(args.teacher) if args.method == "distill" and not args.teacher_cache else None
    memory = int(args.memory_gib * GiB) if args.memory_gib else None
    plans = plan(cfg, tcfg, args.device, devices=args.devices, mesh=args.mesh or "", memory=memory, teacher=teacher)
    kind = DEVICES[args.device]
    n = args.devices or kind.devices
    if args.json:
        print(json.dumps({"device": args.device, "devices": n, "compiler": kind.compiler,
                          **plans[0].to_json(), "tried": [p.to_json() for p in plans[1:]]}, indent=2))
        return
    print(f"{args.model} on {n} x {kind.label}: seq {args.seq_len} x batch {args.batch_size} x accum "
          f"{args.grad_accum}, {args.method} {args.tune} (rank {args.lora_rank}), remat {args.remat}, {args.dtype}"
          + (f", teacher {args.teacher}" + (" (from its cache)" if args.teacher_cache else "")
             if args.method == "distill" else ""))
    print(format_plan(plans[0]))
    for p in plans[1:]:
        print(f"\ntried {p.changes}:")
        print(format_plan(p))
    fitting = [p for p in plans[1:] if p.fits]
    if not plans[0].fits:
        teacher = " --teacher-cache (the teacher's top-k computed first, apart)," if teacher is not None else ""
        print("\n" + (f"It fits with: {fitting[0].changes}" if fitting else
                      f"Nothing tried fits: use more devices,{teacher} a shorter --seq-len, or a smaller model."))


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(p: Plan) -> str:
    from gemmatune.plan import PARTS

    mesh = ",".join(f"{a}={s}" for a, s in p.mesh.items())
    rows = [f"  mesh {mesh}; per device:"]
    rows += [f"  {name:<12}{_size(p.bytes[name]):>12}" for name in PARTS]
    verdict = "fits" if p.fits else "does NOT fit"
    rows.append(f"  {'total':<12}{_size(p.bytes['total']):>12} of {_size(p.capacity)}: {verdict}")
    return "\n".join(rows + ([f"  ({p.note})"] if p.note else []))


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one message (see main), not the usage block argparse prints before it."""

    def error(self, message: str) -> NoReturn:
        raise GemmatuneError(f"{self.prog}: {message} (see {self.prog} --help)")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype; auto means the checkpoint's")


def _quant_args(p: argparse.ArgumentParser) -> None:
    """--quantize, --quantize-block, --double-quant: the base's projection weights stored quantized (QLoRA), as
    `train` takes them (TrainConfig.quantize)."""
    p.add_argument("--quantize", choices=["none", *QUANT_KINDS], default="none",
                   help="store the base's projection weights quantized: nf4, int4 or int8 (default: none)")
    p.add_argument("--quantize-block", type=int, default=64, help="with --quantize: weights per scale (default: 64)")
    p.add_argument("--double-quant", action="store_true", help="with --quantize: code the scales in 8 bits too")


def _quantization(args: argparse.Namespace) -> Quantization | None:
    return None if args.quantize == "none" else Quantization(args.quantize, args.quantize_block, args.double_quant)


def _decoding_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options of the commands that decode through the engine (generate, chat)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"longest answer (default: "
                                                                              f"{max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _dtype_arg(p)
    _quant_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gemmatune", description="LoRA fine-tuning of Gemma 2 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)  # the subcommands' parsers are _Parsers too

    g = sub.add_parser("generate", help="continue a prompt (or answer it with --chat)",
                       description="Generate text; only the generated text is written to stdout, streamed.")
    g.add_argument("--model", default=EMBEDDED_MODEL, help=MODEL_HELP + "; default: tiny")
    g.add_argument("--adapter", default=None, help="a gemmatune adapter directory (OUTPUT/adapter) to apply")
    g.add_argument("--prompt", default="The quick brown fox", help="prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    _decoding_args(g, max_new_tokens=64)
    g.set_defaults(run=_generate, parser=g)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: a base model and its adapters, batched",
                        description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) "
                                    "for a base model and any number of LoRA adapters; requests name the base or an "
                                    "adapter as their model, and decode together in one batch.")
    sv.add_argument("--model", default=EMBEDDED_MODEL, help="the base model: " + MODEL_HELP + "; default: tiny")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="an adapter (gemmatune's or PEFT's) served as model NAME (PATH alone: its directory's "
                         "name); repeat for more. Adapters can also be added while running: POST /v1/adapters")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    sv.add_argument("--api-key", default=os.environ.get("GEMMATUNE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every request but /health (default: the "
                         "GEMMATUNE_API_KEY environment variable, which keeps the key out of the process list)")
    _dtype_arg(sv)
    _quant_args(sv)
    sv.add_argument("--slots", type=int, default=8, help="requests decoded together in one batch (default: 8)")
    sv.add_argument("--max-len", type=int, default=None,
                    help="tokens per request, prompt + answer (default: the model's context, at most 4096)")
    sv.set_defaults(run=_serve, parser=sv)

    c = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="An interactive chat: answers streamed, the conversation kept (through the chat "
                                   "template). /reset clears it, /exit (or end of input) ends. Reads stdin, so a "
                                   "pipe of lines works too.")
    c.add_argument("--model", default=EMBEDDED_MODEL, help=MODEL_HELP + "; default: tiny")
    c.add_argument("--adapter", default=None, help="an adapter directory (gemmatune's or PEFT's) to apply")
    _decoding_args(c, max_new_tokens=256)
    c.add_argument("--max-len", type=int, default=None,
                   help="tokens of the whole conversation (default: the model's context, at most 4096)")
    c.set_defaults(run=_chat, parser=c)

    t = sub.add_parser("train", help="fine-tune with LoRA (no arguments: the embedded tiny model on sample data)",
                       description="Fine-tune a Gemma 2 checkpoint on your data. Every setting is an option, listed "
                                   "below with its default; a YAML file (--config) sets them too, and options "
                                   "override it. A setting in a section is --section.key or --section-key (e.g. "
                                   "--lora.rank 16, --data-max-seq-len 512); '_' may replace '-' (the YAML "
                                   "spelling). A boolean alone means true (--resume), or takes true/false; a list "
                                   "takes comma-separated values (--lora.targets q,v). With neither --config nor "
                                   "--data: the embedded sample job.")
    add_train_args(t)
    t.set_defaults(run=_train, parser=t)

    for name, what in (("merge", "fold an adapter into the base weights: a Hugging Face checkpoint"),
                       ("export", "write a merged Hugging Face model, a PEFT adapter or a GGUF file")):
        e = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        e.add_argument("--model", default=EMBEDDED_MODEL, help="the base model: " + MODEL_HELP + "; default: tiny")
        e.add_argument("--adapter", required=True, help="the adapter directory (OUTPUT/adapter, or a PEFT adapter)")
        if name == "merge":
            e.add_argument("--output", required=True, help="output directory for the merged checkpoint")
            e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                           help="merged weights: auto (the base's), float32 or bfloat16 (default: auto)")
        else:
            e.add_argument("--format", choices=["hf", "peft", "gguf"], required=True,
                           help="hf: merged Hugging Face checkpoint; peft: the adapter for transformers + peft; "
                                "gguf: one merged file for llama.cpp and Ollama")
            e.add_argument("--output", required=True, help="output directory; for --format gguf a .gguf file path")
            e.add_argument("--dtype", default="auto",
                           choices=["auto", "float32", "bfloat16", "f32", "f16", "bf16", "q8_0"],
                           help="merged weights: auto (the base's), float32 or bfloat16; for --format gguf also "
                                "f32, f16, bf16 and q8_0 (default: auto)")
        e.add_argument("--force", action="store_true", help="replace an existing output")
        e.set_defaults(run=_export, parser=e)

    from gemmatune.config import EVAL_BATCH, EVAL_MAX_NEW_TOKENS, EVAL_NEW_TOKENS_SLACK, NO_ADAPTER
    from gemmatune.scoring import METRICS

    ev = sub.add_parser("eval", help="loss, perplexity and answer metrics of a base model and adapters on your data",
                        description="Evaluate the base model and adapters on one dataset, side by side: the loss "
                                    "and perplexity over the trained tokens (the data read, formatted and masked "
                                    "as train reads it; with --val-fraction or --val-data, the validation examples "
                                    "that training held out), and with --generate the answers to each example's "
                                    "prompt (its text before the last model turn) scored against that turn: exact "
                                    "match, contains, token F1 and ROUGE-L.")
    ev.add_argument("--model", default=EMBEDDED_MODEL, help="the base model: " + MODEL_HELP + "; default: tiny")
    ev.add_argument("--adapter", action="append", metavar="DIR",
                    help=f"an adapter directory (OUTPUT/adapter, or a PEFT adapter); repeat for several runs side by "
                         f"side; {NO_ADAPTER} is the base model alone (default: {NO_ADAPTER})")
    _dtype_arg(ev)
    _quant_args(ev)
    ev.add_argument("--generate", action="store_true", help="also answer every prompt and score the answers "
                                                            "(instruction or chat rows)")
    ev.add_argument("--metric", action="append", metavar="NAME",
                    help=f"with --generate: a metric to report, repeatable or comma-separated: "
                         f"{', '.join(METRICS)} (default: all)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"tokens generated per answer at most (default: the longest reference's tokens + "
                         f"{EVAL_NEW_TOKENS_SLACK}, at most {EVAL_MAX_NEW_TOKENS})")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 (the default) means greedy decoding")
    ev.add_argument("--top-p", type=float, default=None)
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    ev.add_argument("--batch-size", type=int, default=EVAL_BATCH,
                    help=f"prompts answered together, and rows per loss batch (default: {EVAL_BATCH})")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N examples")
    ev.add_argument("--json", action="store_true", help='print one JSON object {"runs": [...]} instead of the table')
    ev.add_argument("--output", default=None, metavar="DIR",
                    help="write results.json, report.html (table, plot, the answers that changed) and, with "
                         "--generate, predictions.jsonl here")
    ev.add_argument("--force", action="store_true", help="replace a non-empty --output directory")
    add_data_args(ev)
    ev.usage = "%(prog)s --data PATH [--adapter DIR ...] [--generate] [--output DIR] [options]"
    ev.set_defaults(run=_eval, parser=ev)

    from gemmatune.plan import DEVICES

    pl = sub.add_parser("plan", help="will a training run fit a device? (a compile-time estimate, no weights)",
                        description="Compile the train step for a device ahead of time, from shapes alone, and report "
                                    "the memory per device the compiler allots: an estimate, not a measurement (on CPU "
                                    "0.89-0.93 of the measured peak; GPU kinds from the table are compiled by the TPU "
                                    "compiler for a stand-in TPU slice, --device gpu by this machine's GPU). When it "
                                    "does not fit, try what would make it fit.")
    pl.add_argument("--model", required=True, help=f"a configuration preset ({CONFIG_PRESETS}) or "
                                                  + MODEL_HELP + " (only its config.json is read)")
    pl.add_argument("--device", required=True, choices=list(DEVICES),
                    help="device kind (memory per device); gpu and cpu: this machine's own, compiled by their "
                         "compilers (gpu: its CUDA backend, the memory JAX may use on it)")
    pl.add_argument("--devices", type=int, default=None, help="device count (default: one GPU; a TPU's smallest slice)")
    pl.add_argument("--mesh", default="",
                    help="e.g. data=2,model=4 (default: chosen from the device count and the batch size)")
    pl.add_argument("--seq-len", type=int, required=True)
    pl.add_argument("--batch-size", type=int, required=True, help="rows per micro-batch")
    pl.add_argument("--grad-accum", type=int, default=1)
    pl.add_argument("--lora-rank", type=int, default=8)
    pl.add_argument("--remat", choices=["none", "block", "full"], default="block")
    pl.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk,
                    help=f"positions per chunk of the loss (train's --loss-chunk; default: {TrainConfig.loss_chunk}); "
                         "each chunk holds [chunk, vocab] float32 logits")
    pl.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    pl.add_argument("--attention", choices=["auto", *ATTENTION], default="auto",
                    help="the attention kernel (train's --attention; auto: the compiling device's choice)")
    pl.add_argument("--tune", choices=["lora", "full"], default="lora", help="what is trained (train's --tune)")
    pl.add_argument("--method", choices=METHODS, default="sft", help="what the model learns (train's --method)")
    pl.add_argument("--teacher", default="", help="method distill: the teacher, as --model (only its config.json is "
                                                  "read); its weights share the devices")
    pl.add_argument("--teacher-cache", action="store_true",
                    help="method distill: train from a teacher cache (train's --teacher-cache): no teacher weights")
    pl.add_argument("--kd-topk", type=int, default=TrainConfig.kd_topk, help="with --teacher-cache: log-probs per "
                                                                              "position in the batches")
    _quant_args(pl)
    pl.add_argument("--memory-gib", type=float, default=None, help="memory per device, overriding the device table")
    pl.add_argument("--json", action="store_true", help="the same figures in bytes, with fits: true|false")
    pl.set_defaults(run=_plan, parser=pl)

    data = sub.add_parser("data", help="check a dataset before training").add_subparsers(dest="data_command",
                                                                                         required=True)
    i = data.add_parser("inspect", help="formats, counts, lengths, packing and a rendered example",
                        description="Read, format and pack a dataset exactly as training would, and report on it. "
                                    "The data settings are the same options as train's.")
    i.add_argument("--model", default=EMBEDDED_MODEL, help="whose tokenizer to use: " + MODEL_HELP +
                   "; default: tiny")
    i.add_argument("--json", action="store_true", help="the same figures as JSON")
    add_data_args(i)
    i.set_defaults(run=_inspect, parser=i)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_jax()  # off a TPU VM, keep JAX away from libtpu (its warnings, its lock); before JAX is imported
    # JAX takes 75% of a GPU's memory by default; `gemmatune plan` counts on 95% (set it lower to share the GPU).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:
            raise unknown_argument(args.parser, extra)
        args.run(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below rather than at exit
    except GemmatuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.EPIPE:  # the reader went away (`| head`): stop quietly, like any Unix tool
            # Python would still flush stdout at exit and report that write failing too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13  # what a shell reports for a command ended by SIGPIPE
        # a full disk, a permission, a vanished file: the system's words and the path
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
