"""GGUF export against llama.cpp itself (llama-cpp-python): the same token ids, prompt logits and greedy text as
gemmatune's own model, past the sliding window; the metadata and tensors read back with gguf-py; the other storage
types; the Ollama Modelfile; and the user-facing failures."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import strong_params
from gemmatune.config import DEFAULT_MODEL, GLOBAL, PRESETS, ModelConfig
from gemmatune.convert.gguf import DTYPES, modelfile, modelfile_path, save_gguf
from gemmatune.convert.hf import load_hf
from gemmatune.errors import GemmatuneError
from gemmatune.generate import generate
from gemmatune.model import forward
from gemmatune.tokenizer import GEMMA2_CHAT_TEMPLATE, load_tokenizer, render_chat

# query_pre_attn_scalar differs from head_dim (32), so llama.cpp's own 1/sqrt(head_dim) would be wrong unless the
# export pre-scales the queries; the attention cap is lowered to where these logits reach it.
STRONG = dataclasses.replace(PRESETS["tiny"], query_pre_attn_scalar=48, attn_logit_softcap=5.0)
# Plain text, digits, repeated spaces and characters that need byte fallback; far longer than the window (64).
PROMPT = ("The quick brown fox jumps over the lazy dog while 12345 sheep count backwards, and then   three spaces "
          "appear before a café serves crème brûlée to 42 guests under the 🌙 moon. Meanwhile the river keeps "
          "flowing past the old mill where nobody has worked since 1987, and the wind carries seeds far away. "
          "Later that evening, the children gathered around a small fire to tell stories about dragons, pirates "
          "and the forgotten kingdom beyond the northern hills. ")
NEW_TOKENS = 24
# llama.cpp's CPU backend evaluates tanh-GELU through a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h), so its
# feed-forward activations carry float16 rounding (relative 2^-11 = 4.9e-4); the rest agrees to ~5e-6 (measured with
# the feed-forward zeroed). Measured max |logit diff| / max |logit|: 3.8e-4 (embedded) and 5.2e-4 (strong). Leaving
# out the norm +1, the query pre-scale, a soft-cap, the window or the rope base moves it to 0.18 or more.
LOGIT_RTOL = 1.5e-3
# A seed whose greedy continuation is diverse and has a top-2 margin above twice the tolerance at every step
# (both asserted), so llama.cpp must pick the same tokens.
STRONG_SEED = 39


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(PROMPT, add_bos=True)
    assert 2 * PRESETS["tiny"].sliding_window < len(ids) < 256 - NEW_TOKENS  # past the window, within n_ctx
    return ids


@pytest.fixture(scope="module")
def strong() -> dict:
    return strong_params(STRONG, STRONG_SEED)


@pytest.fixture(scope="module", params=["embedded", "strong"])
def model(request) -> tuple[ModelConfig, dict, int]:
    """(config, weights, how many distinct tokens greedy text must have): the embedded tiny checkpoint in float32
    (its greedy text repeats one token), and weights that make a strong reference (diverse greedy text, logits
    near the final soft-cap) under a config that needs the query pre-scale."""
    if request.param == "embedded":
        return *load_hf(DEFAULT_MODEL, dtype="float32"), 1
    return STRONG, request.getfixturevalue("strong"), NEW_TOKENS // 2


def _export(tmp: Path, cfg: ModelConfig, params: dict, dtype: str) -> Path:
    path = tmp / f"model-{dtype}.gguf"
    save_gguf(path, cfg, params, DEFAULT_MODEL, dtype=dtype)
    return path


def _llama(path: Path):
    import llama_cpp

    # A float32 KV cache: the default float16 cache would round keys and values, hiding export errors in its noise.
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # [T, V]


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy decoding one token at a time through llama.cpp's KV cache."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def test_llama_cpp_matches_gemmatune(tmp_path, model, tokenizer, prompt_ids):
    cfg, params, min_distinct = model
    llm = _llama(_export(tmp_path, cfg, params, "f32"))

    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == prompt_ids
    chat = render_chat([{"role": "user", "content": "Hi there!\n\tTabs, 7 digits 1234567."}], True)
    assert llm.tokenize(chat.encode(), add_bos=True, special=True) == tokenizer.encode(chat, add_bos=True)

    assert_llama_agrees(llm, params, cfg, prompt_ids, min_distinct)


def assert_llama_agrees(llm, params: dict, cfg, prompt_ids: list[int], min_distinct: int) -> None:
    """llama.cpp's logits on the prompt are within LOGIT_RTOL of gemmatune's, and its greedy continuation is
    gemmatune's (which must vary, with a top-2 margin that the logit tolerance cannot flip)."""
    ours = np.asarray(forward(params, jnp.asarray([prompt_ids]), cfg))[0]
    theirs = _llama_logits(llm, prompt_ids)
    diff, tol = np.abs(ours - theirs).max(), LOGIT_RTOL * np.abs(ours).max()
    print(f"max |logit diff| over {len(prompt_ids)} positions: {diff:.2e} (max |logit| {np.abs(ours).max():.1f})")
    assert diff < tol

    expected = generate(params, cfg, [prompt_ids], max_new_tokens=NEW_TOKENS)[0]
    # With every logit within tol, a top-2 margin above 2 tol fixes each greedy step, so the texts must agree.
    full = np.asarray(forward(params, jnp.asarray([prompt_ids + expected]), cfg))[0, len(prompt_ids) - 1:-1]
    top2 = np.sort(full, axis=-1)[:, -2:]
    assert len(set(expected)) >= min_distinct and (top2[:, 1] - top2[:, 0]).min() > 2 * tol
    assert _llama_greedy(llm, prompt_ids, NEW_TOKENS) == expected


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8_0"])
def test_other_dtypes_load_and_run(tmp_path, dtype, strong, prompt_ids):
    path = _export(tmp_path, STRONG, strong, dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == DTYPES[dtype][0]
    assert types["blk.0.post_ffw_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    logits = _llama_logits(_llama(path), prompt_ids)
    assert np.isfinite(logits).all()
    if dtype != "q8_0":  # rounding every weight to 16 bits moves logits a little, not the argmax much
        ours = np.asarray(forward(strong, jnp.asarray([prompt_ids]), STRONG))[0]
        agree = (ours.argmax(-1) == logits.argmax(-1)).mean()
        print(f"{dtype}: argmax agrees at {agree:.0%} of positions")
        assert agree > 0.9


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata_and_tensors(tmp_path, tokenizer, strong):
    reader = gguf.GGUFReader(_export(tmp_path, STRONG, strong, "f32"))
    expected = {
        "general.architecture": "gemma2", "general.name": "model-f32", "general.file_type": 0,
        "gemma2.context_length": 2048, "gemma2.embedding_length": 128, "gemma2.block_count": 4,
        "gemma2.feed_forward_length": 256, "gemma2.attention.head_count": 4, "gemma2.attention.head_count_kv": 2,
        "gemma2.attention.key_length": 32, "gemma2.attention.value_length": 32,
        "gemma2.attention.sliding_window": 64, "gemma2.attn_logit_softcapping": 5.0,
        "gemma2.final_logit_softcapping": 30.0, "gemma2.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.eot_token_id": tokenizer.end_of_turn_id, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": GEMMA2_CHAT_TEMPLATE,
    }
    assert {k: _field(reader, k) for k in expected} == expected
    assert _field(reader, "gemma2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)

    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    types = dict(zip(tokens, _field(reader, "tokenizer.ggml.token_type")))
    T = gguf.TokenType
    assert [types[t] for t in ("<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "<0x41>", "The")] == [
        T.CONTROL, T.UNKNOWN, T.CONTROL, T.CONTROL, T.USER_DEFINED, T.BYTE, T.NORMAL]
    scores = _field(reader, "tokenizer.ggml.scores")
    assert scores[tokens.index("The")] < scores[tokens.index("▁g")] < 0  # SentencePiece's merge priorities

    layer_names = ["attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q", "attn_k", "attn_v",
                   "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(STRONG.num_layers) for n in layer_names}
    layers = strong["layers"]
    # Norms carry the 1 that Gemma adds at run time; queries carry sqrt(head_dim / query_pre_attn_scalar).
    np.testing.assert_array_equal(tensors["output_norm.weight"], np.asarray(strong["final_norm"]) + 1)
    np.testing.assert_array_equal(tensors["blk.3.post_ffw_norm.weight"], np.asarray(layers["post_ffw_norm"][3]) + 1)
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight"],
                               np.asarray(layers["q_proj"][1]).reshape(128, 128).T * np.sqrt(32 / 48), rtol=1e-6)
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], np.asarray(layers["k_proj"][1]).reshape(128, 64).T)
    np.testing.assert_array_equal(tensors["token_embd.weight"], np.asarray(strong["embed"]))


def _ollama_render(template: str, system: str, prompt: str) -> str:
    """The part of an Ollama Prompt/Response template before {{ .Response }}, for one turn: what it feeds the
    model to generate an answer."""
    text = template.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda m: m[1] if system else "", text, flags=re.DOTALL)
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


def test_modelfile_is_written_beside_the_gguf(tmp_path, strong):
    path = _export(tmp_path, STRONG, strong, "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-f32.Modelfile", "model-f32.gguf"]  # no leftovers
    text = modelfile_path(path).read_text()
    assert text == modelfile("model-f32.gguf")
    assert text.startswith("FROM ./model-f32.gguf\n")  # relative: Ollama resolves it from the Modelfile's folder
    assert text.count('PARAMETER stop "<end_of_turn>"\n') == text.count('PARAMETER stop "<eos>"\n') == 1
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL)[1]
    # The prompt Ollama builds is the one gemmatune trained on (a system prompt folded into the user turn).
    for system in ("", "Be brief."):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": "Hello?"})
        assert _ollama_render(template, system, "Hello?") == render_chat(messages, add_generation_prompt=True)
    with pytest.raises(GemmatuneError, match="without a directory"):
        modelfile("sub/tuned.gguf")
    with pytest.raises(GemmatuneError, match="must not end in .Modelfile"):
        save_gguf(tmp_path / "x.Modelfile", STRONG, strong, DEFAULT_MODEL)


