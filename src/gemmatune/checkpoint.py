"""Train-state checkpoints, adapter files and the output-directory guard.

Layout of a run directory (`--output`):
    run.json                        {"config_digest": ...}: which configuration this run belongs to
    checkpoints/step-00000100/      state.safetensors (every train-state leaf, keyed by its tree path) + meta.json
    adapter/                        adapter.safetensors + adapter_config.json
    metrics.jsonl, tensorboard/, wandb/, mlflow/, config.yaml, loss.png, summary.txt, data/   (written by loop.py)

Every directory that must appear whole (a checkpoint, an adapter) is staged in a hidden sibling
`.NAME.partial-PID`, fsynced, and renamed into place. A rename is atomic, so whenever the writer is killed a reader
sees the previous directory or the new one, never half of one. Directories are removed the same way in reverse
(renamed to `.NAME.old-PID`, then deleted), and the next writer deletes whatever a killed one left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gemmatune.atomic import (
    LEFTOVER,
    refuse_to_replace,
    remove_dir,
    remove_leftovers,
    staged_dir,
    write_text,
)
from gemmatune.config import LoraConfig, ModelConfig, Quantization
from gemmatune.convert.common import fields_of, read_json
from gemmatune.errors import GemmatuneError
from gemmatune.layout import adapter_shapes
from gemmatune.safetensors_io import SafetensorsReader, write_safetensors
from gemmatune.sharding import place

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
STATE_FORMAT = "gemmatune-train-state"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "gemmatune-lora"
ADAPTER_VERSION = 1
BASE_QUANTIZATION = "base_quantization"  # adapter_config.json: {"kind", "block", "double"} of a QLoRA base
RUN_FILE = "run.json"
# What a run writes into its directory: the only names --overwrite may delete.
RUN_OUTPUTS = frozenset({CHECKPOINTS, RUN_FILE, "metrics.jsonl", "samples.jsonl", "tensorboard", "wandb", "mlflow",
                         "adapter", "config.yaml", "loss.png", "summary.txt", "data"})
# The numbers that fix the shapes of an adapter's tensors; an adapter only fits a base that agrees on all of them.
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim")
# TrainConfig fields that do not change the run's math: changing them must not stop a resume (more steps, another
# logging or saving cadence).
# The mesh and the processes are left out too: every mesh computes the same step (to float rounding), so a run may
# resume on other devices.
NOT_IN_DIGEST = frozenset({"resume", "overwrite", "output", "log_every", "save_every", "keep", "eval_every",
                           "eval_prompts", "eval_max_new_tokens", "eval_generate",
                           "eval_generate_examples", "max_steps", "epochs", "mesh", "distributed",
                           "coordinator_address", "num_processes", "process_id", "report_to"})

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _tree_key(path: tuple[Any, ...], separator: str) -> str:
    # "opt_state/1/0/mu/q_proj/a": readable, and unique because a tree's paths are.
    return jax.tree_util.keystr(path, simple=True, separator=separator)


def _some(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Train-state checkpoints


def _is_prng_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a leaf as stored: PRNG keys as their raw key data. Works on abstract leaves too."""
    if _is_prng_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    elif not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)  # Python scalars
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _write_state(path: Path, state: Any) -> None:
    flat = [(_tree_key(p, "/"), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]]
    # The PRNG implementation is not visible in the raw key data, and an abstract template cannot name it.
    impls = {name: str(jax.random.key_impl(leaf)) for name, leaf in flat if _is_prng_key(leaf)}
    layout = [(name, *_stored_spec(leaf)) for name, leaf in flat]
    # A generator, so that only one leaf at a time is copied to host memory.
    host = ((name, np.asarray(jax.random.key_data(leaf) if name in impls else leaf)) for name, leaf in flat)
    write_safetensors(path, layout, host, {"format": STATE_FORMAT, "prng_keys": json.dumps(impls)})


