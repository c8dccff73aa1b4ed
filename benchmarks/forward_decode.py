"""Forward and KV-cache decode throughput: gemmatune vs transformers, same weights, same CPU, one run.

    python benchmarks/forward_decode.py [--preset small] [--batch 4] [--seq 512] [--prompt 64] [--new 128]

Both sides run float32 on the CPU threads this process has (torch is told the same count XLA uses).
transformers runs with eager attention, the implementation it requires for Gemma 2. Prints tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import best_of, random_tokens

from conftest import hf_model
from gemmatune import model as M
from gemmatune.config import PRESETS
from gemmatune.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = PRESETS[a.preset]
    # Weights that keep greedy decoding diverse, so neither side stops early or repeats one token.
    params = M.init_params(cfg, jax.random.key(0), jnp.float32, norm_mean=0.5, post_norm_mean=5.0)
    hf = hf_model(cfg, params)
    tokens = random_tokens(cfg.vocab_size, (a.batch, a.seq))

    fwd = jax.jit(lambda p, t: M.forward(p, t, cfg))
    ours_fwd = best_of(lambda: fwd(params, tokens).block_until_ready(), a.repeats)
    with torch.no_grad():
        hf_fwd = best_of(lambda: hf(torch.from_numpy(tokens)), a.repeats)

    layers = M.unstack(params)  # decoding's layout, as `gemmatune generate` loads it
    decode = {}
    for b in sorted({1, a.batch}):
        prompt = tokens[:b, :a.prompt]
        # No stop ids here and no eos for transformers: both decode exactly `new` tokens.
        ours = best_of(lambda prompt=prompt: generate(layers, cfg, prompt.tolist(), max_new_tokens=a.new), a.repeats)
        with torch.no_grad():
            ref = best_of(lambda prompt=prompt: hf.generate(torch.from_numpy(prompt), max_new_tokens=a.new,
                                                            min_new_tokens=a.new, do_sample=False, eos_token_id=None,
                                                            pad_token_id=0), a.repeats)
        decode[b] = (b * a.new / ours, b * a.new / ref)

    n_fwd = a.batch * a.seq
    print(f"{a.preset}: vocab {cfg.vocab_size}, {cfg.num_layers} layers, hidden {cfg.hidden_size}; forward batch "
          f"{a.batch} x seq {a.seq}; decode prompt {a.prompt} + {a.new} new tokens (prefill included); "
          f"{os.cpu_count()} CPU threads; float32")
    print(f"{'':16}{'gemmatune':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'forward':16}{n_fwd / ours_fwd:12.0f}{n_fwd / hf_fwd:14.0f}{hf_fwd / ours_fwd:8.2f}x  tokens/s")
    for b, (ours, ref) in decode.items():
        print(f"{f'decode batch {b}':16}{ours:12.1f}{ref:14.1f}{ours / ref:8.2f}x  tokens/s")


if __name__ == "__main__":
    main()
