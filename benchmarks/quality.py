"""Fine-tuning quality on the real Gemma 3 270M, side by side: gemmatune vs transformers + PEFT.

    python benchmarks/quality.py [--steps 16] [--batch 8] [--lr 2e-3] [--held-out 64] [--threads 2] [--json out.json]

Both tools start from the same file, Google's Gemma 3 270M base model as GGUF Q4_K_M (scripts/gemma3_270m.py fetches
it once), dequantized to float32, and fine-tune it on the same task (benchmarks/tasks.py: "Date: 2024-03-15\\nDMY: "
-> "15.03.2024") with the same recipe (tasks.Recipe: LoRA r=8, alpha 16 on q, k, v, o, gate, up, down; AdamW lr
2e-3, betas 0.9/0.999, eps 1e-8, no weight decay, after global-norm clipping at 1.0; 2 warmup steps then cosine to 0;
16 steps of 8 examples, one example per row of 32 positions; the loss on the answer and <eos> only, averaged over
the step's trained tokens; float32). Each tool runs as a user would:

  gemmatune            the data as a JSONL file, `gemmatune.train(TrainConfig(model=<the .gguf>, ...))`; the adapter
                       it writes loaded back (convert.peft.load_adapter_for) and merged; `generate` for the answers;
                       the tokenizer from the GGUF file.
  transformers + PEFT  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer` on the same
                       file, `get_peft_model`, a plain torch loop (torch.optim.AdamW, LambdaLR with the same schedule,
                       clip_grad_norm_), `generate` (greedy) with the adapter disabled (before) and enabled (after).

Measured for each: held-out exact match (tasks.exact_match: greedy, the answer up to <eos>/<end_of_turn>/newline,
stripped, equal to the expected string) before and after; training tokens/s (non-padding input positions per second
over the steps after the first, which compiles or warms up); the training's peak RSS (ru_maxrss of the tool's own
subprocess read right after training: the model load, data and training, not the evaluation that follows). The
training examples are drawn in a different order by each tool (each its own seeded shuffle) from the same 1,000.

Threads: as benchmarks/compare.py, every child is pinned to the same `--threads` CPUs and told that count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import tasks  # noqa: E402
from compare import THREADS, pinned_cpus  # noqa: E402
from gemma3_270m import gemma3_270m  # noqa: E402

TOOLS = ("gemmatune", "transformers+peft")
N_TRAIN = 1000
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


# --- the two tools, each run in a child process ----------------------------------------------------------------

def quant_settings(quant: Any) -> dict[str, Any]:
    """The TrainConfig fields that quantize the base as `quant` (a Quantization, or None: no fields)."""
    return {} if quant is None else {"quantize": quant.kind, "quantize_block": quant.block,
                                     "double_quant": quant.double}


def run_gemmatune(recipe: tasks.Recipe, n_held_out: int, quant: Any = None, before: bool = True) -> dict[str, Any]:
    """quant (a gemmatune.config.Quantization): QLoRA, the base quantized as `train --quantize` stores it, and the
    answers from that base with the adapter applied unmerged (benchmarks/qlora.py). before=False skips the base
    model's answers."""
    import gemmatune
    from gemmatune.convert import load_model
    from gemmatune.convert.peft import load_adapter_for
    from gemmatune.lora import merge
    from gemmatune.tokenizer import load_tokenizer

    gguf = gemma3_270m()
    train, held_out = tasks.splits(N_TRAIN, n_held_out)
    with tempfile.TemporaryDirectory() as tmp:
        data = tasks.write_jsonl(train, Path(tmp) / "dates.jsonl")
        t0 = time.perf_counter()
        result = gemmatune.train(recipe.train_config(str(gguf), data, Path(tmp) / "run", log_every=1,
                                                     **quant_settings(quant)))
        train_s = time.perf_counter() - t0
        peak = peak_rss_gb()
        s = result.summary
        # metrics.jsonl logs each step's rate (its positions over its time); every step has the same positions
        # (8 rows of one 30-token example each), so the rate over steps 2.. is their harmonic mean.
        rates = [json.loads(line)["tokens_per_s"] for line in Path(s["metrics"]).read_text().splitlines()]
        assert len(rates) == recipe.steps and s["tokens_seen"] % recipe.steps == 0, (len(rates), s)
        tokens_per_s = (len(rates) - 1) / sum(1 / r for r in rates[1:])
        tokenizer = load_tokenizer(gguf)
        cfg, base = load_model(gguf, dtype=recipe.dtype, quant=quant)
        t0 = time.perf_counter()
        base_answers = tasks.gemmatune_answers(base, cfg, tokenizer, held_out) if before else None
        base_eval_s = time.perf_counter() - t0
        adapters, lora_cfg = load_adapter_for(gguf, s["adapter"], cfg)
        t0 = time.perf_counter()
        if quant is None:
            after = tasks.gemmatune_answers(merge(base, adapters, lora_cfg), cfg, tokenizer, held_out)
        else:
            after = tasks.gemmatune_answers(base, cfg, tokenizer, held_out, adapter=(adapters, lora_cfg))
        eval_s = time.perf_counter() - t0
    return {"before": base_answers, "after": after, "tokens_per_s": tokens_per_s, "peak_rss_gb": peak,
            "train_s": train_s, "final_loss": s["train_loss"], "positions_per_step": s["tokens_seen"] // recipe.steps,
            "base_eval_s": base_eval_s, "eval_s": eval_s,
            "settings": "gemmatune.train on the .gguf, packing pad; generate on the merged weights" if quant is None
            else f"gemmatune.train --quantize {quant.describe()}; generate on the quantized base, adapter unmerged"}