def _checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only complete ones carry a step-N name: see the module docstring."""
    ckpt_dir = run_dir / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: Any, meta: dict[str, Any], keep: int) -> Path:
    """Write `state` (any pytree of arrays, PRNG keys and scalars) and `meta` (JSON) as RUN/checkpoints/step-N,
    then keep only the newest `keep` checkpoints.

    A checkpoint of a step that already exists is left as it is: the state at a step of one run is the same state,
    and replacing a directory cannot be atomic (for a moment neither the old nor the new one would exist)."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    final = ckpt_dir / f"step-{step:08d}"
    meta_text = json.dumps({"format": STATE_FORMAT, "step": step, "meta": meta}, indent=2)  # fails before writing
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(ckpt_dir)  # before writing: a killed save's partial state may hold as much disk as this one
    if not final.exists():
        with staged_dir(final) as staged:
            _write_state(staged / STATE_FILE, state)
            write_text(staged / META_FILE, meta_text)
    for old in _checkpoints(Path(run_dir))[:-keep]:
        remove_dir(old)
    return final


def _describe(shape: tuple[int, ...], dtype: np.dtype, prng_key: bool) -> str:
    return f"{'PRNG key data' if prng_key else 'an array'} of shape {shape} and dtype {dtype}"


def _different_config(path: Path, detail: str) -> GemmatuneError:
    return GemmatuneError(
        f"{path}: {detail}. The checkpoint was written by a different configuration (e.g. another LoRA rank or "
        "targets, another method or dtype) and cannot continue this one: start a new --output directory or pass "
        "--overwrite to replace that run.")


