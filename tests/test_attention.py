"""The attention choice per platform; the TPU Splash kernel (run in Pallas interpret mode on CPU) against the XLA
reference path: soft-capped logits, a sliding window, packed segments, gradients included; and the call gemmatune
makes to cuDNN's kernel on a GPU, run through jax's XLA implementation of the same call, against the XLA path."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL, strong_params
from gemmatune import model as M
from gemmatune.attention import attention_impl, check_forced, cudnn_attention
from gemmatune.config import PRESETS
from gemmatune.errors import GemmatuneError
from gemmatune.flash import BLOCKS, flash_attention

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16
H100, A100, T4 = (9, 0), (8, 0), (7, 5)


@pytest.mark.parametrize(("platform", "name", "seq", "dtype", "capability", "model_axis", "want"), [
    ("tpu", "gemma2-2b", 1024, BF16, None, 1, "splash"),
    ("tpu", "gemma2-27b", 384, BF16, None, 1, "splash"),  # head_dim 128, seq a multiple of 128
    ("tpu", "gemma3-1b", 1024, BF16, None, 1, "splash"),  # no soft-cap: Splash takes None
    ("tpu", "gemma2-2b", 1000, BF16, None, 1, "xla"),  # the kernel tiles the sequence by 128
    ("tpu", "small", 1024, BF16, None, 1, "xla"),  # head_dim 64 is below the 128-lane tile
    ("gpu", "gemma2-2b", 1024, BF16, H100, 1, "flash"),  # jax's cuDNN attention has no logit soft-cap: ours
    ("gpu", "gemma2-27b", 4096, BF16, A100, 2, "flash"),  # head_dim 128; 16 key/value heads over model=2
    ("gpu", "gemma2-9b", 1000, BF16, H100, 1, "xla"),  # no tiles divide 1000
    ("gpu", "gemma2-9b", 1024, F32, H100, 1, "xla"),  # the kernel's tiles are sized for 16-bit values
    ("gpu", "gemma2-2b", 1024, BF16, T4, 1, "xla"),  # Triton's lowering in jax needs Ampere or later
    ("gpu", "gemma3-1b", 1024, BF16, H100, 1, "cudnn"),
    ("cuda", "gemma3-4b", 1024, F16, H100, 1, "cudnn"),  # a device's platform name; float16 is the kernel's too
    ("gpu", "gemma3-27b", 4096, BF16, A100, 1, "cudnn"),  # head_dim 128: Ampere's limit
    ("gpu", "gemma3-4b", 1024, BF16, A100, 1, "flash"),  # cuDNN's head_dim 256 needs Hopper; ours does not
    ("gpu", "gemma3-27b", 1024, BF16, T4, 1, "xla"),  # cuDNN's fused attention needs Ampere or later
    ("gpu", "gemma3-1b", 1024, F32, H100, 1, "xla"),  # bfloat16 / float16 only
    ("gpu", "gemma3-1b", 1023, BF16, H100, 1, "xla"),  # cuDNN's bias gradient needs an even sequence, ours tiles
    ("gpu", "gemma3-4b", 1024, BF16, H100, 2, "cudnn"),  # 4 key/value heads split over model=2 like the queries
    ("gpu", "gemma3-4b", 1024, BF16, H100, 8, "xla"),  # over model=8 they are replicated, the queries split
    ("cpu", "gemma3-1b", 1024, BF16, H100, 1, "xla"),
    ("cpu", "gemma2-2b", 1024, BF16, None, 1, "xla"),
])
def test_attention_choice(platform, name, seq, dtype, capability, model_axis, want):
    assert attention_impl(platform, PRESETS[name], seq, dtype=dtype, capability=capability,
                          model_axis=model_axis) == want


def test_attention_choice_without_a_cuda_gpu():
    """A "gpu" platform with no CUDA device to read a capability from (here: none at all; ROCm has none) uses XLA."""
    assert attention_impl("gpu", PRESETS["gemma3-1b"], 1024, dtype=BF16) == "xla"


@pytest.mark.parametrize(("choice", "platform", "name", "seq", "says"), [
    ("flash", "cpu", "gemma2-2b", 1024, "flash runs on GPUs; this run is on cpu"),
    ("splash", "gpu", "gemma2-2b", 1024, "splash runs on TPUs"),
    ("cudnn", "gpu", "gemma2-9b", 1024, "cudnn has no logit soft-cap"),
    ("flash", "gpu", "gemma2-9b", 1000, "no tiles for head_dim 256 with rows of 1000 tokens"),
    ("flash", "gpu", "gemma2-9b", 1024, None), ("cudnn", "cuda", "gemma3-1b", 1024, None),
    ("xla", "cpu", "gemma2-2b", 1000, None), ("auto", "tpu", "gemma2-2b", 1000, None),
])
def test_a_forced_kernel_that_cannot_run_is_refused(choice, platform, name, seq, says):
    if says is None:
        check_forced(choice, platform, PRESETS[name], seq)
        return
    with pytest.raises(GemmatuneError, match=says):
        check_forced(choice, platform, PRESETS[name], seq)


# A Gemma 3 body (no soft-caps, QK-norm, 5 local : 1 global, a partial last repeat) with window 8 < T.
GEMMA3 = dataclasses.replace(SMALL, family="gemma3", num_layers=7, layer_types=(), attn_logit_softcap=None,
                             final_logit_softcap=None, rope_theta=1_000_000.0, max_position_embeddings=256)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_cudnn_call_equals_xla_attention(kv_heads):
    """cudnn_attention's call (mask, causal flag, window, scale), run by jax's XLA implementation, equals the XLA
    path's attention on local and global layers: a whole row, and two packed segments then padding (float32)."""
    cfg = dataclasses.replace(GEMMA3, num_kv_heads=kv_heads)
    B, T, H, E = 2, 48, cfg.num_heads, cfg.head_dim
    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.randn(B, T, n, E), jnp.float32) for n in (H, kv_heads, kv_heads))
    seg = np.ones((B, T), np.int32)
    seg[1, 20:], seg[1, 41:] = 2, 0
    seg = jnp.asarray(seg)
    ref = M.full_attend(cfg, seg, "xla")
    outs = {}
    for kind in set(cfg.layer_types):
        want = np.asarray(ref[kind](q, k, v)[0])
        got = np.asarray(cudnn_attention(q, k, v, seg, kind, cfg, implementation="xla"))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # padding rows too: both uniform over S
        outs[kind] = got
    # The window and the segments show: local differs from global, and segment 2 does not see segment 1.
    assert np.abs(outs["sliding_attention"] - outs["full_attention"]).max() > 1e-2
    whole = np.asarray(cudnn_attention(q, k, v, jnp.ones_like(seg), "full_attention", cfg, implementation="xla"))
    assert np.abs(whole[1, 20:41] - outs["full_attention"][1, 20:41]).max() > 1e-2
    np.testing.assert_allclose(whole[1, :20], outs["full_attention"][1, :20], atol=1e-5, rtol=1e-5)


