"""KerasHub presets: a random Gemma 2 saved by keras-hub itself must give KerasHub's logits after conversion."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Keras picks its backend once, at import; the reference must run on JAX like gemmatune (no TensorFlow here).
os.environ["KERAS_BACKEND"] = "jax"

import jax
import jax.numpy as jnp
import keras
import keras_hub  # noqa: E402  (scripts/test.sh installs it; a missing reference must fail, not skip)
import numpy as np
import pytest

from gemmatune.config import GLOBAL, LOCAL
from gemmatune.convert.kerashub import (
    is_kerashub_preset,
    load_kerashub,
)
from gemmatune.errors import GemmatuneError
from gemmatune.model import forward
from gemmatune.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parents[1] / "src" / "gemmatune" / "assets" / "tiny" / "tokenizer.model"
# hidden // heads = 24 differs from head_dim = 16, so a wrong query scale shows; window 8 with 40 tokens spans
# five windows; the attention cap is lowered to where these small logits reach it.
BACKBONE = {"vocabulary_size": 4096, "num_layers": 4, "num_query_heads": 4, "num_key_value_heads": 2,
            "hidden_dim": 96, "intermediate_dim": 256, "head_dim": 16, "query_head_dim_normalize": False,
            "use_post_ffw_norm": True, "use_post_attention_norm": True, "attention_logit_soft_cap": 3.0,
            "final_logit_soft_cap": 30.0, "use_sliding_window_attention": True, "sliding_window_size": 8,
            "layer_norm_epsilon": 1e-6}


def _randomise(backbone: keras.Model, seed: int = 0) -> None:
    """Strong weights (PITFALLS: random weights make weak references): norms far from 0 so a missing (1 + w) or
    a swapped norm shows, large post-norms, a large final norm so the logits reach the final soft-cap."""
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        shape, path = tuple(v.shape), v.path
        if "final_normalization" in path:
            a = 4.5 + 0.1 * rng.standard_normal(shape)
        elif "post_" in path:
            a = 5.0 + 0.5 * rng.standard_normal(shape)
        elif "norm" in path:
            a = 0.5 + 0.3 * rng.standard_normal(shape)
        elif "embedding" in path:
            a = 0.1 * rng.standard_normal(shape)
        else:  # kernels: fan-in scaling; query/key/value [N, D, E] read D, the others all but the last axis
            fan_in = shape[1] if len(shape) == 3 and "attention_output" not in path else np.prod(shape[:-1])
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        v.assign(a.astype(np.float32))


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keras.Model]:
    """A KerasHub Gemma 2 preset laid out as Kaggle serves it (GemmaCausalLM.save_to_preset), and its model."""
    backbone = keras_hub.models.GemmaBackbone(**BACKBONE, dtype="float32")
    # keras-hub 0.32's GemmaDecoderBlock builds its attention with query_head_dim_normalize=True whatever the
    # backbone says (gemma_decoder_block.py), so False (Gemma 2 27B) scales by head_dim there. The attention layer
    # honours its own flag: set it, so the reference follows the documented meaning and transformers (144 for 27B).
    for block in backbone.transformer_layers:
        block.attention.query_head_dim_normalize = False
    _randomise(backbone)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=str(TOKENIZER))
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone,
                                        preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer))
    path = tmp_path_factory.mktemp("kerashub") / "gemma2_tiny"
    lm.save_to_preset(str(path))
    return path, lm


def test_logits_match_kerashub(preset: tuple[Path, keras.Model]) -> None:
    path, lm = preset
    assert is_kerashub_preset(path)
    cfg, params = load_kerashub(path, dtype="float32")
    assert cfg.query_pre_attn_scalar == 24 and cfg.intermediate_size == 128
    assert cfg.layer_types == (LOCAL, GLOBAL) * 2
    tokens = np.random.default_rng(1).integers(3, 4096, size=(2, 40)).astype(np.int32)
    ref = np.asarray(lm({"token_ids": tokens, "padding_mask": np.ones_like(tokens)}))  # [B, T, V]
    ours = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    assert np.abs(ref).max() > 15  # the final soft-cap (30) is in play
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_dtype_and_tokenizer(preset: tuple[Path, keras.Model]) -> None:
    path, _ = preset
    _, params = load_kerashub(path, dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16 and params["layers"]["q_proj"].dtype == jnp.bfloat16
    _, params = load_kerashub(path)  # auto: a float32 preset loads as float32
    assert params["embed"].dtype == jnp.float32
    import sentencepiece as spm

    text = "Hello world, how are you? Fine-tuning Gemma 2."
    assert load_tokenizer(path).encode(text) == spm.SentencePieceProcessor(model_file=str(TOKENIZER)).encode(text)


def test_bfloat16_preset(tmp_path: Path) -> None:
    """Keras stores bfloat16 as opaque 2-byte data tagged attrs["dtype"]; "auto" must keep it, bit for bit."""
    backbone = keras_hub.models.GemmaBackbone(**{**BACKBONE, "num_layers": 2}, dtype="bfloat16")
    _randomise(backbone)
    backbone.save_to_preset(str(tmp_path))
    _, params = load_kerashub(tmp_path)
    assert params["embed"].dtype == jnp.bfloat16
    query = np.asarray(backbone.transformer_layers[1].attention.query_dense.kernel)  # [H, D, E]
    np.testing.assert_array_equal(np.asarray(params["layers"]["q_proj"][1]), query.transpose(1, 0, 2))


def _edited(src: Path, dst: Path, **config: object) -> Path:
    """A copy of the preset with config.json's backbone fields (or class_name) changed."""
    shutil.copytree(src, dst)
    d = json.loads((dst / "config.json").read_text())
    if "class_name" in config:
        d["class_name"] = config.pop("class_name")
    d["config"].update(config)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("edit, message", [
    ({"class_name": "LlamaBackbone"}, "Llama"),
    ({"use_post_attention_norm": False, "use_post_ffw_norm": False}, "Gemma 1"),
    ({"num_layers": 5}, "gemma_decoder_block_4"),
])
def test_other_presets_refused(preset: tuple[Path, keras.Model], tmp_path: Path, edit: dict, message: str) -> None:
    path = _edited(preset[0], tmp_path / "p", **edit)
    with pytest.raises(GemmatuneError, match=message):
        load_kerashub(path)


