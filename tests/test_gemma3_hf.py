"""Gemma 3 Hugging Face checkpoints against transformers and peft: gemma3_text directories in both config layouts,
the language model of multimodal Gemma3ForConditionalGeneration checkpoints under both key prefixes, export as
Gemma3ForCausalLM (merged LoRA), PEFT adapters that peft loads onto the original checkpoint (text-only and
multimodal), and <end_of_turn> read from the checkpoint's own tokenizer.

Random weights with strong norms (conftest.strong_params) on a tiny Gemma 3: 8 layers (one 5 local : 1 global
pattern and a partial tail of 2 local), QK-norm, a window of 8 tokens, global RoPE scaled linearly by 8."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from conftest import SMALL3, hf_logits, hf_model, strong_params
from gemmatune.checkpoint import save_adapter
from gemmatune.config import DEFAULT_MODEL, GLOBAL, LOCAL, LoraConfig, ModelConfig
from gemmatune.convert import load_model, model_config
from gemmatune.convert.hf import load_hf, save_hf
from gemmatune.convert.peft import load_any_adapter, load_peft
from gemmatune.errors import GemmatuneError
from gemmatune.export import export
from gemmatune.layout import adapter_shapes
from gemmatune.lora import attach
from gemmatune.model import forward
from gemmatune.tokenizer import GEMMA3_CHAT_TEMPLATE, gguf_sentencepiece, load_tokenizer, render_chat

G3 = dataclasses.replace(SMALL3, vocab_size=4096)  # the embedded tokenizer's vocabulary
# The 4B-and-up vocabulary (262,144 SentencePiece tokens + 64 image tokens) for the multimodal checkpoint.
MM = dataclasses.replace(G3, vocab_size=262_208)
TOKENS = np.random.default_rng(0).integers(0, G3.vocab_size, (2, 24))  # [B, T]: three windows long
MM_TOKENS = np.random.default_rng(1).integers(0, 262_144, (1, 24))  # text tokens only (no image token)
LORA = LoraConfig(rank=2, alpha=4.0)


# One compiled program per config instead of XLA compiling each operation of the eager forward (tens of seconds).
_forward = jax.jit(forward, static_argnames=("cfg", "adapter"))


def ours(cfg: ModelConfig, params: dict, tokens: np.ndarray, adapters: dict | None = None,
         lora_cfg: LoraConfig = LORA) -> np.ndarray:
    p = params if adapters is None else attach(params, jax.tree.map(jnp.asarray, adapters))
    return np.asarray(_forward(p, jnp.asarray(tokens), cfg=cfg, adapter=None if adapters is None else lora_cfg))


def random_adapters(cfg: ModelConfig, seed: int = 2) -> dict:
    """B nonzero, large enough to move the logits well beyond the tolerance (numpy: no compile per shape)."""
    rng = np.random.default_rng(seed)
    return {name: {"a": (rng.normal(size=s["a"]) / math.sqrt(math.prod(s["a"][1:-1]))).astype(np.float32),
                   "b": (0.2 * rng.normal(size=s["b"])).astype(np.float32)}
            for name, s in adapter_shapes(cfg, LORA).items()}


def gemma3_like_tokenizer(out: Path) -> Path:
    """The embedded tokenizer with <start_of_turn>/<end_of_turn> moved to Gemma 3's ids 105/106 (they are 5/6 in the
    embedded vocabulary, 106/107 in Gemma 2's), swapped with the pieces that held those ids; no chat template."""
    out.mkdir(parents=True)
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    by_id = {i: p for p, i in vocab.items()}
    for old, new in ((5, 105), (6, 106)):
        vocab[by_id[old]], vocab[by_id[new]] = new, old
    for t in tok["added_tokens"]:
        t["id"] = {5: 105, 6: 106}.get(t["id"], t["id"])
    config["added_tokens_decoder"] = {str({5: 105, 6: 106}.get(int(i), int(i))): t
                                      for i, t in config.get("added_tokens_decoder", {}).items()}
    config.pop("chat_template", None)
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copyfile(DEFAULT_MODEL / "special_tokens_map.json", out / "special_tokens_map.json")
    return out


@pytest.fixture(scope="module")
def params() -> dict:
    return strong_params(G3)


@pytest.fixture(scope="module")
def reference(params):
    return hf_model(G3, params)


