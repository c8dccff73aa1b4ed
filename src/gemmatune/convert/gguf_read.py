"""GGUF files (llama.cpp, Ollama) as a base model: architectures "gemma2" and "gemma3". The metadata is read with
tokenizer.gguf_metadata, the tensors are memory-mapped (`tensor_index`) and dequantized with gguf-py.

The numbers are llama.cpp's reading of the file, since that is the model a user runs (llama.cpp's gemma2 and gemma3
hyper-parameter loaders, src/llama-model.cpp; convert_hf_to_gguf.py for the tensors):
- norm weights are stored as 1 + w (llama.cpp multiplies by w, Gemma by 1 + w): the 1 is subtracted back, also for
  Gemma 3's attn_q_norm / attn_k_norm;
- the query and key matrices are not permuted (Gemma's RoPE is the NEOX, half-split form in llama.cpp, which is
  transformers' layout; only llama-style models are permuted by the converter), so every matrix is the Hugging Face
  [out, in] tensor as it stands;
- llama.cpp reads no query_pre_attn_scalar: it scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads)
  for the 27B models, which it recognises by their layer count alone (46 layers for Gemma 2, 62 for Gemma 3);
- Gemma 2: even layers sliding-window (pattern 2), both soft-caps from the file (llama.cpp's defaults 50 and 30
  when absent), one RoPE base; Gemma 3: five local layers then a global one (pattern 6), local RoPE base 10,000
  without scaling, the file's rope.freq_base and linear rope.scaling.factor on global layers, no soft-caps;
- there is no separate output head (tied to token_embd); a file with an output.weight other than the embedding is
  refused.
Weights are dequantized one tensor at a time (gguf.quants.dequantize) from the memory-mapped file, so host memory
holds about one tensor beyond the loaded model. dtype "auto" loads a file whose embedding is stored as BF16 in
bfloat16 and anything else (F32, F16, every quantized type: gguf-py dequantizes to float32) in float32.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from gemmatune.config import GLOBAL, LOCAL, ModelConfig, Quantization
from gemmatune.convert.common import GEMMATUNE_KEY, MERGED_ADAPTERS, check_dtype, load_dtype, place_params
from gemmatune.convert.gguf import ARCHS, NORMS, llama_cpp_query_scalar, tensor_name
from gemmatune.convert.hf import from_hf, hf_keys, hf_shape
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params
from gemmatune.tokenizer import gguf_metadata

SUFFIX = ".gguf"
OUTPUT = "output.weight"  # an untied output head: gemma3's tensor list allows one; Gemma never has one
Q = gguf.GGMLQuantizationType
# Tensor types gemmatune reads: every float type and every block quantization that gguf-py dequantizes (the
# llama.cpp types written for Gemma: Q8_0, Q4_0/1, Q5_0/1, the K-quants, the imatrix IQ types, ...). Integer
# types (I8..I64) and F64 are not weights llama.cpp writes for these models.
READABLE_TYPES = frozenset({Q.F32, Q.F16, *gguf.quants._type_traits})
LLAMA_CPP_LOCAL_THETA = 10000.0  # llama.cpp's gemma3 loader: rope_freq_base_train_swa, not read from the file
LLAMA_CPP_GEMMA2_SOFTCAPS = (50.0, 30.0)  # llama.cpp's defaults when a gemma2 file has no soft-cap keys
LLAMA_CPP_GEMMA2_WINDOW = 4096
PATTERNS = {"gemma2": 2, "gemma3": 6}  # llama.cpp's set_swa_pattern: layer i is global when (i + 1) % n == 0


def is_gguf(path: str | Path) -> bool:
    """A path that names a GGUF file (by its suffix; the magic number is checked when it is opened)."""
    return Path(path).suffix.lower() == SUFFIX and Path(path).is_file()


def _field(meta: dict[str, Any], path: Path, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in meta:
        if required:
            raise GemmatuneError(f"{path}: missing metadata key {key!r}; the file is incomplete or was not written by "
                                 "llama.cpp's converter; re-download or re-convert it.")
        return default
    return meta[key]


def architecture(meta: dict[str, Any], path: Path) -> str:
    arch = _field(meta, path, "general.architecture", required=True)
    if arch not in ARCHS:
        raise GemmatuneError(f"{path}: GGUF architecture {arch!r} is not supported; gemmatune reads Gemma 2 and "
                             f"Gemma 3 text models ({', '.join(ARCHS)}). Gemma 3n, EmbeddingGemma and other models "
                             "are different architectures.")
    return arch


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07): the number
    the converter was given."""
    return float(str(np.float32(value)))


