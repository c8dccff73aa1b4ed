"""GGUF export for llama.cpp and Ollama (architectures "gemma2" and "gemma3"), with an Ollama Modelfile beside the
file.

The tensors are the Hugging Face ones (`hf_state`) renamed to llama.cpp's names, with the numbers llama.cpp expects
rather than transformers' (both from llama.cpp's convert_hf_to_gguf.py and its gemma2/gemma3 loaders):
- RMSNorm weights (Gemma 3's attn_q_norm/attn_k_norm included) are stored with the 1 added (llama.cpp multiplies by
  w, transformers by 1 + w), kept in float32;
- llama.cpp does not read query_pre_attn_scalar: it scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads)
  for the 27B models (46 layers in Gemma 2, 62 in Gemma 3). Where that differs from the config, the queries are
  pre-scaled: Gemma 2's query weights, Gemma 3's query norm (its RMSNorm would undo a scaled projection);
- the layer pattern is fixed (Gemma 2: even layers local; Gemma 3: five local then one global, local RoPE base
  10,000 unscaled), Gemma 2 always applies both soft-caps and Gemma 3 none, so configs outside that are refused
  rather than exported wrongly; Gemma 3's global RoPE base is rope.freq_base, its linear scaling rope.scaling.*;
- there is no output tensor: llama.cpp ties the output projection to token_embd, as Gemma does.
The vocabulary comes from tokenizer.model (pieces, scores, types; tokenizer.json holds no scores), or is copied
from a GGUF source file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from gemmatune.atomic import staged_files
from gemmatune.config import GLOBAL, LOCAL, ModelConfig
from gemmatune.convert.common import GEMMATUNE_KEY, MERGED_ADAPTERS, read_json
from gemmatune.convert.hf import hf_keys, hf_shape, hf_state
from gemmatune.errors import GemmatuneError
from gemmatune.layout import Params
from gemmatune.tokenizer import GEMMA2_CHAT_TEMPLATE, TOKENIZER_JSON, TOKENIZER_MODEL, gguf_metadata

ARCHS = {"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}  # by ModelConfig.family
T = gguf.MODEL_TENSOR
# gemmatune name -> llama.cpp tensor ("blk.{bid}.attn_q" etc., plus ".weight").
TENSORS = {
    "embed": T.TOKEN_EMBD, "final_norm": T.OUTPUT_NORM,
    "input_norm": T.ATTN_NORM, "post_attn_norm": T.ATTN_POST_NORM,
    "pre_ffw_norm": T.FFN_PRE_NORM, "post_ffw_norm": T.FFN_POST_NORM,
    "q_norm": T.ATTN_Q_NORM, "k_norm": T.ATTN_K_NORM,  # Gemma 3's QK-norm
    "q_proj": T.ATTN_Q, "k_proj": T.ATTN_K, "v_proj": T.ATTN_V, "o_proj": T.ATTN_OUT,
    "gate_proj": T.FFN_GATE, "up_proj": T.FFN_UP, "down_proj": T.FFN_DOWN,
}
# Every tensor gguf-py lists for gemma2 is written (old exports without the post-norms failed to load); gemma3's
# list adds the QK-norms and an optional untied output head, which Gemma never has.
assert set(TENSORS.values()) - {T.ATTN_Q_NORM, T.ATTN_K_NORM} == set(gguf.MODEL_TENSORS[ARCHS["gemma2"]]), \
    "gguf's gemma2 tensor list changed"
assert set(TENSORS.values()) | {T.OUTPUT} == set(gguf.MODEL_TENSORS[ARCHS["gemma3"]]), \
    "gguf's gemma3 tensor list changed"
NORMS = {"final_norm", "input_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm", "q_norm", "k_norm"}

Q = gguf.GGMLQuantizationType
# dtype name -> (storage of the matrices, general.file_type). Norms are float32 in every file, as llama.cpp's
# converter writes them: they are tiny and their precision matters.
DTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp recognises the 27B models by layer count alone
LLAMA_CPP_GEMMA3_PATTERN = 6  # llama.cpp's gemma3: layer i is global when (i + 1) % 6 == 0
LLAMA_CPP_GEMMA3_LOCAL_THETA = 10000.0  # and local layers' RoPE base is 10,000, unscaled, whatever the file says

# Ollama's Go template for one chat turn; a system prompt is folded into the user turn, as render_chat does.
OLLAMA_TEMPLATE = """<start_of_turn>user
{{ if .System }}{{ .System }}