def test_cudnn_path_through_the_model_equals_xla(monkeypatch):
    """hidden_states with attn_impl="cudnn" (the kernel swapped for jax's XLA implementation of the same call)
    equals the XLA path, forward and gradients, on a Gemma 3 body with packed segments and padding."""
    monkeypatch.setattr(M, "cudnn_attention", functools.partial(cudnn_attention, implementation="xla"))
    cfg = dataclasses.replace(GEMMA3, num_layers=2, layer_types=("sliding_attention", "full_attention"))
    params = jax.jit(strong_params, static_argnums=0)(cfg)  # one compile, not an op-by-op init
    B, T = 2, 48
    r = np.random.RandomState(2)
    tokens = jnp.asarray(r.randint(3, cfg.vocab_size, (B, T)))
    seg = np.ones((B, T), np.int32)
    seg[1, 30:], seg[1, 44:] = 2, 0
    pos = np.stack([np.arange(T), np.r_[np.arange(30), np.arange(14), np.zeros(4, int)]])
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl):  # the hidden states and the gradients of sum(h ** 2) over real tokens, in one compile
        h, pull = jax.vjp(lambda p: M.hidden_states(p, tokens, cfg, segment_ids=seg, positions=pos,
                                                    attn_impl=impl), params)
        return h, pull(jnp.where(seg[..., None] != 0, 2 * h, 0.0))[0]["layers"]

    (ref, g_ref), (got, g_got) = run("xla"), run("cudnn")
    assert np.abs(ref).max() > 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5 * np.abs(ref).max(), rtol=0)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        scale = float(jnp.max(jnp.abs(g_ref[name])))
        np.testing.assert_allclose(np.asarray(g_got[name]), np.asarray(g_ref[name]), atol=1e-5 * scale, rtol=0)


