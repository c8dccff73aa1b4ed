"""`gemmatune serve` under load: requests/s and generated tokens/s at 1, 4 and 16 concurrent clients, every request
for one adapter vs requests spread over the base and two adapters. One run, one process: the server in a thread,
clients as threads speaking HTTP through the `openai` client.

    python benchmarks/serve.py [--model tiny] [--slots 8] [--requests 48] [--max-tokens 32]

Each setting first runs a warm-up round (every prompt once: compilation), then `--requests` greedy chat requests of
up to --max-tokens tokens; tokens/s counts the tokens generated (usage.completion_tokens: an answer that ends early
counts what it made).
Prints a table and the ratios: 16 clients vs 1 (what batching buys), mixed vs one adapter (what gathering each row's
adapter costs).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import openai
from common import cpu_name

from gemmatune.checkpoint import save_adapter
from gemmatune.config import LoraConfig
from gemmatune.convert import model_config
from gemmatune.hub import resolve_model
from gemmatune.lora import init_adapters
from gemmatune.server import model_name, open_server

QUESTIONS = ["What is JAX?", "Tell me a story.", "Why is the sky blue?", "Name three colours.", "Write a haiku.",
             "What is LoRA?", "Count to five.", "Who are you?"]


def write_adapter(path: Path, model: str, seed: int) -> str:
    cfg = model_config(resolve_model(model))
    lora_cfg = LoraConfig(rank=8, alpha=16.0)
    adapters = init_adapters(cfg, lora_cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    adapters = {n: {"a": ab["a"], "b": 0.05 * jax.random.normal(k, ab["b"].shape)}
                for k, (n, ab) in zip(keys, adapters.items())}
    save_adapter(path, adapters, lora_cfg, cfg, model)
    return str(path)


def run(client: openai.OpenAI, models: list[str], clients: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) for `requests` requests from `clients` threads, models round-robin."""
    def ask(i: int) -> int:
        r = client.chat.completions.create(model=models[i % len(models)], max_tokens=max_tokens, temperature=0,
                                           messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(ask, range(requests)))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="requests per setting (after a warm-up round)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"alpha": write_adapter(Path(tmp) / "alpha", a.model, 1),
                 "beta": write_adapter(Path(tmp) / "beta", a.model, 2)}
        server = open_server(a.model, paths, port=0, slots=a.slots, max_len=a.max_len)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.uvicorn.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
        base = model_name(a.model)
        mixes = {"one adapter": ["alpha"], "mixed (base + 2 adapters)": [base, "alpha", "beta"]}
        print(f"{a.model}, {a.slots} slots, {a.requests} requests of {a.max_tokens} tokens per setting; "
              f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}")
        print(f"{'models':<28}{'clients':>8}{'requests/s':>12}{'tokens/s':>10}")
        rates: dict[tuple[str, int], float] = {}
        for mix, models in mixes.items():
            for clients in (1, 4, 16):
                # warm-up: every prompt once, so every shape this setting meets is compiled before timing
                run(client, models, clients, max(clients, len(QUESTIONS)), a.max_tokens)
                took, tokens = run(client, models, clients, a.requests, a.max_tokens)
                rates[mix, clients] = tokens / took
                print(f"{mix:<28}{clients:>8}{a.requests / took:>12.2f}{tokens / took:>10.1f}")
        server.stop()
        thread.join(timeout=30)
    one, mixed = mixes
    print(f"16 clients vs 1: {rates[one, 16] / rates[one, 1]:.2f}x tokens/s (one adapter), "
          f"{rates[mixed, 16] / rates[mixed, 1]:.2f}x (mixed)")
    print("mixed vs one adapter: " + ", ".join(f"{rates[mixed, c] / rates[one, c]:.2f}x at {c}" for c in (1, 4, 16)))


if __name__ == "__main__":
    main()
