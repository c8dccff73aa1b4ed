"""Checkpoints quantized by bitsandbytes in 4 bits (the `*-bnb-4bit` downloads), loaded as stored: real checkpoints
written by transformers + bitsandbytes on CPU from the small Gemma 2 and Gemma 3; gemmatune's fields against the
files' bytes, its dequantized weights against bitsandbytes' dequantize_4bit, its logits against transformers' own
4-bit model, and the checkpoints it cannot load as stored refused, saying why."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from conftest import SMALL, SMALL3, hf_logits
from gemmatune import quantize
from gemmatune.config import ModelConfig, Quantization
from gemmatune.convert import checkpoint_quantization, load_model
from gemmatune.convert.hf import LAYER_KEYS, WEIGHTS, load_hf
from gemmatune.errors import GemmatuneError
from gemmatune.layout import PROJECTIONS
from gemmatune.model import forward

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
safetensors_torch = pytest.importorskip("safetensors.torch")


@dataclasses.dataclass
class Checkpoint:
    cfg: ModelConfig
    path: Path
    quant: Quantization
    model: Any  # transformers' own 4-bit model, as it wrote the checkpoint
    float_model: Any  # the same model unquantized


def _bnb_checkpoint(base: Path, out: Path, double: bool, quant_type: str = "nf4", **kw: Any):
    """Load the float checkpoint `base` with transformers quantizing to 4 bits on the CPU, and save it as such."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                           bnb_4bit_compute_dtype=torch.float32, **kw)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu", dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    model.save_pretrained(out)
    # On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight at the first inference call and then
    # computes in bfloat16 (scales rounded to bfloat16, whatever bnb_4bit_compute_dtype says); off, it dequantizes
    # to float32 and multiplies, the reference wanted here.
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="session")
def bnb_checkpoints(tmp_path_factory, small_hf, small3_hf) -> dict[str, Checkpoint]:
    """Gemma 2 with double-quantized scales; Gemma 3 with plain scales and the codes stored as bfloat16
    (bnb_4bit_quant_storage, which FSDP setups use); Gemma 2 with down_proj left in float (llm_int8_skip_modules);
    Gemma 2 in FP4. Block 64, bitsandbytes' default (the SMALL sizes are multiples of it)."""
    root = tmp_path_factory.mktemp("bnb")
    small_hf.save_pretrained(root / "gemma2")
    small3_hf.save_pretrained(root / "gemma3")
    out = {}
    for name, cfg, base, hf, double, kw in [
            ("gemma2-double", SMALL, "gemma2", small_hf, True, {}),
            ("gemma3-bf16-storage", SMALL3, "gemma3", small3_hf, False, {"bnb_4bit_quant_storage": torch.bfloat16}),
            ("gemma2-skip-down", SMALL, "gemma2", small_hf, False, {"llm_int8_skip_modules": ["down_proj"]}),
            ("gemma2-fp4", SMALL, "gemma2", small_hf, False, {"bnb_4bit_quant_type": "fp4"})]:
        kw = {"quant_type": kw.pop("bnb_4bit_quant_type", "nf4"), **kw}
        model = _bnb_checkpoint(root / base, root / name, double, **kw)
        out[name] = Checkpoint(cfg, root / name, Quantization("nf4", 64, double), model, hf)
    return out


@pytest.fixture(scope="session")
def loaded(bnb_checkpoints) -> dict[str, tuple[ModelConfig, dict]]:
    return {name: load_hf(c.path, "float32") for name, c in bnb_checkpoints.items() if name != "gemma2-fp4"}


def _bits(a: Any) -> tuple[str, tuple[int, ...], bytes]:
    a = np.ascontiguousarray(np.asarray(a))
    return str(a.dtype), a.shape, a.tobytes()


