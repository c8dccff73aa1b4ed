"""Which attention kernel a full-sequence forward uses, and the fused kernels: Splash on TPU; on GPUs cuDNN's and
gemmatune's own Pallas kernel (gemmatune.flash).

Gemma 2's attention soft-caps its logits (cap * tanh(logits / cap)) before the mask and the softmax; Gemma 3 has no
cap. Both have a sliding window on local layers, grouped-query heads, and packed rows (segment ids, 0 on padding).
A fused kernel is used only where it computes exactly that; `attention_impl` is the one place that chooses:

- TPU: Pallas Splash attention (`splash_attention`), which takes `attn_logits_soft_cap` and a local
  (sliding-window) mask and never materialises the [T, S] logits. It needs the sequence to be a multiple of its
  block and head_dim a multiple of the 128-lane vector width.
- GPU: for Gemma 2 (soft-capped logits), gemmatune's own Pallas kernel (`flash_attention`, gemmatune.flash: Triton
  lowering, forward and backward, soft-cap, window, segments and grouped-query heads, no [T, S] array stored).
  For configs without a soft-cap (Gemma 3), cuDNN's fused (flash) attention through
  `jax.nn.dot_product_attention(..., implementation="cudnn")` (`cudnn_attention`) where it applies, else the same
  Pallas kernel where that applies. The Pallas kernel is chosen for bfloat16 or float16 (a float32 run uses XLA:
  the tiles are sized for 16-bit values; forced, it multiplies float32 exactly), a CUDA GPU of compute capability
  8.0 or later (Triton's lowering in jax supports Ampere on), head_dim 64, 128 or 256 with a sequence its tiles
  divide (flash.BLOCKS; a multiple of 128 always is), and on a mesh the key/value heads dividing over the model
  axis (it runs per shard in a shard_map, each shard's query heads reading its own key/value heads). cuDNN's
  limits in jax 0.10.2, each falling back for exactly that case:
  bfloat16 or float16 only; Ampere (8.0) or later (cuDNN's SDPA needs SM80: a T4 or V100 uses XLA); head_dim a
  multiple of 8 and at most 128 before Hopper, 256 from Hopper (9.0) on (so Gemma 3's head_dim 256 is fused by
  cuDNN on an H100, by the Pallas kernel on an A100; 27B's 128 by cuDNN on both); an even sequence (its bias
  gradient needs one); and on a mesh, queries, keys and values split alike. The window is
  `local_window_size=(W - 1, 0)` with `is_causal=True` (cuDNN's sliding_window_length W: key s is seen from t when
  t - W < s <= t). Packed segments and padding are a boolean mask [B, 1, T, S] (same segment, key not padding),
  which cuDNN adds as a bias; the causal and window parts stay in the kernel, which skips the blocks they exclude.
  In jax 0.10.2 the backward pass also computes that bias's gradient, which nothing reads (later jax skips it for
  boolean masks, jax-ml/jax#39512). Padding queries (whose outputs nothing reads) see a uniform softmax over the
  causal keys, where the XLA path spreads it over all keys.
- CPU, and every case above that falls back: the XLA path (model.attention), which is also the reference every
  kernel is tested against (on CPU, the Pallas kernels run in interpret mode, and
  `cudnn_attention(..., implementation="xla")` runs the same call through jax's XLA implementation).

TrainConfig.attention (`--attention`) forces one of them instead of this choice.

KV-cache decoding always uses the XLA path: one query per step leaves nothing to fuse.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gemmatune import sharding
from gemmatune.config import ATTENTION, LOCAL, ModelConfig
from gemmatune.errors import GemmatuneError
from gemmatune.flash import blocks_for, flash_attention

IMPLS = ATTENTION
SPLASH_BLOCKS = (512, 256, 128)  # largest first: fewer grid steps; each must divide the sequence
LANES = 128  # TPU vector width: Splash tiles head_dim by it
GPU_PLATFORMS = ("gpu", "cuda")  # jax.default_backend() says "gpu"; a device's platform may say "cuda"
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MIN_CAPABILITY = (8, 0)  # cuDNN's fused attention needs Ampere or later
FLASH_MIN_CAPABILITY = (8, 0)  # jax's Triton lowering of Pallas supports Ampere and later
HOPPER = (9, 0)  # from here head_dim may be 256 (128 before), as jax's check_is_flash_attention says


def cuda_capability() -> tuple[int, int] | None:
    """The compute capability of the first local CUDA GPU, e.g. (9, 0); None without one (CPU, TPU, ROCm)."""
    try:
        gpus = jax.local_devices(backend="gpu")
    except RuntimeError:  # no GPU backend in this process
        return None
    text = str(getattr(gpus[0], "compute_capability", "")) if gpus else ""
    major, _, minor = text.partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None  # ROCm: "gfx90a" -> None


def _active_model_axis() -> int:
    """The size of the active mesh's model axis (1 off a mesh)."""
    mesh = sharding.active_mesh()
    return 1 if mesh is None else int(mesh.shape.get("model", 1))