@pytest.fixture(scope="module")
def base_dir(params, tmp_path_factory) -> Path:
    """A Gemma 3 text checkpoint written by save_hf, with the Gemma-3-like tokenizer and no chat template."""
    root = tmp_path_factory.mktemp("gemma3")
    out = root / "base"
    save_hf(out, G3, params, dtype="float32", tokenizer_dir=gemma3_like_tokenizer(root / "tok"))
    return out


def transformers_model(path: Path, cls: type | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return (cls or AutoModelForCausalLM).from_pretrained(path, attn_implementation="eager",
                                                         dtype=torch.float32).eval()


# --- gemma3_text checkpoints ------------------------------------------------------------------------------------

LEGACY = ("rope_theta", "rope_local_base_freq", "rope_scaling")


@pytest.mark.parametrize("layout", ["legacy", "rope_parameters"])
def test_gemma3_text_checkpoint_in_both_config_layouts(params, reference, base_dir, tmp_path, layout) -> None:
    """save_hf writes a Gemma3ForCausalLM directory (tied, QK-norm weights); with its config.json cut down to either
    RoPE layout, gemmatune and transformers both read it back to the same logits as the reference."""
    d = tmp_path / layout
    shutil.copytree(base_dir, d)
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    if layout == "legacy":  # transformers 4's layout: no rope_parameters, no layer_types (the pattern instead)
        config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
        config["sliding_window_pattern"] = 6
        assert config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    else:
        config = {k: v for k, v in config.items() if k not in LEGACY}
    (d / "config.json").write_text(json.dumps(config))
    keys = safetensors.numpy.load_file(d / "model.safetensors").keys()
    assert "lm_head.weight" not in keys and "model.layers.7.self_attn.k_norm.weight" in keys

    cfg, loaded = load_hf(d)
    assert cfg == G3 and G3.layer_types[5] == GLOBAL and G3.layer_types[6:] == (LOCAL, LOCAL)  # a partial tail
    want = hf_logits(reference, TOKENS)
    np.testing.assert_allclose(ours(cfg, loaded, TOKENS), want, atol=1e-4, rtol=0)
    model = transformers_model(d)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    np.testing.assert_allclose(hf_logits(model, TOKENS), want, atol=1e-4, rtol=0)


# --- multimodal checkpoints (Gemma3ForConditionalGeneration) ----------------------------------------------------

@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower of one layer) saved by transformers, its language model
    holding strong random weights, under both key prefixes: as save_pretrained writes it (language_model.model.*,
    vision_tower.*) and as the module tree names it (model.language_model.*, model.vision_tower.*).
    Returns (model, {prefix: directory}, gemmatune parameters)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from gemmatune.convert.hf import hf_state

    params = strong_params(MM, seed=3)
    text = {k: v for k, v in MM.to_hf_dict().items() if k != "architectures"}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4,
                          attn_implementation="eager")
    model = Gemma3ForConditionalGeneration(config).eval()
    state = {k.removeprefix("model."): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in hf_state(MM, params)}
    missing, unexpected = model.model.language_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    root = tmp_path_factory.mktemp("multimodal")
    model.save_pretrained(root / "t4")
    for f in gemma3_like_tokenizer(root / "tok").iterdir():  # a checkpoint comes with its tokenizer
        shutil.copyfile(f, root / "t4" / f.name)
    tensors = safetensors.numpy.load_file(root / "t4" / "model.safetensors")
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in tensors
    assert any(k.startswith("vision_tower.") for k in tensors) and any(k.startswith("multi_modal_projector.")
                                                                       for k in tensors)
    shutil.copytree(root / "t4", root / "t5")
    renamed = {("model.language_model." + k.removeprefix("language_model.model.")
                if k.startswith("language_model.model.") else "model." + k): v for k, v in tensors.items()}
    assert "model.language_model.norm.weight" in renamed and "model.vision_tower.post_layernorm.weight" in renamed
    safetensors.numpy.save_file(renamed, root / "t5" / "model.safetensors", metadata={"format": "pt"})
    return model, {"language_model.model.": root / "t4", "model.language_model.": root / "t5"}, params


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_gives_its_language_model(multimodal, prefix) -> None:
    """The language model of a multimodal checkpoint loads under either key prefix (vision tensors skipped), with
    the 262,208-token vocabulary, and gives transformers' logits on text."""
    model, dirs, _ = multimodal
    cfg, params = load_model(dirs[prefix])
    assert cfg == MM and model_config(dirs[prefix]) == MM
    np.testing.assert_allclose(ours(cfg, params, MM_TOKENS), hf_logits(model, MM_TOKENS), atol=1e-4, rtol=0)


