"""Hugging Face Gemma 2 and Gemma 3 layout: the key table and its transforms, written down once.

Hugging Face stores each projection as a torch Linear weight [out, in]; gemmatune keeps einsum-shaped arrays
[in, ..., out] split by head. Norm weights are stored the same way on both sides (the forward adds 1), the
embedding is not pre-scaled, and there is no lm_head (the output projection is tied to the embedding).

Checkpoints read: Gemma2ForCausalLM and Gemma3ForCausalLM (keys `model.*`), and the language model of a multimodal
Gemma3ForConditionalGeneration (4B and up), whose text tensors carry another prefix and whose vision tower and
projector are skipped (`KeyLayout`); in float, or with the projections quantized by bitsandbytes in 4 bits (NF4, the
`*-bnb-4bit` checkpoints), whose codes and scales load as they are stored (`checkpoint_quantization`). Checkpoints
written: Gemma2ForCausalLM or Gemma3ForCausalLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from gemmatune import quantize
from gemmatune.atomic import refuse_to_replace, staged_dir
from gemmatune.config import QUANT_BLOCKS, ModelConfig, Quantization, load_config
from gemmatune.convert.common import (
    DTYPE_NAMES,
    GEMMATUNE_KEY,
    MERGED_ADAPTERS,
    WEIGHT_DTYPES,
    check_dtype,
    load_dtype,
    place_params,
    read_json,
)
from gemmatune.errors import GemmatuneError
from gemmatune.layout import (
    NESTED_BLOCK,
    PROJECTIONS,
    Params,
    param_shapes,
    quantized_shapes,
)
from gemmatune.safetensors_io import SafetensorsReader, tensor_nbytes, write_safetensors
from gemmatune.tokenizer import load_tokenizer

# gemmatune per-layer name -> Hugging Face name inside model.layers.{i}.
LAYER_KEYS = {
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "pre_ffw_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",  # Gemma 3 only
    "k_norm": "self_attn.k_norm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
TOP_KEYS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FROM_HF_LAYER = {v: k for k, v in LAYER_KEYS.items()}


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Where a checkpoint keeps the language model: `prefix` stands for the causal LM's "model." before
    embed_tokens / layers.{i} / norm; `lm_head` is the (tied) output head's key; tensors under `skipped` belong to
    other parts of the model (vision) and are not read."""

    prefix: str
    lm_head: str
    skipped: tuple[str, ...] = ()

    def key(self, causal_lm_key: str) -> str:
        """A Gemma2ForCausalLM / Gemma3ForCausalLM key ("model.norm.weight") in this layout."""
        return self.prefix + causal_lm_key.removeprefix("model.")


CAUSAL_LM = KeyLayout("model.", "lm_head.weight")
# Gemma3ForConditionalGeneration holds a SigLIP vision tower and a projector beside the language model; gemmatune
# trains the language model as text, so those tensors are skipped. The released checkpoints (and transformers'
# save_pretrained, which writes the original names back) keep the language model as a Gemma3ForCausalLM under
# "language_model." (keys language_model.model.*, head language_model.lm_head); a state dict saved from the module
# tree of transformers >= 4.52 has it at model.language_model.* (head lm_head), as some fine-tunes on the Hub do.
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
MULTIMODAL_LAYOUTS = (KeyLayout("language_model.model.", "language_model.lm_head.weight", _VISION),
                      KeyLayout("model.language_model.", "lm_head.weight", _VISION))
# The module path of the decoder (…layers.{i}.self_attn.q_proj) in transformers 5's Gemma3ForConditionalGeneration,
# whatever the checkpoint's key names: what PEFT names its adapters by.
MULTIMODAL_DECODER = "model.language_model."


def is_multimodal(config: dict[str, Any]) -> bool:
    """A multimodal Gemma 3 config.json (Gemma3ForConditionalGeneration): model_type gemma3 with a text_config."""
    return config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict)


def checkpoint_is_multimodal(model_dir: str | Path) -> bool:
    """Whether the Hugging Face checkpoint directory `model_dir` holds a multimodal Gemma 3 (its language model is
    what gemmatune loads)."""
    path = Path(model_dir) / "config.json"
    return path.is_file() and is_multimodal(read_json(path, _REFETCH))


