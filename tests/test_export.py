"""Export against the reference tools: a merged Hugging Face checkpoint loaded by transformers and a PEFT adapter
loaded by peft give gemmatune's logits with the adapter; PEFT's own adapters load into gemmatune; every refusal.

Both sides read the same base weights: the base checkpoint is written by gemmatune's save_hf and loaded from disk
by transformers."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMALL, hf_logits, strong_params
from gemmatune.checkpoint import save_adapter
from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, LORA_TARGETS, LoraConfig, ModelConfig
from gemmatune.convert.gguf import OLLAMA_STOPS, OLLAMA_TEMPLATE
from gemmatune.convert.hf import save_hf, to_hf
from gemmatune.convert.peft import adapter_digest, load_any_adapter, load_peft, save_peft
from gemmatune.errors import GemmatuneError
from gemmatune.export import export
from gemmatune.layout import adapter_shapes
from gemmatune.lora import attach, delta, merge
from gemmatune.model import forward
from gemmatune.safetensors_io import SafetensorsReader, write_safetensors
from gemmatune.tokenizer import GEMMA2_CHAT_TEMPLATE

# SMALL with the embedded tokenizer's vocabulary, so the export carries a real tokenizer.
CFG = dataclasses.replace(SMALL, vocab_size=4096)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24))  # [B, T]: three sliding windows long
PEFT_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def params() -> dict:
    return strong_params(CFG)


@pytest.fixture(scope="module")
def base_dir(params, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "base"
    save_hf(out, CFG, params, dtype="float32", tokenizer_dir=DEFAULT_MODEL)
    return out


def hf_base(base_dir: Path) -> torch.nn.Module:
    """A fresh transformers model of the base (PEFT injects its layers into the model it is given)."""
    return AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32).eval()


def random_adapters(lora_cfg: LoraConfig, cfg: ModelConfig = CFG, seed: int = 1) -> dict:
    """An adapter with B nonzero, large enough to move the logits well beyond the tolerance. numpy: jax.random
    would compile one program per shape, seconds on this machine."""
    rng = np.random.default_rng(seed)
    return {name: {"a": (rng.normal(size=s["a"]) / math.sqrt(math.prod(s["a"][1:-1]))).astype(np.float32),
                   "b": (0.2 * rng.normal(size=s["b"])).astype(np.float32)}
            for name, s in adapter_shapes(cfg, lora_cfg).items()}


@pytest.fixture(scope="module")
def base_logits(params) -> np.ndarray:
    return ours(params)


def ours(params: dict, adapters: dict | None = None, lora_cfg: LoraConfig | None = None) -> np.ndarray:
    p = params if adapters is None else attach(params, jax.tree.map(jnp.asarray, adapters))
    return np.asarray(forward(p, jnp.asarray(TOKENS), CFG, adapter=lora_cfg))


def assert_same_logits(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(want - base).max() > 0.1  # the adapter matters, so a dropped adapter fails
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# --- hf: merged weights ---------------------------------------------------------------------------------------

def test_export_hf_loads_in_transformers_with_the_adapter_merged(params, base_logits, base_dir, tmp_path):
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = random_adapters(lora_cfg)
    save_adapter(tmp_path / "adapter", adapters, lora_cfg, CFG, base_model=str(base_dir))
    out = export(base_dir, tmp_path / "adapter", "hf", tmp_path / "merged")
    # The merged checkpoint records which adapter it holds, under a key transformers keeps but does not use.
    [record] = json.loads((out / "config.json").read_text())["gemmatune"]["merged_adapters"]
    assert record == {"digest": adapter_digest(adapters, lora_cfg), "scale": 2.0,
                      "source": str((tmp_path / "adapter").resolve())}

    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert_same_logits(hf_logits(model, TOKENS), ours(params, adapters, lora_cfg), base_logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    for f in out.glob("*.safetensors"):
        with SafetensorsReader(f) as r:
            assert "lm_head.weight" not in r.tensors
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [CFG.eos_token_id, eot]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("source", ["tokenizer_config", "jinja", "none"])
def test_export_hf_writes_the_chat_template_into_tokenizer_config(params, base_dir, tmp_path, source):
    """A base keeps its own template (in tokenizer_config.json or transformers 5's chat_template.jinja); a base
    without one gets the Gemma 2 template that gemmatune trains with."""
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    custom = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    if source != "tokenizer_config":
        del config["chat_template"]
        (base / "tokenizer_config.json").write_text(json.dumps(config))
    if source == "jinja":
        (base / "chat_template.jinja").write_text(custom)
    lora_cfg = LoraConfig(rank=2, targets=("q",))
    save_adapter(tmp_path / "adapter", random_adapters(lora_cfg), lora_cfg, CFG, base_model=str(base))
    out = export(base, tmp_path / "adapter", "hf", tmp_path / "merged")
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["chat_template"] == (custom if source == "jinja" else GEMMA2_CHAT_TEMPLATE)
    assert {k: v for k, v in written.items() if k != "chat_template"} == \
        {k: v for k, v in config.items() if k != "chat_template"}


# --- peft: the adapter for transformers + peft ------------------------------------------------------------------

@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q", "v")], ids=["all", "q-v"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_export_peft_gives_gemmatune_logits_in_peft(params, base_logits, base_dir, tmp_path, targets, rslora):
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets, rslora=rslora)
    adapters = random_adapters(lora_cfg)
    save_adapter(tmp_path / "adapter", adapters, lora_cfg, CFG, base_model=str(base_dir))
    out = export(base_dir, tmp_path / "adapter", "peft", tmp_path / "peft")

    # The file's B @ A is the Hugging Face layout of gemmatune's update, layer by layer.
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(targets) * CFG.num_layers
    for name, ab in adapters.items():
        module = f"{'self_attn' if name in PEFT_NAMES[:4] else 'mlp'}.{name}"
        for i in range(CFG.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            product = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
            want = to_hf(name, np.asarray(delta(name, ab["a"][i], ab["b"][i], 1.0)))
            np.testing.assert_allclose(product, want, atol=1e-5)

    model = peft.PeftModel.from_pretrained(hf_base(base_dir), out).eval()
    assert model.peft_config["default"].use_rslora == rslora
    assert_same_logits(hf_logits(model, TOKENS), ours(params, adapters, lora_cfg), base_logits)


# --- PEFT's own adapters into gemmatune ---------------------------------------------------------------------------

@pytest.mark.parametrize("modules, layers, rslora",
                         [(PEFT_NAMES, None, False), (["q_proj", "down_proj"], [1, 2], True)],
                         ids=["all-layers", "some-layers"])
def test_adapter_made_by_peft_loads_into_gemmatune(params, base_logits, base_dir, tmp_path, modules, layers, rslora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, layers_to_transform=layers,
                             use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM")  # random B
    model = peft.get_peft_model(hf_base(base_dir), config).eval()
    model.save_pretrained(tmp_path / "made-by-peft")

    adapters, lora_cfg = load_any_adapter(tmp_path / "made-by-peft", CFG)
    assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.rslora) == (4, 8.0, rslora)
    assert sorted(adapters) == sorted(modules)
    if layers is not None:  # the layers PEFT left alone hold a zero update
        assert all(not np.any(ab["b"][i]) for ab in adapters.values() for i in set(range(CFG.num_layers)) - set(layers))
    assert_same_logits(ours(params, adapters, lora_cfg), hf_logits(model, TOKENS), base_logits)

    save_peft(tmp_path / "again", adapters, lora_cfg, CFG, str(base_dir))
    again, again_cfg = load_peft(tmp_path / "again", CFG)
    assert again_cfg == lora_cfg
    for name in adapters:
        for part in ("a", "b"):
            assert np.array_equal(again[name][part], adapters[name][part])


# --- refusals ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    out = tmp_path_factory.mktemp("refusals") / "peft"
    return save_peft(out, random_adapters(lora_cfg), lora_cfg, CFG, "base")


def edited(src: Path, dst: Path, **fields) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return dst


@pytest.mark.parametrize("fields, message", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
    ({"use_dora": True}, "use_dora asks for DoRA"),
    ({"bias": "all"}, "bias asks for trained biases (bias 'all')"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules includes ['embed_tokens']"),
    ({"modules_to_save": ["lm_head"]}, "fully trained copies of ['lm_head']"),
    ({"rank_pattern": {"q_proj": 16}}, ("a rank_pattern with ranks other than r=4 ({'q_proj': 16}), which is not "
                                         "supported")),
    ({"alpha_pattern": {"v_proj": 32}}, "an alpha_pattern with alphas other than lora_alpha=8.0"),
])
def test_peft_config_refusals(peft_dir, tmp_path, fields, message):
    with pytest.raises(GemmatuneError) as e:
        load_peft(edited(peft_dir, tmp_path / "a", **fields), CFG)
    assert message in str(e.value)


def test_peft_uniform_patterns_are_accepted(peft_dir, tmp_path):
    _, lora_cfg = load_peft(edited(peft_dir, tmp_path / "a", rank_pattern={"q_proj": 4}, alpha_pattern={"o": 8}), CFG)
    assert (lora_cfg.rank, lora_cfg.alpha) == (4, 8.0)


def test_peft_lora_on_lm_head_is_refused(peft_dir, tmp_path):
    d = edited(peft_dir, tmp_path / "a")
    tensors = {**safetensors.numpy.load_file(d / "adapter_model.safetensors"),
               "base_model.model.lm_head.lora_A.weight": np.zeros((4, CFG.hidden_size), np.float32)}
    write_safetensors(d / "adapter_model.safetensors", [(k, t.shape, t.dtype) for k, t in tensors.items()],
                      tensors.items())
    with pytest.raises(GemmatuneError, match=r"lm_head\.lora_A\.weight is not LoRA on a decoder layer's projection"):
        load_peft(d, CFG)


@pytest.mark.parametrize("cfg, message", [
    (dataclasses.replace(CFG, hidden_size=128),
     "an adapter of rank 4 for hidden size 64, this model has hidden size 128"),
    (dataclasses.replace(CFG, intermediate_size=96),
     "an adapter of rank 4 for intermediate size 128, this model has intermediate size 96"),
    (dataclasses.replace(CFG, num_layers=2, layer_types=()), "adapts layer 2, this model has 2 layers"),
], ids=["hidden", "intermediate", "layers"])
def test_peft_shape_mismatch_names_both(peft_dir, cfg, message):
    with pytest.raises(GemmatuneError) as e:
        load_peft(peft_dir, cfg)
    assert message in str(e.value)


def test_peft_pickle_only_is_refused(peft_dir, tmp_path):
    d = edited(peft_dir, tmp_path / "a")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(GemmatuneError, match="only adapter_model.bin, a pickle"):
        load_peft(d, CFG)


@pytest.mark.parametrize("config", [None, {"format": "lora-v2"}], ids=["missing", "unknown"])
def test_unknown_adapter_format_lists_what_is_expected(tmp_path, config):
    tmp_path.joinpath("adapter_model.safetensors").write_bytes(b"")
    if config is not None:
        tmp_path.joinpath("adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(GemmatuneError, match='expected a gemmatune adapter .*"format": "gemmatune-lora".* or a PEFT '
                                             'LoRA adapter .*"peft_type": "LORA"'):
        load_any_adapter(tmp_path, CFG)


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_export_refuses_an_adapter_of_another_base(base_dir, tmp_path, fmt):
    """Adapter shapes do not depend on the vocabulary: the recorded base config must catch it."""
    lora_cfg = LoraConfig(rank=4)
    save_adapter(tmp_path / "adapter", random_adapters(lora_cfg), lora_cfg, SMALL, base_model="small")
    with pytest.raises(GemmatuneError, match="vocab_size 256, this model has 4096"):
        export(base_dir, tmp_path / "adapter", fmt, tmp_path / "out")
    other = dataclasses.replace(CFG, intermediate_size=96)
    save_peft(tmp_path / "peft", random_adapters(lora_cfg, other), lora_cfg, other, "other")
    with pytest.raises(GemmatuneError, match="intermediate size 96, this model has intermediate size 128"):
        export(base_dir, tmp_path / "peft", fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_output_guard(base_dir, peft_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GemmatuneError, match="not empty; pass --force"):
        export(base_dir, peft_dir, "peft", out)
    with pytest.raises(GemmatuneError, match="model or adapter directory itself"):
        export(base_dir, peft_dir, "peft", peft_dir, force=True)
    bad = edited(peft_dir, tmp_path / "bad", use_dora=True)
    with pytest.raises(GemmatuneError, match="DoRA"):
        export(base_dir, bad, "peft", out, force=True)
    assert (out / "keep.txt").read_text() == "mine"  # a refused export leaves the output as it was
    export(base_dir, peft_dir, "peft", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(GemmatuneError, match="'onnx' is not one of hf, peft, gguf"):
        export(base_dir, peft_dir, "onnx", tmp_path / "x")
    with pytest.raises(GemmatuneError, match="'f16' is not one of auto, float32, bfloat16 for hf export"):
        export(base_dir, peft_dir, "hf", tmp_path / "x", dtype="f16")


def test_export_gguf_writes_the_merged_weights_and_a_modelfile(params, base_dir, tmp_path):
    lora_cfg = LoraConfig(rank=4, targets=("gate",))
    adapters = random_adapters(lora_cfg)
    save_adapter(tmp_path / "adapter", adapters, lora_cfg, CFG, base_model=str(base_dir))
    out = tmp_path / "gguf" / "model.gguf"
    assert main(["export", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--format", "gguf",
                 "--output", str(out), "--dtype", "float32"]) == 0

    reader = gguf.GGUFReader(out)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}["blk.1.ffn_gate.weight"]
    want = to_hf("gate_proj", np.asarray(merge(params, adapters, lora_cfg)["layers"]["gate_proj"][1]))
    assert np.abs(want - to_hf("gate_proj", np.asarray(params["layers"]["gate_proj"][1]))).max() > 0.1
    np.testing.assert_array_equal(stored.reshape(want.shape), want)
    [record] = json.loads(reader.fields["gemmatune.merged_adapters"].contents())
    assert record["digest"] == adapter_digest(adapters, lora_cfg)

    # The Ollama Modelfile beside it: the GGUF by its name relative to the Modelfile, the template, the stops.
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.Modelfile", "model.gguf"]
    text = (out.parent / "model.Modelfile").read_text()
    assert text.splitlines()[0] == "FROM ./model.gguf"
    assert re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL)[1] == OLLAMA_TEMPLATE
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE) == list(OLLAMA_STOPS)

    with pytest.raises(GemmatuneError, match="model.gguf: file exists; pass --force"):
        export(base_dir, tmp_path / "adapter", "gguf", out)
    out.unlink()  # the Modelfile alone also needs --force, and is checked before the weights are read
    with pytest.raises(GemmatuneError, match="model.Modelfile: file exists; pass --force"):
        export(base_dir, tmp_path / "adapter", "gguf", out)
    with pytest.raises(GemmatuneError, match="dtype 'q4_0' is not one of auto, float32, bfloat16, f32, f16"):
        export(base_dir, tmp_path / "adapter", "gguf", out, dtype="q4_0", force=True)
    assert export(base_dir, tmp_path / "adapter", "gguf", out, dtype="q8_0", force=True) == out
    assert (out.parent / "model.Modelfile").read_text() == text


# --- an adapter is applied once ---------------------------------------------------------------------------------

def test_the_same_adapter_is_not_applied_twice_to_a_merged_checkpoint(base_dir, tmp_path, capsys):
    """A merged checkpoint records its adapter; generate, merge, export and train refuse to apply that adapter (or
    its PEFT export) again, and accept another one."""
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    adapter, peft_copy, merged = tmp_path / "adapter", tmp_path / "peft", tmp_path / "merged"
    save_adapter(adapter, random_adapters(lora_cfg), lora_cfg, CFG, base_model=str(base_dir))
    assert main(["export", "--model", str(base_dir), "--adapter", str(adapter), "--format", "peft",
                 "--output", str(peft_copy)]) == 0
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--output", str(merged)]) == 0
    capsys.readouterr()

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(4)))
    uses = [["generate", "--max-new-tokens", "2"], ["merge", "--output", str(tmp_path / "again")],
            ["export", "--format", "gguf", "--output", str(tmp_path / "again.gguf")],
            ["export", "--format", "peft", "--output", str(tmp_path / "again-peft")],
            ["train", "--data", str(data), "--output", str(tmp_path / "run"), "--overwrite", "--max-steps", "1",
             "--seq-len", "32", "--batch-size", "1", "--lora-rank", "4", "--lora-alpha", "8", "--dtype", "float32"]]
    for use in uses:
        for same in (adapter, peft_copy)[:1 if use[0] == "train" else 2]:  # train is slower to reach the check
            assert main([*use, "--model", str(merged), "--adapter", str(same)]) == 2, use
            err = capsys.readouterr().err
            assert f"{same}: this adapter is already merged into {merged}" in err, err
            assert "would add its update twice" in err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("again")]

    # Another adapter still applies to the merged checkpoint, and a second merge records both.
    other = tmp_path / "other"
    save_adapter(other, random_adapters(lora_cfg, seed=2), lora_cfg, CFG, base_model=str(merged))
    assert main(["generate", "--max-new-tokens", "2", "--model", str(merged), "--adapter", str(other)]) == 0
    assert main(["merge", "--model", str(merged), "--adapter", str(other), "--output", str(tmp_path / "both")]) == 0
    records = json.loads((tmp_path / "both" / "config.json").read_text())["gemmatune"]["merged_adapters"]
    assert [r["source"] for r in records] == [str(adapter.resolve()), str(other.resolve())]
    assert main(["generate", "--model", str(tmp_path / "both"), "--adapter", str(adapter)]) == 2
    assert "already merged" in capsys.readouterr().err


def test_a_gemmatune_adapter_and_its_peft_export_have_one_digest(tmp_path):
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "down"))
    adapters = random_adapters(lora_cfg)
    save_adapter(tmp_path / "ours", adapters, lora_cfg, CFG, base_model="base")
    save_peft(tmp_path / "peft", adapters, lora_cfg, CFG, "base")
    digests = {adapter_digest(*load_any_adapter(tmp_path / d, CFG)) for d in ("ours", "peft")}
    assert digests == {adapter_digest(adapters, lora_cfg)}
    # Any change to what the adapter adds changes the digest: a tensor, or the scale.
    changed = {**adapters, "q_proj": {**adapters["q_proj"], "b": adapters["q_proj"]["b"] * 1.001}}
    assert adapter_digest(changed, lora_cfg) not in digests
    assert adapter_digest(adapters, dataclasses.replace(lora_cfg, alpha=16.0)) not in digests
