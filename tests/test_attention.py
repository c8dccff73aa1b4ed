"""The attention choice per platform, and the TPU Splash kernel (run in Pallas interpret mode on CPU) against the
XLA reference path: soft-capped logits, a sliding window, packed segments, gradients included."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL, strong_params
from gemmatune import model as M
from gemmatune.attention import attention_impl
from gemmatune.config import PRESETS


@pytest.mark.parametrize(("platform", "name", "seq", "want"), [
    ("tpu", "gemma2-2b", 1024, "splash"),
    ("tpu", "gemma2-27b", 384, "splash"),  # head_dim 128, seq a multiple of 128
    ("tpu", "gemma2-2b", 1000, "xla"),  # the kernel tiles the sequence by 128
    ("tpu", "small", 1024, "xla"),  # head_dim 64 is below the 128-lane tile
    ("gpu", "gemma2-2b", 1024, "xla"),  # no fused kernel with a logit soft-cap there
    ("cpu", "gemma2-2b", 1024, "xla"),
])
def test_attention_choice(platform, name, seq, want):
    assert attention_impl(platform, PRESETS[name], seq) == want


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
