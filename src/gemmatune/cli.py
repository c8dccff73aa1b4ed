"""`gemmatune` command line. Generated text goes to stdout; everything else (progress, timings) to stderr.
A GemmatuneError ends the command with its message and status 2, never a stack trace."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gemmatune.config import DEFAULT_MODEL
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GemmatuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
