"""PEFT (Hugging Face) LoRA adapters: adapter_config.json + adapter_model.safetensors, read and written.

PEFT stores, per layer and projection, two torch Linear weights: lora_A [r, in_features] and lora_B
[out_features, r], whose product B @ A (times the same alpha / r or alpha / sqrt(r) scale) is the update of the
Linear weight [out, in]. gemmatune's A is [*W's input axes, r] and B [r, *W's output axes] (see lora.py); flattening
the input axes (and the output axes) row-major is exactly how `convert.hf.to_hf` flattens W's, so
lora_B @ lora_A == to_hf(name, A B) layer by layer.

PEFT names a tensor by the module it adapts, inside PeftModel's wrapper `base_model.model.`: the decoder layers are
`model.layers.{i}` in Gemma2ForCausalLM and Gemma3ForCausalLM, `model.language_model.layers.{i}` in transformers
5's Gemma3ForConditionalGeneration (multimodal Gemma 3; `language_model.model.layers.{i}` in transformers < 4.52).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gemmatune.atomic import refuse_to_replace, staged_dir, write_text
from gemmatune.checkpoint import ADAPTER_CONFIG, ADAPTER_FILE, ADAPTER_FORMAT, check_adapter_shapes, load_adapter
from gemmatune.config import LoraConfig, ModelConfig
from gemmatune.convert.common import GEMMATUNE_KEY, MERGED_ADAPTERS, fields_of, read_json
from gemmatune.convert.gguf_read import gguf_merged_adapters, is_gguf
from gemmatune.convert.hf import CAUSAL_LM, LAYER_KEYS, MULTIMODAL_DECODER, hf_shape
from gemmatune.errors import GemmatuneError
from gemmatune.layout import PROJECTIONS, adapter_shapes, target_names
from gemmatune.safetensors_io import SafetensorsReader, write_safetensors

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
# gemmatune name -> module path inside a decoder layer ("self_attn.q_proj"), for the seven projections, and back.
_MODULE = {name: LAYER_KEYS[name].removesuffix(".weight") for name in PROJECTIONS}
_NAME = {module: name for name, module in _MODULE.items()}
# PeftModel wraps the model as base_model.model; the decoder's module path follows (see the module docstring).
_KEY = re.compile(r"base_model\.model\.(?:model\.|model\.language_model\.|language_model\.model\.)layers\.(\d+)\."
                  r"(.+)\.lora_([AB])\.weight")
# LoRA on a multimodal model's vision tower or projector (what a plain target list like ["q_proj", ...] also
# matches there): it does not act on text, which is what gemmatune trains, so it is left out.
_VISION_KEY = re.compile(r"base_model\.model\.(?:model\.)?(?:vision_tower|multi_modal_projector)\..+")
# A projection's Linear (in_features, out_features) in words, for shape-mismatch messages.
_FEATURES = {"q_proj": ("hidden size", "num_heads x head_dim"), "k_proj": ("hidden size", "num_kv_heads x head_dim"),
             "v_proj": ("hidden size", "num_kv_heads x head_dim"), "o_proj": ("num_heads x head_dim", "hidden size"),
             "gate_proj": ("hidden size", "intermediate size"), "up_proj": ("hidden size", "intermediate size"),
             "down_proj": ("intermediate size", "hidden size")}
_SUPPORTED = "gemmatune reads PEFT LoRA adapters on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def _key(i: int, name: str, part: str, decoder: str = CAUSAL_LM.prefix) -> str:
    return f"base_model.model.{decoder}layers.{i}.{_MODULE[name]}.lora_{part}.weight"


def save_peft(out_dir: str | Path, adapters: Any, lora_cfg: LoraConfig, model_cfg: ModelConfig, base_model: str,
              *, multimodal: bool = False, force: bool = False) -> Path:
    """Write `adapters` (gemmatune layout, {name: {"a": [L, *in, r], "b": [L, r, *out]}}) as a PEFT LoRA adapter
    that `peft.PeftModel.from_pretrained(model, out_dir)` loads onto the base's transformers model:
    Gemma2ForCausalLM or Gemma3ForCausalLM, or with multimodal=True Gemma3ForConditionalGeneration (transformers 5
    module paths; target_modules is then a pattern that matches the language model's projections only, not the
    vision tower's). Atomic; an existing non-empty out_dir is replaced only with force=True."""
    out = Path(out_dir)
    refuse_to_replace(out, force, "output")
    check_adapter_shapes(out, {f"{n}.{p}": np.shape(v) for n, ab in adapters.items() for p, v in ab.items()},
                          lora_cfg, model_cfg)
    names = target_names(lora_cfg)
    decoder = MULTIMODAL_DECODER if multimodal else CAUSAL_LM.prefix
    r = lora_cfg.rank
    tensors = {}
    for i in range(model_cfg.num_layers):
        for name in names:
            a, b = np.asarray(adapters[name]["a"][i]), np.asarray(adapters[name]["b"][i])  # [*in, r], [r, *out]
            tensors[_key(i, name, "A", decoder)] = a.reshape(-1, r).T  # [r, in]
            tensors[_key(i, name, "B", decoder)] = b.reshape(r, -1).T  # [out, r]
    # PEFT full-matches a string target against module names: only the decoder layers' projections, so that the
    # vision tower's q_proj/k_proj/v_proj get no (empty) LoRA.
    targets: list[str] | str = names if not multimodal else (
        rf"{re.escape(decoder)}layers\.\d+\.(?:{'|'.join(re.escape(_MODULE[n]) for n in names)})")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "use_rslora": lora_cfg.rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        # Spelled out so that readers with other defaults see plain LoRA on every layer.
        "use_dora": False, "lora_bias": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
    }
    with staged_dir(out) as staged:
        write_safetensors(staged / PEFT_WEIGHTS, [(k, t.shape, np.float32) for k, t in tensors.items()],
                          tensors.items(), {"format": "pt"})  # "pt": what PEFT writes and transformers expects
        write_text(staged / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return out


def _refuse_unsupported(path: Path, cfg: dict[str, Any]) -> tuple[int, float]:
    """Check that adapter_config.json describes plain LoRA that gemmatune can hold; returns (r, lora_alpha)."""
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise GemmatuneError(f"{path}: peft_type {peft_type!r}; {_SUPPORTED} (peft_type \"LORA\") only.")
    with fields_of(path, "re-save the adapter with PEFT"):
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    unsupported = {  # field: (whether it asks for something gemmatune cannot hold, what that is)
        "use_dora": (bool(cfg.get("use_dora")), "DoRA (weight-decomposed LoRA)"),
        "bias": (cfg.get("bias", "none") != "none", f"trained biases (bias {cfg.get('bias')!r})"),
        "lora_bias": (bool(cfg.get("lora_bias")), "a bias on lora_B"),
        "modules_to_save": (bool(cfg.get("modules_to_save")),
                            f"fully trained copies of {cfg.get('modules_to_save')}"),
        "trainable_token_indices": (bool(cfg.get("trainable_token_indices")), "trained embedding rows"),
        "layer_replication": (bool(cfg.get("layer_replication")), "replicated layers"),
        "target_parameters": (bool(cfg.get("target_parameters")), "LoRA on raw parameters"),
        "rank_pattern": (any(v != r for v in (cfg.get("rank_pattern") or {}).values()),
                         f"a rank_pattern with ranks other than r={r} ({cfg.get('rank_pattern')})"),
        "alpha_pattern": (any(v != alpha for v in (cfg.get("alpha_pattern") or {}).values()),
                          f"an alpha_pattern with alphas other than lora_alpha={alpha} ({cfg.get('alpha_pattern')})"),
    }
    for field, (bad, what) in unsupported.items():
        if bad:
            raise GemmatuneError(f"{path}: {field} asks for {what}, which is not supported: {_SUPPORTED}, with "
                                 "one rank and alpha for all of them.")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex (or "all-linear"): the tensors below say what it matched
        # PEFT matches a target by the last components of the module name ("q_proj" or "self_attn.q_proj").
        other = [t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in PROJECTIONS]
        if other:
            raise GemmatuneError(f"{path}: target_modules includes {other}; {_SUPPORTED}.")
    return r, alpha


def _check_shape(path: Path, key: str, name: str, part: str, shape: tuple[int, ...], r: int,
                 model_cfg: ModelConfig) -> None:
    """lora_A must be [r, in_features], lora_B [out_features, r] of the model's Linear [out, in]."""
    out_features, in_features = hf_shape(name, model_cfg)
    # (rank axis, features axis, the model's features, their name)
    rank_axis, axis, size, words = (0, 1, in_features, _FEATURES[name][0]) if part == "A" else \
        (1, 0, out_features, _FEATURES[name][1])
    if len(shape) != 2 or shape[rank_axis] != r:
        raise GemmatuneError(f"{path}: {key} has shape {list(shape)}, but adapter_config.json says r={r}; the "
                             "adapter's files do not belong together: re-save the adapter with PEFT.")
    if shape[axis] != size:
        raise GemmatuneError(f"{path}: {key} has shape {list(shape)}: an adapter of rank {r} for {words} "
                             f"{shape[axis]}, this model has {words} {size}. Use the adapter with the base it was "
                             "trained on.")


def load_peft(adapter_dir: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                        LoraConfig]:
    """Read a PEFT LoRA adapter of a Gemma 2 or Gemma 3 causal LM (or of a multimodal Gemma 3's language model) into
    gemmatune's layout (float32 numpy) and its LoraConfig.

    LoRA may sit on any subset of the seven projections and of the layers (PEFT's layers_to_transform, or a regex
    target_modules): the tensors in the file say where. A projection adapted in some layers only gets A = B = 0 in
    the others, so its update there is exactly zero, as in PEFT. Refused, with a message: other PEFT methods,
    DoRA, trained biases, modules outside the seven projections (embed_tokens, lm_head, ...), per-module ranks or
    alphas (rank_pattern/alpha_pattern), and adapters whose shapes do not fit `model_cfg`. LoRA on a multimodal
    model's vision tower is skipped: it does not act on text."""
    d = Path(adapter_dir)
    cfg_path = d / ADAPTER_CONFIG
    cfg = read_json(cfg_path, "a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors")
    r, alpha = _refuse_unsupported(cfg_path, cfg)
    weights = d / PEFT_WEIGHTS
    if not weights.is_file():
        pickled = " (only adapter_model.bin, a pickle, which gemmatune does not load: re-save it with PEFT's " \
                  "save_pretrained(..., safe_serialization=True))" if (d / PEFT_PICKLE).is_file() else ""
        raise GemmatuneError(f"{d}: no {PEFT_WEIGHTS}{pickled}.")
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}  # name -> layer -> "A"/"B" -> PEFT tensor
    with SafetensorsReader(weights) as reader:
        for key, info in reader.tensors.items():
            if _VISION_KEY.fullmatch(key):
                continue
            m = _KEY.fullmatch(key)
            if not m or m[2] not in _NAME:
                raise GemmatuneError(f"{weights}: tensor {key} is not LoRA on a decoder layer's projection; "
                                     f"{_SUPPORTED} (not embed_tokens or lm_head).")
            i, name, part = int(m[1]), _NAME[m[2]], m[3]
            if i >= model_cfg.num_layers:
                raise GemmatuneError(f"{weights}: tensor {key} adapts layer {i}, this model has "
                                     f"{model_cfg.num_layers} layers. Use the adapter with the base it was "
                                     "trained on.")
            _check_shape(weights, key, name, part, info.shape, r, model_cfg)
            found.setdefault(name, {}).setdefault(i, {})[part] = reader.read(key).astype(np.float32)
    if not found:
        raise GemmatuneError(f"{weights}: holds no LoRA tensors.")
    halves = [_key(i, n, p) for n, layers in found.items() for i, ab in layers.items() for p in "AB" if p not in ab]
    if halves:
        raise GemmatuneError(f"{weights}: {halves[0]} is missing (each lora_A needs its lora_B); re-save the adapter.")
    lora_cfg = LoraConfig(rank=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                          targets=tuple(n.removesuffix("_proj") for n in PROJECTIONS if n in found),
                          rslora=bool(cfg.get("use_rslora")))
    adapters = {}
    for name, shapes in adapter_shapes(model_cfg, lora_cfg).items():
        a, b = np.zeros(shapes["a"], np.float32), np.zeros(shapes["b"], np.float32)  # [L, *in, r], [L, r, *out]
        for i, ab in found[name].items():
            a[i] = ab["A"].T.reshape(shapes["a"][1:])
            b[i] = ab["B"].T.reshape(shapes["b"][1:])
        adapters[name] = {"a": a, "b": b}
    return adapters, lora_cfg