def load_checkpoint(path: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restore a checkpoint into the structure of `template` (the state as freshly built by loop.py, or its
    `jax.eval_shape`): every leaf must be stored with the template's path, shape and dtype. Restored leaves take the
    template's sharding (numpy leaves stay numpy). Returns (state, the meta given to save_checkpoint)."""
    path = Path(path)
    what = "the checkpoint is incomplete or was modified; resume from another one or start with --overwrite"
    saved = read_json(path / META_FILE, what)
    if "meta" not in saved:
        raise GemmatuneError(f"{path / META_FILE}: no 'meta' field; {what}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [_tree_key(p, "/") for p, _ in flat]
    with SafetensorsReader(path / STATE_FILE) as reader:
        missing = [n for n in names if n not in reader.tensors]
        if missing:
            raise _different_config(path, f"key(s) {_some(missing)} missing")
        extra = sorted(set(reader.tensors) - set(names))
        if extra:
            raise _different_config(path, f"unexpected key(s) {_some(extra)}")
        impls = json.loads(reader.metadata.get("prng_keys", "{}"))
        leaves = []
        for name, (_, leaf) in zip(names, flat):
            info = reader.tensors[name]
            stored, wanted = (*_stored_spec(info), name in impls), (*_stored_spec(leaf), _is_prng_key(leaf))
            if stored != wanted:
                raise _different_config(path, f"key {name!r} holds {_describe(*stored)}, this run expects "
                                               f"{_describe(*wanted)}")
            value = reader.read(name)
            if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
                # Each device (of every process) receives its slice of the leaf; a PRNG key as its raw data.
                where = getattr(leaf, "sharding", None)
                value = jax.device_put(value) if where is None else place(value, where)
            if name in impls:
                value = jax.random.wrap_key_data(value, impl=impls[name])
                if value.dtype != leaf.dtype:
                    raise _different_config(path, f"key {name!r} is a {impls[name]} PRNG key, this run uses "
                                                  f"{leaf.dtype}")
            leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves), saved["meta"]


# ---------------------------------------------------------------------------------------------------------------
# Adapter files


def check_adapter_shapes(source: Path, shapes: Mapping[str, tuple[int, ...]], lora_cfg: LoraConfig,
                          model_cfg: ModelConfig) -> None:
    want = {f"{name}.{part}": shape for name, parts in adapter_shapes(model_cfg, lora_cfg).items()
            for part, shape in parts.items()}
    why = (f"rank {lora_cfg.rank} and targets {', '.join(lora_cfg.targets)} on this base need "
           f"{_some(list(want))}")
    missing, extra = [k for k in want if k not in shapes], sorted(set(shapes) - set(want))
    if missing or extra:
        found = f"missing {_some(missing)}" if missing else f"unexpected {_some(extra)}"
        raise GemmatuneError(f"{source}: adapter tensors do not match its configuration: {found} ({why}).")
    for k, shape in want.items():
        if tuple(shapes[k]) != shape:
            raise GemmatuneError(f"{source}: adapter tensor {k!r} has shape {tuple(shapes[k])}, but rank "
                                 f"{lora_cfg.rank} on this base needs {shape}.")


def save_adapter(out_dir: str | Path, lora_params: Any, lora_cfg: LoraConfig, model_cfg: ModelConfig,
                 base_model: str, *, force: bool = False, quant: Quantization | None = None) -> Path:
    """Write adapter.safetensors (tensors as given, keys like "q_proj.a") and adapter_config.json into `out_dir`,
    atomically. An existing non-empty `out_dir` is replaced only with force=True. `quant`: the base was
    quantized in training (QLoRA), recorded as "base_quantization" so that merging uses the weights trained on."""
    out = Path(out_dir)
    refuse_to_replace(out, force, "adapter")
    tensors = {_tree_key(p, "."): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(lora_params)[0]}
    check_adapter_shapes(out, {k: np.shape(v) for k, v in tensors.items()}, lora_cfg, model_cfg)
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
              "dropout": lora_cfg.dropout, "targets": list(lora_cfg.targets), "rslora": lora_cfg.rslora,
              "scale": lora_cfg.scale, "base_model": base_model,
              "base_config": {k: getattr(model_cfg, k) for k in BASE_FIELDS}}
    if quant is not None:
        config[BASE_QUANTIZATION] = dataclasses.asdict(quant)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}  # adapters are small: all on the host at once is fine
    with staged_dir(out) as staged:
        write_safetensors(staged / ADAPTER_FILE, [(k, a.shape, a.dtype) for k, a in arrays.items()],
                          arrays.items(), {"format": ADAPTER_FORMAT})
        write_text(staged / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return out


def adapter_quantization(adapter_dir: str | Path) -> Quantization | None:
    """How the base was quantized while a gemmatune adapter was trained (None: not quantized, or a PEFT
    adapter)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    cfg = read_json(path, "re-export the adapter") if path.is_file() else {}
    if cfg.get("format") != ADAPTER_FORMAT or BASE_QUANTIZATION not in cfg:
        return None
    with fields_of(path, "re-export the adapter"):
        q = cfg[BASE_QUANTIZATION]
        return Quantization(str(q["kind"]), int(q["block"]), bool(q["double"]))


def load_adapter(adapter_dir: str | Path, model_cfg: ModelConfig) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                           LoraConfig]:
    """Read an adapter written by save_adapter, refusing one that does not fit `model_cfg`."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise GemmatuneError(f"{d}: no such adapter directory (expected {ADAPTER_FILE} and {ADAPTER_CONFIG}).")
    cfg_path = d / ADAPTER_CONFIG
    cfg = read_json(cfg_path, "re-export the adapter (gemmatune writes it at the end of training)")
    if cfg.get("format") != ADAPTER_FORMAT:
        what = "a PEFT adapter" if "peft_type" in cfg else f"format {cfg.get('format')!r}"
        raise GemmatuneError(f"{cfg_path}: this is {what}, not a gemmatune adapter (format {ADAPTER_FORMAT!r}).")
    if cfg.get("version") != ADAPTER_VERSION:
        raise GemmatuneError(f"{cfg_path}: adapter format version {cfg.get('version')!r}; this gemmatune reads "
                             f"version {ADAPTER_VERSION}. Use the gemmatune version that wrote it.")
    with fields_of(cfg_path, "re-export the adapter"):
        lora_cfg = LoraConfig(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), dropout=float(cfg["dropout"]),
                              targets=tuple(cfg["targets"]), rslora=bool(cfg["rslora"]))
        base = {k: cfg["base_config"][k] for k in BASE_FIELDS}
    differ = [f"{k} {base[k]}, this model has {getattr(model_cfg, k)}" for k in BASE_FIELDS
              if base[k] != getattr(model_cfg, k)]
    if differ:
        raise GemmatuneError(f"{d}: adapter was trained on a base with {'; '.join(differ)}. Use it with the base "
                             f"it was trained on ({cfg.get('base_model')}).")
    params: dict[str, dict[str, np.ndarray]] = {}
    with SafetensorsReader(d / ADAPTER_FILE) as reader:
        check_adapter_shapes(reader.path, {k: i.shape for k, i in reader.tensors.items()}, lora_cfg, model_cfg)
        for key in reader.tensors:
            target, part = key.split(".")
            params.setdefault(target, {})[part] = reader.read(key)
    return params, lora_cfg