def test_an_existing_modelfile_needs_force_and_a_failed_write_leaves_both_files(tmp_path, strong):
    path = tmp_path / "m.gguf"
    modelfile_path(path).write_text("mine")
    with pytest.raises(GemmatuneError, match=r"m\.Modelfile: file exists; pass --force"):
        save_gguf(path, STRONG, strong, DEFAULT_MODEL)
    assert not path.exists() and modelfile_path(path).read_text() == "mine"
    path.write_text("old gguf")
    bad = dataclasses.replace(STRONG, vocab_size=STRONG.vocab_size - 1)  # the tokenizer no longer fits: fails late
    with pytest.raises(GemmatuneError, match="tokens, but the model's embedding has only"):
        save_gguf(path, bad, strong, DEFAULT_MODEL, force=True)
    assert path.read_text() == "old gguf" and modelfile_path(path).read_text() == "mine"  # neither half of the pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]  # nor a staged leftover
    save_gguf(path, STRONG, strong, DEFAULT_MODEL, force=True)
    assert modelfile_path(path).read_text() == modelfile("m.gguf")


def test_missing_tokenizer_model(tmp_path, strong):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", tokenizer_dir)
    with pytest.raises(GemmatuneError, match="tokenizer.model: not found. GGUF stores the SentencePiece vocabulary"):
        save_gguf(tmp_path / "m.gguf", STRONG, strong, tokenizer_dir)
    assert list(tmp_path.iterdir()) == [tokenizer_dir]  # nothing half-written: neither the GGUF nor its Modelfile


