"""Where `--model` comes from: a local directory, the embedded model's name, a Hugging Face Hub id or a Kaggle
model handle, resolved to a local directory once per command. Downloads go through each service's own client, so
its cache, its login and its offline switch apply (huggingface_hub: HF_HOME / HF_HUB_CACHE, HF_TOKEN or
`hf auth login`, HF_HUB_OFFLINE=1; kagglehub: KAGGLEHUB_CACHE, KAGGLE_USERNAME + KAGGLE_KEY or
~/.kaggle/kaggle.json).

The order is decided by the text of the spec, so a mistyped path is never sent to a server:
  1. an existing path;
  2. `tiny`, the embedded demo model (config.EMBEDDED_MODEL);
  3. a configuration preset (gemma2-2b, ...): shapes without weights, refused with the Hub id to use instead
     (only `gemmatune plan` reads presets: resolve_config);
  4. `owner/name` or `owner/name@revision`: a Hugging Face Hub model;
  5. `owner/model/framework/variation[/version]`, optionally written `kaggle://...` (KerasHub's spelling): a Kaggle
     model; framework `keras` is a KerasHub preset, `transformers` a Hugging Face checkpoint;
  anything else is a local path that does not exist. A spec that starts like a path (/, ./, ../, ~) or ends with /
  is a path even when it also reads as an id.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gemmatune.config import DEFAULT_MODEL, EMBEDDED_MODEL, PRESET_HUB_IDS, PRESETS
from gemmatune.errors import GemmatuneError

if TYPE_CHECKING:
    from gemmatune.config import ModelConfig

HUB = "https://huggingface.co"
# What gemmatune reads from a Hugging Face checkpoint (convert/hf.py, tokenizer.py, export.py): nothing else is
# downloaded (no PyTorch .bin, GGUF or original/ folders). fnmatch patterns over repo paths; the shard pattern does
# not match files in sub-folders.
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja")
CONFIG = "config.json"

# Hugging Face repo ids: owner and name of letters, digits, '-', '_', '.'; a revision (branch, tag, commit) after '@'.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9_.-]+)(?:@(?P<revision>[^@\s]+))?")
KAGGLE_PREFIX = "kaggle://"
_KAGGLE = re.compile(r"(?P<owner>[\w.-]+)/(?P<model>[\w.-]+)/(?P<framework>[A-Za-z0-9]+)/(?P<variation>[\w.-]+)"
                     r"(?:/(?P<version>\d+))?")
# Kaggle's framework slugs: a four- or five-part spec whose third part is none of these is a path, not a handle.
KAGGLE_FRAMEWORKS = {"keras", "transformers", "jax", "flax", "pytorch", "tensorflow1", "tensorflow2", "tflite",
                     "tfjs", "pax", "maxtext", "gemmacpp", "ggml", "gguf", "coral", "scikitlearn", "mxnet", "onnx",
                     "tensorrtllm", "triton", "api", "other"}
READABLE_FRAMEWORKS = ("keras", "transformers")  # KerasHub presets and Hugging Face checkpoints

# --model's help, for every command that loads weights.
MODEL_HELP = (f"a checkpoint directory, `{EMBEDDED_MODEL}` (the embedded demo model), a Hugging Face Hub id "
              "(google/gemma-2-2b-it, optionally @revision) or a Kaggle handle (keras/gemma2/keras/gemma2_2b_en/1)")
CONFIG_PRESETS = ", ".join(p for p in PRESETS if p != EMBEDDED_MODEL)  # what only `plan` reads
CHOICES = (f"a checkpoint directory (Hugging Face layout or a KerasHub preset), `{EMBEDDED_MODEL}` (the embedded demo "
           "model), a Hugging Face Hub id such as google/gemma-2-2b-it (optionally @revision), or a Kaggle handle "
           "such as keras/gemma2/keras/gemma2_2b_en/1")


def resolve_model(spec: str) -> Path:
    """The local directory of the checkpoint `spec` names (see the module docstring for the order), downloaded
    into the Hugging Face or Kaggle cache first when it is an id; only the files gemmatune reads are fetched."""
    return _resolve(spec, config_only=False)


def resolve_config(spec: str) -> ModelConfig:
    """`--model` of `gemmatune plan`: what resolve_model takes, and configuration presets; of a Hub or Kaggle model
    only config.json is fetched."""
    from gemmatune.convert import model_config

    if Path(spec).expanduser().exists():
        return model_config(Path(spec).expanduser())  # a directory, or a config.json file
    if spec in PRESETS and spec != EMBEDDED_MODEL:
        return PRESETS[spec]
    return model_config(_resolve(spec, config_only=True))


def _resolve(spec: str, config_only: bool) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix.lower() != ".gguf":  # a GGUF file is a whole model (convert.load_model)
            raise GemmatuneError(f"--model {spec}: is a file; pass the checkpoint directory that holds it.")
        return path
    if spec == EMBEDDED_MODEL:
        return DEFAULT_MODEL
    if spec in PRESETS:
        hub_id = PRESET_HUB_IDS.get(spec)
        instead = (f"pass its weights' Hugging Face Hub id, --model {hub_id} (or {hub_id}-it, instruction-tuned)"
                   if hub_id else f"pass {CHOICES}")
        raise GemmatuneError(f"--model {spec}: a configuration preset (shapes only, for `gemmatune plan`) has no "
                             f"weights or tokenizer to load: {instead}.")
    if not _looks_like_path(spec):
        if m := _HUB_ID.fullmatch(spec):
            return _from_hub(m["repo"], m["revision"], config_only)
        handle = spec.removeprefix(KAGGLE_PREFIX)
        m = _KAGGLE.fullmatch(handle)
        if m and (m["framework"].lower() in KAGGLE_FRAMEWORKS or spec.startswith(KAGGLE_PREFIX)):
            if m["framework"].lower() not in READABLE_FRAMEWORKS:
                raise GemmatuneError(f"--model {spec}: gemmatune reads a Kaggle model's keras (KerasHub preset) or "
                                     f"transformers (Hugging Face) variations, not {m['framework']}: pick one of "
                                     f"those at https://www.kaggle.com/models/{m['owner']}/{m['model']}.")
            return _from_kaggle(handle, config_only)
    hint = f" (the Hub id is probably google/{spec})" if "/" not in spec and spec.lower().startswith("gemma") else ""
    presets = f", or a configuration preset ({CONFIG_PRESETS})" if config_only else ""
    raise GemmatuneError(f"--model {spec}: no such directory{hint}. Pass {CHOICES}{presets}.")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.endswith(("/", "\\")) or "\\" in spec


def _from_hub(repo: str, revision: str | None, config_only: bool) -> Path:
    import huggingface_hub as hf
    from huggingface_hub import errors

    where = f"{HUB}/{repo}"
    name = f"{repo}@{revision}" if revision else repo
    try:
        got = Path(hf.snapshot_download(repo, revision=revision, allow_patterns=[CONFIG] if config_only
                                        else list(HUB_FILES)))
    except errors.HFValidationError as e:
        raise GemmatuneError(f"--model {name}: not a valid Hugging Face Hub id ({e}).") from None
    except errors.GatedRepoError:
        if hf.get_token():
            why = f"the token in use has no access: accept the license at {where} with that account"
        else:
            why = f"accept the license at {where} and log in with `hf auth login` or set HF_TOKEN"
        raise GemmatuneError(f"--model {name}: a gated model; {why}, then run again.") from None
    except errors.RevisionNotFoundError:
        raise GemmatuneError(f"--model {name}: {repo} has no revision {revision!r} on the Hugging Face Hub; see "
                             f"{where}/tree/main for its branches and commits.") from None
    except errors.RepositoryNotFoundError:
        private = "" if hf.get_token() else " (a private model also needs `hf auth login` or HF_TOKEN)"
        raise GemmatuneError(f"--model {name}: no local directory {repo}, and no model {repo} on the Hugging Face "
                             f"Hub{private}. Check the id, e.g. google/gemma-2-2b-it.") from None
    except errors.LocalEntryNotFoundError:  # offline, or no connection, and not in the cache
        cache = hf.constants.HF_HUB_CACHE
        why = ("HF_HUB_OFFLINE is set" if hf.constants.HF_HUB_OFFLINE else
               f"the Hugging Face Hub ({hf.constants.ENDPOINT}) could not be reached")
        raise GemmatuneError(f"--model {name}: {why} and {name} is not in the cache ({cache}). Download it once with "
                             "a connection (check the network or proxy; unset HF_HUB_OFFLINE), then run "
                             "again.") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise GemmatuneError(f"--model {name}: the Hugging Face Hub answered {status} ({e}). Try again later, "
                             "or pass a local checkpoint directory.") from None
    except Exception as e:  # the HTTP client's connection errors (httpx, or requests in older huggingface_hub)
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        raise GemmatuneError(f"--model {name}: downloading from the Hugging Face Hub ({hf.constants.ENDPOINT}) "
                             f"failed ({type(e).__name__}: {e}). Check the network, then run again (finished files "
                             "stay in the cache).") from None
    if not (got / CONFIG).is_file():
        raise GemmatuneError(f"--model {name}: the repository has no {CONFIG} ({where}); gemmatune reads Gemma 2 "
                             "checkpoints in the Hugging Face Transformers layout.")
    return got


def _from_kaggle(handle: str, config_only: bool) -> Path:
    import kagglehub
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    # kagglehub logs its progress to stdout; stdout is for generated text (and JSON) only.
    for h in logging.getLogger("kagglehub").handlers:
        if type(h) is logging.StreamHandler and not isinstance(h.stream, _Stderr):
            h.stream = _Stderr()
    owner, model = handle.split("/")[:2]
    page = f"https://www.kaggle.com/models/{owner}/{model}"
    try:
        got = Path(kagglehub.model_download(handle, path=CONFIG if config_only else None))
    except KaggleApiHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise GemmatuneError(f"--model {handle}: Kaggle refused access ({status}). Accept the model's license "
                                 f"at {page} and set up Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
                                 "~/.kaggle/kaggle.json from kaggle.com > Settings > API).") from None
        if status == 404:
            raise GemmatuneError(f"--model {handle}: no such model on Kaggle and no such local directory. Check the "
                                 f"handle (owner/model/framework/variation[/version]) at {page}.") from None
        raise GemmatuneError(f"--model {handle}: Kaggle answered {status} ({e}). Try again later.") from None
    except requests.ConnectionError as e:
        pinned = "" if _KAGGLE.fullmatch(handle)["version"] else (
            "; an unversioned handle asks Kaggle for its latest version each time: add /VERSION to use the cache "
            "offline")
        raise GemmatuneError(f"--model {handle}: Kaggle could not be reached ({type(e).__name__}). Check the "
                             f"network, then run again{pinned}.") from None
    return got.parent if config_only else got


class _Stderr:
    """Whatever sys.stderr is when a log line is written (a handler keeps the stream it was given)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
