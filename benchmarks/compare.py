"""One LoRA fine-tuning step, side by side: gemmatune vs transformers + PEFT vs KerasHub (Keras 3 on JAX).

    python benchmarks/compare.py [--workload small|vocab256k|all] [--steps 8] [--bf16] [--threads 2] [--json out.json]

Every tool trains the same Gemma 2 config with LoRA r=8, alpha 16 on q, k, v, o, gate, up, down, on the same random
tokens (inputs and next-token targets, every position trained), with AdamW (lr 2e-4, betas 0.9/0.999, eps 1e-8, no
weight decay) after global-norm clipping at 1.0, in float32; `--bf16` adds a second set of runs, every tool with
bfloat16 base weights, compared only with each other. Each tool runs in its own subprocess, one at a time, so its
peak RSS (ru_maxrss at the end of the child) is its own. A step is compiled or warmed up first, then `--steps` steps
are timed, each waited for (as a training loop reads its loss).

Threads: every child is pinned to the same `--threads` CPUs (sched_setaffinity, inherited by all its threads) and
told that count in each library's own setting, so that no tool runs on more cores than another on any machine:
XLA's CPU client (gemmatune, and KerasHub on JAX) sizes its Eigen intra-op pool from PJRT_NPROC (then NPROC, then
the CPUs in the affinity mask; jaxlib 0.10's DefaultThreadPoolSize), torch from torch.set_num_threads, OpenMP and
MKL from OMP_NUM_THREADS / MKL_NUM_THREADS. Each child reports the CPUs it ran on.

MFU (gemmatune only) counts the model FLOPs of a LoRA step, not 6 x parameters: the frozen base weights get no
weight gradient, so a frozen matrix of n weights costs 2n per token forward and 2n backward (the input gradient
only), while an adapter of n weights costs 2n forward and 4n backward (input and weight gradients):

    flops/token = 4 * N_base + 6 * N_lora + 12 * H * E * sum over layers of T_attn

N_base: the seven projections of every layer plus the tied output projection (D x V; the embedding lookup is no
matmul); N_lora: r * (in + out) for each adapted projection; the attention term is QK^T and PV, 2 matmuls of
2 * H * E * T_attn FLOPs each per token forward (4 H E T_attn), twice that backward (8 H E T_attn: both inputs of
each need gradients), 12 H E T_attn in all, with T_attn the keys a query sees on average in that layer under the
causal (and sliding-window) mask, about (T + 1) / 2. Rematerialisation is not counted (it is the implementation's
extra work, not the model's). The peak is the matrix multiply throughput of the run's dtype (float32, or bfloat16
for the bfloat16 base weights) measured in the same process (a jitted 2048 x 2048 jnp.dot, best of several).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import best_of, call_times, random_tokens

from gemmatune.config import LOCAL, PRESETS, ModelConfig

TOOLS = ("gemmatune", "transformers+peft", "kerashub")
RANK, ALPHA, LR, CLIP = 8, 16.0, 2e-4, 1.0
THREADS = 2  # --threads default: the CI machine's cores


@dataclasses.dataclass(frozen=True)
class Workload:
    cfg: ModelConfig
    batch: int
    seq: int


WORKLOADS = {
    "small": Workload(PRESETS["small"], batch=4, seq=512),
    # The real Gemma vocabulary on the small body: the output projection and the loss dominate.
    "vocab256k": Workload(dataclasses.replace(PRESETS["small"], vocab_size=256000), batch=2, seq=1024),
}


def data(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, [B, T] each."""
    t = random_tokens(w.cfg.vocab_size, (w.batch, w.seq + 1))
    return t[:, :-1], t[:, 1:]


def timed_steps(step: Callable[[], Any], steps: int) -> float:
    """Seconds per step, median of `steps` timed steps after two warm-up steps (the first compiles)."""
    return float(np.median(call_times(step, steps, warmup=2)))


# --- the three tools, each run in a child process --------------------------------------------------------------

