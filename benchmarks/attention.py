"""One attention layer's forward and backward: the XLA path against gemmatune's flash kernel (and cuDNN's where
it applies), as the model calls them (model.full_attend), in bfloat16 with one packed row per batch.

    python benchmarks/attention.py [--seqs 1024,4096,8192] [--example-tokens 512] [--sweep] [--json out.json]

Per case: the memory XLA's compiler allocates for the program's temporaries (compiled from shapes, no arrays) and,
on a GPU, milliseconds per forward + backward and the useful TFLOP/s (the matrix products of the causal or
windowed pairs each kernel must compute: 4·H·E per pair forward, 10·H·E backward, the convention of the
FlashAttention papers; the XLA path computes all T² pairs, so its useful rate counts only these). On CPU the
kernel compiles in Pallas interpret mode: its memory figure is still the program's (no [T, S] array), and no time
is shown (interpret mode runs the grid as loops). --example-tokens N adds rows packed with examples of N tokens,
where the kernel skips the blocks of other examples (useful TFLOP/s then count each example's own pairs). With
--sweep (GPU), each head_dim's tiles (flash.BLOCKS) are
timed against alternatives, the forward tiles first and then the backward ones, and the fastest are printed as
the table entry to put in flash.BLOCKS.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import best_of, cpu_name, finish  # noqa: E402

from gemmatune import flash  # noqa: E402
from gemmatune import model as M  # noqa: E402
from gemmatune.config import GLOBAL, LOCAL, PRESETS  # noqa: E402

MODELS = ("gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma3-1b")
MiB = 2**20


def useful_flops(T: int, H: int, E: int, window: int | None) -> float:
    """Forward + backward matrix-product FLOPs over the pairs (t, s) a query sees: causal, within the window."""
    W = T if window is None else min(window, T)
    pairs = W * (W + 1) / 2 + (T - W) * W  # the first W rows see t + 1 keys, the rest W each
    return 14.0 * H * E * pairs


def segments(T: int, length: int) -> jax.Array:
    """[1, T] segment ids: examples of `length` tokens packed into one row (length T: one example)."""
    return (jnp.arange(T, dtype=jnp.int32) // length + 1)[None]


def layer_fn(cfg: Any, kind: str, impl: str, T: int, blocks: flash.Blocks | None = None, length: int | None = None):
    """(q, k, v, cotangent) -> the gradients of <attention(q, k, v), cotangent>: one layer's forward and backward
    through model.full_attend's `impl` (or flash_attention with these tiles), over one row of examples of `length`
    tokens (default: one example)."""
    seg = segments(T, length or T)

    def loss(q, k, v, cot):
        if blocks is not None:
            window = cfg.sliding_window if kind == LOCAL else None
            out = flash.flash_attention(q, k, v, seg, cap=cfg.attn_logit_softcap, window=window, blocks=blocks)
        else:
            out = M.full_attend(cfg, seg, impl)[kind](q, k, v)[0]
        return jnp.sum(out.astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def shapes(cfg: Any, T: int) -> list[jax.ShapeDtypeStruct]:
    q = jax.ShapeDtypeStruct((1, T, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    return [q, kv, kv, jax.ShapeDtypeStruct(q.shape, jnp.float32)]


def arrays(cfg: Any, T: int) -> list[jax.Array]:
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys, shapes(cfg, T))]


def milliseconds(fn: Any, args: list[jax.Array], repeats: int = 5) -> float:
    return 1e3 * best_of(lambda: jax.block_until_ready(fn(*args)), repeats)


def measure(name: str, kind: str, impl: str, T: int, gpu: bool, length: int | None = None) -> dict[str, Any]:
    cfg = PRESETS[name]
    row: dict[str, Any] = {"model": name, "layer": "local" if kind == LOCAL else "global", "seq": T, "impl": impl,
                           "example_tokens": length or T}
    try:
        fn = layer_fn(cfg, kind, impl, T, length=length)
        compiled = fn.lower(*shapes(cfg, T)).compile()
        row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / MiB
        if gpu:
            row["ms"] = milliseconds(compiled, arrays(cfg, T))
            window = cfg.sliding_window if kind == LOCAL else None
            n = T // (length or T)  # examples in the row, each its own causal triangle
            row["useful_tflops"] = n * useful_flops(T // n, cfg.num_heads, cfg.head_dim, window) / row["ms"] / 1e9
    except Exception as e:  # a kernel that does not apply or runs out of memory: recorded, the others go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def sweep(head_dim: int, T: int, budget_s: float) -> dict[str, Any]:
    """Time candidate tiles for `head_dim` (a gemma2 config with it, global layer): forward tiles first (warps and
    stages with them), then backward tiles with the best forward ones. Returns the fastest and every timing."""
    name = {256: "gemma2-9b", 128: "gemma2-27b"}[head_dim]
    cfg, start = PRESETS[name], time.perf_counter()
    args = arrays(cfg, T)
    base = flash.BLOCKS[head_dim]
    timings: list[dict[str, Any]] = []

    def timed(b: flash.Blocks, forward_only: bool) -> float:
        if time.perf_counter() - start > budget_s:
            return float("inf")
        try:
            if forward_only:
                seg = jnp.ones((1, T), jnp.int32)
                fn = jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, seg, cap=cfg.attn_logit_softcap,
                                                                   window=None, blocks=b))
                ms = milliseconds(fn, args[:3])
            else:
                ms = milliseconds(layer_fn(cfg, GLOBAL, "flash", T, b), args)
        except Exception as e:  # tiles too large for shared memory or registers: not a candidate
            timings.append({**dataclasses.asdict(b), "forward_only": forward_only, "error": str(e)[:120]})
            return float("inf")
        timings.append({**dataclasses.asdict(b), "forward_only": forward_only, "ms": ms})
        return ms

    def fastest(candidates: list[flash.Blocks], forward_only: bool, fallback: flash.Blocks) -> flash.Blocks:
        ms = [timed(b, forward_only) for b in candidates]  # inf: failed, or past the budget
        i = min(range(len(ms)), key=ms.__getitem__)
        return candidates[i] if ms[i] < float("inf") else fallback

    fwd = [dataclasses.replace(base, q=q, k=k, warps=w, stages=s)
           for q, k, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
    best = fastest(fwd, True, base)
    bwd = [dataclasses.replace(best, bwd_q=q, bwd_k=k) for q, k in itertools.product((32, 64, 128), (32, 64, 128))]
    best = fastest(bwd, False, best)
    return {"head_dim": head_dim, "seq": T, "best": dataclasses.asdict(best), "timings": timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1024,4096,8192")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--example-tokens", type=int, default=0,
                    help="also measure rows packed with examples of this many tokens (0: whole rows only)")
    ap.add_argument("--sweep", action="store_true", help="GPU: time alternative tiles for head_dim 128 and 256")
    ap.add_argument("--sweep-budget-s", type=float, default=120.0, help="seconds per head_dim for --sweep")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = jax.devices()[0]
    gpu = device.platform in ("gpu", "cuda")
    results: dict[str, Any] = {"device": device.device_kind if gpu else cpu_name(), "jax": jax.__version__,
                               "rows": [], "sweeps": []}
    print(f"{results['device']}, jax {jax.__version__}")
    print(f"{'model':<11} {'layer':<6} {'seq':>5} {'impl':<6} {'temp MiB':>9} {'ms':>8} {'TFLOP/s':>8}")
    for name in args.models.split(","):
        cfg = PRESETS[name]
        impls = ["xla", "flash"] + (["cudnn"] if gpu and cfg.attn_logit_softcap is None else [])
        for T in map(int, args.seqs.split(",")):
            kinds = [GLOBAL] + ([LOCAL] if cfg.sliding_window < T else [])
            lengths = [None] + ([args.example_tokens] if 0 < args.example_tokens < T else [])
            for kind, impl, length in itertools.product(kinds, impls, lengths):
                row = measure(name, kind, impl, T, gpu, length)
                results["rows"].append(row)
                shown = (f"{row.get('temp_mib', float('nan')):9.1f} {row.get('ms', float('nan')):8.2f} "
                         f"{row.get('useful_tflops', float('nan')):8.1f}")
                packed = f"packed {length}" if length else ""
                print(f"{name:<11} {row['layer']:<6} {T:>5} {impl:<6} {shown} {packed} {row.get('error', '')}")
    if args.sweep:
        if not gpu:
            sys.exit("--sweep times kernels: it needs a GPU")
        for head_dim in (256, 128):
            found = sweep(head_dim, 4096, args.sweep_budget_s)
            results["sweeps"].append(found)
            print(f"head_dim {head_dim}: fastest tiles {found['best']}")
    finish(results, t_start, args.json)


if __name__ == "__main__":
    main()