def test_missing_weights(preset: tuple[Path, keras.Model], tmp_path: Path) -> None:
    path = _edited(preset[0], tmp_path / "p")
    (path / "model.weights.h5").unlink()
    with pytest.raises(GemmatuneError, match="model.weights.h5"):
        load_kerashub(path)
    assert not is_kerashub_preset(tmp_path)


def test_commands_take_a_preset_as_model(preset: tuple[Path, keras.Model], tmp_path: Path, capsys) -> None:
    """`--model PRESET` works where a model is read (generate here; train and export share the loader)."""
    from gemmatune.cli import main

    assert main(["generate", "--model", str(preset[0]), "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_export_from_a_preset(preset: tuple[Path, keras.Model], tmp_path: Path, capsys) -> None:
    """An adapter trained on a KerasHub base exports to every format: the merged model in transformers, the
    adapter in PEFT on that model, and the GGUF file carry the preset's numbers and its tokenizer."""
    import gguf
    import sentencepiece as spm
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import hf_logits
    from gemmatune.checkpoint import save_adapter
    from gemmatune.cli import main
    from gemmatune.config import LoraConfig
    from gemmatune.convert.hf import save_hf
    from gemmatune.layout import adapter_shapes
    from gemmatune.lora import attach

    path = preset[0]
    cfg, params = load_kerashub(path, dtype="float32")
    lora_cfg = LoraConfig(rank=2, alpha=4.0)
    rng = np.random.default_rng(2)
    adapters = {name: {"a": rng.normal(size=s["a"]).astype(np.float32) / 8, "b": rng.normal(size=s["b"]).astype(
        np.float32) / 4} for name, s in adapter_shapes(cfg, lora_cfg).items()}
    save_adapter(tmp_path / "adapter", adapters, lora_cfg, cfg, str(path))
    tokens = np.random.default_rng(3).integers(3, 4096, size=(1, 24))
    want = np.asarray(forward(attach(params, jax.tree.map(jnp.asarray, adapters)), jnp.asarray(tokens), cfg,
                              adapter=lora_cfg))
    assert np.abs(want - np.asarray(forward(params, jnp.asarray(tokens), cfg))).max() > 0.1  # the adapter matters

    def export(fmt: str, out: Path) -> Path:
        assert main(["export", "--model", str(path), "--adapter", str(tmp_path / "adapter"), "--format", fmt,
                     "--output", str(out)]) == 0, capsys.readouterr().err
        return out

    merged = export("hf", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(model, tokens), want, atol=1e-4, rtol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tok = AutoTokenizer.from_pretrained(merged)
    text = "Fine-tuning Gemma 2, how are you?"
    assert tok(text)["input_ids"] == [cfg.bos_token_id, *spm.SentencePieceProcessor(model_file=str(TOKENIZER)).encode(
        text)]
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
                                   ) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    eot = load_tokenizer(path).end_of_turn_id
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [cfg.eos_token_id, eot]

    save_hf(tmp_path / "base", cfg, params, dtype="float32")  # the same base in transformers, for PEFT to wrap
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, export("peft", tmp_path / "peft")).eval()
    np.testing.assert_allclose(hf_logits(peft_model, tokens), want, atol=1e-4, rtol=0)

    reader = gguf.GGUFReader(export("gguf", tmp_path / "model.gguf"))
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens_field.parts[i]).decode() for i in tokens_field.data]
    assert pieces == [load_tokenizer(path).id_to_piece(i) for i in range(cfg.vocab_size)]
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}["blk.0.ffn_gate.weight"]
    hf_gate = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()  # the merged weights, HF layout
    np.testing.assert_array_equal(stored.reshape(hf_gate.shape), hf_gate)