def run_gemmatune(w: Workload, steps: int, dtype: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from gemmatune.config import LoraConfig, TrainConfig
    from gemmatune.model import init_params
    from gemmatune.step import (
        Shapes,
        init_state,
        make_train_step,
        optimizer,
        split_trainable,
    )

    tcfg = TrainConfig(dtype=dtype, lora=LoraConfig(rank=RANK, alpha=ALPHA), lr=LR, schedule="constant",
                       clip_norm=CLIP, weight_decay=0.0, batch_size=w.batch)
    base = init_params(w.cfg, jax.random.key(0), jnp.dtype(dtype))
    trainable, frozen = split_trainable(base, w.cfg, tcfg, jax.random.key(1))
    opt = optimizer(tcfg, 1000)
    state = init_state(trainable, opt, jax.random.key(2))
    train_step = make_train_step(w.cfg, tcfg, opt)
    x, y = data(w)
    ones = np.ones_like(x)
    batch = Shapes(1, w.batch, w.seq).stack({"inputs": x, "targets": y, "weights": ones.astype(np.float32),
                                             "segment_ids": ones, "positions": np.broadcast_to(np.arange(w.seq),
                                                                                               x.shape)})

    def step() -> None:
        nonlocal state
        state, m = train_step(state, frozen, batch)
        jax.block_until_ready(m["loss"])

    seconds = timed_steps(step, steps)
    peak = matmul_peak(dtype)
    return {"seconds": seconds, "peak_flops": peak, "dtype": f"{dtype} base (adapters, optimizer: float32)",
            "settings": f"remat {tcfg.remat}, loss_chunk {tcfg.loss_chunk}"}


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Matrix-multiply FLOP/s in `dtype` of this process's XLA CPU backend."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    return 2 * n ** 3 / best_of(lambda: dot(a, a).block_until_ready(), repeats)


def run_transformers(w: Workload, steps: int, dtype: str, threads: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = {k: v for k, v in w.cfg.to_hf_dict().items() if k != "architectures"}
    model = Gemma2ForCausalLM(Gemma2Config(**d, attn_implementation="eager"))  # eager: what Gemma 2 requires
    model.to(getattr(torch, dtype))  # the base weights; PEFT keeps the adapters float32 (autocast_adapter_dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in data(w))

    def step() -> None:
        logits = model(input_ids=x).logits.float()  # final soft-cap applied; the loss in float32, as gemmatune's
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return {"seconds": timed_steps(step, steps), "dtype": f"{dtype} base (adapters, optimizer: float32)",
            "settings": "eager attention, PEFT LoRA on all seven projections"}


# KerasHub's layer names for q, k, v, o, gate, up, down (its default enable_lora targets only query and value).
KERAS_TARGETS = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]


def run_kerashub(w: Workload, steps: int, dtype: str) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = "jax"  # the original notebooks' stack; read once, at import
    import keras
    import keras_hub

    c = w.cfg
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=c.vocab_size, num_layers=c.num_layers, num_query_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, hidden_dim=c.hidden_size,
        intermediate_dim=2 * c.intermediate_size,  # KerasHub stores twice the feed-forward width
        head_dim=c.head_dim, query_head_dim_normalize=c.query_pre_attn_scalar == c.head_dim,
        use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=c.attn_logit_softcap,
        final_logit_soft_cap=c.final_logit_softcap, use_sliding_window_attention=LOCAL in c.layer_types,
        sliding_window_size=c.sliding_window, layer_norm_epsilon=c.rms_norm_eps, dtype=dtype)
    backbone.enable_lora(rank=RANK, target_layer_names=KERAS_TARGETS)
    adapted = [layer for layer in backbone._flatten_layers() if getattr(layer, "lora_enabled", False)]
    assert len(adapted) == 7 * c.num_layers, len(adapted)
    for layer in adapted:  # enable_lora takes no alpha (it defaults to the rank): set PEFT's scale alpha / r
        layer.lora_alpha = ALPHA
    # Keras 3 creates LoRA kernels in float32 whatever the layer's dtype, as PEFT and gemmatune keep adapters.
    assert all(k.dtype == "float32" for layer in adapted for k in (layer.lora_kernel_a, layer.lora_kernel_b))
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.AdamW(learning_rate=LR, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                                                weight_decay=0.0, global_clipnorm=CLIP),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(w)
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x, dtype=bool)}
    return {"seconds": timed_steps(lambda: lm.train_on_batch(inputs, y), steps),
            "dtype": f"{dtype} base (adapters, optimizer: float32)",
            "settings": "enable_lora on all seven projections (LoRA merged into each kernel per call)"}


def child(tool: str, workload: str, steps: int, dtype: str, threads: int) -> None:
    w = WORKLOADS[workload]
    if tool == "gemmatune":
        out = run_gemmatune(w, steps, dtype)
    elif tool == "transformers+peft":
        out = run_transformers(w, steps, dtype, threads)
    else:
        out = run_kerashub(w, steps, dtype)
    out.update(tool=tool, workload=workload, tokens_per_s=w.batch * w.seq / out["seconds"],
               peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,  # KiB on Linux
               cpus=sorted(os.sched_getaffinity(0)), run_dtype=dtype)
    print(json.dumps(out))


# --- the parent: run each tool, compare ------------------------------------------------------------------------

def flops_per_token(w: Workload, rank: int = RANK) -> float:
    """Model FLOPs of one trained token in a LoRA step with adapters of `rank` on the seven projections (the module
    docstring explains the terms; benchmarks/gpu.py counts the same way)."""
    c = w.cfg
    D, F, H, K, E, L, V = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
                           c.num_layers, c.vocab_size)
    shapes = [(D, H * E), (D, K * E), (D, K * E), (H * E, D), (D, F), (D, F), (F, D)]  # (in, out) per projection
    n_base = L * sum(i * o for i, o in shapes) + D * V
    n_lora = L * sum(rank * (i + o) for i, o in shapes)
    t = np.arange(w.seq)
    seen = np.minimum(t + 1, np.where([k == LOCAL for k in c.layer_types], c.sliding_window, w.seq)[:, None])
    t_attn = seen.mean(axis=1)  # [L]: keys per query, averaged over positions
    return 4 * n_base + 6 * n_lora + float(np.sum(12 * H * E * t_attn))


