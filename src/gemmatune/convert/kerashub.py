"""KerasHub Gemma 2 presets (what Kaggle serves, and what the original Keras notebooks load) -> gemmatune.
(Gemma 3 is read from its Hugging Face checkpoints; KerasHub's Gemma3Backbone presets are refused with a pointer
to them.)

A preset directory holds config.json (a serialised `keras_hub` GemmaBackbone), model.weights.h5 (Keras 3's
weights file), assets/tokenizer/vocabulary.spm (the SentencePiece model) and a Keras tokenizer.json, which is a
layer config, not a Hugging Face tokenizer. KerasHub keeps the same numbers as Hugging Face in other shapes:

- projections are per-head einsum kernels: query [H, D, E], key/value [K, D, E], attention_output [H, E, D];
  ffw_gating (gate) / ffw_gating_2 (up) [D, F], ffw_linear (down) [F, D];
- intermediate_dim is twice the feed-forward width (KerasHub's convert_gemma.py writes 2 * intermediate_size);
- RMSNorm scales by (1 + scale), as gemmatune and transformers do, so norm weights copy unchanged;
- the embedding is not pre-scaled (the backbone multiplies by sqrt(D)) and is tied; Gemma's vocabulary is
  256000 in both formats, so there is no padding to trim;
- query_head_dim_normalize=True scales queries by head_dim ** -0.5, False by (hidden_dim // heads) ** -0.5
  (Gemma 2 27B: 4608 // 32 = 144, its query_pre_attn_scalar);
- with use_sliding_window_attention, even layers (0, 2, ...) are local, as in transformers' layer_types.

Keras names a functional model's layers in the weights file by class (`layers/gemma_decoder_block_3/...`) and a
layer's sub-layers by attribute (`attention/query_dense/vars/0`); bfloat16 is stored as 2-byte opaque data with
attrs["dtype"] = "bfloat16".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from gemmatune.config import GLOBAL, PRESET_HUB_IDS, PRESETS, ModelConfig, Quantization
from gemmatune.convert.common import check_dtype, fields_of, load_dtype, place_params, read_json
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params, param_shapes

if TYPE_CHECKING:
    import h5py

CONFIG = "config.json"
WEIGHTS = "model.weights.h5"

# gemmatune per-layer name -> path inside a decoder block's group, and the axes permutation into our layout.
LAYER_KEYS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "input_norm": ("pre_attention_norm", None),
    "post_attn_norm": ("post_attention_norm", None),
    "pre_ffw_norm": ("pre_ffw_norm", None),
    "post_ffw_norm": ("post_ffw_norm", None),
    "q_proj": ("attention/query_dense", (1, 0, 2)),  # [H, D, E] -> [D, H, E]
    "k_proj": ("attention/key_dense", (1, 0, 2)),  # [K, D, E] -> [D, K, E]
    "v_proj": ("attention/value_dense", (1, 0, 2)),
    "o_proj": ("attention/output_dense", None),  # [H, E, D] already
    "gate_proj": ("gating_ffw", None),  # [D, F]
    "up_proj": ("gating_ffw_2", None),
    "down_proj": ("ffw_linear", None),  # [F, D]
}
TOP_KEYS = {"embed": "layers/reversible_embedding", "final_norm": "layers/rms_normalization"}
# What gemmatune fine-tunes, in the refusals.
SUPPORTED = ("Gemma 2 (KerasHub presets gemma2_* or Hugging Face checkpoints) and Gemma 3 (Hugging Face "
             "checkpoints, e.g. google/gemma-3-1b-pt)")

# Other KerasHub backbones someone may point --model at, named in the error.
_OTHER_BACKBONES = {"Gemma4Backbone": "Gemma 4", "LlamaBackbone": "Llama",
                    "Llama3Backbone": "Llama 3", "MistralBackbone": "Mistral", "QwenBackbone": "Qwen",
                    "PaliGemmaBackbone": "PaliGemma", "GPT2Backbone": "GPT-2"}


def is_kerashub_preset(model_dir: str | Path) -> bool:
    """A directory whose config.json is a serialised KerasHub backbone (a transformers one has model_type)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        return False
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and "class_name" in d and isinstance(d.get("config"), dict)


def _gemma3_hub_id(d: dict) -> str:
    """The Hugging Face Hub ids of the Gemma 3 size a Gemma3Backbone config describes (by its layer count), for the
    refusal; the 1B's when the config does not say."""
    layers = d.get("config", {}).get("num_layers")
    name = next((n for n, c in PRESETS.items() if c.family == "gemma3" and c.num_layers == layers), "gemma3-1b")
    pt = PRESET_HUB_IDS[name]
    return f"{pt} (or {pt.removesuffix('-pt')}-it, instruction-tuned)"


