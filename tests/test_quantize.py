"""QLoRA's quantized base (quantize.py): NF4 against bitsandbytes itself, int4/int8 error bounds, the quantized
model against the same model on the dequantized weights, and loading a checkpoint quantized as it streams."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL, SMALL3
from gemmatune import quantize
from gemmatune.config import Quantization
from gemmatune.errors import GemmatuneError
from gemmatune.layout import nbytes, param_shapes, param_structs
from gemmatune.model import forward

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes.functional")


def _weight(out: int, inp: int, dtype, seed: int = 0):
    """A PyTorch-layout weight [out, in] and the same weight as gemmatune's down_proj ([in, out], "fd")."""
    g = torch.Generator().manual_seed(seed)
    wt = (torch.randn(out, inp, generator=g) * 0.05).to(dtype)
    return wt, jnp.asarray(wt.float().numpy().T).astype(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nf4_codes_and_scales_equal_bitsandbytes(dtype):
    wt, w = _weight(96, 320, getattr(torch, dtype))
    packed, state = bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4")
    ours = quantize.quantize(w, "down_proj", Quantization("nf4", 64))
    theirs_order = quantize.to_bnb(ours)  # gemmatune stores the transpose of bitsandbytes' [out, in]
    np.testing.assert_array_equal(theirs_order["packed"], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(theirs_order["scale"], state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(ours["table"]), state.code.numpy())
    # Dequantized in the weight's dtype: bitsandbytes' dequantize_4bit to the bit.
    ref = bnb.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(np.asarray(quantize.matrix(ours, "down_proj", w.dtype).astype(jnp.float32)).T, ref)


def test_double_quantization_equals_bitsandbytes():
    """Nested scales: the same dynamic map, offset and per-256 absmax; the codes are the nearest entries of the
    map, as bitsandbytes' reference (PyTorch) implementation picks them. Its native CPU kernel's binary search
    can land one entry off when a value sits within a hair of a midpoint: allowed only there."""
    np.testing.assert_array_equal(quantize.dynamic_map(), bnb.create_dynamic_map(signed=True).numpy())
    wt, w = _weight(256, 640, torch.float32, seed=1)
    packed, state = bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize.quantize(w, "down_proj", Quantization("nf4", 64, double=True))
    np.testing.assert_array_equal(quantize.to_bnb(ours)["packed"], packed.numpy().reshape(-1))
    assert float(ours["scale_offset"]) == pytest.approx(float(state.offset), rel=1e-6)
    np.testing.assert_allclose(np.asarray(ours["scale_absmax"]), state.state2.absmax.numpy(), rtol=1e-6)
    codes, theirs = quantize.to_bnb(ours)["scale"], state.absmax.numpy()
    table = quantize.dynamic_map()
    exact = bnb.quantize_4bit(wt, blocksize=64, quant_type="nf4")[1].absmax.numpy() - float(state.offset)
    scaled = exact / np.repeat(state.state2.absmax.numpy(), 256)[:exact.size]
    off = np.nonzero(codes != theirs)[0]
    assert len(off) <= codes.size // 100
    assert (np.abs(codes[off].astype(int) - theirs[off]) == 1).all()
    assert (np.abs(table[codes[off]] - scaled[off]) <= np.abs(table[theirs[off]] - scaled[off])).all()
    assert (np.abs(table[codes] - scaled) <= np.abs(table[np.clip(codes.astype(int) + 1, 0, 255)] - scaled)).all()


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["int8", "int4", "nf4"]), block=st.sampled_from([32, 64]), seed=st.integers(0, 99),
       double=st.booleans())