def run_transformers(recipe: tasks.Recipe, n_held_out: int, threads: int, nf4: bool = False,
                     before: bool = True) -> dict[str, Any]:
    """nf4: QLoRA as transformers does it, the base's linear layers bitsandbytes NF4 (benchmarks/qlora.py).
    before=False skips the base model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gguf = gemma3_270m()
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, recipe.dtype),
                                                 attn_implementation="eager")
    if nf4:
        model = bnb_nf4(model, recipe.dtype)
    model = get_peft_model(model, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                                             target_modules=[HF_TARGETS[t] for t in recipe.targets]))
    train, held_out = tasks.splits(N_TRAIN, n_held_out)

    def encode(row: dict[str, str]) -> tuple[list[int], list[bool]]:
        """<bos> prompt answer <eos>, the answer and <eos> trained: gemmatune's template rendering."""
        p = tok.encode(tasks.prompt(row), add_special_tokens=False)
        r = tok.encode(row["response"], add_special_tokens=False)
        return [tok.bos_token_id, *p, *r, tok.eos_token_id], [False] * (1 + len(p)) + [True] * (len(r) + 1)

    examples = [encode(r) for r in train]
    order = np.random.RandomState(0).permutation(len(examples))

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, attention mask and labels (-100: not trained), [B, T] each, right-padded."""
        x = np.full((recipe.batch, recipe.seq), tok.pad_token_id, np.int64)
        y = np.full((recipe.batch, recipe.seq), -100, np.int64)
        m = np.zeros((recipe.batch, recipe.seq), np.int64)
        for b in range(recipe.batch):
            ids, mask = examples[order[(step * recipe.batch + b) % len(order)]]
            n = len(ids) - 1
            assert n <= recipe.seq, n
            x[b, :n], m[b, :n] = ids[:-1], 1
            y[b, :n] = np.where(mask[1:], ids[1:], -100)
        return torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(y)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: recipe.lr_at(s) / recipe.lr)
    model.train()
    times, positions, loss = [], 0, float("nan")
    for step in range(recipe.steps):
        x, m, y = batch(step)
        t0 = time.perf_counter()
        logits = model(input_ids=x, attention_mask=m).logits.float()
        out = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.item()
        times.append(time.perf_counter() - t0)
        positions = int(m.sum())
    train_s = time.perf_counter() - t_start
    peak = peak_rss_gb()
    model.eval()
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    prompts = torch.tensor([[tok.bos_token_id, *tok.encode(tasks.prompt(r), add_special_tokens=False)]
                            for r in held_out])  # every prompt has the same length: no padding

    def answers() -> list[str]:
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=tasks.ANSWER_TOKENS + 1, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        texts = []
        for row in out[:, prompts.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tok.decode(row[:cut]))
        return texts

    t0 = time.perf_counter()
    with model.disable_adapter():
        base_answers = answers() if before else None
    base_eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = answers()
    eval_s = time.perf_counter() - t0
    return {"before": base_answers, "after": after, "tokens_per_s": positions * (len(times) - 1) / sum(times[1:]),
            "peak_rss_gb": peak, "train_s": train_s, "final_loss": loss, "positions_per_step": positions,
            "base_eval_s": base_eval_s, "eval_s": eval_s,
            "settings": "eager attention, PEFT LoRA, torch loop with AdamW + LambdaLR; generate greedy"
            + (f"; bitsandbytes NF4 base (block 64, compute {recipe.dtype})" if nf4 else "")}


def bnb_nf4(model: Any, dtype: str) -> Any:
    """The model with every linear layer bitsandbytes NF4 (BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4"), compute in `dtype`). transformers refuses a quantization_config together with
    gguf_file ("You cannot combine Quantization and loading a model from a GGUF file"), and a model loaded from GGUF
    refuses save_pretrained ("The model is quantized with gguf and is not serializable"); so the dequantized weights
    are saved as a plain checkpoint (the GGUF marker dropped) and loaded back quantized: the supported route."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                    quantization_config=BitsAndBytesConfig(
                                                        load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=getattr(torch, dtype)))


