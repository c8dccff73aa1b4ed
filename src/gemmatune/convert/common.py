"""What every converter shares: the dtype rule, zero-filled layer stacks and per-layer placement into them, JSON
reading, the one way an error names its file and field, and the config.json key where gemmatune records what it
merged. The Hugging Face and KerasHub loaders, PEFT, GGUF, export and the checkpoint files all use these; none of
them borrows another's private helpers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gemmatune import quantize, sharding
from gemmatune.config import ModelConfig, Quantization
from gemmatune.errors import GemmatuneError
from gemmatune.layout import PROJECTIONS, Params, param_structs

# The dtypes weights are loaded and computed in. float16 is left out on purpose: Gemma's activations overflow it
# (NaN logits, transformers #30004, #36822); a float16 checkpoint loads as float32.
WEIGHT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {v: k for k, v in WEIGHT_DTYPES.items()}

# config.json key (transformers keeps unknown keys as attributes and ignores them) under which a checkpoint that
# gemmatune wrote records what it holds: {"merged_adapters": [{"digest", "scale", "source"}, ...]}.
GEMMATUNE_KEY = "gemmatune"
MERGED_ADAPTERS = "merged_adapters"


def check_dtype(dtype: str) -> None:
    """Refuse a requested load dtype other than "auto", "float32" or "bfloat16", saying why float16 is missing."""
    if dtype != "auto" and dtype not in WEIGHT_DTYPES:
        why = " (float16 overflows in Gemma's activations: use bfloat16)" if dtype == "float16" else ""
        raise GemmatuneError(f"dtype {dtype!r} is not one of auto, {', '.join(WEIGHT_DTYPES)}{why}.")


def load_dtype(dtype: str, stored: np.dtype) -> np.dtype:
    """The dtype weights stored as `stored` load in: "auto" keeps bfloat16 and loads anything else (float32, and
    float16, which overflows in Gemma) as float32; "float32" / "bfloat16" as asked."""
    check_dtype(dtype)
    if dtype == "auto":
        return WEIGHT_DTYPES["bfloat16" if np.dtype(stored) == WEIGHT_DTYPES["bfloat16"] else "float32"]
    return WEIGHT_DTYPES[dtype]


@functools.partial(jax.jit, static_argnums=(0, 1))
def zero_stacks(structs: tuple[tuple[str, jax.ShapeDtypeStruct], ...],
                shardings: tuple[tuple[str, NamedSharding], ...] | None) -> Params:
    """Every layer stack ({key: [L, ...]}, keys as `flat_layers` gives them), zero-filled, from one compiled
    program: each compiled program keeps some host memory (~2 MB on CPU), so one program rather than one per
    stack. With shardings ({key: NamedSharding}, frozen as a tuple of pairs), each device allocates only its
    own part."""
    out = {key: jnp.zeros(s.shape, s.dtype) for key, s in structs}
    return out if shardings is None else {k: jax.lax.with_sharding_constraint(out[k], s) for k, s in shardings}


@functools.partial(jax.jit, donate_argnums=0)
def set_layer(stacks: Params, layer: Params, i: jax.Array) -> Params:
    """Write one layer's arrays ({key: [...]}) at index i of the stacks ({key: [L, ...]}). The stacks are
    donated, so XLA updates them in place instead of allocating a second copy of the model; callers wait for the
    result (jax.block_until_ready) so that the host holds one layer at a time."""
    return {key: jax.lax.dynamic_update_index_in_dim(s, layer[key].astype(s.dtype), i, axis=0)
            for key, s in stacks.items()}


def flat_layers(tree: Params) -> dict[str, Any]:
    """A layer tree ({name: array, or a quantized weight's {field: array}}) as flat {"name" or "name/field": leaf}."""
    out = {}
    for name, v in tree.items():
        out.update({f"{name}/{f}": a for f, a in v.items()} if isinstance(v, dict) else {name: v})
    return out


def nest_layers(flat: dict[str, Any]) -> Params:
    """`flat_layers` undone."""
    out: Params = {}
    for key, v in flat.items():
        name, _, field = key.partition("/")
        if field:
            out.setdefault(name, {})[field] = v
        else:
            out[name] = v
    return out


def place_params(cfg: ModelConfig, tensors: Iterator[tuple[str, int | None, np.ndarray]], dtype: np.dtype, *,
                 stacked: bool = True, mesh: Mesh | None = None, quant: Quantization | None = None) -> Params:
    """The parameter tree from (gemmatune name, layer index or None, host array in gemmatune's layout) in
    `hf_keys` order (the embedding, each layer's tensors, the final norm), on the default device or split over
    `mesh` as sharding.param_shardings lays it out. Each tensor is cast to `dtype` and placed straight onto its
    devices (on a mesh, every device receives only its slice), then written a layer at a time into preallocated
    stacks (stacked=False: the per-layer list that decoding takes): beyond the loaded model, host memory holds one
    tensor and one layer at most. Waiting for each placement keeps asynchronous dispatch from reading ahead while
    earlier host copies are still alive.

    With `quant`, each projection weight is quantized (quantize.quantize) as soon as it is on its devices, so the
    model in full precision never exists anywhere; only one tensor at a time does. A tensor already quantized
    (a dict of fields: a bitsandbytes checkpoint) is placed as it is."""
    stacks = sharding.param_shardings(cfg, mesh, quant=quant)["layers"] if mesh is not None else None
    # One layer's shardings (the stacks' without the layer axis) and the top-level tensors'.
    placement = sharding.param_shardings(cfg, mesh, stacked=False, quant=quant) if mesh is not None else None
    unquantized = (sharding.param_shardings(cfg, mesh, stacked=False)
                   if mesh is not None and quant is not None else None)  # where a tensor goes to be quantized
    structs = flat_layers(param_structs(cfg, dtype, quant)["layers"])
    params: Params = {"layers": zero_stacks(tuple(structs.items()), None if stacks is None else
                                            tuple(sorted(flat_layers(stacks).items())))
                      if stacked else []}

    def put(host: np.ndarray, at: Any) -> jax.Array:
        return jax.block_until_ready(jax.device_put(host) if at is None else sharding.place(host, at))

    for i, group in itertools.groupby(tensors, key=lambda t: t[1]):
        arrays: Params = {}
        for name, _, host in group:
            at = None if placement is None else placement[name] if i is None else placement["layers"][i][name]
            if isinstance(host, dict):  # already quantized
                arrays[name] = {f: put(np.asarray(a), None if at is None else at[f]) for f, a in host.items()}
            elif quant is not None and name in PROJECTIONS:
                w = put(host, None if unquantized is None else unquantized["layers"][i][name])
                q = quantize.quantize(w, name, quant)
                arrays[name] = jax.block_until_ready(q if at is None else jax.device_put(q, at))
                del w, q
            else:
                arrays[name] = put(host.astype(dtype, copy=False), at)
            del host
        if i is None:
            params.update(arrays)
        elif not stacked:
            params["layers"].append(arrays)
        else:
            params["layers"] = jax.block_until_ready(set_layer(params["layers"], flat_layers(arrays), i))
        del arrays
    if stacked:
        params["layers"] = nest_layers(params["layers"])
    return params


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing file, invalid JSON or another JSON value is an error that names the
    file and ends with `what` (what the file should be, or what to do)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GemmatuneError(f"{path}: missing; {what}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmatuneError(f"{path}: not valid JSON ({e}); {what}.") from None
    if not isinstance(d, dict):
        raise GemmatuneError(f"{path}: expected a JSON object; {what}.")
    return d


@contextlib.contextmanager
def fields_of(path: Path, fix: str) -> Iterator[None]:
    """Read fields of the file `path` inside this block: a missing field (KeyError), a field of the wrong type
    (TypeError, ValueError) or a value refused by a config's own check (GemmatuneError) becomes one error that names
    the file and the field and ends with `fix`."""
    try:
        yield
    except KeyError as e:
        raise GemmatuneError(f"{path}: missing field {e.args[0]!r}; {fix}.") from None
    except (TypeError, ValueError) as e:
        raise GemmatuneError(f"{path}: a field has the wrong type ({e}); {fix}.") from None
    except GemmatuneError as e:
        raise GemmatuneError(f"{path}: {e}") from None