def test_dequantized_weights_are_within_half_a_step(kind, block, seed, double):
    """Every weight comes back within half of its block's code spacing (all-zero blocks stay zero), plus, with
    double quantization, what coding the block's scale in 8 bits moved (itself within half a step of the
    dynamic map, times the nested block's absmax)."""
    w = jax.random.normal(jax.random.key(seed), (128, 2, 16)) * jnp.where(seed % 3 == 0, 0.0, 1.0)  # o_proj [H,E,D]
    q = Quantization(kind, block, double)
    qw = quantize.quantize(w, "o_proj", q)
    back = quantize.dequantize(qw, "o_proj", w.shape)
    m = np.asarray(w).reshape(256, 16).T.reshape(16, -1, block)  # [out, blocks, block]
    absmax = np.abs(m).max(-1)
    qmax = {"int8": 127, "int4": 1, "nf4": 1}[kind]
    spacing = {"int8": 1 / 127, "int4": 1 / 7, "nf4": 0.31}[kind]  # widest gap between codes, NF4's at +-1
    used = np.asarray(quantize.scales(qw)).T  # [out, blocks]
    exact = absmax / (127 if kind == "int8" else 1)
    if double:
        gaps = np.diff(quantize.dynamic_map())
        nested = np.repeat(np.asarray(qw["scale_absmax"]), 256)[:used.size].reshape(used.shape)
        assert (np.abs(used - exact) <= nested * gaps.max() / 2 + 1e-7).all()
    else:
        np.testing.assert_allclose(used, exact, rtol=1e-6)
    err = np.abs(np.asarray(back).reshape(256, 16).T.reshape(16, -1, block) - m)
    bound = absmax * spacing / 2 + np.abs(used - exact) * qmax + 1e-6
    assert (err <= bound[..., None]).all()


def test_quantized_model_equals_the_model_on_dequantized_weights(small3_params):
    """Gemma 3 on an int8 base: the logits of the model dequantizing inside each projection equal those of the
    model given the dequantized weights, and differ from the unquantized model's."""
    q = Quantization("int8", 32)
    layers = {k: quantize.quantize(v, k, q) if k.endswith("_proj") else v for k, v in small3_params["layers"].items()}
    qparams = {**small3_params, "layers": layers}
    assert jax.tree.structure(qparams) == jax.tree.structure(
        jax.tree.map(lambda s: 0, param_shapes(SMALL3, q), is_leaf=lambda x: isinstance(x, tuple)))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, SMALL3.vocab_size)
    got = forward(qparams, tokens, SMALL3)
    want = forward(quantize.dequantize_tree(qparams, SMALL3), tokens, SMALL3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-5)
    assert np.abs(np.asarray(forward(small3_params, tokens, SMALL3)) - np.asarray(got)).max() > 1e-3


def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(small_params):
    """Gemma 2 on an NF4 base with double-quantized scales: the loss and the adapters' gradients through the
    quantized projections (dequantized inside a jax.checkpoint) equal those on the dequantized weights."""
    from gemmatune.config import LoraConfig
    from gemmatune.lora import attach, init_adapters

    q, lora = Quantization("nf4", 32, double=True), LoraConfig(rank=4)
    layers = {k: quantize.quantize(v, k, q) if k.endswith("_proj") else v for k, v in small_params["layers"].items()}
    base = {**small_params, "layers": layers}
    adapters = jax.tree.map(lambda a: a + 0.01, init_adapters(SMALL, lora, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, SMALL.vocab_size)

    def loss(ad, base):
        logits = forward(attach(base, ad), tokens, SMALL, adapter=lora).astype(jnp.float32)
        return jax.nn.logsumexp(logits, -1).mean()

    value, g = jax.value_and_grad(loss)(adapters, base)
    value_ref, g_ref = jax.value_and_grad(loss)(adapters, quantize.dequantize_tree(base, SMALL))
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name, shape, q", [("gate_proj", (128, 96), Quantization("nf4", 32, double=True)),
                                             ("o_proj", (4, 32, 48), Quantization("int8", 32))])