def to_hf(name: str, a: np.ndarray) -> np.ndarray:
    """One layer's (or a top-level) gemmatune array -> the Hugging Face tensor."""
    if name in ("q_proj", "k_proj", "v_proj"):  # [D, N, E] -> [N*E, D]
        return a.reshape(a.shape[0], -1).T
    if name == "o_proj":  # [H, E, D] -> [D, H*E]
        return a.reshape(-1, a.shape[-1]).T
    if name in ("gate_proj", "up_proj", "down_proj"):  # [in, out] -> [out, in]
        return a.T
    return a


def from_hf(name: str, t: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The inverse of `to_hf`, given the config for the head split."""
    if name == "q_proj":
        return t.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    if name in ("k_proj", "v_proj"):
        return t.T.reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim)
    if name == "o_proj":
        return t.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)
    if name in ("gate_proj", "up_proj", "down_proj"):
        return t.T
    return t


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The Hugging Face tensor shape for a gemmatune name (per layer for layer names)."""
    D, F, H, K, E, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    return {"embed": (V, D), "final_norm": (D,), "input_norm": (D,), "post_attn_norm": (D,),
            "pre_ffw_norm": (D,), "post_ffw_norm": (D,), "q_norm": (E,), "k_norm": (E,), "q_proj": (H * E, D),
            "k_proj": (K * E, D), "v_proj": (K * E, D), "o_proj": (D, H * E), "gate_proj": (F, D), "up_proj": (F, D),
            "down_proj": (D, F)}[name]


def parse_key(key: str) -> tuple[str, int | None] | None:
    """Hugging Face key -> (gemmatune name, layer index or None); None for keys gemmatune does not hold."""
    for name, hf in TOP_KEYS.items():
        if key == hf:
            return name, None
    m = _LAYER_RE.fullmatch(key)
    if m and m.group(2) in _FROM_HF_LAYER:
        return _FROM_HF_LAYER[m.group(2)], int(m.group(1))
    return None


def hf_keys(cfg: ModelConfig, layout: KeyLayout = CAUSAL_LM) -> Iterator[tuple[str, str, int | None]]:
    """Every Hugging Face key of a Gemma 2 or Gemma 3 causal LM checkpoint (or of the language model in `layout`) as
    (key, gemmatune name, layer index)."""
    names = param_shapes(cfg)["layers"]
    yield layout.key(TOP_KEYS["embed"]), "embed", None
    for i in range(cfg.num_layers):
        for name, hf in LAYER_KEYS.items():
            if name in names:
                yield layout.key(f"model.layers.{i}.{hf}"), name, i
    yield layout.key(TOP_KEYS["final_norm"]), "final_norm", None


def hf_state(cfg: ModelConfig, params: dict, convert: Callable[[object], np.ndarray] = np.asarray
             ) -> Iterator[tuple[str, np.ndarray]]:
    """Stream (key, tensor) pairs in Hugging Face layout, one tensor materialised at a time."""
    for key, name, i in hf_keys(cfg):
        a = params[name] if i is None else params["layers"][name][i]
        yield key, to_hf(name, convert(a))


# --- checkpoint directories: load and save ---------------------------------------------------------------------

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_SHOW = 5  # how many names an error message lists


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_SHOW]) + (f", ... ({len(names)} in all)" if len(names) > _SHOW else "")


