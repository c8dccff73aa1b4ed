"""Which attention kernel a full-sequence forward uses, and the fused TPU kernel (Splash attention).

Gemma 2's attention soft-caps its logits (cap * tanh(logits / cap)) before the mask and the softmax, and its local
layers see a sliding window. A fused kernel is used only where it computes exactly that:

- TPU: Pallas Splash attention, which takes `attn_logits_soft_cap` and a local (sliding-window) mask and never
  materialises the [T, S] logits. It needs the sequence to be a multiple of its block and head_dim a multiple of
  the 128-lane vector width.
- GPU: the XLA path. jax.nn.dot_product_attention (jax 0.10.2) has no soft-cap argument, so its cuDNN kernel
  cannot compute Gemma 2's attention; without a cap (a config with attn_logit_softcap None) it could, but the
  released Gemma 2 checkpoints all have one.
- CPU: the XLA path (model.attention), which is also the reference every kernel is tested against.

KV-cache decoding always uses the XLA path: one query per step leaves nothing to fuse.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemmatune.config import LOCAL, ModelConfig

IMPLS = ("xla", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # largest first: fewer grid steps; each must divide the sequence
LANES = 128  # TPU vector width: Splash tiles head_dim by it


def attention_impl(platform: str, cfg: ModelConfig, seq_len: int) -> str:
    """"splash" on TPU where the kernel applies (sequence a multiple of 128, head_dim of 128), else "xla"."""
    if platform == "tpu" and seq_len % SPLASH_BLOCKS[-1] == 0 and cfg.head_dim % LANES == 0:
        return "splash"
    return "xla"


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, kind: str,
                     cfg: ModelConfig) -> jax.Array:
    """Causal (and, on local layers, sliding-window) attention with soft-capped logits, tokens attending only
    within their segment. q: [B, T, H, E] already scaled; k, v: [B, T, K, E]; segment_ids: [B, T]. Returns
    [B, T, H, E]. Off TPU the kernel runs in Pallas interpret mode (the tests' parity check).

    Padding (segment 0) queries attend to padding keys here, where the XLA path gives them a uniform softmax;
    both are outputs no real token reads and the loss does not weigh."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    B, T, H, E = q.shape
    K = k.shape[2]
    G = H // K
    if kind == LOCAL:  # key s is seen from query t when t - (W - 1) <= s <= t
        one = sm.LocalMask((T, T), (cfg.sliding_window - 1, 0), offset=0)
    else:
        one = sm.CausalMask((T, T))
    block = next(b for b in SPLASH_BLOCKS if T % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # One multi-query kernel per key/value head: its G query heads share that head's keys and values.
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * G), block_sizes=sizes,
                                              attn_logits_soft_cap=cfg.attn_logit_softcap,
                                              interpret=jax.default_backend() != "tpu")
    qg = q.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, E]
    ids = segment_ids.astype(jnp.int32)

    def per_row(qb: jax.Array, kb: jax.Array, vb: jax.Array, sb: jax.Array) -> Any:
        seg = sk.SegmentIds(q=sb, kv=sb)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(qb, kb, vb)

    out = jax.vmap(per_row)(qg, kg, vg, ids)  # [B, K, G, T, E]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q.dtype)
