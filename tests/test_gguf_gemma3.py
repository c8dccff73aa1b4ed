"""GGUF "gemma3" export against llama.cpp (llama-cpp-python): a tiny random Gemma 3 with a query scale llama.cpp
does not apply, linear RoPE scaling on global layers and a partial last layer pattern gives the same prompt logits
and greedy tokens in llama.cpp as in gemmatune; gemmatune's own GGUF reader loads its exports back (gemma2 and
gemma3); configs llama.cpp cannot represent are refused."""

from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf import NEW_TOKENS, PROMPT, _llama, assert_llama_agrees

from conftest import strong_params
from gemmatune.config import DEFAULT_MODEL, GLOBAL, LOCAL, PRESETS, ModelConfig
from gemmatune.convert import load_model, model_config
from gemmatune.convert.gguf import save_gguf
from gemmatune.convert.hf import load_hf
from gemmatune.errors import GemmatuneError
from gemmatune.model import forward
from gemmatune.tokenizer import load_tokenizer

# 8 layers: five local, one global, then a partial pattern of two local layers (llama.cpp's pattern is by index too);
# query_pre_attn_scalar 48 against head_dim 32, so the export must fold the difference into the query norm; the
# window of 16 makes the prompt span several windows; global RoPE scaled linearly (rope.scaling.* keys).
G3 = ModelConfig(family="gemma3", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=8, num_heads=4,
                 num_kv_heads=2, head_dim=32, query_pre_attn_scalar=48, sliding_window=16, attn_logit_softcap=None,
                 final_logit_softcap=None, rope_theta=1e6, rope_scaling=4.0, max_position_embeddings=2048)
# A seed whose greedy continuation is diverse and whose top-2 margin exceeds twice the tolerance at every step
# (both asserted below).
SEED = 6
PROMPT_TOKENS = 96


@pytest.fixture(scope="module")
def g3() -> dict:
    return strong_params(G3, SEED)


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    ids = load_tokenizer(DEFAULT_MODEL).encode(PROMPT, add_bos=True)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS > 4 * G3.sliding_window
    return ids


def test_llama_cpp_runs_a_gemma3_export_like_gemmatune(tmp_path, g3, prompt_ids):
    path = tmp_path / "g3.gguf"
    save_gguf(path, G3, g3, DEFAULT_MODEL, dtype="f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.rope.freq_base"].contents() == 1e6
    assert fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert fields["gemma3.rope.scaling.factor"].contents() == 4.0
    assert fields["gemma3.attention.sliding_window"].contents() == 16
    assert not [k for k in fields if "softcapping" in k]

    assert_llama_agrees(_llama(path), g3, G3, prompt_ids, NEW_TOKENS // 2)


def _assert_same_params(got: dict, want: dict) -> None:
    """Matrices bit for bit; norms within the float32 rounding of storing 1 + w and subtracting 1 again."""
    flat_got = {**{k: v for k, v in got.items() if k != "layers"}, **got["layers"]}
    flat_want = {**{k: v for k, v in want.items() if k != "layers"}, **want["layers"]}
    assert set(flat_got) == set(flat_want)
    for name, w in flat_want.items():
        g, w = np.asarray(flat_got[name]), np.asarray(w, dtype=np.float32)
        assert g.shape == w.shape and g.dtype == np.float32, name
        if "norm" in name:
            np.testing.assert_allclose(g, w, rtol=0, atol=2 ** -23 * (1 + np.abs(w).max()), err_msg=name)
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


def test_gemmatune_reads_its_gemma3_export_back(tmp_path, g3, prompt_ids):
    cfg = dataclasses.replace(G3, query_pre_attn_scalar=G3.head_dim)  # what llama.cpp applies: stored as it is
    path = tmp_path / "g3.gguf"
    save_gguf(path, cfg, g3, DEFAULT_MODEL, dtype="f32")
    tok = load_tokenizer(DEFAULT_MODEL)
    assert model_config(path) == dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    got_cfg, got = load_model(path)  # "auto": an f32 file loads as float32
    assert got_cfg == model_config(path)
    _assert_same_params(got, g3)


def test_gemmatune_reads_gemma2_exports_back(tmp_path, prompt_ids):
    """The embedded model round-trips; a config whose query scale llama.cpp does not apply reads back as llama.cpp
    runs it (its scale, pre-scaled query weights): the same logits."""
    cfg, params = load_hf(DEFAULT_MODEL, dtype="float32")
    path = tmp_path / "tiny.gguf"
    save_gguf(path, cfg, params, DEFAULT_MODEL, dtype="f32")
    got_cfg, got = load_model(path)
    assert got_cfg == cfg
    _assert_same_params(got, params)

    scaled = dataclasses.replace(PRESETS["tiny"], query_pre_attn_scalar=48, attn_logit_softcap=5.0)
    strong = strong_params(scaled, 1)
    save_gguf(path, scaled, strong, DEFAULT_MODEL, dtype="f32", force=True)
    got_cfg, got = load_model(path, "float32")
    assert got_cfg == dataclasses.replace(scaled, query_pre_attn_scalar=32.0)
    want = np.asarray(forward(strong, jnp.asarray([prompt_ids]), scaled))
    np.testing.assert_allclose(np.asarray(forward(got, jnp.asarray([prompt_ids]), got_cfg)), want,
                               rtol=0, atol=2e-5 * np.abs(want).max())


def test_bf16_export_loads_as_bfloat16(tmp_path, g3):
    cfg = dataclasses.replace(G3, query_pre_attn_scalar=G3.head_dim)
    path = tmp_path / "g3.gguf"
    save_gguf(path, cfg, g3, DEFAULT_MODEL, dtype="bf16")
    _, got = load_model(path)
    assert got["embed"].dtype == jnp.bfloat16 and got["layers"]["q_proj"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["embed"]), np.asarray(g3["embed"].astype(jnp.bfloat16)))
    _, as_f32 = load_model(path, "float32")
    assert as_f32["embed"].dtype == jnp.float32


def test_configs_llama_cpp_cannot_represent_are_refused(tmp_path, g3):
    path = tmp_path / "m.gguf"
    cases = {
        "every sixth layer global": dataclasses.replace(G3, layer_types=(LOCAL, GLOBAL) * 4),
        "local layers' RoPE base at 10000": dataclasses.replace(G3, rope_local_theta=20000.0),
        "applies no logit soft-cap": dataclasses.replace(G3, final_logit_softcap=30.0),
    }
    for message, cfg in cases.items():
        with pytest.raises(GemmatuneError, match=message):
            save_gguf(path, cfg, g3, DEFAULT_MODEL)
    assert not path.exists()


_ON_A_MESH = """
import sys
import jax
import numpy as np
from gemmatune import sharding as S
from gemmatune.convert import load_model

mesh = S.make_mesh("data=2,model=4")
for stacked in (True, False):
    cfg, ref = load_model(sys.argv[1], stacked=stacked)
    _, params = load_model(sys.argv[1], stacked=stacked, mesh=mesh)
    want = S.param_shardings(cfg, mesh, stacked=stacked)
    assert all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
print("ok")
"""


def test_loading_onto_a_mesh_places_each_tensor_on_its_shards(tmp_path, g3):
    """On 8 simulated devices (a subprocess), as convert.hf.load_hf does: the same values, split as
    sharding.param_shardings says, stacked and per layer."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "g3.gguf"
    save_gguf(path, dataclasses.replace(G3, query_pre_attn_scalar=G3.head_dim), g3, DEFAULT_MODEL, dtype="f32")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _ON_A_MESH, str(path)], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]