@pytest.mark.parametrize("name", ["gemma2-double", "gemma3-bf16-storage"])
def test_fields_are_the_files_bytes(name, bnb_checkpoints, loaded):
    """Every projection's codes, scales and code books are the file's bytes (read by the safetensors library),
    reordered (quantize.to_bnb gives the file's order back); the weights they decode to, compiled, are
    bitsandbytes' dequantize_4bit's to the bit; the embedding and norms load as in any float checkpoint."""
    ckpt = bnb_checkpoints[name]
    cfg, params = loaded[name]
    assert checkpoint_quantization(ckpt.path) == ckpt.quant
    assert jax.tree.structure(params["layers"]["q_proj"]) == jax.tree.structure(
        {f: 0 for f in (["packed", "table"] + (["scale_absmax", "scale_codes", "scale_offset", "scale_table"]
                                               if ckpt.quant.double else ["scale"]))})
    file = safetensors_torch.load_file(ckpt.path / WEIGHTS)
    layers = params["layers"]
    # Compiled, as the training step runs it (where XLA would fuse the double-quantized scales' multiply and add).
    matrix = jax.jit(quantize.matrix, static_argnums=1)
    dequantized = {proj: np.asarray(matrix(layers[proj], proj)) for proj in PROJECTIONS}  # [L, in, *out]
    for i in range(cfg.num_layers):
        module = ckpt.model.model.layers[i]
        for proj in PROJECTIONS:
            key = f"model.layers.{i}.{LAYER_KEYS[proj]}"
            got = {f: np.asarray(v[i]) for f, v in layers[proj].items()}
            theirs_order = quantize.to_bnb(got)  # gemmatune stores the transpose of bitsandbytes' [out, in]
            stored = file[key].view(torch.uint8).numpy()  # [n/2, 1] uint8, or the same bytes as bfloat16
            assert _bits(theirs_order["packed"]) == _bits(stored.reshape(-1))
            assert _bits(got["table"]) == _bits(file[key + ".quant_map"].numpy())
            absmax = file[key + ".absmax"].numpy()
            if ckpt.quant.double:
                state = json.loads(bytes(file[key + ".quant_state.bitsandbytes__nf4"].numpy()))
                assert _bits(theirs_order["scale"]) == _bits(absmax)
                assert _bits(got["scale_table"]) == _bits(file[key + ".nested_quant_map"].numpy())
                assert _bits(got["scale_absmax"]) == _bits(file[key + ".nested_absmax"].numpy())
                assert got["scale_offset"] == np.float32(state["nested_offset"])
            else:
                assert _bits(theirs_order["scale"]) == _bits(absmax)
            # What bitsandbytes itself computes with: its dequantized [out, in] weight.
            weight = getattr(module.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else module.mlp,
                             proj).weight
            want = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).numpy()
            ours = dequantized[proj][i].reshape(want.shape[::-1]).T
            assert _bits(ours) == _bits(want), (key, np.abs(ours - want).max())
    assert _bits(params["embed"]) == _bits(file["model.embed_tokens.weight"].numpy())
    assert _bits(params["final_norm"]) == _bits(file["model.norm.weight"].numpy())
    assert _bits(layers["input_norm"][1]) == _bits(file["model.layers.1.input_layernorm.weight"].numpy())


