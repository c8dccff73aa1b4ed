"""Frozen model configuration: one preset per released Gemma 2 and Gemma 3 text model, small presets for tests, and
`config.json` (Hugging Face model_type gemma2, gemma3_text, or the text part of a multimodal gemma3) read as-is.

Gemma 2 and Gemma 3 are one architecture with variants, told apart by `family`: Gemma 3 adds an RMSNorm on queries
and keys (QK-norm), drops both soft-caps, repeats five local layers to one global one, and gives global layers their
own RoPE base (with linear scaling on 4B and up)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gemmatune.errors import GemmatuneError

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# The attention kernels a full-sequence forward can run (gemmatune.attention chooses among them).
ATTENTION = ("xla", "splash", "cudnn", "flash")
FAMILIES = ("gemma2", "gemma3")
# The Hugging Face model_type and class of each family's causal LM.
HF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}
HF_ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
GEMMA3_PATTERN = 6  # Gemma 3: layer i is global when (i + 1) % 6 == 0 (transformers' sliding_window_pattern)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float  # queries are scaled by this ** -0.5 (read it, never derive it)
    sliding_window: int = 4096
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    rope_theta: float = 10000.0  # the RoPE base of global layers
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    # One entry per layer; Gemma 2 alternates local/global starting with a local layer 0, Gemma 3 has five local
    # layers then a global one.
    layer_types: tuple[str, ...] = ()
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    family: str = "gemma2"  # "gemma3": QK-norm (q_norm, k_norm weights); see the module docstring
    rope_local_theta: float = 10000.0  # the RoPE base of local (sliding-window) layers
    # Linear RoPE scaling (positions divided by the factor) per layer kind: Gemma 3 4B and up scale global layers by 8.
    rope_scaling: float = 1.0
    rope_local_scaling: float = 1.0

    def __post_init__(self) -> None:
        if not self.layer_types:
            if self.family == "gemma3":
                types = tuple(GLOBAL if (i + 1) % GEMMA3_PATTERN == 0 else LOCAL for i in range(self.num_layers))
            else:
                types = tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if set(self.layer_types) - {LOCAL, GLOBAL}:
            problems.append(f"layer_types may hold only {LOCAL!r} and {GLOBAL!r}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "sliding_window"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "rope_local_theta", "rope_scaling", "rope_local_scaling", "query_pre_attn_scalar"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise GemmatuneError("invalid Gemma configuration: " + "; ".join(problems))

    @property
    def qk_norm(self) -> bool:
        """Queries and keys pass an RMSNorm over head_dim before RoPE (Gemma 3)."""
        return self.family == "gemma3"

    def rope(self, kind: str) -> tuple[float, float]:
        """(base, linear scaling factor) of RoPE on layers of `kind` (LOCAL or GLOBAL)."""
        return (self.rope_local_theta, self.rope_local_scaling) if kind == LOCAL else (self.rope_theta,
                                                                                      self.rope_scaling)

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """The repeating run of layer types that the layer stack is scanned over, so local and global layers keep
        static masks and their own KV-cache sizes: the shortest run whose repeats give the layer types, allowing
        a partial repeat at the end (Gemma 3 1B: 26 layers, four repeats of 5 local + 1 global, then 2 local).
        `layer_segments` says how the stack splits into whole repeats and that tail."""
        n = self.num_layers
        for p in range(1, n + 1):
            if self.layer_types == (self.layer_types[:p] * (n // p + 1))[:n]:
                return self.layer_types[:p]
        raise AssertionError("unreachable: p = n always matches")

    @property
    def layer_segments(self) -> tuple[tuple[int, int, tuple[str, ...]], ...]:
        """The layer stack as scanned runs (first layer, repeats, pattern): whole repeats of `block_pattern`,
        then the partial repeat at the end (if any) as repeats of its own shortest pattern."""
        pattern = self.block_pattern
        whole = self.num_layers // len(pattern)
        segments = [(0, whole, pattern)] if whole else []
        tail = self.layer_types[whole * len(pattern):]
        if tail:
            sub = ModelConfig(**{**dataclasses.asdict(self), "num_layers": len(tail), "layer_types": tail})
            segments += [(whole * len(pattern) + start, reps, pat) for start, reps, pat in sub.layer_segments]
        return tuple(segments)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it for Gemma2ForCausalLM or Gemma3ForCausalLM. Gemma 3's RoPE is
        written in both layouts (transformers 5's rope_parameters, and rope_theta / rope_local_base_freq /
        rope_scaling that transformers 4 reads); both say the same."""
        d = {
            "architectures": [HF_ARCHITECTURES[self.family]],
            "model_type": HF_MODEL_TYPES[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            # transformers' config is strict: an integral scalar must be written as an int (256, not 256.0).
            "query_pre_attn_scalar": (int(self.query_pre_attn_scalar) if float(self.query_pre_attn_scalar).is_integer()
                                      else self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "final_logit_softcapping": self.final_logit_softcap,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": list(self.layer_types),
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
        }
        if self.family == "gemma3":
            def params(theta: float, factor: float) -> dict[str, Any]:
                return ({"rope_type": "default", "rope_theta": theta} if factor == 1.0 else
                        {"rope_type": "linear", "factor": factor, "rope_theta": theta})

            d["rope_local_base_freq"] = self.rope_local_theta
            d["rope_scaling"] = ({"rope_type": "linear", "factor": self.rope_scaling}
                                 if self.rope_scaling != 1.0 else None)
            d["rope_parameters"] = {LOCAL: params(self.rope_local_theta, self.rope_local_scaling),
                                    GLOBAL: params(self.rope_theta, self.rope_scaling)}
            d["use_bidirectional_attention"] = False
        return d


def _gemma3(**kw: Any) -> ModelConfig:
    """A Gemma 3 text model's config: no soft-caps, RoPE bases 10k local and 1M global."""
    return ModelConfig(family="gemma3", attn_logit_softcap=None, final_logit_softcap=None, rope_theta=1_000_000.0,
                       rope_local_theta=10_000.0, **kw)


# Configuration presets: shapes only, for `gemmatune plan` and the tests. The released checkpoints' config.json
# numbers (google/gemma-2-{2b,9b,27b}, google/gemma-3-{270m,1b,4b,12b,27b}-pt); their weights are Hub ids
# (PRESET_HUB_IDS).
PRESETS: dict[str, ModelConfig] = {
    "gemma2-2b": ModelConfig(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26,
                             num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma2-9b": ModelConfig(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42,
                             num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma2-27b": ModelConfig(vocab_size=256000, hidden_size=4608, intermediate_size=36864, num_layers=46,
                              num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gemma3-270m": _gemma3(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                           num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                           max_position_embeddings=32768),
    "gemma3-1b": _gemma3(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
                         num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                         max_position_embeddings=32768),
    "gemma3-4b": _gemma3(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
                         num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                         max_position_embeddings=131072, rope_scaling=8.0),
    "gemma3-12b": _gemma3(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16,
                          num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                          max_position_embeddings=131072, rope_scaling=8.0),
    "gemma3-27b": _gemma3(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
                          num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                          max_position_embeddings=131072, rope_scaling=8.0),
    # Small bodies for tests and demos; the window is tiny so sequences span several windows. "tiny" is the embedded
    # model's config (EMBEDDED_MODEL); "small" has no weights anywhere.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                        max_position_embeddings=2048),
    "small": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_layers=4, num_heads=8,
                         num_kv_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096),
}
# Where the weights of a preset's shapes are: the Hugging Face Hub ids that --model takes (the -it ids are the
# instruction-tuned models). The Gemma 3 4B, 12B and 27B repositories hold multimodal checkpoints, whose language
# model gemmatune trains.
PRESET_HUB_IDS = {"gemma2-2b": "google/gemma-2-2b", "gemma2-9b": "google/gemma-2-9b",
                  "gemma2-27b": "google/gemma-2-27b", "gemma3-270m": "google/gemma-3-270m",
                  "gemma3-1b": "google/gemma-3-1b-pt", "gemma3-4b": "google/gemma-3-4b-pt",
                  "gemma3-12b": "google/gemma-3-12b-pt", "gemma3-27b": "google/gemma-3-27b-pt"}

# transformers' Gemma3TextConfig defaults: the Hub's multimodal configs leave most text_config fields at these.
_GEMMA3_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 131072,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
_OTHER_MODEL_TYPES = {"gemma": "Gemma 1", "gemma3n": "Gemma 3n", "gemma3n_text": "Gemma 3n", "llama": "Llama",
                      "mistral": "Mistral", "qwen2": "Qwen 2", "qwen3": "Qwen 3"}


def _rope_of(d: dict[str, Any], kind: str, default_theta: float, source: str) -> tuple[float, float]:
    """(base, linear factor) of `kind` layers from either config layout: transformers 5's rope_parameters (one
    entry per layer kind, or one for all in Gemma 2) or rope_theta / rope_local_base_freq / rope_scaling."""
    nested = d.get("rope_parameters")
    if isinstance(nested, dict) and kind in nested:
        r = nested[kind] or {}
    elif isinstance(nested, dict) and nested:
        r = nested
    else:
        legacy = {LOCAL: "rope_local_base_freq", GLOBAL: "rope_theta"}[kind]
        scaling = d.get("rope_scaling") if kind == GLOBAL else None
        r = {**(scaling or {}), "rope_theta": d.get(legacy, default_theta)}
    rope_type = r.get("rope_type", r.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise GemmatuneError(f"{source}: rope_type {rope_type!r} ({kind}) is not supported; gemmatune reads "
                             "default and linear rotary embeddings, as the released Gemma models use.")
    factor = float(r.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(r.get("rope_theta", default_theta)), factor


def from_hf_dict(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a transformers Gemma 2 or Gemma 3 config (gemma2, gemma3_text, or the text_config of a multimodal
    gemma3); refuse other architectures with a message that says why."""
    model_type = d.get("model_type")
    if model_type == "gemma3" and isinstance(d.get("text_config"), dict):
        # Multimodal Gemma 3: gemmatune trains its language model (as text). Token ids may sit at the top level.
        top_ids = {k: d[k] for k in ("pad_token_id", "eos_token_id", "bos_token_id") if k in d}
        d = {"model_type": "gemma3_text", **top_ids, **d["text_config"]}
        d["model_type"] = "gemma3_text"
        model_type = "gemma3_text"
        source = f"{source} (text_config)"
    family = {"gemma2": "gemma2", "gemma3_text": "gemma3"}.get(model_type or "")
    if family is None:
        what = _OTHER_MODEL_TYPES.get(model_type, f"model_type {model_type!r}") if model_type else "no model_type"
        raise GemmatuneError(
            f"{source}: this is a {what} checkpoint, not Gemma 2 or Gemma 3 (model_type gemma2, gemma3_text or "
            "gemma3). gemmatune fine-tunes Gemma 2 and Gemma 3 text models: point --model at one of their "
            "checkpoint directories (for example one downloaded from google/gemma-2-2b or google/gemma-3-1b-pt).")
    if d.get("use_bidirectional_attention"):
        raise GemmatuneError(f"{source}: use_bidirectional_attention is set (an embedding model); gemmatune "
                             "supports causal Gemma language models only.")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise GemmatuneError(f"{source}: hidden_activation {act!r} is not Gemma's gelu_pytorch_tanh.")
    if d.get("attention_bias"):
        raise GemmatuneError(f"{source}: attention_bias is true; Gemma has no attention biases.")
    if family == "gemma3":
        d = {**_GEMMA3_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k.endswith("softcapping")}}
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in required if k not in d]
    if missing:
        raise GemmatuneError(f"{source}: missing field(s) {', '.join(missing)}; is this a complete "
                             "Gemma config.json?")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    softcaps = {"gemma2": (50.0, 30.0), "gemma3": (None, None)}[family]
    try:
        global_theta, global_factor = _rope_of(d, GLOBAL, 10000.0, source)
        local_theta, local_factor = _rope_of(d, LOCAL, global_theta if family == "gemma2" else 10000.0, source)
        if family == "gemma2" and (global_factor, local_factor) != (1.0, 1.0):
            raise GemmatuneError("rope scaling is not supported for Gemma 2 (its released models use default "
                                 "rotary embeddings).")
        layer_types = d.get("layer_types") or ()
        if not layer_types and family == "gemma3" and d.get("sliding_window_pattern"):
            pattern = int(d["sliding_window_pattern"])
            layer_types = [GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(int(d["num_hidden_layers"]))]
        return ModelConfig(
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(heads),
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            sliding_window=int(d.get("sliding_window") or 4096),
            attn_logit_softcap=d.get("attn_logit_softcapping", softcaps[0]),
            final_logit_softcap=d.get("final_logit_softcapping", softcaps[1]),
            rope_theta=global_theta,
            rope_scaling=global_factor,
            rope_local_theta=local_theta,
            rope_local_scaling=local_factor,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            layer_types=tuple(layer_types),
            pad_token_id=_first_id(d.get("pad_token_id"), 0),
            eos_token_id=_first_id(d.get("eos_token_id"), 1),
            bos_token_id=_first_id(d.get("bos_token_id"), 2),
        )
    except GemmatuneError as e:
        raise GemmatuneError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise GemmatuneError(f"{source}: a field has the wrong type ({e}).") from None


def _first_id(v: Any, default: int) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return default if v is None else int(v)


def load_config(path: str | Path) -> ModelConfig:
    """A preset name, a config.json file, or a directory holding one."""
    if str(path) in PRESETS:
        return PRESETS[str(path)]
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise GemmatuneError(f"{p}: no such file; a Gemma checkpoint directory holds a config.json. "
                             "Re-download the checkpoint, or pass the directory that holds it.")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmatuneError(f"{p}: not valid JSON ({e}). Re-download the checkpoint's config.json.") from None
    if not isinstance(d, dict):
        raise GemmatuneError(f"{p}: expected a JSON object.")
    return from_hf_dict(d, source=str(p))


# The embedded tiny Gemma 2 (config, weights, tokenizer) that every command defaults to, `--model tiny` by name;
# built by scripts/build_tiny.py so that a fresh install works without downloads. It is a demo, not a language model.
# Its config is PRESETS["tiny"], so the name means the same model for `plan` (config only) and for every other command.
EMBEDDED_MODEL = "tiny"
DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny"


# `gemmatune eval` (evaluation.py) defaults, here so that the command line builds its --help without JAX.
NO_ADAPTER = "none"  # the adapter name of the base model alone
EVAL_BATCH = 16  # prompts answered together (one left-padded batch)
# Default max new tokens: the longest reference plus this, at most EVAL_MAX_NEW_TOKENS. The slack lets an answer run
# a little past the reference's length (and emit its <end_of_turn>) without decoding far beyond it.
EVAL_NEW_TOKENS_SLACK = 16
EVAL_MAX_NEW_TOKENS = 512

FORMATS = ("auto", "text", "instruction", "chat", "preference")
METHODS = ("sft", "dpo", "distill")
DPO_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
PLAIN_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n{response}"  # the original notebooks' template


def setting(default: Any, help: str, *, commas: bool = True) -> Any:
    """A settings field: its default and its one-line meaning, which `gemmatune train --help` shows (settings.py
    builds every option from the dataclasses, so the meaning is written once, here). commas=False: a list of
    free text, where a command-line value is one item even if it holds commas."""
    return dataclasses.field(default=default, metadata={"help": help, "commas": commas})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How a user's files become training batches. Every field is validated in __post_init__ with a message that
    names the field."""

    paths: tuple[str, ...] = setting((), "JSONL/JSON/CSV/TSV/Parquet files, globs, a datasets save_to_disk directory "
                                         "or a Hub dataset name")
    format: str = setting("auto", "auto (detected from the columns), text, instruction, chat or preference")
    # Instruction rows: our field name -> the user's column name, e.g. (("instruction", "question"),
    # ("response", "answer")). Known layouts need none.
    columns: tuple[tuple[str, str], ...] = setting((), "instruction rows: which column holds each field "
                                                       "(instruction, input, response), e.g. instruction=question,"
                                                       "response=answer; known layouts need none")
    template: str = setting("chat", "instruction rows: chat (the Gemma chat template), plain (Instruction:/Response:) "
                                    "or a template with {instruction} that ends with {response}")
    train_on: str = setting("model", "model: only the model turns (with <end_of_turn>) and the final <eos> are "
                                     "trained; all: every token (preference pairs: always their replies only)")
    max_seq_len: int = setting(1024, "input positions per packed row; an example of up to max_seq_len + 1 tokens "
                                     "fits")
    overflow: str = setting("truncate", "examples longer than a row: truncate (keep their start) or drop")
    packing: str = setting("pack", "pack (several examples per row) or pad (one example per row)")
    shuffle_buffer: int = setting(4096, "examples (or preference pairs) shuffled and packed together")
    seed: int = setting(0, "seed of the data order and of the validation split")
    val_fraction: float = setting(0.0, "hold out this fraction of the examples for validation (unless val_paths)")
    val_paths: tuple[str, ...] = setting((), "validation files, read like paths")
    split: str = setting("train", "the split of a Hub dataset to read")
    skip_bad_rows: bool = setting(False, "skip and count bad rows instead of stopping at the first")

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, want: str) -> GemmatuneError:
            return GemmatuneError(f"data.{field}: {value!r} is not valid; expected {want}.")

        if self.format not in FORMATS:
            raise bad("format", self.format, " or ".join(FORMATS))
        head, _, tail = self.template.partition("{response}")
        if self.template != "chat" and (tail or "{instruction}" not in head):
            # The response is the trained part, after the prompt: it must come last, once.
            raise bad("template", self.template, '"chat" or a template with {instruction} that ends with {response}')
        if self.train_on not in ("model", "all"):
            raise bad("train_on", self.train_on, "model or all")
        if self.overflow not in ("truncate", "drop"):
            raise bad("overflow", self.overflow, "truncate or drop")
        if self.packing not in ("pack", "pad"):
            raise bad("packing", self.packing, "pack or pad")
        if self.max_seq_len < 2:
            raise bad("max_seq_len", self.max_seq_len, "an integer of at least 2")
        if self.shuffle_buffer < 1:
            raise bad("shuffle_buffer", self.shuffle_buffer, "a positive integer")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", self.val_fraction, "a fraction in [0, 1)")
        known = {"instruction", "input", "response"}
        for ours, _ in self.columns:
            if ours not in known:
                raise bad("columns", ours, f"a mapping whose keys are among {', '.join(sorted(known))}")


TRACKERS = ("tensorboard", "wandb", "mlflow")  # report_to's choices (trackers.py holds them)

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = setting(8, "adapter rank r: each adapted projection W [in, out] gains A [in, r] @ B [r, out]")
    alpha: float = setting(16.0, "the adapters' output is scaled by alpha / rank")
    dropout: float = setting(0.0, "dropout on the adapters' input while training")
    targets: tuple[str, ...] = setting(LORA_TARGETS, "projections adapted: any of q, k, v, o (attention), gate, up, "
                                                     "down (feed-forward)")
    rslora: bool = setting(False, "rank-stabilised LoRA: scale by alpha / sqrt(rank) instead of alpha / rank")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise GemmatuneError(f"lora.rank: {self.rank!r} is not valid; expected a positive integer.")
        if not 0.0 <= self.dropout < 1.0:
            raise GemmatuneError(f"lora.dropout: {self.dropout!r} is not valid; expected a fraction in [0, 1).")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise GemmatuneError(f"lora.targets: {list(self.targets)!r} is not valid; expected distinct names "
                                 f"among {', '.join(LORA_TARGETS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


QUANT_KINDS = ("nf4", "int4", "int8")
QUANT_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the frozen base's projection weights are stored (QLoRA; quantize.py): `kind` nf4 (NormalFloat-4, the
    QLoRA paper's and bitsandbytes' code book), int4 or int8, one float32 scale per `block` consecutive weights
    along the input axis, and with `double` the scales themselves coded in 8 bits (bitsandbytes' nested form)."""

    kind: str
    block: int = 64
    double: bool = False

    def __post_init__(self) -> None:
        if self.kind not in QUANT_KINDS:
            raise GemmatuneError(f"quantize: {self.kind!r} is not valid; expected one of {', '.join(QUANT_KINDS)} "
                                 "(or none).")
        if self.block not in QUANT_BLOCKS:
            raise GemmatuneError(f"quantize_block: {self.block!r} is not valid; expected one of "
                                 f"{', '.join(map(str, QUANT_BLOCKS))}.")

    def describe(self) -> str:
        return f"{self.kind}, block {self.block}" + (", double-quantized scales" if self.double else "")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `gemmatune train` does; YAML sections `data:` and `lora:` fill the nested configs."""

    model: str = setting(EMBEDDED_MODEL, "a checkpoint directory (Hugging Face layout or a KerasHub preset), "
                                         "tiny (the embedded demo model, the default), a Hugging Face Hub id "
                                         "(google/gemma-2-2b-it[@revision]) or a Kaggle handle "
                                         "(keras/gemma2/keras/gemma2_2b_en/1)")
    output: str = setting("runs/gemmatune", "run directory: checkpoints, logs, config.yaml, the adapter")
    data: DataConfig = setting(DataConfig(), "what to train on and how it becomes batches")
    lora: LoraConfig = setting(LoraConfig(), "the adapters (with tune lora)")
    adapter: str = setting("", "start from this adapter directory (gemmatune's or PEFT's) instead of a fresh one")
    method: str = setting("sft", "what the model learns: sft (the next token of the data), dpo (to prefer the "
                                 "chosen over the rejected response of preference pairs) or distill (a teacher's "
                                 "next-token distribution, with --teacher)")
    tune: str = setting("lora", "what is trained: lora (adapters on a frozen base), or full (every weight; the "
                                "optimizer then holds two model-size buffers)")
    dpo_loss: str = setting("sigmoid", "method dpo: sigmoid (DPO), ipo, simpo or orpo (the last two need no "
                                       "reference model)")
    dpo_beta: float = setting(0.1, "method dpo: the preference strength beta (SimPO's beta, ORPO's lambda)")
    dpo_label_smoothing: float = setting(0.0, "method dpo, sigmoid and simpo losses: the probability that a "
                                              "pair's preference is flipped (conservative DPO)")
    simpo_gamma: float = setting(0.5, "dpo_loss simpo: the target reward margin gamma")
    teacher: str = setting("", "method distill: the teacher model (any --model form); it must share the "
                               "student's tokenizer")
    teacher_cache: str = setting("", "method distill: precompute the teacher's top-k log-probabilities into this "
                                     "directory (reused and resumed), then train from it without the teacher")
    kd_loss: str = setting("forward_kl", "method distill: forward_kl, reverse_kl or jsd (generalized "
                                         "Jensen-Shannon, mixed by kd_beta)")
    kd_temperature: float = setting(1.0, "method distill: both distributions at this temperature; the "
                                         "divergence is scaled by its square")
    kd_alpha: float = setting(0.5, "method distill: loss = alpha * divergence + (1 - alpha) * cross-entropy on "
                                   "the data's tokens")
    kd_beta: float = setting(0.5, "kd_loss jsd: the mixture's teacher weight (0: forward KL, 1: reverse KL)")
    kd_topk: int = setting(64, "with teacher_cache: teacher log-probabilities kept per position (the rest of the "
                               "vocabulary as one bucket)")
    dtype: str = setting("bfloat16", "base weights and compute: bfloat16 or float32; adapters and optimizer state "
                                     "are float32")
    quantize: str = setting("none", "store the frozen base's projection weights quantized (QLoRA): nf4, int4, int8 "
                                    "or none; adapters, norms and the embedding stay in dtype")
    quantize_block: int = setting(64, "with quantize: weights per scale, along each projection's input axis")
    double_quant: bool = setting(False, "with quantize: code the scales in 8 bits too (bitsandbytes' double "
                                        "quantization: about 0.37 fewer bits per weight at block 64)")
    max_steps: int = setting(0, "optimizer steps; 0: run `epochs` epochs")
    epochs: float = setting(1.0, "passes over the data when max_steps is 0 (fractions allowed)")
    batch_size: int = setting(8, "packed rows per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(2e-4, "peak learning rate")
    schedule: str = setting("cosine", "learning rate after warmup: cosine, linear or constant")
    warmup_steps: int = setting(0, "steps of linear warmup from 0 to lr")
    min_lr_ratio: float = setting(0.0, "the schedule's end, as a fraction of lr")
    weight_decay: float = setting(0.0, "AdamW weight decay (on the trained weights)")
    clip_norm: float = setting(1.0, "clip the gradients' global norm to this; 0: no clipping")
    adam_b1: float = setting(0.9, "AdamW beta1")
    adam_b2: float = setting(0.999, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    attention: str = setting("auto", "the attention kernel of full-sequence passes: auto (each platform's fastest "
                                     "that computes this model's attention exactly: README, Attention kernels), xla, "
                                     "flash (Pallas, GPU), cudnn (GPU, no soft-cap) or splash (TPU)")
    remat: str = setting("block", "recomputation in the backward pass: none, block (keep each layer's matrix "
                                  "products) or full (keep only each layer's input)")
    # Full [batch, seq, vocab] logits never exist, about 3 [chunk, vocab] float32 arrays do (the choice of 512:
    # BENCHMARKS.md).
    loss_chunk: int = setting(512, "positions per chunk of the loss computation")
    seed: int = setting(0, "seed of the adapters' initialisation and of dropout (the data order has data.seed)")
    log_every: int = setting(1, "steps between log lines")
    eval_every: int = setting(0, "steps between evaluations; 0: only at the end (when there is validation data)")
    eval_prompts: tuple[str, ...] = setting((), "chat prompts answered at each evaluation and logged; one prompt "
                                                "per value", commas=False)
    eval_max_new_tokens: int = setting(64, "tokens generated per eval prompt")
    eval_generate: bool = setting(False, "at each evaluation, answer validation examples' prompts with the current "
                                         "weights (greedy) and log exact match, contains, F1 and ROUGE-L against "
                                         "their references (val_exact_match, val_contains, val_f1, val_rouge_l); "
                                         "needs validation data of instruction or chat rows")
    eval_generate_examples: int = setting(64, "with eval_generate: the first this many validation examples are "
                                              "answered at each evaluation")
    save_every: int = setting(0, "steps between checkpoints; 0: only at the end")
    keep: int = setting(3, "checkpoints kept")
    resume: bool = setting(False, "continue from the latest checkpoint in output")
    overwrite: bool = setting(False, "replace an output directory that holds another run")
    nonfinite: str = setting("stop", "a NaN or inf loss or gradient: stop, or skip (the step's update is dropped "
                                     "and counted)")
    report_to: tuple[str, ...] = setting(("tensorboard",), "experiment trackers the metrics, evaluation texts and "
                                         "this config also go to (metrics.jsonl is always written): tensorboard, "
                                         "wandb, mlflow, or none")
    # Devices: see sharding.py. Empty: tensor parallelism over a host's devices (as far as the key/value heads
    # divide), data parallelism across hosts.
    mesh: str = setting("", "device mesh, e.g. data=2,model=4 (axes data, fsdp, model); empty: model parallel "
                            "within a host, data parallel across hosts")
    # Several processes (hosts): jax.distributed.initialize, from the environment (`distributed`) or from
    # coordinator_address, num_processes and process_id. Neither: one process.
    distributed: bool = setting(False, "several processes: find the cluster (TPU pod slice, SLURM, Open MPI, "
                                       "Kubernetes) in the environment")
    coordinator_address: str = setting("", "several processes: process 0's HOST:PORT")
    num_processes: int | None = setting(None, "several processes: how many")
    process_id: int | None = setting(None, "several processes: this one's index, 0 to num_processes - 1")

    def __post_init__(self) -> None:
        if self.method in ("lora", "full"):  # the meaning `method` had before dpo and distill
            raise GemmatuneError(f"method: {self.method!r} is now set by tune (--tune {self.method}); method is "
                                 "what the model learns: sft, dpo or distill.")
        choices = {"method": METHODS, "tune": ("lora", "full"), "dpo_loss": DPO_LOSSES, "kd_loss": KD_LOSSES,
                   "dtype": ("bfloat16", "float32"),
                   "schedule": ("cosine", "linear", "constant"), "remat": ("none", "block", "full"),
                   "attention": ("auto", *ATTENTION), "nonfinite": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GemmatuneError(f"{name}: {getattr(self, name)!r} is not valid; expected one of "
                                     f"{', '.join(allowed)}.")
        positive = ("batch_size", "grad_accum", "loss_chunk", "log_every", "keep", "eval_max_new_tokens",
                    "eval_generate_examples")
        for name in positive:
            if getattr(self, name) < 1:
                raise GemmatuneError(f"{name}: {getattr(self, name)!r} is not valid; expected a positive integer.")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise GemmatuneError(f"{name}: {getattr(self, name)!r} is not valid; expected 0 or more.")
        if not set(self.report_to) <= {*TRACKERS, "none"} or "none" in self.report_to and len(self.report_to) > 1:
            raise GemmatuneError(f"report_to: {','.join(self.report_to)!r} is not valid; expected any of "
                                 f"{', '.join(TRACKERS)} (comma-separated), or none.")
        if self.num_processes is not None and self.num_processes < 1:
            raise GemmatuneError(f"num_processes: {self.num_processes!r} is not valid; expected a positive integer.")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
            raise GemmatuneError(f"process_id: {self.process_id!r} is not valid; expected 0 to num_processes - 1 "
                                 f"({(self.num_processes or 1) - 1}).")
        if self.eval_generate and not (self.data.val_fraction > 0 or self.data.val_paths):
            raise GemmatuneError("eval_generate: answers validation examples, but there are none; set "
                                 "data.val_fraction (e.g. --val-fraction 0.1) or data.val_paths (--val-data FILE).")
        if self.quantize != "none":
            self.quantization()  # checks kind and block
            if self.tune == "full":
                raise GemmatuneError("quantize: a quantized base is frozen, but tune full trains every weight; "
                                     "use tune lora (QLoRA), or quantize none.")
        if self.method == "dpo":
            if self.tune == "full":
                raise GemmatuneError("method dpo trains LoRA adapters (its reference model is the base with them "
                                     "switched off, no second copy of the weights); use tune lora.")
            if self.dpo_beta <= 0 or not 0.0 <= self.dpo_label_smoothing < 0.5:
                raise GemmatuneError(f"dpo_beta must be positive and dpo_label_smoothing in [0, 0.5) (got "
                                     f"dpo_beta={self.dpo_beta}, dpo_label_smoothing={self.dpo_label_smoothing}).")
        if self.method == "distill":
            if not self.teacher:
                raise GemmatuneError("method distill needs a teacher: pass --teacher MODEL (a larger model with "
                                     "the student's tokenizer).")
            if self.kd_temperature <= 0 or not 0.0 <= self.kd_alpha <= 1.0 or not 0.0 <= self.kd_beta <= 1.0 \
                    or self.kd_topk < 1:
                raise GemmatuneError(f"kd_temperature must be positive, kd_alpha and kd_beta in [0, 1], kd_topk "
                                     f"positive (got kd_temperature={self.kd_temperature}, kd_alpha={self.kd_alpha}"
                                     f", kd_beta={self.kd_beta}, kd_topk={self.kd_topk}).")
        elif self.teacher or self.teacher_cache:
            raise GemmatuneError(f"teacher and teacher_cache are for method distill (method is {self.method}); "
                                 "pass --method distill, or leave them out.")
        if self.max_steps == 0 and self.epochs <= 0:
            raise GemmatuneError(f"epochs: {self.epochs!r} is not valid; expected a positive number "
                                 "(or set max_steps).")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.weight_decay < 0 or self.clip_norm < 0:
            raise GemmatuneError("lr must be positive, min_lr_ratio in [0, 1], weight_decay and clip_norm >= 0 "
                                 f"(got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}, "
                                 f"weight_decay={self.weight_decay}, clip_norm={self.clip_norm}).")

    def quantization(self) -> Quantization | None:
        """The base's quantization (quantize, quantize_block, double_quant), or None for quantize none."""
        return None if self.quantize == "none" else Quantization(self.quantize, self.quantize_block, self.double_quant)