{{ end }}{{ .Prompt }}<end_of_turn>
<start_of_turn>model
{{ .Response }}<end_of_turn>
"""
OLLAMA_STOPS = ("<end_of_turn>", "<eos>")
MODELFILE_SUFFIX = ".Modelfile"  # out/mine.gguf -> out/mine.Modelfile: one per GGUF file in a directory


def llama_cpp_query_scalar(cfg: ModelConfig) -> float:
    """The query_pre_attn_scalar llama.cpp applies to a gemma2 or gemma3 GGUF; it reads none from the file (the
    gemma2/gemma3 cases of llama.cpp's hyper-parameter loading, src/llama-model.cpp)."""
    if cfg.num_layers == LLAMA_CPP_27B_LAYERS[cfg.family]:
        return cfg.hidden_size // cfg.num_heads  # llama.cpp divides integers here
    return cfg.head_dim


def tensor_name(name: str, layer: int | None) -> str:
    return gguf.TENSOR_NAMES[TENSORS[name]].format(bid=layer) + ".weight"


def _check_supported(cfg: ModelConfig, params: Params) -> None:
    problems = []
    if cfg.family == "gemma2":
        expected = tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(cfg.num_layers))
        if cfg.layer_types != expected:
            problems.append("llama.cpp's gemma2 makes even layers sliding-window and odd layers global, but this "
                            f"config's layer_types are {list(cfg.layer_types)}")
        if cfg.attn_logit_softcap is None or cfg.final_logit_softcap is None:
            problems.append("llama.cpp's gemma2 always applies both logit soft-caps, but this config turns one off")
    else:
        expected = tuple(GLOBAL if (i + 1) % LLAMA_CPP_GEMMA3_PATTERN == 0 else LOCAL for i in range(cfg.num_layers))
        if cfg.layer_types != expected:
            problems.append("llama.cpp's gemma3 makes every sixth layer global and the others sliding-window, but "
                            f"this config's layer_types are {list(cfg.layer_types)}")
        if (cfg.rope_local_theta, cfg.rope_local_scaling) != (LLAMA_CPP_GEMMA3_LOCAL_THETA, 1.0):
            problems.append("llama.cpp's gemma3 fixes the local layers' RoPE base at 10000 without scaling, but this "
                            f"config has base {cfg.rope_local_theta:g}, factor {cfg.rope_local_scaling:g}")
        if cfg.attn_logit_softcap is not None or cfg.final_logit_softcap is not None:
            problems.append("llama.cpp's gemma3 applies no logit soft-cap, but this config sets one")
    if problems:
        raise GemmatuneError("cannot export to GGUF: " + "; ".join(problems) + ".")
    if "lora" in params["layers"]:
        raise GemmatuneError("cannot export to GGUF: the parameters still hold LoRA adapters; merge them into the "
                             "base weights first (gemmatune.lora.merge), as GGUF stores plain weights.")


# --- the vocabulary ----------------------------------------------------------------------------------------------