def config_from_metadata(meta: dict[str, Any], path: Path) -> ModelConfig:
    """The ModelConfig that llama.cpp would run from a GGUF file's metadata (see the module docstring)."""
    arch = architecture(meta, path)

    def key(name: str, default: Any = None, required: bool = True) -> Any:
        return _field(meta, path, f"{arch}.{name}", default, required=required and default is None)

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise GemmatuneError(f"{path}: no tokenizer.ggml.tokens; gemmatune builds the tokenizer from the file's "
                             "vocabulary, so it needs a GGUF file with its tokenizer (as llama.cpp writes it).")
    n_layers, hidden, heads = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads, required=False))
    if int(key("attention.value_length", head_dim, required=False)) != head_dim:
        raise GemmatuneError(f"{path}: {arch}.attention.value_length differs from key_length; Gemma's are equal.")
    kv = key("attention.head_count_kv", heads, required=False)
    if np.ndim(kv):  # llama.cpp allows a per-layer array; Gemma's is one number
        if len(set(np.asarray(kv).tolist())) != 1:
            raise GemmatuneError(f"{path}: {arch}.attention.head_count_kv varies by layer; Gemma's does not.")
        kv = np.asarray(kv).flat[0]
    pattern = PATTERNS[arch]
    common = dict(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
        num_layers=n_layers, num_heads=heads, num_kv_heads=int(kv), head_dim=head_dim,
        rms_norm_eps=_decimal(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        layer_types=tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n_layers)),
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        query_pre_attn_scalar=1.0,  # replaced below: llama.cpp's depends on the shapes
    )
    theta = _decimal(key("rope.freq_base", 10000.0, required=False))
    if arch == "gemma2":
        attn_cap = _decimal(key("attn_logit_softcapping", LLAMA_CPP_GEMMA2_SOFTCAPS[0], required=False))
        final_cap = _decimal(key("final_logit_softcapping", LLAMA_CPP_GEMMA2_SOFTCAPS[1], required=False))
        cfg = ModelConfig(**common, family="gemma2", sliding_window=int(
            key("attention.sliding_window", LLAMA_CPP_GEMMA2_WINDOW, required=False)),
            attn_logit_softcap=attn_cap, final_logit_softcap=final_cap, rope_theta=theta, rope_local_theta=theta)
    else:
        window = int(key("attention.sliding_window", 0, required=False))
        if window <= 0:
            raise GemmatuneError(f"{path}: a gemma3 file without {arch}.attention.sliding_window, which llama.cpp "
                                 "runs with global attention on every layer; that is not a Gemma 3 model.")
        if f"{arch}.final_logit_softcapping" in meta:
            raise GemmatuneError(f"{path}: {arch}.final_logit_softcapping is set; Gemma 3 has no soft-cap, and this "
                                 "file is another model under Gemma 3's architecture name.")
        factor = _decimal(key("rope.scaling.factor", 1.0, required=False)) or 1.0
        kind = key("rope.scaling.type", "linear" if factor != 1.0 else "none", required=False)
        if factor != 1.0 and kind != "linear":
            raise GemmatuneError(f"{path}: {arch}.rope.scaling.type is {kind!r}; Gemma 3 scales RoPE linearly only.")
        cfg = ModelConfig(**common, family="gemma3", sliding_window=window, attn_logit_softcap=None,
                          final_logit_softcap=None, rope_theta=theta, rope_scaling=factor,
                          rope_local_theta=LLAMA_CPP_LOCAL_THETA, rope_local_scaling=1.0)
    return dataclasses.replace(cfg, query_pre_attn_scalar=float(llama_cpp_query_scalar(cfg)))


