"""The JAX Gemma 2 and Gemma 3 against transformers' Gemma2ForCausalLM and Gemma3ForCausalLM on the same weights
(float32 logits within 1e-4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL, SMALL3, hf_classes, hf_logits, hf_model, strong_params
from gemmatune import model as M
from gemmatune.config import GLOBAL, LOCAL, PRESETS, from_hf_dict
from gemmatune.convert.hf import hf_keys, hf_shape
from gemmatune.errors import GemmatuneError
from gemmatune.layout import param_shapes

TOL = 1e-4
rng = np.random.RandomState(0)


def test_logits_match_transformers_over_several_windows(small_params, small_hf):
    tokens = rng.randint(0, SMALL.vocab_size, (2, 5 * SMALL.sliding_window))
    ours = np.asarray(M.forward(small_params, jnp.asarray(tokens), SMALL))
    ref = hf_logits(small_hf, tokens)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    # The reference is strong: the logits vary and reach into the final soft-cap's bend.
    assert np.abs(ref).max() > 0.5 * SMALL.final_logit_softcap and ref.std() > 2


def test_weights_make_a_sensitive_reference(small_params):
    """Dropping (1 + w), the sliding window or either soft-cap must move the logits far past the tolerance."""
    tokens = jnp.asarray(rng.randint(0, SMALL.vocab_size, (1, 40)))
    base = M.forward(small_params, tokens, SMALL)
    shifted = {**small_params,
               "layers": {k: (v - 1.0 if "norm" in k else v) for k, v in small_params["layers"].items()}}
    variants = [M.forward(shifted, tokens, SMALL)] + [
        M.forward(small_params, tokens, dataclasses.replace(SMALL, **change))
        for change in ({"sliding_window": 1000}, {"attn_logit_softcap": None}, {"final_logit_softcap": None})]
    for v in variants:
        assert np.abs(base - v).max() > 100 * TOL


@pytest.fixture(params=["gemma2", "gemma3"])
def family(request):
    """(config, weights, transformers reference) of the small Gemma 2 and the small Gemma 3."""
    if request.param == "gemma2":
        return SMALL, request.getfixturevalue("small_params"), request.getfixturevalue("small_hf")
    return SMALL3, request.getfixturevalue("small3_params"), request.getfixturevalue("small3_hf")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers_and_unpadded(family, side):
    cfg, params, hf = family
    T, n = 36, 21  # row 1 holds n real tokens, padded to T
    tokens = rng.randint(3, cfg.vocab_size, (2, T))
    real = np.ones((2, T), np.int32)
    if side == "left":
        real[1, :T - n] = 0
    else:
        real[1, n:] = 0
    tokens = np.where(real == 1, tokens, 0)
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg, positions=jnp.asarray(positions),
                                segment_ids=jnp.asarray(real)))
    ref = hf_logits(hf, tokens, attention_mask=real, position_ids=positions)
    keep = real.astype(bool)
    assert np.isfinite(ours).all()  # fully masked padding rows must not produce NaN
    np.testing.assert_allclose(ours[keep], ref[keep], atol=TOL, rtol=0)
    alone = np.asarray(M.forward(params, jnp.asarray(tokens[1][keep[1]][None]), cfg))[0]
    np.testing.assert_allclose(ours[1][keep[1]], alone, atol=TOL, rtol=0)


def test_packed_segments_equal_separate_runs(family):
    cfg, params, hf = family
    a = rng.randint(3, cfg.vocab_size, 23)
    b = rng.randint(3, cfg.vocab_size, 17)
    tokens = np.concatenate([a, b, np.zeros(4, int)])[None]  # two examples and padding in one row
    segments = np.array([[1] * 23 + [2] * 17 + [0] * 4])
    positions = np.array([list(range(23)) + list(range(17)) + [0] * 4])
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg, segment_ids=jnp.asarray(segments),
                                positions=jnp.asarray(positions)))[0]
    np.testing.assert_allclose(ours[:23], hf_logits(hf, a[None])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[23:40], hf_logits(hf, b[None])[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("types", [(GLOBAL,) * 4, (LOCAL, LOCAL, GLOBAL, GLOBAL), (LOCAL,) * 4])
def test_other_layer_patterns_from_config_match(types):
    cfg = dataclasses.replace(SMALL, layer_types=types)
    params = strong_params(cfg, seed=1)
    tokens = rng.randint(0, cfg.vocab_size, (1, 30))
    ours = np.asarray(M.forward(params, jnp.asarray(tokens), cfg))
    np.testing.assert_allclose(ours, hf_logits(hf_model(cfg, params), tokens), atol=TOL, rtol=0)


def test_cached_chunks_equal_full_forward(small_params):
    tokens = jnp.asarray(rng.randint(0, SMALL.vocab_size, (2, 45)))
    full = M.forward(small_params, tokens, SMALL)
    cache = M.init_cache(SMALL, 2, 48, jnp.float32)
    layers = M.unstack(small_params)
    cached = jax.jit(lambda p, t, c: M.forward_cached(p, t, c, SMALL))
    outs = []
    # chunks longer than the ring, shorter than it, and single tokens (the write-then-attend path)
    for lo, hi in [(0, 13), (13, 14), (14, 19), (19, 20), (20, 21), (21, 35), (35, 45)]:
        logits, cache = cached(layers, tokens[:, lo:hi], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=TOL, rtol=0)


def test_bfloat16_compute_is_as_close_as_transformers_bfloat16(small_params):
    """bfloat16 weights and compute against transformers in float32 on the same (bfloat16-rounded) weights: the
    error allowed is what transformers' own bfloat16 forward makes against that reference, times 2 for a different
    but equally valid rounding order, in the largest and the root-mean-square logit error. Both come from bfloat16's
    2^-8 relative precision over a few layers: here transformers' errors are 0.29 (max) and 0.063 (RMS) on logits
    up to 16.8 (the RMS error is about 2^-8 x the largest logit), ours 0.30 and 0.053. The former bound, 10% of the
    largest logit (1.7), let a bfloat16-only query scale of 224 for 256 through (max error 1.04); this one fails it,
    RMSNorm without (1 + w) in bfloat16 or everywhere (15.3), and every variant below."""
    import torch

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(a))))

    tokens = np.random.RandomState(1).randint(0, SMALL.vocab_size, (2, 3 * SMALL.sliding_window))
    bf = jax.tree.map(lambda a: jnp.asarray(a).astype(jnp.bfloat16), small_params)
    hf = hf_model(SMALL, jax.tree.map(lambda a: a.astype(jnp.float32), bf))  # exactly the bfloat16 weights
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()  # float32 compute
        hf_bf16 = hf.to(torch.bfloat16)(torch.from_numpy(tokens)).logits.float().numpy()
    max_tol, rms_tol = 2 * np.abs(hf_bf16 - ref).max(), 2 * rms(hf_bf16 - ref)
    assert max_tol < 2 ** -8 * 16 * np.abs(ref).max()  # the reference's error is bfloat16 rounding, not a defect

    def error(params: dict, cfg=SMALL) -> tuple[float, float]:
        out = M.forward(params, jnp.asarray(tokens), cfg)
        assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
        return float(np.abs(np.asarray(out) - ref).max()), rms(np.asarray(out) - ref)

    got = error(bf)
    assert got[0] <= max_tol and got[1] <= rms_tol, (got, max_tol, rms_tol)
    # Defects that a bfloat16 path could have must fail the bound: RMSNorm without (1 + w), the query scale of
    # the published 224-for-256 bug, either soft-cap dropped.
    shifted = {**bf, "layers": {k: (v - 1 if "norm" in k else v) for k, v in bf["layers"].items()}}
    variants = [error(shifted)] + [error(bf, dataclasses.replace(SMALL, **change)) for change in (
        {"query_pre_attn_scalar": SMALL.query_pre_attn_scalar * 224 / 256}, {"attn_logit_softcap": None},
        {"final_logit_softcap": None})]
    for worst, mean in variants:
        assert worst > max_tol or mean > rms_tol, (worst, mean, max_tol, rms_tol)


def _count_eqns(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_eqns(sub)
    return n


def test_program_size_does_not_grow_with_depth():
    """The layer stack runs under lax.scan: 2 and 8 layers trace to the same number of operations."""
    counts = []
    for layers in (2, 8):
        cfg = dataclasses.replace(SMALL, num_layers=layers, layer_types=())
        shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
        jaxpr = jax.make_jaxpr(lambda p, t: M.forward(p, t, cfg))(shapes, jax.ShapeDtypeStruct((1, 16), jnp.int32))
        counts.append(_count_eqns(jaxpr.jaxpr))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("name", ["gemma2-2b", "gemma2-9b", "gemma2-27b"])
def test_preset_shapes_equal_transformers(name):
    """Every parameter shape equals transformers' for the preset (model built on the meta device, no weights)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = PRESETS[name]
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    with torch.device("meta"):
        hf = Gemma2ForCausalLM(Gemma2Config(**d))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = {key: hf_shape(n, cfg) for key, n, _ in hf_keys(cfg)}
    assert ours == hf_shapes
    # and the same count as gemmatune's own layout
    shapes = param_shapes(cfg)
    n_ours = sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))
    assert n_ours == sum(int(np.prod(s)) for s in hf_shapes.values())