# ---------------------------------------------------------------------------------------------------------------
# Output directory guard


def config_digest(cfg: Mapping[str, Any]) -> str:
    """A stable hash of the resolved config (as JSON data), over the fields that change what the run computes."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _is_run_output(name: str) -> bool:
    m = LEFTOVER.match(name)
    return (m["name"] if m else name) in RUN_OUTPUTS


def _is_leftover(name: str) -> bool:
    """Whether `name` is what a killed writer left of one of a run's outputs."""
    m = LEFTOVER.match(name)
    return m is not None and m["name"] in RUN_OUTPUTS


def check_run_dir(run_dir: str | Path, config_digest: str, *, resume: bool, overwrite: bool) -> Path | None:
    """Whether a run of the configuration `config_digest` may use `run_dir`, reading only (a refused or failed
    start leaves the directory as it was): returns the checkpoint to resume from, or None for a fresh start.
    `claim_run_dir` then makes the directory the run's."""
    d = Path(run_dir)
    if resume and overwrite:
        raise GemmatuneError(f"--resume continues the run in {d} and --overwrite replaces it: pass only one.")
    if d.exists() and not d.is_dir():
        raise GemmatuneError(f"--output {d}: exists and is not a directory; choose another --output.")
    # What killed writers left (a killed start's staged data, say) belongs to no run and counts as nothing.
    entries = [n for n in sorted(p.name for p in d.iterdir()) if not _is_leftover(n)] if d.exists() else []
    is_run = RUN_FILE in entries or CHECKPOINTS in entries
    if entries and not is_run:
        raise GemmatuneError(f"--output {d}: not empty ({_some(entries)}) and not a gemmatune run; gemmatune never "
                             "deletes files it did not write, even with --overwrite. Choose a new or empty --output.")
    if resume:
        if not is_run:
            raise GemmatuneError(f"nothing to resume in {d}: it holds no run. Start without --resume.")
        old = read_json(d / RUN_FILE, "cannot tell which configuration this run used; start a new --output "
                                       "or pass --overwrite").get("config_digest")
        if old != config_digest:
            raise GemmatuneError(
                f"cannot resume the run in {d}: its configuration (digest {old}) differs from this one "
                f"({config_digest}). A setting that changes training (model, data, LoRA, optimizer, ...) changed "
                "since that run, so resuming would not continue the same run. Restore the original settings to "
                "resume it, or start afresh with --overwrite or another --output.")
        found = latest_checkpoint(d)
        if found is None:
            raise GemmatuneError(f"nothing to resume in {d}: no complete checkpoint (the run stopped before its "
                                 "first save). Start it again with --overwrite.")
        return found
    if is_run:
        if not overwrite:
            raise GemmatuneError(f"--output {d} holds a previous run: pass --resume to continue it or --overwrite "
                                 "to replace it, or choose another --output.")
        foreign = [n for n in entries if not _is_run_output(n)]
        if foreign:
            raise GemmatuneError(f"--output {d} holds files gemmatune did not write ({_some(foreign)}); --overwrite "
                                 "replaces only a run's own files. Move them away or choose another --output.")
    return None


def claim_run_dir(run_dir: str | Path, config_digest: str, *, overwrite: bool, keep: Collection[str] = ()) -> None:
    """Make `run_dir`, accepted by `check_run_dir`, the run's: delete what killed writers left and, with
    overwrite, the previous run's outputs (never a file gemmatune did not write), then record the configuration
    in run.json. `keep`: names the starting run has already staged there."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    # run.json stays until it is replaced below, so a kill midway leaves a directory still seen as a run.
    for name in sorted(p.name for p in d.iterdir()):
        path = d / name
        if name in keep or name == RUN_FILE or not _is_run_output(name):
            continue
        if overwrite or _is_leftover(name):  # a killed writer's leftovers go whatever the mode
            if path.is_dir():
                remove_dir(path)
            else:
                path.unlink()
    write_text(d / RUN_FILE, json.dumps({"config_digest": config_digest}))