_REFETCH = "re-download or re-export it"


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, else the shards its index lists."""
    single, index = model_dir / WEIGHTS, model_dir / INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index, _REFETCH).get("weight_map")
        # Shard names must be plain file names: an index must not point outside the checkpoint directory.
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(f, str) and Path(f).name == f for f in weight_map.values())):
            raise GemmatuneError(f"{index}: expected a \"weight_map\" from tensor names to shard file names in "
                                 "this directory; re-download the index.")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise GemmatuneError(f"{f}: this shard is listed in {index} but is missing; download all "
                                     f"{len(files)} shards of the checkpoint into {model_dir}.")
        return files
    shards = sorted(p.name for p in model_dir.glob("model-*-of-*.safetensors"))
    if shards:
        raise GemmatuneError(f"{model_dir}: found shards ({_listing(shards)}) but no {INDEX}, which says which "
                             "tensor lives in which shard; download the index file as well.")
    raise GemmatuneError(f"{model_dir}: no {WEIGHTS} (or sharded weights with {INDEX}). gemmatune reads Hugging Face "
                         "safetensors checkpoints; re-download the weights, or convert PyTorch .bin weights with "
                         "transformers' save_pretrained(..., safe_serialization=True).")


def _layout(multimodal: bool, keys: dict[str, SafetensorsReader]) -> KeyLayout:
    """The key layout of a checkpoint's tensors: a multimodal checkpoint's is the one whose embedding is present
    (the first, whose names the errors then use, when none is)."""
    if not multimodal:
        return CAUSAL_LM
    return next((lay for lay in MULTIMODAL_LAYOUTS if lay.key(TOP_KEYS["embed"]) in keys), MULTIMODAL_LAYOUTS[0])


def _check_tensors(cfg: ModelConfig, readers: list[SafetensorsReader], config_path: Path, multimodal: bool = False,
                   bnb: bool = False) -> tuple[dict[str, SafetensorsReader], KeyLayout, Quantization | None]:
    """(key -> the reader holding it, the key layout, how the projections are stored quantized or None), after
    checking names, shapes, dtypes and the tied head; reads no weights, only an lm_head that must be compared with
    the embedding and, in a bitsandbytes checkpoint (`bnb`), each quantized weight's small quant-state tensors. A
    multimodal checkpoint's vision tensors are skipped, not checked."""
    where: dict[str, SafetensorsReader] = {}
    for r in readers:
        for key in r.tensors:
            if key in where:
                raise GemmatuneError(f"tensor {key} is stored in both {where[key].path} and {r.path}; the "
                                     "checkpoint is corrupt; re-download or re-export it.")
            where[key] = r
    layout = _layout(multimodal, where)
    searched = ", ".join(str(r.path) for r in readers)
    expected = {key: name for key, name, _ in hf_keys(cfg, layout)}
    missing = [k for k in expected if k not in where]
    unknown = [k for k in where if k not in expected and k != layout.lm_head and not k.startswith(layout.skipped)
               and not (bnb and _bnb_owner(k) in expected)]
    if missing:
        instead = f" They hold other tensors instead ({_listing(unknown)})." if unknown else ""
        raise GemmatuneError(f"{len(missing)} tensor(s) that {config_path} calls for are missing from {searched}: "
                             f"{_listing(missing)}.{instead} The weights are incomplete or belong to another model: "
                             "re-download them, or use the config.json that came with them.")
    if unknown:
        if any(_bnb_owner(k) in expected for k in unknown):
            raise GemmatuneError(f"{searched} hold(s) bitsandbytes quantization state ({_listing(unknown)}) but "
                                 f"{config_path} has no bitsandbytes \"quantization_config\"; use the config.json "
                                 "that came with these weights.")
        raise GemmatuneError(f"unknown tensor(s) in {searched}: {_listing(unknown)}. gemmatune reads Gemma 2 and "
                             "Gemma 3 checkpoints (Gemma2ForCausalLM, Gemma3ForCausalLM, or the language model of "
                             "Gemma3ForConditionalGeneration) only; merge or remove other weights (e.g. LoRA "
                             "adapters) before loading.")
    stored: dict[Quantization, str] = {}  # each quantization found -> the first tensor stored with it
    for key, name in expected.items():
        info, path = where[key].tensors[key], where[key].path
        if bnb and name in PROJECTIONS and (_bnb_quantized(where, key) or info.dtype not in _FLOAT_DTYPES):
            stored.setdefault(_check_bnb(cfg, where, key, name), key)
            continue
        if info.shape != hf_shape(name, cfg):
            raise GemmatuneError(f"{path}: tensor {key} has shape {list(info.shape)} but {config_path} implies "
                                 f"{list(hf_shape(name, cfg))}: the config.json and the weights disagree; use the "
                                 "config.json that came with these weights.")
        if info.dtype not in _FLOAT_DTYPES:
            raise GemmatuneError(f"{path}: tensor {key} is stored as {info.dtype}; gemmatune reads float32, "
                                 "bfloat16 or float16 weights, and projections quantized by bitsandbytes in 4 "
                                 "bits (NF4) with their quant state (config.json's quantization_config and the "
                                 f"{key}.absmax/.quant_map/.quant_state.* tensors).")
    if len(stored) > 1:
        (q1, k1), (q2, k2) = list(stored.items())[:2]
        raise GemmatuneError(f"{where[k2].path}: {k1} is quantized as {q1.describe()} but {k2} as {q2.describe()}; "
                             "gemmatune stores every projection of a model one way. Load the original (unquantized) "
                             "checkpoint with --quantize instead.")
    if layout.lm_head in where:
        _check_tied(where, layout)
    return where, layout, next(iter(stored), None)