def test_logits_equal_transformers_bitsandbytes(bnb_checkpoints, loaded):
    """gemmatune on the loaded checkpoint computes what transformers' own 4-bit model computes (bitsandbytes on the
    CPU dequantizes each weight to float32, then multiplies), and a different model from the float one. One family
    (the loader does not depend on it; the weights of both are checked above), the harder double-quantized scales."""
    ckpt = bnb_checkpoints["gemma2-double"]
    cfg, params = loaded["gemma2-double"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    ours = np.asarray(jax.jit(forward, static_argnums=2)(params, tokens, cfg))
    theirs = hf_logits(ckpt.model, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)
    assert np.abs(hf_logits(ckpt.float_model, tokens) - theirs).max() > 1e-2


def test_projections_left_in_float_are_quantized_as_they_load(bnb_checkpoints, loaded, small_params):
    """bitsandbytes leaves the modules of llm_int8_skip_modules in float; gemmatune stores a model's projections
    alike, so those are quantized the checkpoint's way as they load, the others kept as stored."""
    ckpt = bnb_checkpoints["gemma2-skip-down"]
    cfg, params = loaded["gemma2-skip-down"]
    file = safetensors_torch.load_file(ckpt.path / WEIGHTS)
    assert file["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in file
    assert checkpoint_quantization(ckpt.path) == Quantization("nf4", 64)
    want = quantize.quantize(small_params["layers"]["down_proj"], "down_proj", Quantization("nf4", 64))
    for f, v in params["layers"]["down_proj"].items():
        assert _bits(v) == _bits(want[f]), f
    up = file["model.layers.2.mlp.up_proj.weight"].numpy()
    up_fields = {f: v[2] for f, v in params["layers"]["up_proj"].items()}
    assert _bits(quantize.to_bnb(up_fields)["packed"]) == _bits(up.reshape(-1))


def test_quantization_asked_for_must_be_the_stored_one(bnb_checkpoints, loaded):
    """A bitsandbytes checkpoint loads as stored, never quantized again: asking for its own quantization gives the
    same tree (here as the per-layer list decoding takes), asking for another is refused, saying what to ask."""
    ckpt = bnb_checkpoints["gemma2-double"]
    _, stacked = loaded["gemma2-double"]
    _, per_layer = load_model(ckpt.path, "float32", stacked=False, quant=ckpt.quant)
    for i, layer in enumerate(per_layer["layers"]):
        for f, v in layer["o_proj"].items():
            assert _bits(v) == _bits(stacked["layers"]["o_proj"][f][i])
    for asked in (Quantization("int8"), Quantization("nf4", 128, double=True), Quantization("nf4", 64)):
        with pytest.raises(GemmatuneError, match=r"config.json: this checkpoint is stored quantized by bitsandbytes "
                                                 r"\(nf4, block 64, double-quantized scales\) and loads as stored.*"
                                                 r"--quantize nf4 --quantize-block 64 --double-quant"):
            load_hf(ckpt.path, quant=asked)


def _variant(src: Path, dst: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of the checkpoint `src` with config.json's quantization_config replaced by `config` (removed for {})
    and/or its tensors changed by `edit` (a function of the state dict)."""
    shutil.copytree(src, dst)
    if config is not None:
        d = json.loads((dst / "config.json").read_text())
        d.pop("quantization_config")
        if config:
            d["quantization_config"] = config
        (dst / "config.json").write_text(json.dumps(d))
    if edit is not None:
        tensors = safetensors_torch.load_file(dst / WEIGHTS)
        edit(tensors)
        safetensors_torch.save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


def test_what_cannot_load_as_stored_is_refused(bnb_checkpoints, tmp_path):
    """FP4, LLM.int8 and other quantization methods are refused from config.json, saying why and what to load
    instead (the 8-bit and other-method configs are written over a 4-bit checkpoint: the refusal comes first); an
    FP4 tensor behind an NF4 config, a code book that is not NF4's, a missing nested absmax and quant state without
    a quantization_config each name the file and the tensor."""
    fp4, nf4 = bnb_checkpoints["gemma2-fp4"].path, bnb_checkpoints["gemma2-double"].path
    with pytest.raises(GemmatuneError, match=r"bnb_4bit_quant_type 'fp4'.*not bitsandbytes' FP4.*--quantize nf4"):
        load_hf(fp4)
    with pytest.raises(GemmatuneError, match=r"bnb_4bit_quant_type 'fp4'"):
        checkpoint_quantization(fp4)
    qc = json.loads((nf4 / "config.json").read_text())["quantization_config"]
    int8 = _variant(nf4, tmp_path / "int8", {**qc, "load_in_4bit": False, "_load_in_4bit": False,
                                            "load_in_8bit": True, "_load_in_8bit": True})
    with pytest.raises(GemmatuneError, match=r"load_in_8bit \(bitsandbytes' LLM.int8: one int8 scale per row, SCB.*"
                                             r"not gemmatune's block-wise int8.*--quantize int8"):
        load_model(int8)
    gptq = _variant(nf4, tmp_path / "gptq", {"quant_method": "gptq", "bits": 4})
    with pytest.raises(GemmatuneError, match=r"quant_method 'gptq': gemmatune reads checkpoints in float and those "
                                             r"quantized by bitsandbytes in 4 bits \(NF4\) only"):
        checkpoint_quantization(gptq)
    fp4_tensors = _variant(fp4, tmp_path / "fp4-tensors", {**qc, "bnb_4bit_quant_type": "nf4"})
    key = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(GemmatuneError, match=rf"{fp4_tensors / WEIGHTS}: tensor {key} is quantized with "
                                             r"bitsandbytes' FP4 code book"):
        load_hf(fp4_tensors)

    def not_nf4(t):
        t["model.layers.3.mlp.up_proj.weight.quant_map"][5] += 1e-3

    bad_map = _variant(nf4, tmp_path / "map", edit=not_nf4)
    with pytest.raises(GemmatuneError, match=rf"{bad_map / WEIGHTS}: tensor model.layers.3.mlp.up_proj.weight."
                                             r"quant_map is not bitsandbytes' NF4 code book; re-download"):
        load_hf(bad_map)
    no_nested = _variant(nf4, tmp_path / "nested",
                         edit=lambda t: t.pop("model.layers.1.self_attn.o_proj.weight.nested_absmax"))
    with pytest.raises(GemmatuneError, match=r"tensor model.layers.1.self_attn.o_proj.weight.nested_absmax is "
                                             r"missing \(every bitsandbytes 4-bit weight with double-quantized "
                                             r"scales has one\)"):
        load_hf(no_nested)
    no_config = _variant(nf4, tmp_path / "noconfig", {})
    with pytest.raises(GemmatuneError, match=r"hold\(s\) bitsandbytes quantization state .* has no bitsandbytes "
                                             r"\"quantization_config\""):
        load_hf(no_config)
    assert checkpoint_quantization(no_config) is None


def test_training_on_a_bnb_checkpoint_is_qlora_on_its_own_codes(tmp_path, capsys):
    """`gemmatune train --model <bnb-4bit dir>` without --quantize: the base stays as stored, and the adapter
    records it (so that merging uses the dequantized base)."""
    from test_train_loop import TINY, write_rows

    from gemmatune.cli import main
    from gemmatune.config import DEFAULT_MODEL

    _bnb_checkpoint(DEFAULT_MODEL, tmp_path / "bnb", double=True)
    for f in DEFAULT_MODEL.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / "bnb" / f.name)
    data = write_rows(tmp_path / "rows.jsonl", 8)
    assert main(["train", "--model", str(tmp_path / "bnb"), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", *TINY]) == 0
    assert "stored quantized (nf4, block 64, double-quantized scales): training QLoRA" in capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_quantization"] == {"kind": "nf4", "block": 64, "double": True}