def load_any_adapter(adapter_dir: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                               LoraConfig]:
    """A gemmatune adapter or a PEFT LoRA adapter, told apart by adapter_config.json; numpy, gemmatune layout."""
    d = Path(adapter_dir)
    expected = (f"expected a gemmatune adapter ({ADAPTER_CONFIG} with \"format\": \"{ADAPTER_FORMAT}\" and "
                f"{ADAPTER_FILE}, as training writes to OUTPUT/adapter) or a PEFT LoRA adapter ({ADAPTER_CONFIG} "
                f"with \"peft_type\": \"LORA\" and {PEFT_WEIGHTS})")
    if not d.is_dir():
        raise GemmatuneError(f"{d}: no such adapter directory; {expected}.")
    cfg = read_json(d / ADAPTER_CONFIG, expected)
    if cfg.get("format") == ADAPTER_FORMAT:
        return load_adapter(d, model_cfg)
    if "peft_type" in cfg:
        return load_peft(d, model_cfg)
    raise GemmatuneError(f"{d / ADAPTER_CONFIG}: neither format; {expected}.")


# --- adapters already merged into a checkpoint ------------------------------------------------------------------

def adapter_digest(adapters: dict[str, dict[str, np.ndarray]], lora_cfg: LoraConfig) -> str:
    """A hash of what an adapter adds to the weights: its scale and its tensors as float32 in gemmatune's layout,
    in sorted order. A gemmatune adapter and its PEFT export load to the same arrays, so they hash the same."""
    h = hashlib.sha256(f"scale {float(lora_cfg.scale)!r}".encode())
    for name in sorted(adapters):
        for part in ("a", "b"):
            a = np.ascontiguousarray(np.asarray(adapters[name][part]), dtype="<f4")
            h.update(f"{name}.{part} {list(a.shape)}".encode())
            h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def merged_record(adapter_dir: str | Path, adapters: dict[str, dict[str, np.ndarray]],
                  lora_cfg: LoraConfig) -> dict[str, Any]:
    """What a merged checkpoint records about one adapter folded into it (config.json, "gemmatune" key)."""
    return {"digest": adapter_digest(adapters, lora_cfg), "scale": float(lora_cfg.scale),
            "source": str(Path(adapter_dir).resolve())}