def test_multimodal_checkpoint_checks_what_it_reads(multimodal, tmp_path) -> None:
    """Everything but the vision tower is still checked: unknown tensors, shapes, the tied head."""
    _, dirs, _ = multimodal
    d = tmp_path / "mm"

    def edited(edit) -> str:
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(dirs["language_model.model."], d)
        tensors = safetensors.numpy.load_file(d / "model.safetensors")
        safetensors.numpy.save_file(edit(tensors), d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(GemmatuneError) as e:
            load_hf(d)
        return str(e.value)

    embed = "language_model.model.embed_tokens.weight"
    msg = edited(lambda t: {**t, "language_model.model.extra.weight": np.zeros(3, np.float32)})
    assert "unknown tensor(s)" in msg and "language_model.model.extra.weight" in msg and "vision" not in msg
    msg = edited(lambda t: {**t, "language_model.lm_head.weight": t[embed] + 1})
    assert "language_model.lm_head.weight differs from" in msg and "untied heads are not supported" in msg
    msg = edited(lambda t: {k: v for k, v in t.items() if k != "language_model.model.layers.3.self_attn.q_norm.weight"})
    assert "missing" in msg and "language_model.model.layers.3.self_attn.q_norm.weight" in msg
    msg = edited(lambda t: {**t, "language_model.model.norm.weight": np.zeros(7, np.float32)})
    assert "language_model.model.norm.weight has shape [7]" in msg
    # A tied head stored anyway is accepted.
    shutil.copytree(dirs["language_model.model."], d, dirs_exist_ok=True)
    tensors = safetensors.numpy.load_file(d / "model.safetensors")
    safetensors.numpy.save_file({**tensors, "language_model.lm_head.weight": tensors[embed]}, d / "model.safetensors",
                                metadata={"format": "pt"})
    assert load_hf(d)[0] == MM


# --- export -----------------------------------------------------------------------------------------------------

def test_gemma3_export_merged_and_peft(params, base_dir, tmp_path) -> None:
    """A LoRA adapter on a Gemma 3 base: the merged export reloads in transformers as Gemma3ForCausalLM with
    gemmatune's merged logits, stops at the tokenizer's own <end_of_turn> (106 here) and carries a chat template;
    the PEFT export loads with peft onto the base checkpoint to the same logits and back into gemmatune."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapters = random_adapters(G3)
    save_adapter(tmp_path / "adapter", adapters, LORA, G3, str(base_dir))
    want = ours(G3, params, TOKENS, adapters)
    assert np.abs(want - ours(G3, params, TOKENS)).max() > 0.1  # the adapter matters

    merged = export(base_dir, tmp_path / "adapter", "hf", tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    model = transformers_model(merged)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    np.testing.assert_allclose(hf_logits(model, TOKENS), want, atol=1e-4, rtol=0)
    eot = load_tokenizer(base_dir).end_of_turn_id
    assert eot == 106
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [1, eot]
    # The base has no chat template: the export carries Gemma 3's, which folds a system turn into the first user
    # turn, and transformers renders it as gemmatune does.
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == GEMMA3_CHAT_TEMPLATE
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = AutoTokenizer.from_pretrained(merged).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert text == "<bos>" + render_chat(chat, add_generation_prompt=True)

    peft_dir = export(base_dir, tmp_path / "adapter", "peft", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(transformers_model(base_dir), peft_dir).eval()
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), want, atol=1e-4, rtol=0)
    back, lora_cfg = load_peft(peft_dir, G3)
    assert lora_cfg == LORA
    for name in adapters:
        for part in ("a", "b"):
            np.testing.assert_array_equal(back[name][part], adapters[name][part])


def test_multimodal_peft_adapters(multimodal, tmp_path) -> None:
    """On a multimodal base, the merged export is its language model (Gemma3ForCausalLM); the PEFT export names the
    modules as Gemma3ForConditionalGeneration has them, so peft loads it onto the original checkpoint (LoRA on the
    language model only); an adapter peft itself trained there (LoRA on the vision tower too) loads into gemmatune
    with the same text logits."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    _, dirs, params = multimodal
    base = dirs["language_model.model."]
    adapters = random_adapters(MM, seed=4)
    save_adapter(tmp_path / "adapter", adapters, LORA, MM, str(base))
    want = ours(MM, params, MM_TOKENS, adapters)
    assert np.abs(want - ours(MM, params, MM_TOKENS)).max() > 0.1

    # The merged export is the language model alone, as Gemma3ForCausalLM.
    merged = transformers_model(export(base, tmp_path / "adapter", "hf", tmp_path / "merged"))
    assert type(merged).__name__ == "Gemma3ForCausalLM" and merged.config.vocab_size == 262_208
    # Merged weights round apart from base + adapter: over 6M logits of magnitude up to ~16, a few land just past
    # 1e-4 absolute, so 1e-4 relative as well.
    np.testing.assert_allclose(hf_logits(merged, MM_TOKENS), want, atol=1e-4, rtol=1e-4)
    del merged

    peft_dir = export(base, tmp_path / "adapter", "peft", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(transformers_model(base, Gemma3ForConditionalGeneration), peft_dir).eval()
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(".language_model.layers." in n for n in adapted)
    assert len(adapted) == MM.num_layers * 7
    np.testing.assert_allclose(hf_logits(peft_model, MM_TOKENS), want, atol=1e-4, rtol=0)
    back, _ = load_peft(peft_dir, MM)  # and gemmatune reads its own multimodal export back
    assert all(np.array_equal(back[n][p], adapters[n][p]) for n in adapters for p in ("a", "b"))

    # peft's own adapter, as a user trains it with a plain target list (which also reaches the vision tower).
    theirs = get_peft_model(transformers_model(base, Gemma3ForConditionalGeneration),
                            PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    keys = safetensors.numpy.load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys()
    assert any(".vision_tower." in k for k in keys)
    loaded, lora_cfg = load_any_adapter(tmp_path / "theirs", MM)
    assert sorted(loaded) == ["down_proj", "q_proj", "v_proj"]
    got = ours(MM, params, MM_TOKENS, loaded, lora_cfg)
    # peft's random init (init_lora_weights=False) moves the logits far more than training would: 1e-4 relative.
    np.testing.assert_allclose(got, hf_logits(theirs, MM_TOKENS), atol=1e-4, rtol=1e-4)


def test_end_of_turn_comes_from_the_tokenizer(params, gemma3_gguf, tmp_path) -> None:
    """generation_config.json's stop ids are the tokenizer's: <end_of_turn> wherever its vocabulary puts it, 106 in
    the real Gemma 3 SentencePiece model (rebuilt from the 270M GGUF's vocabulary)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "tokenizer.model").write_bytes(gguf_sentencepiece(gemma3_gguf))
    save_hf(tmp_path / "real-g3", G3, params, tokenizer_dir=real)
    assert json.loads((tmp_path / "real-g3" / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    save_hf(tmp_path / "g3", G3, params, tokenizer_dir=gemma3_like_tokenizer(tmp_path / "tok"))
    assert json.loads((tmp_path / "g3" / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    save_hf(tmp_path / "tiny", G3, params, tokenizer_dir=DEFAULT_MODEL)  # the embedded vocabulary: id 6
    assert json.loads((tmp_path / "tiny" / "generation_config.json").read_text())["eos_token_id"] == [1, 6]


# --- refusals elsewhere -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, hub_id", [(26, "google/gemma-3-1b-pt"), (34, "google/gemma-3-4b-pt"),
                                            (18, "google/gemma-3-270m")])
def test_kerashub_gemma3_presets_point_to_the_hf_checkpoint(tmp_path, layers, hub_id) -> None:
    """A KerasHub Gemma3Backbone preset is refused with the Hub id of its size, which gemmatune reads."""
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "Gemma3Backbone", "config": {
        "num_layers": layers, "vocabulary_size": 262144}}))
    with pytest.raises(GemmatuneError) as e:
        model_config(tmp_path)
    msg = str(e.value)
    assert "Gemma 3" in msg and f"--model {hub_id}" in msg and "instruction-tuned" in msg
    assert str(tmp_path / "config.json") in msg


def test_other_refusals_name_both_families(tmp_path) -> None:
    from gemmatune.hub import CHOICES, MODEL_HELP

    (tmp_path / "config.json").write_text(json.dumps({"class_name": "LlamaBackbone", "config": {}}))
    with pytest.raises(GemmatuneError, match="Llama") as e:
        model_config(tmp_path)
    assert "Gemma 2" in str(e.value) and "Gemma 3 (Hugging Face" in str(e.value)
    assert all("Gemma 3" in text and "google/gemma-3-1b-it" in text for text in (CHOICES, MODEL_HELP))