def _check_tied(where: dict[str, SafetensorsReader], layout: KeyLayout, chunk_bytes: int = 64 * 2**20) -> None:
    """Accept an lm_head only if it is bit-identical to the embedding; compared in row blocks so that the
    check holds at most two blocks in memory, not two [V, D] matrices."""
    embed_key = layout.key(TOP_KEYS["embed"])
    embed, head = where[embed_key], where[layout.lm_head]
    e, h = embed.tensors[embed_key], head.tensors[layout.lm_head]
    rows = max(1, chunk_bytes // (e.nbytes // e.shape[0]))  # the embedding's shape [V, D] is already checked
    tied = (e.shape, e.dtype) == (h.shape, h.dtype) and all(
        np.array_equal(embed.read_rows(embed_key, s, s + rows).view(np.uint8),
                       head.read_rows(layout.lm_head, s, s + rows).view(np.uint8))
        for s in range(0, e.shape[0], rows))
    if not tied:
        raise GemmatuneError(f"{head.path}: {layout.lm_head} differs from {embed_key}. Gemma 2 and Gemma 3 tie their "
                             "output projection to the embedding, and untied heads are not supported; use a "
                             f"checkpoint without a separate {layout.lm_head}.")


# --- checkpoints quantized by bitsandbytes ------------------------------------------------------------------------
# transformers' save_pretrained writes a bitsandbytes 4-bit projection `<key>` (its torch weight's name) as the packed
# codes `<key>` (uint8 [n/2, 1], or the same bytes in the dtype bnb_4bit_quant_storage names), the code book
# `<key>.quant_map` (float32 [16]), the scales `<key>.absmax` (float32 [m], m = n / blocksize, in row-major order),
# with double quantization coded as uint8 [m] and decoded by `<key>.nested_quant_map` (float32 [256]) and
# `<key>.nested_absmax` (float32 [ceil(m / 256)]), and a JSON blob `<key>.quant_state.bitsandbytes__<type>` (uint8)
# holding quant_type, blocksize, shape, dtype and, with double quantization, nested_blocksize and nested_offset.

_BNB_STATE = ".quant_state.bitsandbytes__"
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", _BNB_STATE + "nf4",
              _BNB_STATE + "fp4")
_BNB_FIX = ("re-download the checkpoint, or load the original (unquantized) one and quantize it as it loads "
            "(--quantize nf4)")


def _bnb_owner(key: str) -> str | None:
    """The weight key a bitsandbytes quant-state tensor belongs to (model.….q_proj.weight for
    model.….q_proj.weight.absmax), or None for any other key."""
    part = next((p for p in _BNB_PARTS if key.endswith(p)), None)
    return None if part is None else key[:-len(part)]


def _bnb_quantized(where: dict[str, SafetensorsReader], key: str) -> bool:
    """Whether the weight `key` is stored quantized (bitsandbytes keeps the modules it skips,
    llm_int8_skip_modules, in float, with no quant state)."""
    return any(key + _BNB_STATE + t in where for t in ("nf4", "fp4"))