def child(tool: str, recipe: tasks.Recipe, n_held_out: int, threads: int) -> None:
    out = run_gemmatune(recipe, n_held_out) if tool == "gemmatune" else run_transformers(recipe, n_held_out, threads)
    _, held_out = tasks.splits(N_TRAIN, n_held_out)
    out.update(tool=tool, em_before=tasks.exact_match(out["before"], held_out),
               em_after=tasks.exact_match(out["after"], held_out), cpus=sorted(os.sched_getaffinity(0)))
    print(json.dumps(out))


# --- the parent: run each tool, compare ------------------------------------------------------------------------

def run_child(tool: str, a: argparse.Namespace, cpus: list[int]) -> dict[str, Any]:
    n = str(len(cpus))
    env = {**os.environ, "PJRT_NPROC": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", tool, "--steps", str(a.steps), "--batch", str(a.batch), "--lr",
           str(a.lr), "--held-out", str(a.held_out), "--threads", n]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                       preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if p.returncode:
        raise SystemExit(f"{tool} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = tasks.Recipe()
    ap.add_argument("--steps", type=int, default=default.steps)
    ap.add_argument("--batch", type=int, default=default.batch)
    ap.add_argument("--lr", type=float, default=default.lr)
    ap.add_argument("--held-out", type=int, default=64, help="held-out examples scored before and after")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    ap.add_argument("--threads", type=int, default=THREADS, help="CPUs (and threads) each tool gets; the same ones")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    recipe = dataclasses.replace(default, steps=a.steps, batch=a.batch, lr=a.lr)
    if a.child:
        return child(a.child, recipe, a.held_out, a.threads)

    cpus = pinned_cpus(a.threads)
    print(f"Gemma 3 270M (GGUF Q4_K_M, dequantized to {recipe.dtype}); task: ISO date -> DMY, {N_TRAIN} train, "
          f"{a.held_out} held out; LoRA r={recipe.rank} alpha {recipe.alpha:g} on {','.join(recipe.targets)}; "
          f"{recipe.steps} steps x {recipe.batch} rows x {recipe.seq} positions, lr {recipe.lr:g} (warmup "
          f"{recipe.warmup}, cosine); {len(cpus)} threads on CPUs {','.join(map(str, cpus))}", flush=True)
    results = [run_child(tool, a, cpus) for tool in a.tools.split(",")]
    print(f"  {'tool':20}{'EM before':>10}{'EM after':>10}{'loss':>9}{'tokens/s':>10}{'peak RSS':>10}"
          f"{'train s':>9}{'eval s':>8}")
    for r in results:
        print(f"  {r['tool']:20}{r['em_before']:10.1%}{r['em_after']:10.1%}{r['final_loss']:9.4f}"
              f"{r['tokens_per_s']:10.1f}{r['peak_rss_gb']:8.2f}GB{r['train_s']:9.1f}{r['eval_s']:8.1f}")
    print("  (EM: held-out exact match; tokens/s: non-padding input positions per second over steps 2..; peak RSS "
          "and train s: model load + data + training; eval s: the held-out answers after training)")
    for r in results:
        pairs = zip(r["before"][:3], r["after"][:3])
        print(f"  {r['tool']}, first answers before -> after: " + ", ".join(f"{b!r} -> {f!r}" for b, f in pairs))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": dataclasses.asdict(recipe), "n_train": N_TRAIN, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