def test_refusals(tmp_path, strong):
    cfg, params = PRESETS["tiny"], strong
    path = tmp_path / "m.gguf"
    path.write_text("keep me")
    with pytest.raises(GemmatuneError, match="file exists; pass --force"):
        save_gguf(path, cfg, params, DEFAULT_MODEL)
    assert path.read_text() == "keep me"
    save_gguf(path, cfg, params, DEFAULT_MODEL, force=True)
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "gemma2"

    with pytest.raises(GemmatuneError, match="dtype 'q4_0' is not one of f32, f16, bf16, q8_0"):
        save_gguf(path, cfg, params, DEFAULT_MODEL, dtype="q4_0", force=True)
    all_global = dataclasses.replace(cfg, layer_types=(GLOBAL,) * cfg.num_layers)
    with pytest.raises(GemmatuneError, match="even layers sliding-window and odd layers global"):
        save_gguf(path, all_global, params, DEFAULT_MODEL, force=True)
    with pytest.raises(GemmatuneError, match="always applies both logit soft-caps"):
        save_gguf(path, dataclasses.replace(cfg, final_logit_softcap=None), params, DEFAULT_MODEL, force=True)
    lora = {**params, "layers": {**params["layers"], "lora": {}}}
    with pytest.raises(GemmatuneError, match="merge them into the base weights first"):
        save_gguf(path, cfg, lora, DEFAULT_MODEL, force=True)