def kerashub_config(model_dir: str | Path) -> ModelConfig:
    """config.json of a KerasHub GemmaBackbone -> ModelConfig; refuses other models, saying which they are."""
    path = Path(model_dir) / CONFIG
    if not is_kerashub_preset(model_dir):
        raise GemmatuneError(f"{path}: missing or not a KerasHub preset config (a JSON object with class_name "
                             "and config).")
    d = read_json(path, "re-download the preset")
    cls = d["class_name"]
    if cls == "Gemma3Backbone":
        raise GemmatuneError(f"{path}: this KerasHub preset is Gemma 3 (class_name 'Gemma3Backbone'); gemmatune "
                             f"reads Gemma 3 from its Hugging Face checkpoints: pass --model {_gemma3_hub_id(d)}, or "
                             "a directory downloaded from there (KerasHub presets are read for Gemma 2, gemma2_*).")
    if cls != "GemmaBackbone":
        what = _OTHER_BACKBONES.get(cls, f"a {cls!r}")
        raise GemmatuneError(f"{path}: this KerasHub preset is {what} (class_name {cls!r}), not Gemma 2 "
                             f"(GemmaBackbone). gemmatune fine-tunes {SUPPORTED}.")
    c = d["config"]
    # Gemma 1 presets are GemmaBackbones too; Gemma 2 is the one with the post norms and the soft-caps.
    if not (c.get("use_post_attention_norm") and c.get("use_post_ffw_norm")):
        raise GemmatuneError(f"{path}: this is a Gemma 1 preset (use_post_attention_norm / use_post_ffw_norm are "
                             f"off); gemmatune fine-tunes {SUPPORTED}.")
    with fields_of(path, "re-download the complete preset"):
        heads, hidden, head_dim = int(c["num_query_heads"]), int(c["hidden_dim"]), int(c["head_dim"])
        if int(c["intermediate_dim"]) % 2:
            raise GemmatuneError(f"intermediate_dim {c['intermediate_dim']} is odd; KerasHub stores twice the "
                                 "feed-forward width")
        return ModelConfig(
            vocab_size=int(c["vocabulary_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_dim"]) // 2,
            num_layers=int(c["num_layers"]),
            num_heads=heads,
            num_kv_heads=int(c["num_key_value_heads"]),
            head_dim=head_dim,
            # KerasHub divides with // (gemma_attention.py); for the released sizes the division is exact.
            query_pre_attn_scalar=float(head_dim if c.get("query_head_dim_normalize", True) else hidden // heads),
            sliding_window=int(c.get("sliding_window_size", 4096)),
            attn_logit_softcap=c.get("attention_logit_soft_cap"),
            final_logit_softcap=c.get("final_logit_soft_cap"),
            rms_norm_eps=float(c.get("layer_norm_epsilon", 1e-6)),
            layer_types=() if c.get("use_sliding_window_attention") else (GLOBAL,) * int(c["num_layers"]),
        )


def _read(f: h5py.File, group: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """The one variable of a layer group, checked against the shape it must have."""
    key = f"{group}/vars/0"
    if key not in f:
        raise GemmatuneError(f"{path}: no weight {key!r}; the file is incomplete or not a Gemma 2 backbone.")
    ds = f[key]
    a = ds[()]
    if ds.attrs.get("dtype") == "bfloat16":  # stored as opaque 2-byte data
        a = a.view(ml_dtypes.bfloat16)
    if a.shape != shape:
        raise GemmatuneError(f"{path}: {key} has shape {a.shape}, config.json implies {shape}.")
    return a


def _block(f: h5py.File, i: int, path: Path) -> str:
    """Layer i's group: Keras numbers same-class layers in model order (gemma_decoder_block, _1, _2, ...)."""
    group = "layers/gemma_decoder_block" + (f"_{i}" if i else "")
    name = f[group]["vars"].attrs.get("name") if group in f and "vars" in f[group] else None
    if name is not None and name != f"decoder_block_{i}":  # recent Keras records the layer's own name
        raise GemmatuneError(f"{path}: {group} holds {name!r}, expected decoder_block_{i}.")
    return group


def load_kerashub(model_dir: str | Path, dtype: str = "auto", *, stacked: bool = True, mesh: Mesh | None = None,
                  quant: Quantization | None = None) -> tuple[ModelConfig, Params]:
    """A KerasHub Gemma 2 preset directory -> (config, parameters on the default JAX device, or split over
    `mesh`), streamed like `convert.hf.load_hf`: datasets are read one at a time and written a layer at a time
    into preallocated device arrays (`convert.common.place_params`, which also quantizes with `quant`).

    dtype: "auto" keeps bfloat16 and loads anything else as float32 (`convert.common.load_dtype`)."""
    model_dir = Path(model_dir)
    check_dtype(dtype)
    cfg = kerashub_config(model_dir)
    path = model_dir / WEIGHTS
    if not path.is_file():
        raise GemmatuneError(f"{path}: no such file; a KerasHub preset keeps its weights in {WEIGHTS}. "
                             "Re-download the preset.")
    shapes = param_shapes(cfg)
    layer_shapes = {name: s[1:] for name, s in shapes["layers"].items()}  # one layer's shapes, no [L]
    try:  # h5py only here: detecting a preset and reading its tokenizer need no HDF5 library
        import h5py
    except ImportError:
        raise GemmatuneError(f"{path}: reading a KerasHub preset needs h5py: pip install h5py") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise GemmatuneError(f"{path}: not a readable HDF5 weights file ({e}). Re-download the preset.") from None

    def tensors() -> Iterator[tuple[str, int | None, np.ndarray]]:
        yield "embed", None, first.pop()  # popped: the generator keeps no reference to it
        for i in range(cfg.num_layers):
            group = _block(f, i, path)
            for name, (sub, axes) in LAYER_KEYS.items():
                want = layer_shapes[name] if axes is None else tuple(layer_shapes[name][a] for a in axes)
                a = _read(f, f"{group}/{sub}", want, path)
                yield name, i, a if axes is None else a.transpose(axes)
        yield "final_norm", None, _read(f, TOP_KEYS["final_norm"], shapes["final_norm"], path)

    with f:
        first = [_read(f, TOP_KEYS["embed"], shapes["embed"], path)]
        target = load_dtype(dtype, first[0].dtype)
        params = place_params(cfg, tensors(), target, stacked=stacked, mesh=mesh, quant=quant)
    return cfg, params