def attention_impl(platform: str, cfg: ModelConfig, seq_len: int, *, dtype: Any,
                   capability: tuple[int, int] | None = None, model_axis: int | None = None) -> str:
    """The attention a full-sequence forward of `seq_len` tokens in `dtype` uses on `platform`: "splash" on TPU
    where that kernel applies (sequence a multiple of 128, head_dim of 128), on a CUDA GPU "cudnn" where cuDNN's
    kernel applies (no soft-cap) and else "flash" where the Pallas kernel does (see the module docstring), else
    "xla". capability: the GPU's compute capability (default: this process's first GPU); model_axis: the mesh's
    model-axis size (default: the active mesh's)."""
    if platform == "tpu" and seq_len % SPLASH_BLOCKS[-1] == 0 and cfg.head_dim % LANES == 0:
        return "splash"
    if platform not in GPU_PLATFORMS or jnp.dtype(dtype) not in CUDNN_DTYPES:
        return "xla"
    capability = capability or cuda_capability()
    model_axis = model_axis or _active_model_axis()
    if capability is None or cfg.num_kv_heads % model_axis:  # every fused kernel splits heads alike on a mesh
        return "xla"
    if (cfg.attn_logit_softcap is None and capability >= CUDNN_MIN_CAPABILITY and cfg.head_dim % 8 == 0
            and cfg.head_dim <= (256 if capability >= HOPPER else 128) and seq_len % 2 == 0):
        return "cudnn"
    if capability >= FLASH_MIN_CAPABILITY and blocks_for(cfg.head_dim, seq_len) is not None:
        return "flash"
    return "xla"


def check_forced(choice: str, platform: str, cfg: ModelConfig, seq_len: int) -> None:
    """Refuse, in one line, a kernel forced by TrainConfig.attention that cannot run this model here ("auto" and
    "xla" always can). Off their own hardware the Pallas kernels would run in interpret mode (the tests' check:
    minutes per step at real sizes)."""
    hardware = {"splash": ("tpu",), "cudnn": GPU_PLATFORMS, "flash": GPU_PLATFORMS}.get(choice)
    if hardware is not None and platform not in hardware:
        raise GemmatuneError(f"attention: {choice} runs on {hardware[0].upper()}s; this run is on {platform}. Use "
                             "--attention auto (or xla).")
    if choice == "cudnn" and cfg.attn_logit_softcap is not None:
        raise GemmatuneError("attention: cudnn has no logit soft-cap, which this model (Gemma 2) applies. Use "
                             "--attention auto (or flash, xla).")
    if choice == "flash" and blocks_for(cfg.head_dim, seq_len) is None:
        raise GemmatuneError(f"attention: flash has no tiles for head_dim {cfg.head_dim} with rows of {seq_len} "
                             "tokens (head_dim 64, 128 or 256; max_seq_len a multiple of 128). Use --attention auto "
                             "or change --max-seq-len.")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids (0 on padding) -> [B, T, S] bool: query t may see key s of its own segment, never a
    padding key. The causal and sliding-window parts are the caller's."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, kind: str,
                    cfg: ModelConfig, implementation: str = "cudnn") -> jax.Array:
    """Causal (and, on local layers, sliding-window) attention without a soft-cap, tokens attending only within
    their segment, through jax.nn.dot_product_attention. q: [B, T, H, E] already scaled; k, v: [B, T, K, E] (K
    divides H: grouped-query heads as transformers' repeat_kv); segment_ids: [B, T]. Returns [B, T, H, E].
    implementation: "cudnn" (the GPU kernel); the tests pass "xla", jax's reference path for the same call."""
    if cfg.attn_logit_softcap is not None:
        raise ValueError("cudnn_attention computes attention without a logit soft-cap; this config has one")
    window = (cfg.sliding_window - 1, 0) if kind == LOCAL else None  # t - (W - 1) <= s <= t
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids)[:, None], scale=1.0,
                                        is_causal=True, local_window_size=window, implementation=implementation)


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


def flash_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, kind: str,
                        cfg: ModelConfig) -> jax.Array:
    """Causal (and, on local layers, sliding-window) attention with the config's soft-cap, tokens attending only
    within their segment, through the Pallas kernel (gemmatune.flash). q: [B, T, H, E] already scaled; k, v:
    [B, T, K, E]; segment_ids: [B, T]. Returns [B, T, H, E]. On a mesh it runs per shard (shard_map): rows split as
    the batch is, heads as the model axis splits the key/value heads (the query heads follow them, so each shard's
    query heads read its own key/value heads)."""
    window = cfg.sliding_window if kind == LOCAL else None
    run = functools.partial(flash_attention, cap=cfg.attn_logit_softcap, window=window)
    mesh = sharding.active_mesh()
    if mesh is None:
        return run(q, k, v, segment_ids)
    kv_spec = sharding.spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh.shape)
    q_spec = PartitionSpec(*kv_spec[:2], kv_spec[2], None)  # query heads split exactly as the key/value heads
    seg_spec = PartitionSpec(*kv_spec[:2])
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