def _is_bnb_4bit(config: dict[str, Any], config_path: Path) -> bool:
    """Whether config.json describes a checkpoint quantized by bitsandbytes in 4 bits with NF4 (its
    "quantization_config"); False for an unquantized one. Other quantizations are refused, saying why."""
    qc = config.get("quantization_config")
    if qc is None:
        return False
    where = f"{config_path}: quantization_config"
    original = "load the original (unquantized) checkpoint instead, quantized as it loads with --quantize nf4|int8|int4"
    if not isinstance(qc, dict):
        raise GemmatuneError(f"{where} is not a JSON object; re-download the checkpoint's config.json.")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise GemmatuneError(f"{where}: quant_method {method!r}: gemmatune reads checkpoints in float and those "
                             f"quantized by bitsandbytes in 4 bits (NF4) only; {original}.")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise GemmatuneError(f"{where}: load_in_8bit (bitsandbytes' LLM.int8: one int8 scale per row, SCB, with "
                             "outlier features computed apart in 16 bits) is not gemmatune's block-wise int8 and "
                             "cannot load as stored; load the original (unquantized) checkpoint with --quantize "
                             "int8.")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise GemmatuneError(f"{where}: bitsandbytes with neither load_in_4bit nor load_in_8bit set; re-download "
                             "the checkpoint's config.json.")
    # Absent, the tensors' own quant states decide (as bitsandbytes reads a pre-quantized weight); `_check_bnb`.
    if qc.get("bnb_4bit_quant_type") not in (None, "nf4"):
        raise GemmatuneError(f"{where}: bnb_4bit_quant_type {qc['bnb_4bit_quant_type']!r}: gemmatune computes with "
                             "the NF4 code book (and int4, int8), not bitsandbytes' FP4 (a 4-bit float format of "
                             f"its own); {original}.")
    return True


