"""Every tensor type llama.cpp writes for Gemma, read by gemmatune: a small Gemma 3 whose widths are multiples of 256
(so the K-quants apply) is exported as f32 and quantized by llama.cpp itself (llama_model_quantize) to F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quant mixes (Q2_K..Q6_K). gemmatune's loaded weights equal gguf-py's own
dequantization of each file's tensors (through gguf.GGUFReader, an independent reading of the file), and its logits
follow llama.cpp's on the quantized file; an unknown tensor type or architecture is one clear error."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import PROMPT, _llama, _llama_logits

from conftest import strong_params
from gemmatune.config import DEFAULT_MODEL, ModelConfig
from gemmatune.convert import load_model, model_config
from gemmatune.convert.gguf import NORMS, TENSORS, save_gguf
from gemmatune.convert.hf import from_hf
from gemmatune.errors import GemmatuneError
from gemmatune.model import forward
from gemmatune.tokenizer import load_tokenizer

Q = gguf.GGMLQuantizationType
# K-quant blocks span 256 values: every matrix row (hidden 256, heads x head_dim 256, intermediate 512) is a
# multiple of 256, so llama.cpp quantizes every matrix rather than falling back to another type.
Q256 = ModelConfig(family="gemma3", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=128, query_pre_attn_scalar=128, sliding_window=16, attn_logit_softcap=None,
                   final_logit_softcap=None, max_position_embeddings=512)
# llama.cpp's file types -> the tensor types it writes for them here (the mixes also use other K-quants).
FTYPES = {"F16": {Q.F16}, "BF16": {Q.BF16}, "Q8_0": {Q.Q8_0}, "Q4_0": {Q.Q4_0, Q.Q6_K}, "Q4_1": {Q.Q4_1, Q.Q6_K},
          "Q5_0": {Q.Q5_0, Q.Q6_K}, "Q5_1": {Q.Q5_1, Q.Q6_K}, "Q2_K": {Q.Q2_K, Q.Q3_K, Q.Q6_K},
          "Q3_K_M": {Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}, "Q4_K_M": {Q.Q4_K, Q.Q6_K}, "Q5_K_M": {Q.Q5_K, Q.Q6_K},
          "Q6_K": {Q.Q6_K}}
REQUIRED = {Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
assert set().union(*FTYPES.values()) == REQUIRED
# llama.cpp multiplies quantized matrices with activations quantized to 8 bits (its vec_dot types), so its logits
# move by a few percent of their scale (measured max 0.065, Q6_K); rounding the weights moves them by 15-98% here
# (Q6_K..Q2_K against the f32 model), so a dequantization error would show far beyond these bounds.
LLAMA_RTOL = 0.1
NAMES = {gguf.TENSOR_NAMES[v].split(".")[-1]: k for k, v in TENSORS.items()}  # "attn_q" -> "q_proj"
LLAMA_CORR = 0.998  # measured >= 0.9992


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quants") / "f32.gguf"
    save_gguf(path, Q256, strong_params(Q256, 0), DEFAULT_MODEL, dtype="f32")
    return path


def _quantize(src: Path, ftype: str) -> Path:
    import llama_cpp

    out = src.with_name(f"{ftype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _gguf_py_params(path: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{GGUF name: array in gemmatune's layout} by gguf-py's reader and dequantization alone."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        name = NAMES[t.name.split(".")[-2]]
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        out[t.name] = from_hf(name, a - 1 if name in NORMS else a, cfg)
    return out


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_every_type_dequantizes_as_gguf_py_and_runs_like_llama_cpp(f32_file, ftype):
    path = _quantize(f32_file, ftype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) - {Q.F32} == FTYPES[ftype]
    cfg, params = load_model(path)
    assert cfg == model_config(f32_file) == model_config(path)
    want = _gguf_py_params(path, cfg)
    for name, a in want.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        key = NAMES[name.split(".")[-2]]
        got = params[key] if layer is None else params["layers"][key][layer]
        # "auto" loads a BF16 file (its float32 norms included) in bfloat16, like a bfloat16 safetensors checkpoint.
        assert got.dtype == (jnp.bfloat16 if ftype == "BF16" else jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), a.astype(got.dtype), err_msg=f"{ftype} {name}")

    ids = load_tokenizer(DEFAULT_MODEL).encode(PROMPT, add_bos=True)[:48]
    ours = np.asarray(forward(params, jnp.asarray([ids]), cfg))[0]
    theirs = _llama_logits(_llama(path), ids)
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    print(f"{ftype}: max |diff| / max |logit| {rel:.3f}, correlation {corr:.5f}")
    assert rel < LLAMA_RTOL and corr > LLAMA_CORR


def _patch(path: Path, out: Path, find: bytes, skip: int, new: bytes) -> Path:
    """A copy of `path` with the bytes `skip` bytes after the first `find` replaced by `new`."""
    data = bytearray(path.read_bytes())
    at = data.index(find) + len(find) + skip
    data[at:at + len(new)] = new
    out.write_bytes(bytes(data))
    return out


def test_unknown_tensor_type_and_architecture_are_clear_errors(f32_file, tmp_path):
    # blk.0.attn_q_norm.weight's tensor info: name, then n_dims (u32), one u64 dim, then the type (u32). I32 has
    # F32's size, so the file stays consistent and only the type is unreadable.
    name = b"blk.0.attn_q_norm.weight"
    bad_type = _patch(f32_file, tmp_path / "i32.gguf", name, 4 + 8, int(Q.I32).to_bytes(4, "little"))
    with pytest.raises(GemmatuneError, match=r"tensor blk\.0\.attn_q_norm\.weight is stored as I32, which gemmatune "
                                             "cannot dequantize"):
        load_model(bad_type)
    # general.architecture's value: type (u32), length (u64), then the string.
    llama = _patch(f32_file, tmp_path / "arch.gguf", b"general.architecture", 4 + 8, b"gemmx3")
    for read in (model_config, load_model):
        with pytest.raises(GemmatuneError, match="GGUF architecture 'gemmx3' is not supported"):
            read(llama)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f32_file.read_bytes()[:-1000])
    with pytest.raises(GemmatuneError, match="truncated"):
        load_model(truncated)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a model at all")
    with pytest.raises(GemmatuneError, match="not a GGUF file"):
        model_config(not_gguf)