# Window 40 < 128 = T: local layers see a real window; the lowered attention cap is reached by these logits.
CFG = dataclasses.replace(SMALL, sliding_window=40, max_position_embeddings=256)
T = 128


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    """Two rows: one whole sequence; two packed segments then padding."""
    r = np.random.RandomState(1)
    tokens = r.randint(3, CFG.vocab_size, (2, T))
    seg = np.ones((2, T), np.int32)
    seg[1, 70:] = 2
    seg[1, 120:] = 0
    pos = np.stack([np.arange(T), np.r_[np.arange(70), np.arange(50), np.zeros(8, int)]])
    return jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos)


def test_splash_equals_xla_attention_forward_and_gradients():
    params = strong_params(CFG)
    tokens, seg, pos = _inputs()
    real = np.asarray(seg) != 0  # padding rows differ by design (see splash_attention); nothing reads them

    def hidden(p, impl):
        return M.hidden_states(p, tokens, CFG, segment_ids=seg, positions=pos, attn_impl=impl)

    ref, got = (np.asarray(hidden(params, impl)) for impl in ("xla", "splash"))
    assert np.abs(ref[real]).max() > 1
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4 * np.abs(ref[real]).max(), rtol=0)

    # A window of T (no sliding) must give different outputs: the test sees the window.
    wide = dataclasses.replace(CFG, sliding_window=T)
    other = np.asarray(M.hidden_states(params, tokens, wide, segment_ids=seg, positions=pos, attn_impl="splash"))
    assert np.abs(other[real] - got[real]).max() > 1e-2

    def loss(p, impl):
        return jnp.sum(jnp.where(seg[..., None] != 0, hidden(p, impl), 0.0) ** 2)

    g_ref, g_got = (jax.grad(loss)(params, impl)["layers"] for impl in ("xla", "splash"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        scale = float(jnp.max(jnp.abs(g_ref[name])))
        np.testing.assert_allclose(np.asarray(g_got[name]), np.asarray(g_ref[name]), atol=1e-4 * scale, rtol=0)


# --- gemmatune's Pallas kernel for GPUs (gemmatune.flash), in interpret mode -------------------------------------

def _flash_inputs(head_dim: int, dtype) -> tuple[jax.Array, ...]:
    """Two rows of 256 positions, 4 query heads over 2 key/value heads (head_dim 256) or 1 (128): one whole row;
    one of four segments (later ones start past whole tiles of earlier ones, which the kernel skips; the last
    reuses the first's id, which packing never does but the kernel's bounds must survive) then padding. Queries
    large enough that the soft-cap (5) saturates."""
    B, T, H, K = 2, 256, 4, 2 if head_dim == 256 else 1  # 2 or 4 query heads per key/value head
    r = np.random.RandomState(head_dim)
    q = jnp.asarray(r.randn(B, T, H, head_dim) * 8 / np.sqrt(head_dim), dtype)
    k, v = (jnp.asarray(r.randn(B, T, K, head_dim), dtype) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    seg[1, 40:], seg[1, 100:], seg[1, 170:], seg[1, 230:] = 2, 3, 1, 0
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize(("head_dim", "dtype"), [(128, F32), (256, F32), (256, BF16)],
                         ids=["f32-128", "f32-256", "bf16-256"])
def test_flash_kernel_equals_xla_attention(head_dim, dtype):
    """The Pallas kernel with its real tiles (interpret mode) equals the XLA path, values and the gradients of q, k
    and v, on the local (window 66 < 256, several tiles) and the global mask, with grouped-query heads, packed
    segments, padding and a reached soft-cap: float32 within 1e-5; bfloat16 within what its rounding of the
    probabilities and of the products' inputs allows."""
    q, k, v, seg = _flash_inputs(head_dim, dtype)
    # Window 66: a block edge falls just inside it (66 = 2 mod 64 and mod 32), so a loop bound one block short
    # leaves out keys that should be seen.
    cap, window, T = 5.0, 66, q.shape[1]
    logits = jnp.einsum("bthe,bshe->bhts", q.astype(F32), jnp.repeat(k.astype(F32), 4 // k.shape[2], axis=2))
    assert float(jnp.max(jnp.abs(logits))) > 5 * cap  # tanh saturates: a missing or misplaced cap would show
    real = (np.asarray(seg) != 0)[:, :, None, None]
    cot = jnp.asarray(np.random.RandomState(9).randn(*q.shape) * real, dtype)  # nothing reads padding rows
    idx = jnp.arange(T)
    tol = 1e-5 if dtype == F32 else 2e-2
    outs = []
    for w in (window, None):
        mask = M.segment_mask(seg) & (idx[None] <= idx[:, None]) & ((idx[:, None] - idx[None]) < (w or T))

        def ref(q, k, v, mask=mask):
            return M.attention(q, k, v, mask, cap)

        def got(q, k, v, w=w):
            return flash_attention(q, k, v, seg, cap=cap, window=w, interpret=True)

        (o_ref, pull_ref), (o_got, pull_got) = jax.vjp(ref, q, k, v), jax.vjp(got, q, k, v)
        want, have = np.asarray(o_ref, np.float32), np.asarray(o_got, np.float32)
        np.testing.assert_allclose(np.where(real, have, 0), np.where(real, want, 0), atol=tol, rtol=0)
        for name, a, b in zip("qkv", pull_got(cot), pull_ref(cot)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            scale = np.abs(b).max()
            assert scale > 0.1, name
            np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0, err_msg=name)
        outs.append(have)
    assert np.abs(outs[0] - outs[1])[real[..., 0, 0]].max() > 0.1  # the window is seen


@pytest.mark.parametrize(("head_dim", "cap", "window", "dtype"), [(256, 50.0, 512, BF16), (128, 50.0, None, BF16),
                                                                   (64, None, 256, F32)])
def test_flash_kernel_lowers_to_triton_for_a_gpu(head_dim, cap, window, dtype):
    """Interpret mode runs any jax op; a GPU needs each to have a Triton lowering and every tile a power of two.
    Lowered for CUDA here (no GPU needed), forward and backward become three Triton kernels, with the grid the
    tiles give."""
    B, T, H, K = 2, 1024, 8, 4
    q = jax.ShapeDtypeStruct((B, T, H, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((B, T, K, head_dim), dtype)

    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, seg, cap=cap, window=window, interpret=False)
        return jnp.sum(out.astype(F32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, jax.ShapeDtypeStruct((B, T), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
    assert f"grid_x = {B} : i32, grid_y = {H} : i32, grid_z = {T // BLOCKS[head_dim].q} : i32" in text  # forward


def test_flash_path_through_the_model_equals_xla():
    """hidden_states with attn_impl="flash" equals the XLA path, forward and the layers' gradients, on a Gemma 2
    body (soft-capped, window 40 < 128) with packed segments and padding; float32 within 1e-5."""
    cfg = dataclasses.replace(CFG, head_dim=64, num_layers=2, layer_types=("sliding_attention", "full_attention"))
    assert 64 in BLOCKS
    params = jax.jit(strong_params, static_argnums=0)(cfg)
    tokens, seg, pos = _inputs()
    real = seg[..., None] != 0

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl):  # the hidden states and the gradients of sum(h ** 2) over real tokens, in one compile
        h, pull = jax.vjp(lambda p: M.hidden_states(p, tokens, cfg, segment_ids=seg, positions=pos,
                                                    attn_impl=impl), params)
        return h, pull(jnp.where(real, 2 * h, 0.0))[0]["layers"]

    (ref, g_ref), (got, g_got) = run("xla"), run("flash")
    ref, got = np.where(real, ref, 0), np.where(real, got, 0)
    assert np.abs(ref).max() > 1
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        scale = float(jnp.max(jnp.abs(g_ref[name])))
        np.testing.assert_allclose(np.asarray(g_got[name]), np.asarray(g_ref[name]), atol=1e-5 * scale, rtol=0)