def pinned_cpus(threads: int) -> list[int]:
    """The first `threads` CPUs this process may run on: every child gets the same ones."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < threads:
        raise SystemExit(f"--threads {threads}, but only {len(allowed)} CPUs are available: {allowed}")
    return allowed[:threads]


def run_child(tool: str, workload: str, steps: int, dtype: str, cpus: list[int]) -> dict[str, Any]:
    n = str(len(cpus))
    # PJRT_NPROC sizes XLA's CPU thread pool (without it: every CPU in the affinity mask, the same number here);
    # torch reads --threads; OpenMP and MKL read theirs. The affinity holds whatever a library starts.
    env = {**os.environ, "PJRT_NPROC": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    cmd = [sys.executable, __file__, "--child", tool, "--workload", workload, "--steps", str(steps),
           "--dtype", dtype, "--threads", n]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if p.returncode:
        raise SystemExit(f"{tool} on {workload} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def chart(results: list[dict[str, Any]], path: str) -> None:
    """One row of plots per dtype, so that bars side by side are always runs of the same dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    dtypes = list(dict.fromkeys(r["run_dtype"] for r in results))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(9, 3.4 * len(dtypes)), dpi=80, squeeze=False)
    for row, dtype in zip(axes, dtypes):
        mine = [r for r in results if r["run_dtype"] == dtype]
        names = list(dict.fromkeys(r["tool"] for r in mine))
        for ax, key, title in ((row[0], "tokens_per_s", "tokens/s (higher is better)"),
                               (row[1], "peak_rss_gb", "peak RSS, GB (lower is better)")):
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                vals = [next((r[key] for r in mine if r["tool"] == name and r["workload"] == wl), 0)
                        for wl in workloads]
                bars = ax.bar(np.arange(len(workloads)) + i * width, vals, width, label=name)
                ax.bar_label(bars, fmt="%.0f" if key == "tokens_per_s" else "%.1f", fontsize=7)
            ax.set_xticks(np.arange(len(workloads)) + width * (len(names) - 1) / 2, workloads)
            ax.set_title(f"{title}, {dtype} base weights", fontsize=10)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def report(w: Workload, dtype: str, rows: list[dict[str, Any]]) -> None:
    """Print one dtype's rows, with ratios against gemmatune's row of that dtype, and set gemmatune's MFU."""
    ours = next((r for r in rows if r["tool"] == "gemmatune"), None)
    print(f"  {dtype} base weights:")
    print(f"  {'tool':26}{'tokens/s':>10}{'peak RSS':>10}{'speed vs':>10}{'memory vs':>11}   dtype; settings")
    for r in rows:
        vs = (f"{ours['tokens_per_s'] / r['tokens_per_s']:9.2f}x{r['peak_rss_gb'] / ours['peak_rss_gb']:10.2f}x"
              if ours else "")
        print(f"  {r['label']:26}{r['tokens_per_s']:10.0f}{r['peak_rss_gb']:8.2f}GB{vs}   "
              f"{r['dtype']}; {r['settings']}")
    for r in rows:
        if "peak_flops" in r:
            r["mfu"] = flops_per_token(w) * r["tokens_per_s"] / r["peak_flops"]
            print(f"  {r['label']}: MFU {r['mfu']:.0%} ({flops_per_token(w) / 1e6:.1f} MFLOP/token, {dtype} "
                  f"matmul peak {r['peak_flops'] / 1e9:.0f} GFLOP/s in its process)")
    print(f"  (speed vs: gemmatune {dtype}'s tokens/s over the row's; memory vs: the row's peak RSS over gemmatune "
          f"{dtype}'s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    ap.add_argument("--bf16", action="store_true",
                    help="also run every tool with bfloat16 base weights (compared with each other only)")
    ap.add_argument("--threads", type=int, default=THREADS, help="CPUs (and threads) each tool gets; the same ones")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--chart", default=os.path.join(os.path.dirname(__file__), "compare.png"))
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.workload, a.steps, a.dtype, a.threads)

    tools = a.tools.split(",")
    cpus = pinned_cpus(a.threads)
    dtypes = ["float32", "bfloat16"] if a.bf16 else ["float32"]
    results = []
    for wl in WORKLOADS if a.workload == "all" else [a.workload]:
        w = WORKLOADS[wl]
        c = w.cfg
        print(f"{wl}: vocab {c.vocab_size}, {c.num_layers} layers, hidden {c.hidden_size}, intermediate "
              f"{c.intermediate_size}, {c.num_heads}/{c.num_kv_heads} heads x {c.head_dim}; batch {w.batch} x seq "
              f"{w.seq}; LoRA r={RANK} alpha {ALPHA:g} on q,k,v,o,gate,up,down; {len(cpus)} threads on CPUs "
              f"{','.join(map(str, cpus))}", flush=True)
        for dtype in dtypes:  # a ratio only ever compares runs of the same dtype
            rows = []
            for tool in tools:
                r = run_child(tool, wl, a.steps, dtype, cpus)
                r["label"] = tool if dtype == "float32" else f"{tool} {dtype}"
                rows.append(r)
            report(w, dtype, rows)
            results += rows
    chart(results, a.chart)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