def _bnb_state(where: dict[str, SafetensorsReader], key: str) -> dict[str, Any]:
    """The JSON quant state of the bitsandbytes weight `key`."""
    k = key + _BNB_STATE + "nf4"
    try:
        state = json.loads(where[k].read(k).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GemmatuneError(f"{where[k].path}: tensor {k} is not valid JSON ({e}); {_BNB_FIX}.") from None
    if not isinstance(state, dict):
        raise GemmatuneError(f"{where[k].path}: tensor {k} is not a JSON object; {_BNB_FIX}.")
    return state


def _check_bnb(cfg: ModelConfig, where: dict[str, SafetensorsReader], key: str, name: str) -> Quantization:
    """Check one projection stored by bitsandbytes in 4 bits (its codes' size, quant state, scales' shapes and
    dtypes, the code books against NF4 and the dynamic map, bit for bit) and return how it is quantized."""
    path = where[key].path
    if key + _BNB_STATE + "fp4" in where:
        raise GemmatuneError(f"{path}: tensor {key} is quantized with bitsandbytes' FP4 code book (a 4-bit float "
                             "format of its own), not NF4, which gemmatune computes with; load the original "
                             "(unquantized) checkpoint with --quantize nf4 instead.")

    def bad(k: str, what: str) -> GemmatuneError:
        return GemmatuneError(f"{where[k].path if k in where else path}: tensor {k} {what}; {_BNB_FIX}.")

    state_key = key + _BNB_STATE + "nf4"
    if state_key not in where:
        raise bad(key, f"is stored as {where[key].tensors[key].dtype} without its quant state {state_key}")
    state = _bnb_state(where, key)
    shape = tuple(hf_shape(name, cfg))
    if state.get("quant_type") != "nf4":
        raise bad(state_key, f"says quant_type {state.get('quant_type')!r} where its name says nf4")
    if state.get("shape") != list(shape):
        raise bad(state_key, f"says the weight's shape is {state.get('shape')} but the config.json implies "
                             f"{list(shape)}")
    block, n = state.get("blocksize"), shape[1]  # a torch Linear weight is [out, in]: blocks run along the input
    if block not in QUANT_BLOCKS:
        raise bad(state_key, f"says blocksize {block!r}; expected one of {', '.join(map(str, QUANT_BLOCKS))}")
    if n % block:
        raise bad(state_key, f"says blocksize {block}, which does not divide the input size {n}: bitsandbytes' "
                             "blocks straddle rows there, and gemmatune keeps each block within a row (so that "
                             "codes and scales split over a mesh like the weight)")
    info = where[key].tensors[key]
    if info.nbytes * 2 != shape[0] * n:
        raise bad(key, f"holds {info.nbytes} bytes of packed codes; a {shape[0]} x {n} weight needs "
                       f"{shape[0] * n // 2}")
    double = "nested_blocksize" in state or key + ".nested_absmax" in where
    m = shape[0] * n // block

    def part(suffix: str, dtype: Any, size: int) -> None:
        k = key + suffix
        if k not in where:
            raise bad(k, "is missing (every bitsandbytes 4-bit weight" + (" with double-quantized scales" if
                                                                         double else "") + " has one)")
        t = where[k].tensors[k]
        if (t.dtype, t.shape) != (np.dtype(dtype), (size,)):
            raise bad(k, f"is {t.dtype} {list(t.shape)}; expected {np.dtype(dtype)} [{size}]")

    part(".quant_map", np.float32, 16)
    part(".absmax", np.uint8 if double else np.float32, m)
    if not np.array_equal(where[key + ".quant_map"].read(key + ".quant_map").view(np.uint32),
                          quantize.NF4.view(np.uint32)):
        raise bad(key + ".quant_map", "is not bitsandbytes' NF4 code book")
    if double:
        part(".nested_absmax", np.float32, -(-m // NESTED_BLOCK))
        part(".nested_quant_map", np.float32, 256)
        if state.get("nested_blocksize") != NESTED_BLOCK:
            raise bad(state_key, f"says nested_blocksize {state.get('nested_blocksize')!r}; bitsandbytes codes the "
                                 f"scales in blocks of {NESTED_BLOCK}")
        if type(state.get("nested_offset")) not in (int, float):
            raise bad(state_key, f"has no numeric nested_offset ({state.get('nested_offset')!r})")
        k = key + ".nested_quant_map"
        if not np.array_equal(where[k].read(k).view(np.uint32), quantize.dynamic_map().view(np.uint32)):
            raise bad(k, "is not bitsandbytes' signed dynamic map (the code book of double-quantized scales)")
    return Quantization("nf4", block, double)


def _read_bnb(cfg: ModelConfig, where: dict[str, SafetensorsReader], key: str, name: str, quant: Quantization
              ) -> Params:
    """One checked bitsandbytes projection -> gemmatune's quantized fields (quantize.py), its bytes as stored,
    transposed from bitsandbytes' [out, in] order into gemmatune's (quantize.from_bnb)."""
    shapes = quantized_shapes(name, param_shapes(cfg)["layers"][name][1:], quant)
    scale_key = "scale_codes" if quant.double else "scale"

    def read(suffix: str) -> np.ndarray:
        return where[key + suffix].read(key + suffix)

    ours = quantize.from_bnb(read("").view(np.uint8), read(".absmax"), shapes[scale_key][1:])
    fields = {"packed": ours["packed"], "table": read(".quant_map"), scale_key: ours["scale"]}
    if quant.double:
        fields.update(scale_table=read(".nested_quant_map"), scale_absmax=read(".nested_absmax"),
                      scale_offset=np.asarray(_bnb_state(where, key)["nested_offset"], np.float32))
    return fields


def _bnb_checkpoint(model_dir: Path) -> tuple[Path, bool]:
    """(config.json's path, whether it describes a checkpoint quantized by bitsandbytes in 4 bits); refuses the
    quantized checkpoints that cannot load as stored (`_is_bnb_4bit`)."""
    config_path = model_dir / "config.json"
    return config_path, config_path.is_file() and _is_bnb_4bit(read_json(config_path, _REFETCH), config_path)


def checkpoint_quantization(model_dir: str | Path) -> Quantization | None:
    """How a Hugging Face checkpoint directory stores its projections: for one quantized by bitsandbytes in 4 bits
    (NF4), Quantization("nf4", its blocksize, whether its scales are double-quantized), which `load_hf` loads as
    stored; None for a checkpoint in float (or for anything else `load_model` reads: a GGUF file, a KerasHub
    preset). Reads config.json and the tensors' headers and quant states, no weights. A quantization that cannot
    load as stored (bitsandbytes' FP4 or 8-bit, other methods) is refused, saying why and what to load instead."""
    model_dir = Path(model_dir)
    config_path, bnb = _bnb_checkpoint(model_dir)
    if not bnb:
        return None
    cfg = load_config(config_path)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader(f)) for f in _weight_files(model_dir)]
        return _check_tensors(cfg, readers, config_path, checkpoint_is_multimodal(model_dir), bnb)[2]


def _load_quantization(stored: Quantization | None, asked: Quantization | None, config_path: Path
                       ) -> Quantization | None:
    """The quantization a checkpoint loads with: a bitsandbytes checkpoint's own (a request must agree with it:
    its codes are loaded as stored, never re-quantized), else the one asked for."""
    if stored is None or asked is None or asked == stored:
        return stored or asked
    flags = f"--quantize nf4 --quantize-block {stored.block}" + (" --double-quant" if stored.double else "")
    raise GemmatuneError(f"{config_path}: this checkpoint is stored quantized by bitsandbytes ({stored.describe()}) "
                         "and loads as stored, without quantizing again; it cannot load as "
                         f"{asked.describe()}. Ask for no quantization or for the stored one ({flags}), or load the "
                         "original (unquantized) checkpoint to quantize it another way.")


def load_hf(model_dir: str | Path, dtype: str = "auto", *, stacked: bool = True, mesh: Mesh | None = None,
            quant: Quantization | None = None) -> tuple[ModelConfig, Params]:
    """A Hugging Face Gemma 2 or Gemma 3 checkpoint directory -> (config, parameters on the default JAX device, or
    split over `mesh` as sharding.param_shardings lays them out). A multimodal Gemma 3 checkpoint gives its language
    model (the vision tower and projector are not read).

    dtype: "auto" keeps the checkpoint's dtype (bfloat16 stays bfloat16; float32, and float16, which overflows
    in Gemma, load as float32), or "float32" / "bfloat16". Tensors are read one at a time, each placed straight
    onto its devices (on a mesh, every device receives only its slice) and written, a layer at a time, into
    preallocated device arrays: beyond the loaded model, host memory holds one tensor and one layer at most.
    stacked=False gives the per-layer list that decoding takes (`model.unstack`) without a second copy.

    quant: quantize the projection weights as they stream in (QLoRA). A checkpoint quantized by bitsandbytes in 4
    bits (NF4, a `*-bnb-4bit` download) loads quantized whatever `quant` is, its codes and scales bit for bit as
    stored (`checkpoint_quantization` says how); `quant` may only repeat that quantization. Projections such a
    checkpoint keeps in float (bitsandbytes' llm_int8_skip_modules) are quantized as they load, the same way, since
    a model's projections are all stored alike."""
    model_dir = Path(model_dir)
    check_dtype(dtype)
    config_path, bnb = _bnb_checkpoint(model_dir)
    cfg = load_config(config_path)
    multimodal = checkpoint_is_multimodal(model_dir)
    files = _weight_files(model_dir)
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader(f)) for f in files]
        where, layout, stored = _check_tensors(cfg, readers, config_path, multimodal, bnb)
        quant = _load_quantization(stored, quant, config_path)
        embed_key = layout.key(TOP_KEYS["embed"])
        target = load_dtype(dtype, where[embed_key].tensors[embed_key].dtype)

        def read(key: str, name: str) -> np.ndarray | Params:
            if bnb and name in PROJECTIONS and _bnb_quantized(where, key):
                return _read_bnb(cfg, where, key, name, quant)
            return from_hf(name, where[key].read(key), cfg)

        # hf_keys lists the embedding, then each layer's tensors, then the final norm: grouped by layer index.
        tensors = ((name, i, read(key, name)) for key, name, i in hf_keys(cfg, layout))
        params = place_params(cfg, tensors, target, stacked=stacked, mesh=mesh, quant=quant)
    return cfg, params