def test_a_large_weight_multiplied_in_slices_equals_the_whole_product(name, shape, q, monkeypatch):
    """A weight over SLICE_ELEMENTS is dequantized and multiplied a slice of whole blocks at a time: the outputs
    and input gradients equal the whole weight's product (to float32 rounding of the sum)."""
    w = jax.random.normal(jax.random.key(0), shape)
    qw = quantize.quantize(w, name, q)
    x = jax.random.normal(jax.random.key(1), (2, 5, *shape[:-1]))

    def run(limit: int) -> tuple[jax.Array, jax.Array]:
        monkeypatch.setattr(quantize, "SLICE_ELEMENTS", limit)
        y, vjp = jax.vjp(lambda x: quantize.project(name, x, qw), x)
        return y, vjp(jnp.cos(y))[0]

    size = w.size  # in 4 blocks per output
    whole, sliced = run(size), run(size // 3)
    assert quantize._slices(4, size) == 4  # the fewest slices of whole blocks within size // 3
    for a, b in zip(whole, sliced):  # float32 sums of values ~10 in another order
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(whole[0]), np.einsum("...i,io->...o", np.asarray(x).reshape(2, 5, -1),
                               np.asarray(quantize.matrix(qw, name))), rtol=1e-5, atol=1e-5)


def test_block_that_does_not_divide_the_input_is_refused():
    with pytest.raises(GemmatuneError, match=r"quantize_block 128 does not divide down_proj's input size 96; .*"
                                             r"--quantize-block 32"):
        quantize.quantize(jnp.zeros((96, 64)), "down_proj", Quantization("nf4", 128))
    with pytest.raises(GemmatuneError, match="quantize: 'nf3' is not valid"):
        Quantization("nf3")


def test_quantized_bytes():
    """On Gemma 2 2B's shapes (nothing allocated): NF4 at block 64 keeps 4.5 bits per projection weight, about
    4.13 with double quantization, int8 8.5; bfloat16 16."""
    from gemmatune.config import PRESETS

    cfg = PRESETS["gemma2-2b"]
    n = sum(np.prod(s) for k, s in param_shapes(cfg)["layers"].items() if k.endswith("_proj"))

    def bits(q: Quantization | None) -> float:
        layers = param_structs(cfg, jnp.bfloat16, q)["layers"]
        return 8 * nbytes({k: v for k, v in layers.items() if k.endswith("_proj")}) / n

    assert bits(None) == 16
    assert bits(Quantization("nf4")) == pytest.approx(4.5, abs=1e-3)
    assert bits(Quantization("int4")) == bits(Quantization("nf4"))
    assert bits(Quantization("int8")) == pytest.approx(8.5)
    assert bits(Quantization("nf4", double=True)) == pytest.approx(4 + 8 / 64 + 32 / 64 / 256, abs=2e-3)


def test_commands_refuse_a_bad_quantization_in_one_line(capsys):
    from gemmatune.cli import main

    assert main(["generate", "--quantize", "nf4", "--quantize-block", "256", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "quantize_block 256 does not divide q_proj's input size 128" in err and "Traceback" not in err
    assert main(["train", "--quantize", "nf4", "--tune", "full"]) == 2
    assert "tune full trains every weight" in capsys.readouterr().err


def test_generate_on_a_quantized_base_equals_generate_on_its_dequantized_weights(tmp_path, capsys):
    """The decoding path (per-layer weights, KV cache, the serving engine) with --quantize nf4 gives the text of
    the same command on a checkpoint holding the dequantized weights."""
    from gemmatune.cli import main
    from gemmatune.config import DEFAULT_MODEL
    from gemmatune.convert import load_model
    from gemmatune.convert.hf import save_hf

    cfg, params = load_model(DEFAULT_MODEL, "float32", quant=Quantization("nf4"))
    save_hf(tmp_path / "deq", cfg, quantize.dequantize_tree(params, cfg), tokenizer_dir=DEFAULT_MODEL)
    run = ["generate", "--max-new-tokens", "12", "--dtype", "float32", "--prompt", "What does gemmatune do?"]
    assert main([*run, "--model", str(tmp_path / "deq")]) == 0
    want = capsys.readouterr().out
    assert main([*run, "--quantize", "nf4"]) == 0
    assert capsys.readouterr().out == want and want.strip()
