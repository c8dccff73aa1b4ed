"""`generate` decoding speed of two commits, alternated in one run (for changes to the decoding path).

    python benchmarks/decode_commits.py BASE [HEAD] [--rounds 2]

Each commit is checked out into a temporary git worktree and timed in a fresh process, the two alternating, so
both see the same machine. Preset `small`, float32, 64-token prompts, 128 new tokens, batch 1 and 4, best of 3.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

TIMING = """
import time, jax, jax.numpy as jnp, numpy as np
from gemmatune import model as M
from gemmatune.config import PRESETS
from gemmatune.generate import generate
cfg = PRESETS["small"]
params = M.unstack(M.init_params(cfg, jax.random.key(0), jnp.float32, norm_mean=0.5, post_norm_mean=5.0))
for b in (1, 4):
    prompts = np.random.RandomState(0).randint(3, cfg.vocab_size, (b, 64)).tolist()
    generate(params, cfg, prompts, max_new_tokens=128)  # compile
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        generate(params, cfg, prompts, max_new_tokens=128)
        best = min(best, time.perf_counter() - t0)
    print(b, b * 128 / best)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("head", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rates: dict[str, dict[int, list[float]]] = {a.base: {1: [], 4: []}, a.head: {1: [], 4: []}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for commit in (a.base, a.head):
            trees[commit] = os.path.join(tmp, commit.replace("/", "_"))
            subprocess.run(["git", "worktree", "add", "-q", "--detach", trees[commit], commit], check=True)
        try:
            for _ in range(a.rounds):
                for commit, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "src"), "JAX_PLATFORMS": "cpu"}
                    out = subprocess.run([sys.executable, "-c", TIMING], env=env, check=True, capture_output=True,
                                         text=True).stdout
                    for line in out.splitlines():
                        b, rate = line.split()
                        rates[commit][int(b)].append(float(rate))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", tree], check=False)
    for b in (1, 4):
        old, new = max(rates[a.base][b]), max(rates[a.head][b])
        print(f"batch {b}: {a.base} {old:.1f} tokens/s, {a.head} {new:.1f} tokens/s, ratio {new / old:.2f}x")


if __name__ == "__main__":
    main()
