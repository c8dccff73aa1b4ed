"""GGUF export for llama.cpp and Ollama (architecture "gemma2"), with an Ollama Modelfile beside the file.

The tensors are the Hugging Face ones (`hf_state`) renamed to llama.cpp's gemma2 names, with the numbers llama.cpp
expects rather than transformers' (both from llama.cpp's convert_hf_to_gguf.py and its gemma2 loader):
- RMSNorm weights are stored with the 1 added (llama.cpp multiplies by w, transformers by 1 + w), kept in float32;
- llama.cpp does not read query_pre_attn_scalar: it scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads)
  when the model has 46 layers (27B). Where that differs from the config, the query weights are pre-scaled;
- the local/global layer pattern is fixed (even layers local) and both soft-caps are always applied, so configs
  outside that are refused rather than exported wrongly;
- there is no output tensor: llama.cpp ties the output projection to token_embd, as Gemma 2 does.
The vocabulary comes from tokenizer.model (pieces, scores, types); tokenizer.json holds no scores.
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
from gemmatune.tokenizer import GEMMA2_CHAT_TEMPLATE, TOKENIZER_JSON, TOKENIZER_MODEL

ARCH = gguf.MODEL_ARCH.GEMMA2
T = gguf.MODEL_TENSOR
# gemmatune name -> llama.cpp tensor ("blk.{bid}.attn_q" etc., plus ".weight").
TENSORS = {
    "embed": T.TOKEN_EMBD, "final_norm": T.OUTPUT_NORM,
    "input_norm": T.ATTN_NORM, "post_attn_norm": T.ATTN_POST_NORM,
    "pre_ffw_norm": T.FFN_PRE_NORM, "post_ffw_norm": T.FFN_POST_NORM,
    "q_proj": T.ATTN_Q, "k_proj": T.ATTN_K, "v_proj": T.ATTN_V, "o_proj": T.ATTN_OUT,
    "gate_proj": T.FFN_GATE, "up_proj": T.FFN_UP, "down_proj": T.FFN_DOWN,
}
# Every tensor gguf-py lists for gemma2 is written (old exports without the post-norms failed to load).
assert set(TENSORS.values()) == set(gguf.MODEL_TENSORS[ARCH]), "gguf's gemma2 tensor list changed"
NORMS = {"final_norm", "input_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm"}

Q = gguf.GGMLQuantizationType
# dtype name -> (storage of the matrices, general.file_type). Norms are float32 in every file, as llama.cpp's
# converter writes them: they are tiny and their precision matters.
DTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LLAMA_CPP_27B_LAYERS = 46  # llama.cpp recognises Gemma 2 27B by its layer count alone

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
    """The query_pre_attn_scalar llama.cpp applies to a gemma2 GGUF; it reads none from the file (gemma2's
    load_arch_hparams in llama.cpp's src/models/gemma2.cpp, formerly llama-model.cpp)."""
    if cfg.num_layers == LLAMA_CPP_27B_LAYERS:
        return cfg.hidden_size // cfg.num_heads  # llama.cpp divides integers here
    return cfg.head_dim


def tensor_name(name: str, layer: int | None) -> str:
    return gguf.TENSOR_NAMES[TENSORS[name]].format(bid=layer) + ".weight"


def _check_supported(cfg: ModelConfig, params: Params) -> None:
    problems = []
    expected = tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(cfg.num_layers))
    if cfg.layer_types != expected:
        problems.append("llama.cpp's gemma2 makes even layers sliding-window and odd layers global, but this "
                        f"config's layer_types are {list(cfg.layer_types)}")
    if cfg.attn_logit_softcap is None or cfg.final_logit_softcap is None:
        problems.append("llama.cpp's gemma2 always applies both logit soft-caps, but this config turns one off")
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


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    tokens, scores, types = _vocab(tokenizer_dir, vocab_size)
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins, as in gemmatune's tokenizer
    missing = [t for t in ("<pad>", "<eos>", "<bos>", "<end_of_turn>") if t not in ids]
    unknown = [i for i, k in enumerate(types) if k == gguf.TokenType.UNKNOWN]
    if missing or not unknown:
        raise GemmatuneError(f"{tokenizer_dir / TOKENIZER_MODEL}: no {', '.join(missing) or 'unknown'} token; "
                             "this is not a Gemma tokenizer.")
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
    w.add_chat_template(GEMMA2_CHAT_TEMPLATE)


# --- tensors -----------------------------------------------------------------------------------------------------

def _storage(name: str, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    return Q.F32 if name in NORMS else qtype


def _encode(name: str, t: np.ndarray, qtype: gguf.GGMLQuantizationType, q_scale: float) -> np.ndarray:
    """One Hugging Face tensor -> its GGUF bytes (as an array, rows stay rows)."""
    if name in NORMS:
        return t.astype(np.float32) + 1.0  # llama.cpp scales by w, Gemma by 1 + w
    if name == "q_proj" and q_scale != 1.0:
        t = t.astype(np.float32) * np.float32(q_scale)
    if qtype == Q.F32:
        return t.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return t.astype(np.float16)
    if qtype == Q.BF16:  # ml_dtypes rounds to nearest even, as ggml does; a bfloat16 tensor is copied bit for bit
        return t.astype(ml_dtypes.bfloat16, copy=False).view(np.uint16)
    return gguf.quants.quantize(t.astype(np.float32, copy=False), qtype)


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
    """Write a GGUF file that llama.cpp (and Ollama) load as "gemma2": hyper-parameters, the SentencePiece vocabulary
    from tokenizer_dir/tokenizer.model with its special tokens and the chat template, and every weight; and beside
    it the Ollama Modelfile for it (`modelfile_path`: `ollama create NAME -f out/NAME.Modelfile`).

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
        w = gguf.GGUFWriter(staged, gguf.MODEL_ARCH_NAMES[ARCH])
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
            w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
            w.add_final_logit_softcapping(cfg.final_logit_softcap)
            _add_tokenizer(w, tokenizer_dir, cfg.vocab_size)
            for gguf_name, _, byte_shape, storage in plan:
                w.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=storage)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for (_, name, byte_shape, storage), (_, t) in zip(plan, hf_state(cfg, params), strict=True):
                data = _encode(name, t, storage, q_scale)
                assert data.nbytes == math.prod(byte_shape), (name, data.shape, data.dtype)
                w.write_tensor_data(data)
                del t, data  # host memory: one tensor at a time
        finally:
            w.close()
