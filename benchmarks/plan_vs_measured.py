"""How `gemmatune plan`'s memory figure compares with the memory a real train step takes, on this CPU.

    python benchmarks/plan_vs_measured.py

For each case: the plan (XLA's CPU compiler, the step compiled from shapes alone) and, in a fresh process, the
real step on random weights: the process's resident memory is read after compiling (no arrays yet), its peak is
reset (/proc/self/clear_refs), the arguments are created (zeros of the same shapes) and one step runs; the peak
growth is the step's measured memory. Prints both and their ratio.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from gemmatune.config import PRESETS, TrainConfig
from gemmatune.plan import plan

CASES = [  # (name, model config, seq, batch, remat, dtype)
    ("small f32, remat block", PRESETS["small"], 512, 4, "block", "float32"),
    ("small bf16, remat full", PRESETS["small"], 512, 4, "full", "bfloat16"),
    ("small + 256k vocab, bf16, remat block", dataclasses.replace(PRESETS["small"], vocab_size=256000), 1024, 2,
     "block", "bfloat16"),
]

MEASURE = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp
from gemmatune import sharding
from gemmatune.step import Shapes, abstract_step
from gemmatune.config import from_hf_dict
from gemmatune.settings import config_from_dict

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

job = json.loads(sys.argv[1])
cfg = from_hf_dict(job["model"])
tcfg = config_from_dict(job["train"])
mesh = sharding.make_mesh(None, jax.devices()[:1], cfg)
shapes = Shapes(1, tcfg.batch_size, tcfg.data.max_seq_len)
step, args = abstract_step(cfg, tcfg, mesh, shapes)
compiled = step.lower(*args).compile()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident size
# Zeros in the arguments' shapes (the memory does not depend on the values; random weights would add their
# float32 draws to the peak).
state, frozen, rows = jax.tree.map(
    lambda a: jax.random.key(0) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype),
    args)
state, metrics = compiled(state, frozen, rows)
jax.block_until_ready(metrics)
print(json.dumps({"measured": status("VmHWM") - before}))
"""


def main() -> None:
    from gemmatune.settings import to_dict

    print(f"{'case':<40}{'plan MiB':>10}{'measured MiB':>14}{'plan/measured':>15}")
    for name, cfg, seq, batch, remat, dtype in CASES:
        base = TrainConfig()
        tcfg = dataclasses.replace(base, data=dataclasses.replace(base.data, max_seq_len=seq), batch_size=batch,
                                   remat=remat, dtype=dtype, max_steps=10)
        [p] = plan(cfg, tcfg, "cpu", suggest=False)
        job = json.dumps({"model": cfg.to_hf_dict(), "train": to_dict(tcfg)})
        out = subprocess.run([sys.executable, "-c", MEASURE, job], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
        print(f"{name:<40}{p.bytes['total'] / 2**20:>10.0f}{measured / 2**20:>14.0f}"
              f"{p.bytes['total'] / measured:>15.2f}")


if __name__ == "__main__":
    main()
