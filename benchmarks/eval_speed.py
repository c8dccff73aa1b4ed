"""`gemmatune eval --generate` answering speed: batched (left-padded, sorted by prompt length) vs one example at a
time (--batch-size 1), on the same examples, in one process.

    python benchmarks/eval_speed.py [--model tiny] [--data FILE] [--examples 64] [--batch-size 16] [--max-new-tokens N]

The examples are benchmarks/tasks.py's held-out dates (`Date: 2024-03-15\\nDMY: ` -> `15.03.2024`, the plain
template; every prompt the same length), or the first --examples rows of --data (instruction or chat rows, the
chat template), read by the same data pipeline as `gemmatune eval`; the answers come from the function `gemmatune eval`
uses (`evaluation.answer_and_score`), greedy, stopping at <eos> / <end_of_turn>. Each mode answers every example
twice: the first pass includes compilation (one per prompt-width bucket and batch size), the second is warm.
Prints examples/s for both passes and modes, the ratios, and whether the two modes gave the same answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import tasks
from common import cpu_name

from gemmatune.config import DataConfig
from gemmatune.convert import load_model
from gemmatune.data.pipeline import prepare
from gemmatune.evaluation import Sampling, answer_and_score, generation_cases
from gemmatune.hub import resolve_model
from gemmatune.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="as gemmatune's --model (tiny, a directory, a GGUF file, ...)")
    ap.add_argument("--data", default=None, help="instruction or chat rows (default: the held-out dates)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: as gemmatune eval's")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    model_dir = resolve_model(a.model)
    tok = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if a.data:
            dcfg = DataConfig(paths=(a.data,), max_seq_len=1024)
        else:
            data = tasks.write_jsonl(tasks.splits(0, a.examples)[1], Path(tmp) / "dates.jsonl")
            dcfg = DataConfig(paths=(str(data),), template=tasks.TEMPLATE, max_seq_len=64)
        prepared = prepare(dcfg, tok, Path(tmp) / "store")
        cases = generation_cases(prepared.train.store, prepared.train.indices[:a.examples], tok)
    t0 = time.perf_counter()
    cfg, params = load_model(model_dir, dtype=a.dtype)
    print(f"{a.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; loaded in "
          f"{time.perf_counter() - t0:.1f}s; {len(cases)} examples, prompts {min(len(c.prompt) for c in cases)}-"
          f"{max(len(c.prompt) for c in cases)} tokens; {a.dtype}; CPU: {cpu_name()} ({os.cpu_count()} threads)")

    results = {}
    for bs in (a.batch_size, 1):
        sampling = Sampling(max_new_tokens=a.max_new_tokens, batch_size=bs)
        passes = [answer_and_score(params, cfg, None, cases, tok, sampling) for _ in range(2)]
        results[bs] = passes
        cold, warm = (len(cases) / p.seconds for p in passes)
        print(f"batch size {bs:>3}: {cold:8.2f} examples/s with compilation, {warm:8.2f} warm "
              f"({passes[0].seconds:.1f}s, {passes[1].seconds:.1f}s); f1 {passes[1].means['f1']:.3f}")
    (b_cold, b_warm), (o_cold, o_warm) = ([p.seconds for p in results[bs]] for bs in (a.batch_size, 1))
    print(f"batched / one at a time: {o_cold / b_cold:.1f}x with compilation, {o_warm / b_warm:.1f}x warm")
    same = results[a.batch_size][1].predictions == results[1][1].predictions
    print(f"same answers in both modes: {same}")


if __name__ == "__main__":
    main()