def test_presets_hold_the_released_numbers():
    from transformers import Gemma2Config

    two_b = Gemma2Config()  # transformers' defaults are gemma-2-2b's
    assert from_hf_dict(two_b.to_dict()) == PRESETS["gemma2-2b"]
    assert [PRESETS[f"gemma2-{s}"].query_pre_attn_scalar for s in ("2b", "9b", "27b")] == [256, 256, 144]
    for p in ("gemma2-2b", "gemma2-9b", "gemma2-27b"):
        c = PRESETS[p]
        assert (c.vocab_size, c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap, c.rope_theta,
                c.rms_norm_eps) == (256000, 4096, 50.0, 30.0, 10000.0, 1e-6)
        assert c.layer_types[0] == LOCAL and c.block_pattern == (LOCAL, GLOBAL)
        assert from_hf_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("model_type,named", [("gemma", "Gemma 1"), ("gemma3n", "Gemma 3n"), ("llama", "Llama"),
                                              (None, "no model_type")])
def test_other_architectures_are_refused_by_name(model_type, named):
    d = PRESETS["gemma2-2b"].to_hf_dict()
    d["model_type"] = model_type
    with pytest.raises(GemmatuneError, match=named) as e:
        from_hf_dict(d, source="ckpt/config.json")
    assert "ckpt/config.json" in str(e.value) and "Gemma 2 or Gemma 3" in str(e.value)


