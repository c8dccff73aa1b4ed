"""`gemmatune export`: a base checkpoint and an adapter (gemmatune's or PEFT's) -> another tool's format.

    hf    the adapter merged into the weights: a Hugging Face Gemma2ForCausalLM or Gemma3ForCausalLM checkpoint (tied
          head, no lm_head; a multimodal Gemma 3 base gives its language model, text only), with the base's
          tokenizer and the chat template in tokenizer_config.json
    peft  the adapter alone, as a PEFT LoRA adapter for transformers + peft on the base checkpoint itself
          (Gemma3ForConditionalGeneration's module paths for a multimodal base)
    gguf  the merged weights as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it

The base is a Hugging Face directory, a KerasHub preset or a GGUF file (its vocabulary becomes the export's
tokenizer: tokenizer.model for hf, copied as it is for gguf). The adapter is checked against the base's config
before any weight is read, and refused if the base already has it merged. Merged outputs record the adapters
folded into them (config.json's "gemmatune" key; GGUF metadata), so that applying one again is refused. Every
output is written atomically (an interrupted export leaves the output as it was).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from gemmatune.atomic import refuse_to_replace
from gemmatune.checkpoint import adapter_quantization
from gemmatune.convert import gguf, load_model, model_config
from gemmatune.convert.common import WEIGHT_DTYPES, read_json
from gemmatune.convert.gguf_read import is_gguf
from gemmatune.convert.hf import TOKENIZER_FILES, checkpoint_is_multimodal, save_hf
from gemmatune.convert.kerashub import is_kerashub_preset
from gemmatune.convert.peft import load_adapter_for, merged_adapters, merged_record, save_peft
from gemmatune.errors import GemmatuneError
from gemmatune.lora import merge
from gemmatune.quantize import dequantize_tree, is_quantized
from gemmatune.tokenizer import (
    KERAS_SPM,
    TOKENIZER_JSON,
    TOKENIZER_MODEL,
    chat_template,
    gguf_metadata,
    gguf_sentencepiece,
)

FORMATS = ("hf", "peft", "gguf")
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template instead of tokenizer_config
GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16"}  # merged weights' dtype -> the GGUF writer's name for it


def export(model_dir: str | Path, adapter_dir: str | Path, fmt: str, output: str | Path, *, dtype: str = "auto",
           force: bool = False, log: TextIO | None = None) -> Path:
    """Export `adapter_dir` on the base `model_dir` as `fmt` (hf, peft or gguf) to `output` (a directory; a file
    for gguf, with its Ollama Modelfile beside it, `convert.gguf.modelfile_path`). dtype: the merged weights',
    "auto" (the base's), "float32" or "bfloat16"; for gguf also the GGUF writer's own types (f32, f16, bf16, q8_0).
    The PEFT adapter stays float32. An existing output (non-empty directory; for gguf the file or its Modelfile)
    is replaced only with force=True."""
    model_dir, adapter_dir, output = Path(model_dir), Path(adapter_dir), Path(output)
    if fmt not in FORMATS:
        raise GemmatuneError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}.")
    choices = ("auto", *WEIGHT_DTYPES, *(gguf.DTYPES if fmt == "gguf" else ()))
    if dtype not in choices:
        raise GemmatuneError(f"dtype {dtype!r} is not one of {', '.join(choices)} for {fmt} export.")
    if output.resolve() in (model_dir.resolve(), adapter_dir.resolve()):
        raise GemmatuneError(f"--output {output} is the model or adapter directory itself; choose another output "
                             "path.")
    _refuse_existing(output, fmt, force)  # before the (possibly long) loading; the writers check again
    cfg = model_config(model_dir)
    # Refuses an adapter of another base, or one already merged into this one, before the weights are read.
    adapters, lora_cfg = load_adapter_for(model_dir, adapter_dir, cfg)
    if fmt == "peft":
        return save_peft(output, adapters, lora_cfg, cfg, str(model_dir.resolve()),
                         multimodal=checkpoint_is_multimodal(model_dir), force=force)
    merged = [*merged_adapters(model_dir), merged_record(adapter_dir, adapters, lora_cfg)]
    # A QLoRA adapter was trained on the quantized base: it is merged into that base's dequantized weights (the
    # model that was trained), and so is any adapter on a base stored quantized (a bitsandbytes checkpoint).
    quant = adapter_quantization(adapter_dir)
    cfg, params = load_model(model_dir, dtype if dtype in WEIGHT_DTYPES else "auto", quant=quant)
    if any(is_quantized(v) for v in params["layers"].values()):
        what = quant.describe() if quant else "as stored in the checkpoint"
        print(f"the base was quantized ({what}) when the adapter was trained: merging into its dequantized "
              f"weights, written in {np.dtype(params['embed'].dtype)}", file=log or sys.stderr)
        params = dequantize_tree(params, cfg, params["embed"].dtype)
    params = merge(params, adapters, lora_cfg)
    tokenizer = (_gguf_tokenizer(model_dir, fmt, cfg.family) if is_gguf(model_dir)
                 else _tokenizer_with_template(model_dir, cfg.family))
    with tokenizer as tokenizer_dir:
        if fmt == "gguf":  # the GGUF writer reads tokenizer.model and writes the Gemma 2 chat template itself
            gguf_dtype = dtype if dtype in gguf.DTYPES else GGUF_DTYPES[str(np.dtype(params["embed"].dtype))]
            gguf.save_gguf(output, cfg, params, tokenizer_dir, dtype=gguf_dtype, force=force, merged_adapters=merged)
        else:
            save_hf(output, cfg, params, tokenizer_dir=tokenizer_dir, force=force, merged_adapters=merged)
    return output


def _refuse_existing(output: Path, fmt: str, force: bool) -> None:
    if fmt != "gguf":
        refuse_to_replace(output, force, "output")
        return
    if output.is_dir():
        raise GemmatuneError(f"{output}: is a directory; gguf export writes one file: name it (e.g. "
                             f"{output / 'model.gguf'}).")
    for path in (output, gguf.modelfile_path(output)):
        if path.exists() and not force:
            raise GemmatuneError(f"{path}: file exists; pass --force to replace it, or choose another output file.")


@contextlib.contextmanager
def _gguf_tokenizer(source: Path, fmt: str, family: str) -> Iterator[Path]:
    """The tokenizer of a GGUF base: for gguf export the file itself (the writer copies its vocabulary, scores,
    token types and chat template); for hf a temporary directory with tokenizer.model rebuilt from the file's
    vocabulary (tokenizer.gguf_sentencepiece) and a tokenizer_config.json with the file's chat template, or the
    family's released one when the file has none (Google's GGUF files carry none)."""
    if fmt == "gguf":
        yield source
        return
    template = gguf_metadata(source).get("tokenizer.chat_template") or chat_template(family)
    # What transformers needs to build Gemma's tokenizer from tokenizer.model alone; without mask_token=None,
    # transformers 5 adds a <mask> token past the vocabulary, one more than the embedding has rows.
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "mask_token": None, "chat_template": template}
    with tempfile.TemporaryDirectory(prefix="gemmatune-tokenizer-") as tmp:
        (Path(tmp) / TOKENIZER_MODEL).write_bytes(gguf_sentencepiece(source))
        (Path(tmp) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        yield Path(tmp)


@contextlib.contextmanager
def _tokenizer_with_template(model_dir: Path, family: str) -> Iterator[Path]:
    """A directory with the base's tokenizer files whose tokenizer_config.json holds a chat template: the base's
    own directory when it does, else a temporary copy with the template added (from chat_template.jinja if the
    base has one, else the instruct template of the model's family, Gemma 2's or Gemma 3's, that gemmatune trains
    with), so that the export stays atomic.
    A KerasHub preset's SentencePiece model becomes tokenizer.model (the same file under the Hugging Face name);
    its tokenizer.json is a Keras layer config and is left behind."""
    keras = is_kerashub_preset(model_dir)
    if keras and not (model_dir / KERAS_SPM).is_file():
        raise GemmatuneError(f"{model_dir}: no {KERAS_SPM}; an exported model needs the preset's tokenizer: "
                             "re-download the preset with its assets folder.")
    if not keras and not ((model_dir / TOKENIZER_JSON).is_file() or (model_dir / TOKENIZER_MODEL).is_file()):
        raise GemmatuneError(f"{model_dir}: no {TOKENIZER_JSON} or {TOKENIZER_MODEL}; an exported model needs the "
                             "base's tokenizer: copy the tokenizer files into the base model directory.")
    config_path = model_dir / TOKENIZER_CONFIG
    config = {} if keras or not config_path.is_file() else read_json(
        config_path, "re-download the base model's tokenizer files")
    if config.get("chat_template"):
        yield model_dir
        return
    jinja = model_dir / CHAT_TEMPLATE_FILE
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else chat_template(family)
    with tempfile.TemporaryDirectory(prefix="gemmatune-tokenizer-") as tmp:
        if keras:
            shutil.copyfile(model_dir / KERAS_SPM, Path(tmp) / TOKENIZER_MODEL)
            # What transformers needs to build Gemma's tokenizer from tokenizer.model alone.
            config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                      "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
        else:
            for name in TOKENIZER_FILES:
                if name != TOKENIZER_CONFIG and (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, Path(tmp) / name)
        (Path(tmp) / TOKENIZER_CONFIG).write_text(json.dumps({**config, "chat_template": template}, indent=2),
                                                  encoding="utf-8")
        yield Path(tmp)