def gguf_merged_adapters(path: str | Path) -> list[dict[str, Any]]:
    """The records of the adapters gemmatune merged into a GGUF file it exported (its "gemmatune.merged_adapters"
    metadata; none for any other file), as convert.peft.merged_adapters reads them from a config.json."""
    text = gguf_metadata(path).get(f"{GEMMATUNE_KEY}.{MERGED_ADAPTERS}")
    if text is None:
        return []
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = None
    if not (isinstance(records, list) and all(isinstance(r, dict) and isinstance(r.get("digest"), str)
                                              for r in records)):
        raise GemmatuneError(f"{path}: metadata {GEMMATUNE_KEY}.{MERGED_ADAPTERS} must be a JSON list of records "
                             "with a \"digest\"; re-export the merged model.")
    return records


def gguf_config(path: str | Path) -> ModelConfig:
    """The configuration of a GGUF file, from its metadata alone (no tensor is read)."""
    return config_from_metadata(gguf_metadata(path), Path(path))


# --- the tensor index --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its name, numpy shape (ggml lists dimensions innermost first: reversed here),
    storage type and the memory-mapped bytes ([rows, bytes per row])."""
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray


# GGUF value types (the spec's numbering) -> their size in bytes; 8 is a string, 9 an array.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32  # general.alignment when a file does not set it


class _Cursor:
    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def u(self, size: int) -> int:
        if self.pos + size > len(self.buf):
            raise GemmatuneError(f"{self.path}: the GGUF header ends early; the file is truncated; re-download it.")
        value = int.from_bytes(self.buf[self.pos:self.pos + size].tobytes(), "little")
        self.pos += size
        return value

    def string(self) -> str:
        n = self.u(8)
        raw = self.buf[self.pos:self.pos + n].tobytes()
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _SIZES:
            self.pos += _SIZES[kind]
        elif kind == _STRING:
            n = self.u(8)  # read before adding: `self.pos += self.u(8)` would add to the position before the read
            self.pos += n
        elif kind == _ARRAY:
            item, n = self.u(4), self.u(8)
            if item in _SIZES:
                self.pos += n * _SIZES[item]  # n was read above
            else:
                for _ in range(n):
                    self.skip_value(item)
        else:
            raise GemmatuneError(f"{self.path}: unknown GGUF value type {kind}; the file is corrupt or from a newer "
                                 "GGUF version.")


def tensor_index(path: str | Path, alignment: int = DEFAULT_ALIGNMENT) -> dict[str, TensorInfo]:
    """Every tensor of the GGUF file `path` by name, its data memory-mapped (nothing is read until used). The
    metadata is skipped, not decoded: gguf.GGUFReader spends many seconds indexing a 262,144-token vocabulary."""
    path = Path(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(buf, path)
    if buf[:4].tobytes() != b"GGUF":
        raise GemmatuneError(f"{path}: not a GGUF file; pass a .gguf model file as llama.cpp and Ollama use.")
    c.pos = 4
    if c.u(4) not in (2, 3):
        raise GemmatuneError(f"{path}: a GGUF version gemmatune does not read (only 2 and 3, little-endian); convert "
                             "the model again with a current llama.cpp.")
    n_tensors, n_kv = c.u(8), c.u(8)
    for _ in range(n_kv):
        c.string()
        c.skip_value(c.u(4))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.u(8) for _ in range(c.u(4)))
        kind, offset = c.u(4), c.u(8)
        try:
            qtype = Q(kind)
        except ValueError:
            raise GemmatuneError(f"{path}: tensor {name} has unknown ggml type {kind}; the file is from a newer "
                                 "llama.cpp than gemmatune's gguf package knows; update the gguf package.") from None
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    start = -(-c.pos // alignment) * alignment
    out = {}
    for name, shape, qtype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = shape[-1] // block * size
        at = start + offset
        if at + rows * row_bytes > len(buf) or shape[-1] % block:
            raise GemmatuneError(f"{path}: tensor {name} lies past the end of the file; it is truncated; "
                                 "re-download it.")
        out[name] = TensorInfo(name, shape, qtype, buf[at:at + rows * row_bytes].reshape(rows, row_bytes))
    return out


# --- weights -----------------------------------------------------------------------------------------------------

def _tensor_table(tensors: dict[str, TensorInfo], cfg: ModelConfig, path: Path) -> dict[str, TensorInfo]:
    """GGUF name -> tensor for every tensor gemmatune reads, after checking names, shapes and types; reads no data
    except when an output head must be compared with the embedding."""
    expected = {tensor_name(name, i): name for _, name, i in hf_keys(cfg)}
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected and n != OUTPUT]
    if missing or extra:
        what = "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else [])
                         + ([f"unexpected {', '.join(extra[:5])}"] if extra else []))
        raise GemmatuneError(f"{path}: its tensors do not match a {cfg.family} model of its metadata ({what}); the "
                             "file is incomplete or holds another model (a multimodal projector belongs in a "
                             "separate mmproj file); re-download it.")
    for gname, name in expected.items():
        t = tensors[gname]
        if t.qtype not in READABLE_TYPES:
            raise GemmatuneError(f"{path}: tensor {gname} is stored as {t.qtype.name}, which gemmatune cannot "
                                 "dequantize (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and "
                                 "the IQ types); requantize the model with llama-quantize, e.g. to Q8_0.")
        if t.shape != hf_shape(name, cfg):
            raise GemmatuneError(f"{path}: tensor {gname} has shape {list(t.shape)}, but the metadata implies "
                                 f"{list(hf_shape(name, cfg))}; the file is corrupt; re-download it.")
    if OUTPUT in tensors:
        out, emb = tensors[OUTPUT], tensors[tensor_name("embed", None)]
        if (out.qtype, out.shape) != (emb.qtype, emb.shape) or not np.array_equal(out.data, emb.data):
            raise GemmatuneError(f"{path}: {OUTPUT} differs from token_embd.weight. Gemma ties its output "
                                 "projection to the embedding, and untied heads are not supported.")
    return {g: tensors[g] for g in expected}


def dequantized(t: TensorInfo) -> np.ndarray:
    """One GGUF tensor as float32 (BF16 stays bfloat16, bit for bit), in numpy order ([out, in] for a matrix)."""
    if t.qtype == Q.BF16:
        out = t.data.view(ml_dtypes.bfloat16)
    else:
        out = gguf.quants.dequantize(t.data, t.qtype)
    return out.reshape(t.shape)


def gguf_state(tensors: dict[str, TensorInfo], cfg: ModelConfig, path: Path
               ) -> Iterator[tuple[str, int | None, np.ndarray]]:
    """(gemmatune name, layer index, gemmatune-layout array) for every tensor, in `hf_keys` order, one tensor
    dequantized at a time, with llama.cpp's conversions undone (norms back to w, from 1 + w)."""
    table = _tensor_table(tensors, cfg, path)
    for _, name, i in hf_keys(cfg):
        host = dequantized(table[tensor_name(name, i)])
        if name in NORMS:
            host = host.astype(np.float32) - np.float32(1.0)
        yield name, i, from_hf(name, host, cfg)


def load_gguf(path: str | Path, dtype: str = "auto", *, stacked: bool = True, mesh: Mesh | None = None,
              quant: Quantization | None = None) -> tuple[ModelConfig, Params]:
    """A GGUF file -> (config, parameters on the default JAX device, or split over `mesh` as
    sharding.param_shardings lays them out), streamed as `convert.hf.load_hf` streams safetensors: each tensor is
    dequantized, placed onto its devices and written, a layer at a time, into preallocated device arrays.
    dtype: "auto" (bfloat16 for a file whose embedding is BF16, float32 otherwise), "float32" or "bfloat16"."""
    check_dtype(dtype)
    path = Path(path)
    meta = gguf_metadata(path)
    cfg = config_from_metadata(meta, path)
    tensors = tensor_index(path, int(meta.get("general.alignment", DEFAULT_ALIGNMENT)))
    embed = tensors.get(tensor_name("embed", None))
    target = load_dtype(dtype, np.dtype(ml_dtypes.bfloat16 if embed is not None and embed.qtype == Q.BF16
                                        else np.float32))
    return cfg, place_params(cfg, gguf_state(tensors, cfg, path), target, stacked=stacked, mesh=mesh, quant=quant)