def test_config_written_back_loads_in_transformers():
    """A config read from config.json and written again is accepted by transformers' strict config class of its
    family, which reads the same numbers back (Gemma 3's RoPE included)."""
    for cfg in (*PRESETS.values(), SMALL, SMALL3):
        d = from_hf_dict(cfg.to_hf_dict()).to_hf_dict()
        assert isinstance(d["query_pre_attn_scalar"], int)
        config_class, _ = hf_classes(cfg)
        theirs = config_class(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
        assert theirs.query_pre_attn_scalar == cfg.query_pre_attn_scalar
        assert from_hf_dict(theirs.to_dict()) == cfg


def test_config_reads_rope_parameters_and_rejects_bad_values():
    d = SMALL.to_hf_dict()
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    assert from_hf_dict(d).rope_theta == 5000.0
    with pytest.raises(GemmatuneError, match="num_key_value_heads"):
        from_hf_dict({**SMALL.to_hf_dict(), "num_key_value_heads": 3})
    with pytest.raises(GemmatuneError, match="layer_types"):
        from_hf_dict({**SMALL.to_hf_dict(), "layer_types": ["sliding_attention"]})


# --- Gemma 3 ------------------------------------------------------------------------------------------------------

def test_gemma3_logits_match_transformers_over_several_windows(small3_params, small3_hf):
    tokens = rng.randint(0, SMALL3.vocab_size, (2, 5 * SMALL3.sliding_window))
    ours = np.asarray(M.forward(small3_params, jnp.asarray(tokens), SMALL3))
    ref = hf_logits(small3_hf, tokens)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert ref.std() > 2


def test_gemma3_weights_make_a_sensitive_reference(small3_params):
    """Each Gemma 3 difference matters here: dropping the QK-norm's (1 + w), the local/global RoPE bases or the
    global scaling, the partial last pattern (as if all layers repeated 5:1) or the window moves the logits far past
    the tolerance; so does applying Gemma 2's soft-caps."""
    tokens = jnp.asarray(rng.randint(0, SMALL3.vocab_size, (1, 40)))
    base = M.forward(small3_params, tokens, SMALL3)
    layers = small3_params["layers"]
    no_qk_shift = {**small3_params, "layers": {**layers, "q_norm": layers["q_norm"] - 1.0}}
    variants = [M.forward(no_qk_shift, tokens, SMALL3)] + [
        M.forward(small3_params, tokens, dataclasses.replace(SMALL3, **change))
        for change in ({"rope_local_theta": 1_000_000.0}, {"rope_theta": 10_000.0}, {"rope_scaling": 1.0},
                       {"layer_types": (LOCAL,) * 5 + (GLOBAL,) + (LOCAL, GLOBAL)}, {"sliding_window": 1000},
                       {"attn_logit_softcap": 3.0}, {"final_logit_softcap": 5.0})]
    for v in variants:
        assert np.abs(base - v).max() > 100 * TOL


def test_gemma3_cached_chunks_equal_transformers(small3_params, small3_hf):
    tokens = rng.randint(0, SMALL3.vocab_size, (2, 45))
    ref = hf_logits(small3_hf, tokens)
    cache = M.init_cache(SMALL3, 2, 48, jnp.float32)
    layers = M.unstack(small3_params)
    cached = jax.jit(lambda p, t, c: M.forward_cached(p, t, c, SMALL3))
    outs = []
    for lo, hi in [(0, 13), (13, 14), (14, 19), (19, 20), (20, 35), (35, 45)]:
        logits, cache = cached(layers, jnp.asarray(tokens[:, lo:hi]), cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), ref, atol=TOL, rtol=0)