def _special_contents(tokenizer_dir: Path) -> set[str]:
    """Tokens that tokenizer.json or tokenizer_config.json declares special. llama.cpp's converter makes them
    CONTROL: tokenizer.model marks <start_of_turn>/<end_of_turn> only user-defined, and llama.cpp expects its
    end-of-generation tokens to be control tokens."""
    found: set[str] = set()
    for fname, table in ((TOKENIZER_JSON, "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        path = tokenizer_dir / fname
        if not path.is_file():
            continue
        entries = read_json(path, "re-download the tokenizer files").get(table, [])
        entries = entries.values() if isinstance(entries, dict) else entries
        found |= {t["content"] for t in entries if isinstance(t, dict) and t.get("special") and "content" in t}
    return found


def _vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) of tokenizer.model, padded to the embedding's vocab_size as llama.cpp's
    converter pads (unused "[PAD{id}]" tokens)."""
    path = tokenizer_dir / TOKENIZER_MODEL
    if not path.is_file():
        raise GemmatuneError(
            f"{path}: not found. GGUF stores the SentencePiece vocabulary with each token's score and type, "
            f"which only {TOKENIZER_MODEL} holds ({TOKENIZER_JSON} has no scores); copy {TOKENIZER_MODEL} from "
            "the base model's Hugging Face repository into this directory.")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise GemmatuneError(f"{path}: not a SentencePiece model ({e}); re-download it.") from None
    if not proto.pieces:
        raise GemmatuneError(f"{path}: the SentencePiece model has no pieces; re-download it.")
    if len(proto.pieces) > vocab_size:
        raise GemmatuneError(f"{path}: {len(proto.pieces)} tokens, but the model's embedding has only {vocab_size} "
                             "rows; this tokenizer belongs to another model.")
    special = _special_contents(tokenizer_dir)
    type_name = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Name
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        # SentencePiece's piece types and GGUF's token types share their names (NORMAL, CONTROL, USER_DEFINED, ...).
        kind = gguf.TokenType[type_name(p.type)]
        if p.piece in special and kind in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            kind = gguf.TokenType.CONTROL
        tokens.append(p.piece)
        scores.append(p.score)
        types.append(int(kind))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def _vocab_from_gguf(path: Path, vocab_size: int) -> tuple[list[str], list[float], list[int], str | None]:
    """(pieces, scores, token types, chat template or None) of a GGUF source file, copied as they are."""
    meta = gguf_metadata(path)
    tokens, scores, types = (meta.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if meta.get("tokenizer.ggml.model") != "llama" or tokens is None or scores is None or types is None:
        raise GemmatuneError(f"{path}: no SentencePiece vocabulary (tokenizer.ggml.model \"llama\" with tokens, "
                             "scores and token types) to copy; re-download the GGUF file with its tokenizer.")
    if len(tokens) != vocab_size:
        raise GemmatuneError(f"{path}: {len(tokens)} tokens, but the model's embedding has {vocab_size} rows; this "
                             "vocabulary belongs to another model.")
    return list(tokens), np.asarray(scores).tolist(), np.asarray(types).tolist(), meta.get("tokenizer.chat_template")


def _chat_template(tokenizer_dir: Path, family: str) -> str:
    """The chat template written into the file: Gemma 2's (gemmatune's own); for Gemma 3 the tokenizer directory's
    (tokenizer_config.json or chat_template.jinja) when it has one, else the same turn format (Gemma 2's)."""
    if family == "gemma3":
        config = tokenizer_dir / "tokenizer_config.json"
        template = read_json(config, "re-download the tokenizer files").get("chat_template") if config.is_file() \
            else None
        if isinstance(template, str) and template:
            return template
        if (tokenizer_dir / "chat_template.jinja").is_file():
            return (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return GEMMA2_CHAT_TEMPLATE


def _add_tokenizer(w: gguf.GGUFWriter, source: Path, cfg: ModelConfig) -> None:
    """The vocabulary of `source`: a tokenizer directory (tokenizer.model) or a GGUF file, whose vocabulary, scores,
    types and chat template are copied."""
    if source.suffix.lower() == ".gguf" and source.is_file():
        tokens, scores, types, template = _vocab_from_gguf(source, cfg.vocab_size)
        template = template or GEMMA2_CHAT_TEMPLATE  # the Gemma turn format; Google's GGUF files carry none
    else:
        tokens, scores, types = _vocab(source, cfg.vocab_size)
        template = _chat_template(source, cfg.family)
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins, as in gemmatune's tokenizer
    missing = [t for t in ("<pad>", "<eos>", "<bos>", "<end_of_turn>") if t not in ids]
    unknown = [i for i, k in enumerate(types) if k == gguf.TokenType.UNKNOWN]
    if missing or not unknown:
        where = source if source.suffix.lower() == ".gguf" else source / TOKENIZER_MODEL
        raise GemmatuneError(f"{where}: no {', '.join(missing) or 'unknown'} token; this is not a Gemma tokenizer.")
    w.add_tokenizer_model("llama")  # llama.cpp's name for SentencePiece
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(ids["<bos>"])
    w.add_eos_token_id(ids["<eos>"])
    w.add_eot_token_id(ids["<end_of_turn>"])  # chat turns end here; llama.cpp and Ollama stop on it
    w.add_pad_token_id(ids["<pad>"])
    w.add_unk_token_id(unknown[0])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # Gemma's tokenizer adds no dummy prefix space; llama.cpp's SentencePiece tokenizer does unless told.
    w.add_add_space_prefix(False)
    w.add_chat_template(template)


# --- tensors -----------------------------------------------------------------------------------------------------

def _storage(name: str, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    return Q.F32 if name in NORMS else qtype


def _encode(name: str, t: np.ndarray, qtype: gguf.GGMLQuantizationType, scale: float) -> np.ndarray:
    """One Hugging Face tensor -> its GGUF bytes (as an array, rows stay rows), multiplied by `scale` (the query
    pre-scale, `_scaled_tensor`; 1 for every other tensor)."""
    if name in NORMS:
        t = t.astype(np.float32) + 1.0  # llama.cpp scales by w, Gemma by 1 + w
        return t if scale == 1.0 else t * np.float32(scale)
    if scale != 1.0:
        t = t.astype(np.float32) * np.float32(scale)
    if qtype == Q.F32:
        return t.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return t.astype(np.float16)
    if qtype == Q.BF16:  # ml_dtypes rounds to nearest even, as ggml does; a bfloat16 tensor is copied bit for bit
        return t.astype(ml_dtypes.bfloat16, copy=False).view(np.uint16)
    return gguf.quants.quantize(t.astype(np.float32, copy=False), qtype)


def _scaled_tensor(cfg: ModelConfig) -> str:
    """Where the query pre-scale goes: Gemma 3's query norm (its RMSNorm would remove a scale of the projection),
    Gemma 2's query weights."""
    return "q_norm" if cfg.qk_norm else "q_proj"


def _tensor_plan(cfg: ModelConfig, qtype: gguf.GGMLQuantizationType) -> list[tuple[str, str, tuple[int, ...], Q]]:
    """(GGUF name, gemmatune name, byte shape, storage type) of every tensor, in `hf_state` order."""
    plan = []
    for _, name, layer in hf_keys(cfg):
        storage = _storage(name, qtype)
        try:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(hf_shape(name, cfg), storage)
        except ValueError as e:
            raise GemmatuneError(f"cannot store {tensor_name(name, layer)} as {storage.name}: {e}; choose f16, bf16 "
                                 "or f32.") from None
        plan.append((tensor_name(name, layer), name, byte_shape, storage))
    return plan


def modelfile_path(path: str | Path) -> Path:
    """Where the Ollama Modelfile of the GGUF file `path` goes: beside it, named after it."""
    if Path(path).suffix == MODELFILE_SUFFIX:
        raise GemmatuneError(f"{path}: a GGUF file name must not end in {MODELFILE_SUFFIX}, the name of the Modelfile "
                             "written beside it; name it NAME.gguf.")
    return Path(path).with_suffix(MODELFILE_SUFFIX)


def modelfile(gguf_file: str) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_file` in the same directory: `FROM ./NAME.gguf` (Ollama resolves
    FROM relative to the Modelfile), the Gemma 2 chat template (a system prompt is folded into the user turn, as
    gemmatune's render_chat does) and <end_of_turn>/<eos> as stop strings."""
    if Path(gguf_file).name != gguf_file:
        raise GemmatuneError(f"Modelfile: {gguf_file!r} must be a file name without a directory; Ollama resolves "
                             "FROM relative to the Modelfile, so the Modelfile goes next to the GGUF file.")
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in OLLAMA_STOPS)
    return f'FROM ./{gguf_file}\nTEMPLATE """{OLLAMA_TEMPLATE}"""\n{stops}'


def save_gguf(path: str | Path, cfg: ModelConfig, params: Params, tokenizer_dir: str | Path, *, dtype: str = "f32",
              force: bool = False, merged_adapters: list[dict[str, Any]] | None = None) -> None:
    """Write a GGUF file that llama.cpp (and Ollama) load as "gemma2" or "gemma3" (cfg.family): hyper-parameters,
    the SentencePiece vocabulary with its special tokens and the chat template, and every weight; and beside it the
    Ollama Modelfile for it (`modelfile_path`: `ollama create NAME -f out/NAME.Modelfile`). tokenizer_dir: a
    directory with tokenizer.model, or the GGUF file the model came from (its vocabulary is copied).

    dtype: "f32", "f16", "bf16" or "q8_0" for the matrices (norms stay float32). params: stacked, merged weights
    (no LoRA adapters). merged_adapters: the records of the adapters folded into them (`convert.peft.merged_record`),
    kept as JSON under the key "gemmatune.merged_adapters". Tensors are converted and written one at a time, so host
    memory holds about one tensor. Atomic: both files are staged and appear complete or not at all; existing files
    are replaced only with force."""
    if dtype not in DTYPES:
        raise GemmatuneError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    _check_supported(cfg, params)
    qtype, file_type = DTYPES[dtype]
    plan = _tensor_plan(cfg, qtype)
    q_scale = math.sqrt(llama_cpp_query_scalar(cfg) / cfg.query_pre_attn_scalar)

    # The Modelfile is renamed into place first: its text depends only on the GGUF's name, so a kill between the
    # two renames leaves a Modelfile that is right for the GGUF file that follows.
    with staged_files([modelfile_path(path), path], force) as (staged_modelfile, staged):
        staged_modelfile.write_text(modelfile(path.name), encoding="utf-8")
        w = gguf.GGUFWriter(staged, gguf.MODEL_ARCH_NAMES[ARCHS[cfg.family]])
        try:
            w.add_name(path.stem)
            if merged_adapters:
                w.add_string(f"{GEMMATUNE_KEY}.{MERGED_ADAPTERS}", json.dumps(merged_adapters))
            w.add_file_type(int(file_type))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_context_length(cfg.max_position_embeddings)
            w.add_embedding_length(cfg.hidden_size)
            w.add_block_count(cfg.num_layers)
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count(cfg.num_heads)
            w.add_head_count_kv(cfg.num_kv_heads)
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
            w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_sliding_window(cfg.sliding_window)
            if cfg.family == "gemma2":
                w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
                w.add_final_logit_softcapping(cfg.final_logit_softcap)
            elif cfg.rope_scaling != 1.0:  # llama.cpp divides the global layers' positions by the factor
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(cfg.rope_scaling)
            _add_tokenizer(w, tokenizer_dir, cfg)
            for gguf_name, _, byte_shape, storage in plan:
                w.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=storage)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for (_, name, byte_shape, storage), (_, t) in zip(plan, hf_state(cfg, params), strict=True):
                data = _encode(name, t, storage, q_scale if name == _scaled_tensor(cfg) else 1.0)
                assert data.nbytes == math.prod(byte_shape), (name, data.shape, data.dtype)
                w.write_tensor_data(data)
                del t, data  # host memory: one tensor at a time
        finally:
            w.close()