def merged_adapters(model_dir: str | Path) -> list[dict[str, Any]]:
    """The records of the adapters gemmatune merged into the checkpoint `model_dir` (none for a checkpoint that
    gemmatune did not merge, such as a downloaded one or a KerasHub preset); a GGUF file keeps them in its
    metadata."""
    if is_gguf(model_dir):
        return gguf_merged_adapters(model_dir)
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return []
    mine = read_json(path, "re-download or re-export the checkpoint").get(GEMMATUNE_KEY, {})
    records = mine.get(MERGED_ADAPTERS, []) if isinstance(mine, dict) else None
    if not (isinstance(records, list) and all(isinstance(r, dict) and isinstance(r.get("digest"), str)
                                              for r in records)):
        raise GemmatuneError(f"{path}: field {GEMMATUNE_KEY}.{MERGED_ADAPTERS} must be a list of records with a "
                             "\"digest\"; re-export the merged checkpoint, or remove the field.")
    return records


def load_adapter_for(model_dir: str | Path, adapter_dir: str | Path, model_cfg: ModelConfig
                     ) -> tuple[dict[str, dict[str, np.ndarray]], LoraConfig]:
    """`load_any_adapter`, for applying it to the checkpoint `model_dir` (generate, merge, export, train
    --adapter): refuses an adapter that is already merged into that checkpoint, which would add its update a
    second time."""
    adapters, lora_cfg = load_any_adapter(adapter_dir, model_cfg)
    digest = adapter_digest(adapters, lora_cfg)
    for record in merged_adapters(model_dir):
        if record["digest"] == digest:
            raise GemmatuneError(
                f"{adapter_dir}: this adapter is already merged into {model_dir} (its config.json records it under "
                f"{GEMMATUNE_KEY}.{MERGED_ADAPTERS}, merged from {record.get('source')}); applying it again would add "
                "its update twice. Use the merged model without --adapter, or apply the adapter to the base model "
                "it was trained on.")
    return adapters, lora_cfg