def _end_of_turn_id(tokenizer_files: list[Path]) -> int | None:
    """The id of <end_of_turn> in the checkpoint's own vocabulary (106 in Gemma 3, 107 in Gemma 2: never assumed),
    read from tokenizer.json's added tokens or vocabulary, tokenizer_config.json or the SentencePiece model (a
    KerasHub preset's tokenizer has only that)."""
    for f in tokenizer_files:
        if f.name == "tokenizer.json":
            tokenizer = read_json(f, _REFETCH)
            vocab = tokenizer.get("model", {}).get("vocab")
            table = vocab if isinstance(vocab, dict) else {}  # BPE: piece -> id (Unigram's is a list of pairs)
            table = {**table, **{t.get("content"): t.get("id") for t in tokenizer.get("added_tokens", [])}}
        elif f.name == "tokenizer_config.json":
            added = read_json(f, _REFETCH).get("added_tokens_decoder", {})
            table = {t.get("content"): int(i) for i, t in added.items()}
        elif f.name == "tokenizer.model":
            table = {"<end_of_turn>": load_tokenizer(f.parent).end_of_turn_id}
        else:
            continue
        if table.get("<end_of_turn>") is not None:
            return int(table["<end_of_turn>"])
    return None


def _shards(layout: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int
            ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Split the tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard of its own),
    as transformers' save_pretrained does."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for entry in layout:
        n = tensor_nbytes(entry[1], entry[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _write_json(path: Path, d: dict[str, Any]) -> None:
    path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")


def _write_checkpoint(out: Path, cfg: ModelConfig, params: Params, dtype: np.dtype, max_shard_bytes: int,
                      tokenizer_files: list[Path], merged_adapters: list[dict[str, Any]]) -> None:
    config = {**cfg.to_hf_dict(), "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}
    if merged_adapters:
        config[GEMMATUNE_KEY] = {MERGED_ADAPTERS: merged_adapters}
    _write_json(out / "config.json", config)
    eot = _end_of_turn_id(tokenizer_files)
    _write_json(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        # Chat models end a turn with <end_of_turn>; generation must stop there as well as at <eos>.
        "eos_token_id": cfg.eos_token_id if eot is None else [cfg.eos_token_id, eot]})
    layout = [(key, hf_shape(name, cfg), dtype) for key, name, _ in hf_keys(cfg)]
    tensors = hf_state(cfg, params, lambda a: np.asarray(a).astype(dtype, copy=False))
    metadata = {"format": "pt"}  # as transformers writes; its loader expects it
    shards = _shards(layout, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out / WEIGHTS, layout, tensors, metadata)
    else:
        weight_map = {}
        for k, part in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, part, itertools.islice(tensors, len(part)), metadata)
            weight_map.update({key: fname for key, _, _ in part})
        total = sum(tensor_nbytes(shape, dt) for _, shape, dt in layout)
        _write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    for f in tokenizer_files:
        shutil.copyfile(f, out / f.name)


def save_hf(out_dir: str | Path, cfg: ModelConfig, params: Params, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | Path | None = None, force: bool = False,
            merged_adapters: list[dict[str, Any]] | None = None) -> None:
    """Write a Hugging Face checkpoint directory (config.json, generation_config.json, safetensors weights,
    tokenizer files) of `cfg`'s family, loadable by transformers' Gemma2ForCausalLM or Gemma3ForCausalLM (a
    multimodal Gemma 3's language model is written as Gemma3ForCausalLM, text only). The output head stays tied (no
    lm_head); generation stops at <eos> and at the tokenizer's own <end_of_turn>. dtype: "float32" or "bfloat16";
    None keeps the embedding's dtype. merged_adapters: the records of the adapters folded into `params`
    (`convert.peft.merged_record`), kept in config.json under "gemmatune" so that applying one of them again is
    refused.

    Atomic: everything is written into a temporary sibling directory that is renamed into place at the end,
    so an interrupted save leaves out_dir as it was."""
    out = Path(out_dir)
    refuse_to_replace(out, force, "output")
    name = DTYPE_NAMES.get(np.dtype(params["embed"].dtype)) if dtype is None else dtype
    if name not in WEIGHT_DTYPES:
        raise GemmatuneError(f"cannot save weights as {dtype or params['embed'].dtype}: choose one of "
                             f"{', '.join(WEIGHT_DTYPES)}.")
    if max_shard_bytes <= 0:
        raise GemmatuneError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    tokenizer_files = []
    if tokenizer_dir is not None:
        tokenizer_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
        if not tokenizer_files:
            raise GemmatuneError(f"{tokenizer_dir}: holds none of the tokenizer files {', '.join(TOKENIZER_FILES)}; "
                                 "point tokenizer_dir at the base model's directory.")
    with staged_dir(out) as staged:
        _write_checkpoint(staged, cfg, params, WEIGHT_DTYPES[name], max_shard_bytes, tokenizer_files,
                          merged_adapters or [])