def test_gemma3_stack_is_one_block_per_pattern_repeat():
    """Gemma 3's stack scans one block per repeat of its 5:1 pattern: 6 and 18 layers trace to the same program; a
    partial last repeat (8 layers: 6 + 2 local) adds one more scanned block, whatever the number of repeats."""
    def count(layers: int) -> int:
        cfg = dataclasses.replace(SMALL3, num_layers=layers, layer_types=())
        shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
        jaxpr = jax.make_jaxpr(lambda p, t: M.forward(p, t, cfg))(shapes, jax.ShapeDtypeStruct((1, 16), jnp.int32))
        return _count_eqns(jaxpr.jaxpr)

    assert count(6) == count(18)
    assert count(8) == count(20) > count(6)
    assert [(s, r, len(p)) for s, r, p in PRESETS["gemma3-1b"].layer_segments] == [(0, 4, 6), (24, 2, 1)]


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"])
def test_gemma3_preset_shapes_equal_transformers(name):
    import torch

    cfg = PRESETS[name]
    config_class, model_class = hf_classes(cfg)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = model_class(config_class(**d))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert {key: hf_shape(n, cfg) for key, n, _ in hf_keys(cfg)} == hf_shapes
    assert hf.config.layer_types == list(cfg.layer_types)


def test_gemma3_presets_hold_the_released_numbers():
    """The numbers of google/gemma-3-*: windows 512 (270M, 1B) and 1024, vocabularies 262,144 and 262,208, 27B's
    query_pre_attn_scalar 168, global RoPE scaled by 8 from 4B up; every layer count ends in its pattern."""
    got = {n: (c.vocab_size, c.sliding_window, c.query_pre_attn_scalar, c.rope_scaling, c.num_layers)
           for n, c in PRESETS.items() if n.startswith("gemma3-")}
    assert got == {"gemma3-270m": (262144, 512, 256, 1.0, 18), "gemma3-1b": (262144, 512, 256, 1.0, 26),
                   "gemma3-4b": (262208, 1024, 256, 8.0, 34), "gemma3-12b": (262208, 1024, 256, 8.0, 48),
                   "gemma3-27b": (262208, 1024, 168, 8.0, 62)}
    for name, c in PRESETS.items():
        if name.startswith("gemma3-"):
            assert (c.rope_theta, c.rope_local_theta, c.attn_logit_softcap, c.final_logit_softcap) == \
                (1_000_000.0, 10_000.0, None, None)
            assert c.layer_types[5::6] == (GLOBAL,) * (c.num_layers // 6) and c.layer_types.count(GLOBAL) == \
                c.num_layers // 6


def test_gemma3_configs_in_both_layouts_and_multimodal_read_alike():
    """Older configs (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern), transformers 5's
    rope_parameters, and a multimodal gemma3 config whose text_config leaves fields at transformers' defaults (as
    the Hub's gemma-3-4b config does) all give the preset."""
    want = PRESETS["gemma3-4b"]
    old = {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
           "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
           "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
           "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131072,
           "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "final_logit_softcapping": None,
           "attn_logit_softcapping": None}
    assert from_hf_dict(old) == want
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                      "sliding_window_pattern")}
    new["rope_parameters"] = {LOCAL: {"rope_type": "default", "rope_theta": 10_000.0},
                              GLOBAL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}
    assert from_hf_dict(new) == want
    multimodal = {"model_type": "gemma3", "eos_token_id": [1, 106], "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}
    assert from_hf_dict(multimodal) == want
    with pytest.raises(GemmatuneError, match="rope_type 'yarn'"):
        from_hf_dict({**old, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(GemmatuneError, match="use_bidirectional_attention"):
        from_hf_dict({**old, "use_bidirectional_attention": True})

